"""Text data: tokenizers (bytes by default, a Hugging Face `tokenizers` tokenizer.json such as GPT-2's byte-level
BPE, or SentencePiece), the default English corpus and local text files read as documents. Documents become token
streams that begin with BOS (`with_bos`); packing them into training windows is `mesanet_jax.data.rows`.
"""
import hashlib
import importlib.util
import os
from pathlib import Path

import numpy as np

# gensim ships the Lee corpus (300 English news articles, ~360 kB, one per line) with its wheel; it is real prose
# and arrives with `pip install`, so the default run never downloads anything. gensim itself is never imported.
DEFAULT_CORPUS = "gensim:test/test_data/lee_background.cor"


BOS_CANDIDATES = ("<|endoftext|>", "<s>", "<|begin_of_text|>", "<bos>", "[BOS]")  # first found is BOS


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255; id 0 (NUL, absent from text) is BOS."""
  vocab_size = 256
  bos_id = 0
  spec = "bytes"

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

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
    self.spec = path
    self.sp = spm.SentencePieceProcessor(model_file=path)
    self.vocab_size = self.sp.get_piece_size()
    self.bos_id = max(self.sp.bos_id(), 0)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.sp.encode(text), np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(ids, np.int32) for ids in self.sp.encode(texts)]

  def decode(self, ids) -> str:
    return self.sp.decode([int(i) for i in ids])


class HuggingFaceTokenizer:
  """A `tokenizers` tokenizer.json (e.g. GPT-2's byte-level BPE, vocabulary 50,257); BOS is its first special token
  among BOS_CANDIDATES (GPT-2: <|endoftext|> = 50256), which the text never produces."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer
    try:
      self.tokenizer = Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a plain Exception for a missing or malformed file
      raise ValueError(f"data.tokenizer: cannot read tokenizer.json {path!r} ({e})") from None
    self.spec = path
    self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
    ids = [self.tokenizer.token_to_id(t) for t in BOS_CANDIDATES]
    if all(i is None for i in ids):
      raise ValueError(f"data.tokenizer {path!r} has none of the special tokens {BOS_CANDIDATES} to use as BOS")
    self.bos_id = next(i for i in ids if i is not None)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    return [np.asarray(e.ids, np.int32) for e in encodings]

  def decode(self, ids) -> str:
    return self.tokenizer.decode([int(i) for i in ids if i != self.bos_id])


def make_tokenizer(spec: str):
  """"bytes" (or ""), a SentencePiece .model file or a Hugging Face tokenizer.json (any name ending in .json)."""
  if spec in ("", "bytes"):
    return ByteTokenizer()
  return HuggingFaceTokenizer(spec) if spec.endswith(".json") else SentencePieceTokenizer(spec)


def fingerprint(tokenizer) -> str:
  """sha256 of the tokenizer's file ("bytes" for the byte tokenizer): shards and runs agree on the tokenizer."""
  if tokenizer.spec == "bytes":
    return "bytes"
  with open(tokenizer.spec, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def with_bos(tokens: np.ndarray, bos_id: int) -> np.ndarray:
  """[1 + N] int32: BOS, then the document's tokens."""
  return np.concatenate([np.array([bos_id], np.int32), tokens.astype(np.int32, copy=False)])


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


