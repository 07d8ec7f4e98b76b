"""Global batches as row streams: the sequence of global batches is a function of (seed, batch size, step) alone,
whatever the number of processes or worker processes, and resumes exactly on any number of them.

Row r of every global batch of B rows is one stream. Packed text: row r reads documents r, r + B, r + 2B, … of the
document stream (shuffled anew each epoch for training; each document a token array that begins with BOS), 32 at a
time, and grain's ConcatThenSplitIterDataset concatenates them and cuts windows of seq_len + 1 tokens; window k of
row r is row r of global batch k (`window_examples` turns a group of rows' windows into examples at once).
Synthetic tasks: row r is examples r, r + B, …. Process p of n reads the rows [p·B/n, (p+1)·B/n), the rows its
devices hold of the global array (`pipeline.to_global`). With W worker processes, grain's mp_prefetch gives worker w
the rows w, w + W, … of those (it slices `_RowGroup`'s rows); each element is one step of a worker's rows, the
workers take turns, and `Batches` puts the rows back in order.

The saved state is the step and every row's iterator state (each row reports it with each window), so a process
that resumes takes the states of its rows, from whichever process saved them (`data/state.py`).
"""
import grain
import jax
import numpy as np

STATE_FORMAT = "mesanet-rows/1"


def stack(elements: list[dict]) -> dict:
  """The rows' examples (synthetic tasks) → one dict of arrays [R, ...]."""
  return {k: np.stack([e[k] for e in elements]) for k in elements[0]}


def window_examples(windows: list[dict], bos_id: int) -> dict:
  """The rows' packed windows (grain's tokens, tokens_segment_ids [T + 1]; 0 = padding) → inputs, targets [R, T]
  int32, mask [R, T] f32 (no loss on BOS or padding), segment_ids [R, T] int32 (1, 2, … per document in the window,
  0 on padding). One numpy pass over all rows; the tokens keep the shards' dtype until here."""
  tokens = np.stack([w["tokens"] for w in windows])
  packed = np.stack([w["tokens_segment_ids"] for w in windows])
  starts = tokens == bos_id  # a record may hold several documents (prepared windows): BOS starts each
  starts[:, 1:] |= packed[:, 1:] != packed[:, :-1]
  starts[:, 0] = True
  segments = np.where(packed > 0, np.cumsum(starts, axis=1), 0)
  mask = (tokens[:, 1:] != bos_id) & (packed[:, 1:] > 0)
  return {"inputs": np.ascontiguousarray(tokens[:, :-1], np.int32),
          "targets": np.ascontiguousarray(tokens[:, 1:], np.int32), "mask": mask.astype(np.float32),
          "segment_ids": np.ascontiguousarray(segments[:, :-1], np.int32)}


DOCUMENTS_PER_READ = 32  # a row reads this many of its documents at once (one pass through grain's layers)


def packed_row(documents: grain.MapDataset, row: int, batch_size: int, seq_len: int) -> grain.IterDataset:
  """Row `row` of `documents` (token arrays, BOS first; infinite): grain's packed windows of seq_len + 1 tokens
  (`window_examples` makes the examples of a group of rows)."""
  ds = _Documents(documents[row::batch_size], DOCUMENTS_PER_READ)
  return grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len + 1})


class _Documents(grain.IterDataset):
  """The documents of a MapDataset in order as {"tokens": array}, read `per_read` at a time through grain's batched
  read (`MapDataset._getitems`: each layer maps the indices in one call, a source with `_getitems` reads them in one
  call), where `to_iter_dataset` takes each element through every layer on its own. The state is
  `to_iter_dataset`'s, {"next_index": i}."""

  def __init__(self, documents: grain.MapDataset, per_read: int):
    super().__init__()
    self.documents, self.per_read = documents, per_read

  def __iter__(self):
    return _DocumentsIterator(self.documents, self.per_read)


class _DocumentsIterator(grain.DatasetIterator):

  def __init__(self, documents: grain.MapDataset, per_read: int):
    super().__init__()
    self.documents, self.per_read = documents, per_read
    self.next_index, self.read, self.read_start = 0, [], 0

  def __next__(self) -> dict:
    offset = self.next_index - self.read_start
    if offset >= len(self.read):
      stop = min(self.next_index + self.per_read, len(self.documents))
      if self.next_index >= stop:
        raise StopIteration
      self.read, self.read_start, offset = self.documents._getitems(range(self.next_index, stop)), self.next_index, 0
    self.next_index += 1
    return {"tokens": self.read[offset]}

  def get_state(self) -> dict:
    return {"next_index": self.next_index}

  def set_state(self, state: dict) -> None:
    self.next_index, self.read, self.read_start = state["next_index"], [], 0


def example_row(examples: grain.MapDataset, row: int, batch_size: int) -> grain.IterDataset:
  """Row `row` of a random-access source of ready examples (synthetic tasks)."""
  return examples[row::batch_size].to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))


