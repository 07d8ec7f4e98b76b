"""Tokenize a corpus once into ArrayRecord shards (`shards.py`): one shard per input unit, in worker processes.

Deterministic: a shard depends on its unit, the tokenizer and the settings only (not on the number of workers or
hosts). Resumable: a shard whose sidecar exists is skipped. Several hosts share the work with `slice_=(i, n)`:
host i prepares the units k with k mod n = i into the same (shared) directory; whichever run finds every shard done
writes the manifest (running the whole command again afterwards writes it too, skipping every shard).
"""
import concurrent.futures
import dataclasses
import itertools
import json
import multiprocessing
import os
import time

import grain

from mesanet_jax.data import readers, shards, text

_PROGRESS = None  # the worker's queue of (documents, tokens) counts for the progress bar
_TOKENIZERS = {}


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the shards depend on besides their inputs; recorded in every sidecar and the manifest."""
  tokenizer: str  # "bytes", or the absolute path of a SentencePiece model / tokenizer.json (not compared)
  sha256: str
  vocab_size: int
  bos_id: int
  dtype: str
  window: int  # 0: one record per document; N: windows of N tokens cut from the BOS-separated stream
  field: str
  text_lines: bool


def settings_for(tokenizer_spec: str, window: int, field: str, text_lines: bool) -> Settings:
  spec = tokenizer_spec if tokenizer_spec == "bytes" else os.path.abspath(tokenizer_spec)
  tokenizer = text.make_tokenizer(spec)
  if window == 1 or window < 0:
    raise ValueError(f"--window must be 0 (documents) or >= 2 tokens, got {window}")
  return Settings(spec, text.fingerprint(tokenizer), tokenizer.vocab_size, tokenizer.bos_id,
                  shards.token_dtype(tokenizer.vocab_size), window, field, text_lines)


class _Tokens(grain.IterDataset):
  """A stream of token arrays as the one-feature elements grain's packer takes (read once, never restored)."""

  def __init__(self, arrays):
    super().__init__()
    self.arrays = arrays

  def __iter__(self):
    return _TokensIterator(iter(self.arrays))


class _TokensIterator(grain.DatasetIterator):

  def __init__(self, arrays):
    super().__init__()
    self.arrays = arrays

  def __next__(self):
    return {"tokens": next(self.arrays)}

  def get_state(self):
    return {}

  def set_state(self, state):
    raise NotImplementedError("a prepare stream is read once")


def _encoded_documents(unit: readers.Unit, settings: Settings, counts: dict):
  """The unit's documents as int32 token arrays that begin with BOS, tokenized a batch at a time."""
  if settings.tokenizer not in _TOKENIZERS:
    _TOKENIZERS[settings.tokenizer] = text.make_tokenizer(settings.tokenizer)
  tokenizer = _TOKENIZERS[settings.tokenizer]
  documents = readers.documents(unit, settings.field, settings.text_lines)
  while batch := list(itertools.islice(documents, readers.BATCH)):
    encoded = [text.with_bos(ids, settings.bos_id) for ids in tokenizer.encode_batch(batch)]
    tokens = sum(len(e) for e in encoded)
    counts["documents"] += len(batch)
    counts["tokens"] += tokens
    if _PROGRESS is not None:
      _PROGRESS.put((len(batch), tokens))
    yield from encoded


def prepare_shard(unit: readers.Unit, path: str, settings: Settings) -> dict:
  """Writes one shard and then its sidecar; returns the sidecar."""
  from array_record.python import array_record_module
  counts = {"documents": 0, "tokens": 0, "records": 0}
  stream = _encoded_documents(unit, settings, counts)
  if settings.window:
    packed = grain.experimental.ConcatThenSplitIterDataset(_Tokens(stream),
                                                           length_struct={"tokens": settings.window})
    stream = (w["tokens"][w["tokens_segment_ids"] > 0] for w in packed)  # the last window is not padded
  writer = array_record_module.ArrayRecordWriter(f"{path}.tmp", shards.WRITER_OPTIONS)
  for record in stream:
    writer.write(shards.encode(record, settings.dtype))
    counts["records"] += 1
  writer.close()
  os.replace(f"{path}.tmp", path)
  sidecar = {"path": os.path.basename(path), "source": unit.name, **counts, "settings": dataclasses.asdict(settings)}
  shards.write_json(f"{path}.json", sidecar)
  return sidecar


def _start_worker(progress):
  global _PROGRESS
  _PROGRESS = progress
  os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker


