"""The inputs of `mesanet-prepare` as units of work, one shard each: local text / JSON lines (plain, .gz, .zst) /
Parquet files, the shard files of a prepared tfds dataset, or the arrow files of a Hugging Face `datasets`
directory saved with `save_to_disk`. A unit is small and picklable; `documents(unit, …)` reads it in a worker.

File kinds by name: *.jsonl / *.json (one JSON object per line, text in `field`), *.parquet (column `field`),
*.txt (one document per file, or per non-empty line with `text_lines`), *.cor (one per non-empty line); each may
end in .gz or .zst except Parquet. A directory stands for every such file below it.
"""
import dataclasses
import glob
import gzip
import io
import json
import os
from collections.abc import Iterator

TEXT_KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".txt": "text", ".cor": "lines", ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".zst")
BATCH = 1024  # records read at a time from tfds / Parquet / arrow


@dataclasses.dataclass(frozen=True)
class Unit:
  """kind: jsonl | text | lines | parquet | tfds | hf; path: a file (tfds: the dataset name); start/stop: the
  records of a tfds split this unit covers."""
  kind: str
  path: str
  start: int = 0
  stop: int = 0

  @property
  def name(self) -> str:
    return f"{self.path}[{self.start}:{self.stop}]" if self.kind == "tfds" else self.path


def _file_kind(path: str) -> str | None:
  stem = path[:-len(c)] if (c := next((c for c in COMPRESSIONS if path.endswith(c)), "")) else path
  kind = TEXT_KINDS.get(os.path.splitext(stem)[1])
  if kind == "parquet" and c:
    raise ValueError(f"--input {path!r}: Parquet compresses inside the file; a .gz/.zst around it is not read")
  return kind


def file_units(inputs: list[str]) -> list[Unit]:
  """Files, directories (every known file below) and globs, sorted and without repeats."""
  files = []
  for entry in inputs:
    matches = sorted(glob.glob(entry)) or [entry]
    for match in matches:
      if os.path.isdir(match):
        files += [os.path.join(root, f) for root, _, names in os.walk(match) for f in names
                  if _file_kind(os.path.join(root, f))]
      elif not os.path.isfile(match):
        raise ValueError(f"--input {entry!r}: no such file or directory")
      elif _file_kind(match) is None:
        raise ValueError(f"--input {match!r}: unknown kind (expected .jsonl, .json, .txt, .cor or .parquet, "
                         f"optionally .gz/.zst)")
      else:
        files.append(match)
  files = sorted(set(os.path.abspath(f) for f in files))
  if not files:
    raise ValueError(f"--input {','.join(inputs)!r} holds no .jsonl/.json/.txt/.cor/.parquet file")
  return [Unit(_file_kind(f), f) for f in files]


def tfds_units(name: str, split: str, data_dir: str | None) -> list[Unit]:
  """One unit per file of a prepared tfds split (its records, by index)."""
  import tensorflow_datasets as tfds
  try:
    info = tfds.builder(name, data_dir=data_dir).info
    lengths = info.splits[split].shard_lengths
  except Exception as e:  # tfds raises several types for a missing dataset or split
    raise ValueError(f"--tfds_name {name!r} split {split!r} is not prepared in {data_dir!r}: {e}") from None
  starts = [sum(lengths[:i]) for i in range(len(lengths))]
  return [Unit("tfds", f"{name}/{split}@{data_dir or ''}", s, s + n) for s, n in zip(starts, lengths)]


def hf_units(directory: str, split: str) -> list[Unit]:
  """One unit per arrow file of a `datasets` directory saved with save_to_disk (a DatasetDict: its `split`)."""
  try:
    import datasets
  except ImportError as e:
    raise ValueError("--hf_dataset needs the `datasets` package (pip install '.[data]')") from e
  try:
    dataset = datasets.load_from_disk(directory)
  except (FileNotFoundError, ValueError) as e:
    raise ValueError(f"--hf_dataset {directory!r}: not a saved `datasets` directory ({e})") from None
  if isinstance(dataset, datasets.DatasetDict):
    if split not in dataset:
      raise ValueError(f"--hf_split {split!r} is not in {directory!r} (splits: {sorted(dataset)})")
    dataset = dataset[split]
  return [Unit("hf", f["filename"]) for f in dataset.cache_files]


def _open_text(path: str):
  if path.endswith(".gz"):
    return gzip.open(path, "rt", encoding="utf-8", errors="replace")
  if path.endswith(".zst"):
    import zstandard
    return io.TextIOWrapper(zstandard.open(path, "rb"), encoding="utf-8", errors="replace")
  return open(path, encoding="utf-8", errors="replace")


def _field(record: dict, field: str, where: str) -> str:
  if not isinstance(record, dict) or field not in record:
    raise ValueError(f"{where}: no field {field!r} (set --field)")
  value = record[field]
  return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def documents(unit: Unit, field: str = "text", text_lines: bool = False) -> Iterator[str]:
  """The unit's documents, in order (empty ones skipped)."""
  if unit.kind == "text" and not text_lines:
    with _open_text(unit.path) as f:
      text = f.read()
    if text.strip():
      yield text
  elif unit.kind in ("text", "lines", "jsonl"):
    with _open_text(unit.path) as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        if unit.kind != "jsonl":
          yield line.rstrip("\n")
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{unit.path}:{number}: not JSON ({e})") from None
        text = _field(record, field, f"{unit.path}:{number}")
        if text.strip():
          yield text
  elif unit.kind == "parquet":
    import pyarrow.parquet as pq
    parquet = pq.ParquetFile(unit.path)
    if field not in parquet.schema_arrow.names:
      raise ValueError(f"{unit.path}: no column {field!r} (set --field; columns: {parquet.schema_arrow.names})")
    for batch in parquet.iter_batches(batch_size=BATCH, columns=[field]):
      yield from (str(v) for v in batch.column(0).to_pylist() if v)
  elif unit.kind == "tfds":
    import tensorflow_datasets as tfds
    name_split, data_dir = unit.path.rsplit("@", 1)
    name, split = name_split.rsplit("/", 1)
    source = tfds.data_source(name, split=f"{split}[{unit.start}:{unit.stop}]", data_dir=data_dir or None,
                              download=False)
    for start in range(0, len(source), BATCH):
      for record in source.__getitems__(range(start, min(start + BATCH, len(source)))):
        yield _field(record, field, unit.name)
  elif unit.kind == "hf":
    import datasets
    dataset = datasets.Dataset.from_file(unit.path)
    if field not in dataset.column_names:
      raise ValueError(f"{unit.path}: no column {field!r} (set --field; columns: {dataset.column_names})")
    for batch in dataset.select_columns([field]).iter(batch_size=BATCH):
      yield from (str(v) for v in batch[field] if v)
  else:
    raise ValueError(f"unknown input kind {unit.kind!r}")