class _Row(grain.IterDataset):
  """One row stream, started from a saved state."""

  def __init__(self, row: int, dataset: grain.IterDataset, state: dict | None):
    super().__init__()
    self.row, self.dataset, self.state = row, dataset, state

  def __iter__(self):
    iterator = self.dataset.__iter__()
    if self.state is not None:
      iterator.set_state(_json_to_state(self.state))
    return iterator


class _RowGroup(grain.IterDataset):
  """Element k = `examples` of window k of each of its rows, with the rows and their states after it; mp_prefetch
  gives worker w of W the rows [w::W] and takes the workers' elements in turn, so W consecutive elements hold one
  step of every row."""

  def __init__(self, rows: list[_Row], examples):
    super().__init__()
    self.rows, self.examples = rows, examples

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    del sequential_slice
    self.rows = self.rows[sl]

  def __iter__(self):
    return _RowGroupIterator([row.row for row in self.rows], [row.__iter__() for row in self.rows], self.examples)


class _RowGroupIterator(grain.DatasetIterator):

  def __init__(self, rows: list[int], iterators: list, examples):
    super().__init__()
    self.rows, self.iterators, self.examples = np.array(rows), iterators, examples

  def __next__(self) -> dict:
    elements = [next(iterator) for iterator in self.iterators]
    return {"rows": self.rows, "states": [iterator.get_state() for iterator in self.iterators],
            **self.examples(elements)}

  def get_state(self):  # mp_prefetch asks after every element; the rows' states travel with the elements
    return {}

  def set_state(self, state):
    raise NotImplementedError("row streams are restored through Batches.set_state")


class Batches(grain.DatasetIterator):
  """This process's batches [B / process_count, ...] of the global batch sequence. `make_row(row)` builds row
  stream `row` (an IterDataset); `examples(elements)` turns one element of each of a group of rows into their
  examples [R, ...] (`stack` when the rows yield examples, `window_examples` for packed windows); `num_workers` > 0
  runs the rows in grain worker processes."""

  def __init__(self, make_row, batch_size: int, num_workers: int = 0, examples=stack):
    super().__init__()
    self.iterator = None  # first: grain's __del__ calls close() even when a check below refuses the arguments
    count, index = jax.process_count(), jax.process_index()
    if batch_size % count:
      raise ValueError(f"train.batch_size {batch_size} is not divisible by the {count} processes")
    local = batch_size // count
    if num_workers and local % num_workers:
      raise ValueError(f"data.num_workers {num_workers} must divide this process's {local} rows of the batch "
                       f"(train.batch_size / processes)")
    self.make_row, self.batch_size, self.num_workers, self.examples = make_row, batch_size, num_workers, examples
    self.rows = range(index * local, (index + 1) * local)
    self.step, self.states = 0, {}

  def _start(self):
    ds = _RowGroup([_Row(r, self.make_row(r), self.states.get(r)) for r in self.rows], self.examples)
    if self.num_workers:
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers))
    return ds.__iter__()

  def __next__(self) -> dict:
    if self.iterator is None:
      self.iterator = self._start()
    groups = [next(self.iterator) for _ in range(max(self.num_workers, 1))]
    for group in groups:
      self.states.update(zip(group["rows"].tolist(), group["states"]))
    self.step += 1
    keys = [k for k in groups[0] if k not in ("rows", "states")]
    if not self.num_workers:
      return {k: groups[0][k] for k in keys}
    batch = {k: np.empty((len(self.rows), *groups[0][k].shape[1:]), groups[0][k].dtype) for k in keys}
    for group in groups:  # each worker's rows into their places, out of grain's shared memory: one copy
      for k in keys:
        batch[k][group["rows"] - self.rows.start] = group[k]
    return batch

  def get_state(self) -> dict:
    return {"format": STATE_FORMAT, "step": self.step, "batch_size": self.batch_size,
            "rows": {str(r): s for r, s in self.states.items()}}

  def set_state(self, state: dict) -> None:
    if state.get("format") != STATE_FORMAT or state.get("batch_size") != self.batch_size:
      raise ValueError(f"the checkpoint's data state ({state.get('format')}, batch size {state.get('batch_size')}) "
                       f"does not match this run (train.batch_size {self.batch_size})")
    rows = {int(r): s for r, s in state["rows"].items()}
    missing = [r for r in self.rows if r not in rows]
    if state["step"] > 0 and missing:
      raise ValueError(f"the checkpoint's data state has no state for rows {missing[:4]}… of the batch: a process's "
                       f"data file is missing from the checkpoint")
    self.close()
    self.step, self.states = state["step"], {r: rows[r] for r in self.rows if r in rows}

  def close(self) -> None:
    if self.iterator is not None and hasattr(self.iterator, "close"):
      self.iterator.close()
    self.iterator = None


def _json_to_state(state):
  """A row state read back from JSON: the packer's slices become tuples again (grain compares them to (-1, -1))."""
  if not isinstance(state, dict):
    return state
  return {k: {f: tuple(s) for f, s in v.items()} if k == "remainder_slices" else _json_to_state(v)
          for k, v in state.items()}
