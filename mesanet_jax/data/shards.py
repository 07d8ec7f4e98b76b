"""The on-disk format `mesanet-prepare` writes and `data.source="arrayrecord"` reads: a directory of ArrayRecord
shards (group size 1, so any record is read on its own), one per input unit, and `manifest.json`.

A record is one token sequence that begins with BOS, stored as little-endian uint16 (vocabulary ≤ 65,536) or
uint32: a whole document, or a window of `window` tokens cut from the BOS-separated stream of one shard's documents
(the last window of a shard may be shorter). Each shard has a sidecar `<shard>.json` (its source and counts) written
after the shard itself, so a shard with a sidecar is finished; the manifest gathers the sidecars once all exist.
"""
import json
import os

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "mesanet-tokens/1"
WRITER_OPTIONS = "group_size:1"  # one record per chunk: random access reads one record


def token_dtype(vocab_size: int) -> str:
  return "uint16" if vocab_size <= 2**16 else "uint32"


def shard_name(index: int, count: int) -> str:
  return f"shard-{index:05d}-of-{count:05d}.array_record"


def encode(tokens: np.ndarray, dtype: str) -> bytes:
  return tokens.astype(np.dtype(dtype).newbyteorder("<"), copy=False).tobytes()


def write_json(path: str, value) -> None:
  """Atomically (write, then rename), so a reader never sees half a file."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
    f.write("\n")
  os.replace(tmp, path)


def read_manifest(directory: str) -> dict:
  path = os.path.join(directory, MANIFEST)
  try:
    with open(path) as f:
      manifest = json.load(f)
  except OSError as e:
    raise ValueError(f"data.path {directory!r}: cannot read {MANIFEST} ({e.strerror or e}); prepare the corpus with "
                     f"mesanet-prepare (a manifest is written once every shard is done)") from None
  if manifest.get("format") != FORMAT:
    raise ValueError(f"data.path {directory!r}: {MANIFEST} has format {manifest.get('format')!r}, expected {FORMAT!r}")
  return manifest


class ShardRecords:
  """Random access over the token records of some shards of a prepared directory: record i → array [N] of the
  shards' dtype (BOS first; read-only, over the record's bytes: the loader converts whole batches to int32). One
  ArrayRecord reader per shard, opened at its first read (so a process holds the index of the shards it read, ~8
  bytes per record); a record is read as the range [i, i + 1): array_record's list read, which grain's
  ArrayRecordDataSource uses, goes through a thread pool and took 1.8× as long per packed window, and 3-5× as long
  per record read 64 at a time (RESULTS.md "Pretraining data"). `_getitems` is grain's batched read."""

  def __init__(self, directory: str, shards: list[dict], dtype: str):
    self.paths = [os.path.join(directory, s["path"]) for s in shards]
    self.ends = np.cumsum([s["records"] for s in shards])
    self.starts = self.ends - [s["records"] for s in shards]
    self.dtype = np.dtype(dtype).newbyteorder("<")
    self.readers = [None] * len(self.paths)

  def __len__(self) -> int:
    return int(self.ends[-1])

  def __getitem__(self, index: int) -> np.ndarray:
    return self._getitems([index])[0]

  def _getitems(self, indices) -> list[np.ndarray]:
    """Records `indices` (grain's batched read, `SupportsBatchedReadRandomAccessDataSource`)."""
    indices = np.asarray(indices, np.int64)
    shards = np.searchsorted(self.ends, indices, side="right")
    positions = (indices - self.starts[shards]).tolist()
    records = []
    for shard, position in zip(shards.tolist(), positions):
      if self.readers[shard] is None:
        from array_record.python import array_record_module
        self.readers[shard] = array_record_module.ArrayRecordReader(self.paths[shard], "readahead_buffer_size:0")
      records.append(np.frombuffer(self.readers[shard].read(position, position + 1)[0], self.dtype))
    return records

  def __getstate__(self) -> dict:  # grain's worker processes open their own readers
    return dict(self.__dict__, readers=[None] * len(self.paths))
