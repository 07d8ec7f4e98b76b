"""The data iterator's state in an orbax checkpoint, readable by any number of processes.

Each process writes its `rows.Batches` state (the step and the states of its rows of the global batch) as
`process_<i>-of-<n>.json`, as grain's handler does; restoring reads every process's file and gives each process the
states of its rows, whichever process saved them, so a run saved by 2 processes resumes on 1 or 4.
"""
import dataclasses
import json

import grain
import orbax.checkpoint as ocp
from etils import epath


class RowStateHandler(grain.checkpoint.CheckpointHandler):
  """grain's per-process save; a restore that merges all processes' row states."""

  def restore(self, directory: epath.Path, item=None, args=None):
    item = item or args.item
    states = [json.loads(f.read_text()) for f in sorted(directory.glob("process_*-of-*.json"))]
    if not states:
      raise ValueError(f"no data iterator state in {directory}")
    steps = {s["step"] for s in states}
    if len(steps) != 1:
      raise ValueError(f"the data states in {directory} disagree on the step ({sorted(steps)})")
    merged = dict(states[0], rows={r: s for state in states for r, s in state["rows"].items()})
    item.set_state(merged)
    return item


@ocp.args.register_with_handler(RowStateHandler, for_save=True)
@dataclasses.dataclass
class Save(ocp.args.CheckpointArgs):
  item: grain.DatasetIterator


@ocp.args.register_with_handler(RowStateHandler, for_restore=True)
@dataclasses.dataclass
class Restore(ocp.args.CheckpointArgs):
  item: grain.DatasetIterator
