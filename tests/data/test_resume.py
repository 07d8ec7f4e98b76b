"""The global batch sequence is a function of (seed, batch size, step): a loader run as 2 processes, saved through
the checkpoint handler and resumed as 1 or 4 processes gives exactly the uninterrupted run's global batches.
Processes are simulated in one Python process (jax.process_index / process_count patched, as the loader and grain's
handler read them). Rows read 3 documents at a time here, so that saved states fall inside a row's reads."""
import numpy as np
import pytest
from absl import flags
from etils import epath

from mesanet_jax.data import pipeline, rows, state, text
from mesanet_jax.train.config import base_config
from tests.data import shards_fixture

BATCH, STEPS, SAVED_AT = 8, 6, 3


def _global_batches(monkeypatch, source, data, count: int, steps: int, saved: epath.Path | None = None):
  """Runs `count` processes' loaders for `steps` steps (restored from `saved` if given); returns the global
  batches (each process's rows stacked in process order) and the loaders."""
  monkeypatch.setattr(pipeline.jax, "process_count", lambda: count)
  loaders = []
  for index in range(count):
    monkeypatch.setattr(pipeline.jax, "process_index", lambda index=index: index)
    loader = pipeline.train_dataset(source, data, BATCH)
    if saved is not None:
      state.RowStateHandler().restore(saved, args=state.Restore(loader))
    loaders.append(loader)
  local = [[next(loader) for _ in range(steps)] for loader in loaders]
  batches = [{k: np.concatenate([p[step][k] for p in local]) for k in local[0][0]} for step in range(steps)]
  return batches, loaders


def _saved_two_process_run(monkeypatch, tmp_path, source):
  """(data config, train source, the uninterrupted 1-process run's STEPS global batches, the first SAVED_AT global
  batches of a 2-process run and its checkpoint directory)."""
  monkeypatch.setattr(rows, "DOCUMENTS_PER_READ", 3)
  data = base_config().data
  path = shards_fixture.prepare_corpus(tmp_path) if source == "arrayrecord" else text.DEFAULT_CORPUS
  data.update(source=source, path=path, tokenizer="" if source == "arrayrecord" else "bytes", eval_shards=1,
              seq_len=32, task="mqar", vocab_size=32, num_pairs=4)
  train, _, _ = pipeline.make_sources(data)
  reference, _ = _global_batches(monkeypatch, train, data, 1, STEPS)
  first, loaders = _global_batches(monkeypatch, train, data, 2, SAVED_AT)
  saved = epath.Path(tmp_path / "data_state")
  saved.mkdir()
  for index, loader in enumerate(loaders):  # each process writes its own file, as in a checkpoint
    monkeypatch.setattr(pipeline.jax, "process_index", lambda index=index: index)
    state.RowStateHandler().save(saved, args=state.Save(loader))
  assert sorted(p.name for p in saved.iterdir()) == ["process_0-of-2.json", "process_1-of-2.json"]
  return data, train, reference, first, saved


def _assert_same(batches, reference, what):
  for step, batch in enumerate(batches):
    for key in batch:
      np.testing.assert_array_equal(batch[key], reference[step][key], err_msg=f"{what}, step {step}")


@pytest.mark.parametrize("source", ["text", "arrayrecord", "synthetic"])
def test_two_processes_resume_exactly_on_one_and_four(monkeypatch, tmp_path, source):
  data, train, reference, first, saved = _saved_two_process_run(monkeypatch, tmp_path, source)
  for count in (1, 2, 4):
    resumed, _ = _global_batches(monkeypatch, train, data, count, STEPS - SAVED_AT, saved)
    _assert_same(first + resumed, reference, f"{count} processes")


@pytest.mark.slow
def test_resume_with_worker_processes(monkeypatch, tmp_path):
  """The 2-process run's checkpoint resumed by 1 process whose rows run in 2 grain worker processes."""
  flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags; the trainer parses them, pytest does not
  data, train, reference, first, saved = _saved_two_process_run(monkeypatch, tmp_path, "arrayrecord")
  data.num_workers = 2
  resumed, loaders = _global_batches(monkeypatch, train, data, 1, STEPS - SAVED_AT, saved)
  loaders[0].close()
  _assert_same(first + resumed, reference, "1 process, 2 workers")
