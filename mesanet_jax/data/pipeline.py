"""grain pipelines from `config.data`: sources → row streams (`rows.py`: packed windows of documents, or synthetic
examples) → this process's rows of every global batch → global jax.Arrays.

Sources: "synthetic" (examples, a pure function of (seed, index)), "text" (local files tokenized at start),
"tfds" (a prepared tfds dataset, tokenized on the fly) and "arrayrecord" (token shards written by
`mesanet-prepare`). Text sources are documents that begin with BOS, packed by grain's ConcatThenSplitIterDataset;
the global batch sequence depends on (data.seed, train.batch_size, step) only, so a run resumes on any number of
processes and workers; the iterator state is checkpointed with the train state (`state.py`).
"""
import dataclasses
import functools
import os

import grain
import jax

from mesanet_jax.data import rows, shards, synthetic, text

NUM_SYNTHETIC = 2**40  # synthetic examples per split; indices never wrap in practice


@dataclasses.dataclass
class Documents:
  """A random-access source of documents (integer token arrays that begin with BOS: int32, or the shards' uint16 /
  uint32), packed into windows of seq_len + 1 tokens."""
  source: object
  bos_id: int
  seq_len: int


def task_config(data) -> synthetic.TaskConfig:
  return synthetic.TaskConfig(seq_len=data.seq_len, vocab_size=data.vocab_size, num_pairs=data.num_pairs,
                              dim=data.dim, noise_std=data.noise_std)


def make_sources(data):
  """(train, eval, tokenizer): synthetic sources (tokenizer None) or `Documents`. For "arrayrecord",
  data.tokenizer "" becomes the manifest's tokenizer (so the run's config.json names it)."""
  if data.source == "synthetic":
    config = task_config(data)
    return (synthetic.SyntheticSource(data.task, config, data.seed, NUM_SYNTHETIC),
            synthetic.SyntheticSource(data.task, config, data.seed + 1_000_003, NUM_SYNTHETIC), None)
  if data.source == "arrayrecord":
    return _arrayrecord_sources(data)
  tokenizer = text.make_tokenizer(data.tokenizer)
  if data.source == "text":
    docs = text.read_documents(data.path)
    n_eval = max(1, int(round(len(docs) * data.eval_fraction))) if len(docs) > 1 else 0
    tokens = [text.with_bos(t, tokenizer.bos_id) for t in tokenizer.encode_batch(docs)]
    train, evals = tokens[:len(tokens) - n_eval], tokens[len(tokens) - n_eval:] or tokens
    return (Documents(train, tokenizer.bos_id, data.seq_len), Documents(evals, tokenizer.bos_id, data.seq_len),
            tokenizer)
  if data.source == "tfds":
    make = lambda split: Documents(TfdsDocuments(data.tfds_name, split, data.tfds_data_dir or None,
                                                 data.tfds_feature, tokenizer), tokenizer.bos_id, data.seq_len)
    return make(data.tfds_split), make(data.tfds_eval_split), tokenizer
  raise ValueError(f"data.source must be 'synthetic', 'text', 'tfds' or 'arrayrecord', got {data.source!r}")


def _arrayrecord_sources(data):
  manifest = shards.read_manifest(data.path)
  recorded = manifest["tokenizer"]
  if not data.tokenizer:
    data.tokenizer = recorded["spec"]
  tokenizer = text.make_tokenizer(data.tokenizer)
  if text.fingerprint(tokenizer) != recorded["sha256"]:
    raise ValueError(f"data.tokenizer {data.tokenizer!r} is not the tokenizer {data.path!r} was prepared with "
                     f"({recorded['spec']!r}, sha256 {recorded['sha256'][:12]}…); set data.tokenizer='' to use it")
  listed = manifest["shards"]
  if not 1 <= data.eval_shards < len(listed):
    raise ValueError(f"data.eval_shards must be in [1, {len(listed) - 1}] (held-out shards of the "
                     f"{len(listed)} in {data.path!r}; one shard per input file), got {data.eval_shards}")
  split = len(listed) - data.eval_shards
  make = lambda part: Documents(shards.ShardRecords(os.path.abspath(data.path), part, manifest["dtype"]),
                                tokenizer.bos_id, data.seq_len)
  return make(listed[:split]), make(listed[split:]), tokenizer


class TfdsDocuments:
  """Random access over a prepared tfds dataset: record i's `feature`, tokenized, BOS first."""

  def __init__(self, name: str, split: str, data_dir: str | None, feature: str, tokenizer):
    try:
      import tensorflow_datasets as tfds
    except ImportError as e:
      raise ValueError("data.source='tfds' needs tensorflow-datasets (pip install '.[data]')") from e
    try:
      self.source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises several types for a missing or unprepared dataset
      raise ValueError(f"data.tfds_name {name!r} (split {split!r}) is not prepared in data_dir {data_dir!r}: "
                       f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    self.feature, self.tokenizer = feature, tokenizer

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int):
    value = self.source[int(index)][self.feature]
    value = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
    return text.with_bos(self.tokenizer.encode(value), self.tokenizer.bos_id)


def _rows(source, batch_size: int, shuffle_seed: int | None) -> dict:
  """`rows.Batches`' make_row (row → that row's stream) and examples (a group of rows' elements → examples)."""
  if isinstance(source, Documents):
    documents = grain.MapDataset.source(source.source)
    documents = (documents.shuffle(seed=shuffle_seed) if shuffle_seed is not None else documents).repeat(None)
    return {"make_row": functools.partial(rows.packed_row, documents, batch_size=batch_size, seq_len=source.seq_len),
            "examples": functools.partial(rows.window_examples, bos_id=source.bos_id)}
  return {"make_row": functools.partial(rows.example_row, grain.MapDataset.source(source), batch_size=batch_size),
          "examples": rows.stack}


def train_dataset(source, data, batch_size: int) -> rows.Batches:
  """Endless batches: this process's rows of every global batch of `batch_size` examples; shuffled by data.seed."""
  return rows.Batches(batch_size=batch_size, num_workers=data.num_workers, **_rows(source, batch_size, data.seed))


def eval_batches(source, batch_size: int, num_batches: int) -> list[dict]:
  """This process's rows of the first `num_batches` held-out global batches (the same at every evaluation)."""
  batches = rows.Batches(batch_size=batch_size, **_rows(source, batch_size, None))
  return [next(batches) for _ in range(num_batches)]


def to_global(batch: dict, shardings: dict) -> dict:
  """This process's numpy batch → global jax.Arrays, each sharded by `shardings[key]` (batch over data, fsdp)."""
  return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in batch.items()}
