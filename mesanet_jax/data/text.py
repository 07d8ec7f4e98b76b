"""Text data: tokenizers (bytes by default, SentencePiece optional), the default English corpus, local text files
packed into fixed-length windows, and tfds datasets through `tfds.data_source`.

Packing: documents are tokenized, joined with a BOS token before each one, and cut into non-overlapping windows of
seq_len + 1 tokens (stride seq_len), so every token of the stream is a target once. No loss on BOS (paper G.1).
"""
import importlib.util
import os
from pathlib import Path

import numpy as np

# gensim ships the Lee corpus (300 English news articles, ~360 kB, one per line) with its wheel; it is real prose
# and arrives with `pip install`, so the default run never downloads anything. gensim itself is never imported.
DEFAULT_CORPUS = "gensim:test/test_data/lee_background.cor"


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255; id 0 (NUL, absent from text) is BOS."""
  vocab_size = 256
  bos_id = 0

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids if i != self.bos_id).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """A SentencePiece model file (needs the `sentencepiece` package); BOS is the model's bos id."""

  def __init__(self, path: str):
    try:
      import sentencepiece as spm
    except ImportError as e:
      raise ValueError("data.tokenizer is a SentencePiece model but `sentencepiece` is not installed") from e
    if not os.path.isfile(path):
      raise ValueError(f"data.tokenizer: cannot read SentencePiece model {path!r}")
    self.sp = spm.SentencePieceProcessor(model_file=path)
    self.vocab_size = self.sp.get_piece_size()
    self.bos_id = max(self.sp.bos_id(), 0)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.sp.encode(text), np.int32)

  def decode(self, ids) -> str:
    return self.sp.decode([int(i) for i in ids])


def make_tokenizer(name: str):
  """"bytes" or the path of a SentencePiece .model file."""
  return ByteTokenizer() if name == "bytes" else SentencePieceTokenizer(name)


def resolve_path(path: str) -> Path:
  """A file path, or "package:relative/path" for a file shipped inside an installed package."""
  if ":" in path and not os.path.exists(path):
    package, relative = path.split(":", 1)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
      raise ValueError(f"data.path {path!r}: package {package!r} is not installed (it ships the default corpus; "
                       f"run `bash launch/install.sh`)")
    return Path(list(spec.submodule_search_locations)[0]) / relative
  return Path(path)


def read_documents(paths: str) -> list[str]:
  """Documents from comma-separated files (or directories of *.txt); one document per non-empty line for .cor
  files, one per file otherwise."""
  docs = []
  for entry in [p for p in paths.split(",") if p]:
    path = resolve_path(entry)
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    for file in files:
      try:
        text = file.read_text(encoding="utf-8", errors="replace")
      except OSError as e:
        raise ValueError(f"data.path: cannot read {str(file)!r} ({e.strerror or e})") from None
      docs += [line for line in text.splitlines() if line.strip()] if file.suffix == ".cor" else [text]
  if not docs:
    raise ValueError(f"data.path {paths!r} holds no text")
  return docs


def pack_documents(docs: list[str], tokenizer) -> np.ndarray:
  """One token stream [N]: BOS doc BOS doc …"""
  parts = []
  for doc in docs:
    parts += [np.array([tokenizer.bos_id], np.int32), tokenizer.encode(doc)]
  return np.concatenate(parts)


class PackedWindows:
  """Random-access source over a token stream: example i = stream[i·T : i·T + T + 1] as next-token (inputs,
  targets), mask 0 where the target is BOS."""

  def __init__(self, stream: np.ndarray, seq_len: int, bos_id: int):
    if len(stream) < seq_len + 1:
      raise ValueError(f"the text has {len(stream)} tokens, fewer than data.seq_len + 1 = {seq_len + 1}")
    self.stream, self.seq_len, self.bos_id = stream, seq_len, bos_id

  def __len__(self) -> int:
    return (len(self.stream) - 1) // self.seq_len

  def __getitem__(self, index: int) -> dict:
    start = int(index) * self.seq_len
    window = self.stream[start:start + self.seq_len + 1]
    return {"inputs": window[:-1], "targets": window[1:], "mask": (window[1:] != self.bos_id).astype(np.float32)}


def text_sources(paths: str, tokenizer, seq_len: int, eval_fraction: float):
  """(train, eval) PackedWindows; the last `eval_fraction` of the documents is held out."""
  docs = read_documents(paths)
  n_eval = max(1, int(round(len(docs) * eval_fraction))) if len(docs) > 1 else 0
  train_docs, eval_docs = docs[:len(docs) - n_eval], docs[len(docs) - n_eval:]
  train = PackedWindows(pack_documents(train_docs, tokenizer), seq_len, tokenizer.bos_id)
  evals = PackedWindows(pack_documents(eval_docs or docs, tokenizer), seq_len, tokenizer.bos_id)
  return train, evals


class TfdsDocuments:
  """Random-access source over a prepared tfds dataset: record i's `feature` tokenized, BOS-prefixed, cut or
  padded (pad = BOS, masked) to seq_len + 1."""

  def __init__(self, name: str, split: str, data_dir: str | None, feature: str, tokenizer, seq_len: int):
    try:
      import tensorflow_datasets as tfds
    except ImportError as e:
      raise ValueError("data.source='tfds' needs tensorflow-datasets (pip install '.[data]')") from e
    try:
      self.source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises several types for a missing or unprepared dataset
      raise ValueError(f"data.tfds_name {name!r} (split {split!r}) is not prepared in data_dir {data_dir!r}: "
                       f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    self.feature, self.tokenizer, self.seq_len = feature, tokenizer, seq_len

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    text = self.source[int(index)][self.feature]
    text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
    ids = np.concatenate([[self.tokenizer.bos_id], self.tokenizer.encode(text)])[:self.seq_len + 1]
    valid = np.zeros(self.seq_len + 1, bool)
    valid[1:len(ids)] = True
    ids = np.pad(ids, (0, self.seq_len + 1 - len(ids)), constant_values=self.tokenizer.bos_id).astype(np.int32)
    return {"inputs": ids[:-1], "targets": ids[1:], "mask": valid[1:].astype(np.float32)}
