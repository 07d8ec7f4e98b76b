"""grain pipelines from `config.data`: source → shuffle(seed) → repeat → this process's shard
[process_index::process_count] → batch → iterator (threads, optional worker processes), and global jax.Arrays.

Every example is a pure function of (seed, index), so the order is deterministic for a given process count; the
iterator's state is checkpointed with the train state (`grain.checkpoint.CheckpointSave`). Resuming with another
process count is not supported (the shard slicing changes).
"""
import grain
import jax
import numpy as np

from mesanet_jax.data import synthetic, text

NUM_SYNTHETIC = 2**40  # synthetic examples per split; indices never wrap in practice


def task_config(data) -> synthetic.TaskConfig:
  return synthetic.TaskConfig(seq_len=data.seq_len, vocab_size=data.vocab_size, num_pairs=data.num_pairs,
                              dim=data.dim, noise_std=data.noise_std)


def make_sources(data):
  """(train, eval) random-access sources and the tokenizer (None for synthetic tasks)."""
  if data.source == "synthetic":
    config = task_config(data)
    return (synthetic.SyntheticSource(data.task, config, data.seed, NUM_SYNTHETIC),
            synthetic.SyntheticSource(data.task, config, data.seed + 1_000_003, NUM_SYNTHETIC), None)
  tokenizer = text.make_tokenizer(data.tokenizer)
  if data.source == "text":
    train, evals = text.text_sources(data.path, tokenizer, data.seq_len, data.eval_fraction)
    return train, evals, tokenizer
  if data.source == "tfds":
    make = lambda split: text.TfdsDocuments(data.tfds_name, split, data.tfds_data_dir or None, data.tfds_feature,
                                            tokenizer, data.seq_len)
    return make(data.tfds_split), make(data.tfds_eval_split), tokenizer
  raise ValueError(f"data.source must be 'synthetic', 'text' or 'tfds', got {data.source!r}")


def _stack(examples):
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def train_dataset(source, data, batch_size: int) -> grain.IterDataset:
  """Infinite batches of `batch_size` // process_count examples for this process."""
  count, index = jax.process_count(), jax.process_index()
  if batch_size % count:
    raise ValueError(f"train.batch_size {batch_size} is not divisible by the {count} processes")
  ds = grain.MapDataset.source(source)
  if data.source != "synthetic":  # synthetic examples are already i.i.d. in the index
    ds = ds.shuffle(seed=data.seed)
  ds = ds.repeat(None)[index::count].batch(batch_size // count, drop_remainder=True, batch_fn=_stack)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=data.num_threads, prefetch_buffer_size=2 * data.num_threads))
  if data.num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.num_workers))
  return ds


def eval_batches(source, batch_size: int, num_batches: int) -> list[dict]:
  """The first `num_batches` held-out batches of this process (the same ones at every evaluation)."""
  count, index = jax.process_count(), jax.process_index()
  ds = grain.MapDataset.source(source)[index::count].batch(batch_size // count, drop_remainder=True,
                                                            batch_fn=_stack)
  n = min(num_batches, len(ds))
  if n == 0:
    raise ValueError(f"the eval split has fewer than train.batch_size = {batch_size} examples")
  return [ds[i] for i in range(n)]


def to_global(batch: dict, shardings: dict) -> dict:
  """This process's numpy batch → global jax.Arrays, each sharded by `shardings[key]` (batch over data, fsdp)."""
  return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in batch.items()}
