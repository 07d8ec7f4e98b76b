"""Checkpoints in `<workdir>/checkpoints/`: one orbax CheckpointManager saving the TrainState and the grain
iterator state together (async, every N steps, keep the last k), restoring the latest onto any mesh, and a SIGTERM
flag for preemption.

orbax's own preemption check only works under `jax.distributed`; a single-process run relies on the SIGTERM flag:
the loop saves at the next step boundary, waits for the write and exits 0.
"""
import signal

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath


class Checkpointer:
  """Saves {"state": TrainState, "data": grain iterator}; restores both. `best_metric` (e.g. "eval_loss") makes
  orbax keep the `keep` best checkpoints by that metric (lower is better) instead of the latest ones."""

  def __init__(self, workdir: str, every_steps: int, keep: int, use_async: bool = True, best_metric: str = ""):
    self.directory = epath.Path(workdir) / "checkpoints"
    self.best_metric = best_metric
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every_steps, max_to_keep=keep, enable_async_checkpointing=use_async,
        best_fn=(lambda m: m[best_metric]) if best_metric else None, best_mode="min",
        keep_checkpoints_without_metrics=not best_metric)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter, metrics: dict | None = None, force: bool = False) -> bool:
    """Saves when `step` is due (every_steps) or when forced; returns whether a save started."""
    if self.best_metric and (not metrics or self.best_metric not in metrics):
      metrics = None
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter))
    return self.manager.save(step, args=args, metrics=metrics, force=force)

  def restore(self, step: int, abstract_state, shardings, data_iter):
    """The TrainState at `step`, placed by `shardings` (any mesh), and the iterator set to where it was."""
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target),
                              data=grain.checkpoint.CheckpointRestore(data_iter))
    try:
      restored = self.manager.restore(step, args=args)
    except Exception as e:  # orbax raises ValueError / KeyError / TypeError for a mismatched tree
      message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise ValueError(f"the checkpoint at {self.directory}/{step} does not match this config (a different model "
                       f"or optimiser?); use another --workdir. orbax: {message[:300]}") from None
    return restored["state"]

  def wait(self):
    self.manager.wait_until_finished()

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def close(self):
    self.manager.close()


class SigtermFlag:
  """Sets `.raised` on SIGTERM instead of dying, so the loop can save and exit cleanly; restores the old handler
  on `restore()`."""

  def __init__(self):
    self.raised = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.raised = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)