def _read_sidecar(path: str, unit: readers.Unit, settings: Settings) -> dict | None:
  try:
    with open(f"{path}.json") as f:
      sidecar = json.load(f)
  except FileNotFoundError:
    return None
  same = lambda a: {k: v for k, v in a.items() if k != "tokenizer"}  # hosts may keep the tokenizer elsewhere
  if same(sidecar["settings"]) != same(dataclasses.asdict(settings)) or sidecar["source"] != unit.name:
    raise ValueError(f"{path} was prepared from {sidecar['source']!r} with other settings "
                     f"({sidecar['settings']}); use another --out, or the same inputs and flags")
  return sidecar


def prepare(units: list[readers.Unit], out: str, settings: Settings, workers: int = 1,
            slice_: tuple[int, int] = (0, 1), progress: bool = True) -> dict:
  """Prepares this slice's missing shards of `units` into `out`, in `workers` processes (0: in this one).
  Returns {"written", "skipped", "documents", "tokens" (of the shards written, from their sidecars), "seconds",
  "manifest" (its path, or None while other slices' shards are missing)}."""
  index, count = slice_
  if not 0 <= index < count:
    raise ValueError(f"--slice must be i/n with 0 <= i < n, got {index}/{count}")
  os.makedirs(out, exist_ok=True)
  paths = [os.path.join(out, shards.shard_name(k, len(units))) for k in range(len(units))]
  mine = [k for k in range(len(units)) if k % count == index]
  todo = [k for k in mine if _read_sidecar(paths[k], units[k], settings) is None]
  done = {"documents": 0, "tokens": 0}  # for the progress bar only: the workers' queue may still hold some at the end
  written = []  # the sidecars of the shards written here
  start = time.perf_counter()
  bar = None
  if progress and todo:
    from tqdm import tqdm
    bar = tqdm(total=len(todo), unit="shard", desc="prepare", dynamic_ncols=True)

  def show(finished: int):
    if bar is not None:
      rate = done["tokens"] / max(time.perf_counter() - start, 1e-9)
      bar.set_postfix_str(f"{done['tokens'] / 1e6:.1f}M tokens, {rate / 1e6:.2f}M tokens/s", refresh=False)
      bar.update(finished)
      bar.refresh()

  if todo and workers == 0:  # in this process, one shard after another
    for k in todo:
      written.append(prepare_shard(units[k], paths[k], settings))
      done["documents"] += written[-1]["documents"]
      done["tokens"] += written[-1]["tokens"]
      show(1)
  elif todo:
    context = multiprocessing.get_context("spawn")  # no fork of a process that imported jax
    queue = context.Queue()
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(todo)), mp_context=context,
                                                initializer=_start_worker, initargs=(queue,)) as pool:
      pending = {pool.submit(prepare_shard, units[k], paths[k], settings) for k in todo}
      while pending:
        finished, pending = concurrent.futures.wait(pending, timeout=1.0,
                                                    return_when=concurrent.futures.FIRST_COMPLETED)
        while not queue.empty():
          documents, tokens = queue.get()
          done["documents"] += documents
          done["tokens"] += tokens
        written += [future.result() for future in finished]  # a worker's error stops the run
        show(len(finished))
  if bar is not None:
    bar.close()
  seconds = time.perf_counter() - start
  totals = {key: sum(sidecar[key] for sidecar in written) for key in ("documents", "tokens")}
  return {"written": len(todo), "skipped": len(mine) - len(todo), **totals, "seconds": seconds,
          "manifest": write_manifest(units, out, paths, settings)}


def write_manifest(units: list[readers.Unit], out: str, paths: list[str], settings: Settings) -> str | None:
  """Gathers the sidecars into manifest.json once every shard exists; returns its path (None if some are missing)."""
  sidecars = [_read_sidecar(path, unit, settings) for path, unit in zip(paths, units)]
  if any(s is None for s in sidecars):
    return None
  for sidecar in sidecars:
    del sidecar["settings"]
  manifest = {"format": shards.FORMAT, "tokenizer": {"spec": settings.tokenizer, "sha256": settings.sha256,
                                                     "vocab_size": settings.vocab_size, "bos_id": settings.bos_id},
              "dtype": settings.dtype, "window": settings.window, "field": settings.field,
              "documents": sum(s["documents"] for s in sidecars), "tokens": sum(s["tokens"] for s in sidecars),
              "shards": sidecars}
  path = os.path.join(out, shards.MANIFEST)
  shards.write_json(path, manifest)
  return path

