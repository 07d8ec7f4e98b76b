"""Checkpoints in `<workdir>/checkpoints/`: one orbax CheckpointManager saving the TrainState and the grain
iterator state together (async, at the steps the train loop picks, keep the last k), restoring the latest onto any
mesh, and a SIGTERM flag for preemption. For evaluation and export: the params alone restored from a trainer
checkpoint (no optimiser state is read), and a params-only checkpoint directory (`save_params` / `load_params`).

orbax's own preemption check only works under `jax.distributed`; a single-process run relies on the SIGTERM flag:
the loop saves at the next step boundary, waits for the write and exits 0.
"""
import signal

import jax
import orbax.checkpoint as ocp
from etils import epath

from mesanet_jax.data import state as data_state


class Checkpointer:
  """Saves {"state": TrainState, "data": grain iterator}; restores both. `best_metric` (e.g. "eval_loss") makes
  orbax keep the `keep` best checkpoints by that metric (lower is better) instead of the latest ones."""

  def __init__(self, workdir: str, keep: int, use_async: bool = True, best_metric: str = ""):
    self.directory = epath.Path(workdir) / "checkpoints"
    self.best_metric = best_metric
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=use_async,
        best_fn=(lambda m: m[best_metric]) if best_metric else None, best_mode="min",
        keep_checkpoints_without_metrics=not best_metric)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter, metrics: dict | None = None) -> None:
    """Starts saving `step` (the caller decides when: orbax's own save-interval policy is bypassed)."""
    if self.best_metric and (not metrics or self.best_metric not in metrics):
      metrics = None
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=data_state.Save(data_iter))
    self.manager.save(step, args=args, metrics=metrics, force=True)

  def restore(self, step: int, abstract_state, shardings, data_iter):
    """The TrainState at `step`, placed by `shardings` (any mesh), and the iterator set to where it was."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(_target(abstract_state, shardings)),
                              data=data_state.Restore(data_iter))
    try:
      restored = self.manager.restore(step, args=args)
    except Exception as e:  # orbax raises ValueError / KeyError / TypeError for a mismatched tree
      raise ValueError(f"the checkpoint at {self.directory}/{step} does not match this config (a different model "
                       f"or optimiser?); use another --workdir. orbax: {_first_line(e)}") from None
    return restored["state"]

  def wait(self):
    self.manager.wait_until_finished()

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def close(self):
    self.manager.close()


def _target(abstract_params, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params, shardings)


def _first_line(e: Exception) -> str:
  message = str(e).strip()
  return message.splitlines()[0][:300] if message else type(e).__name__


def restore_params(workdir: str, step: int | None, abstract_params, shardings) -> tuple[object, int]:
  """(params of the TrainState at `step` (None: the latest), the step) from `<workdir>/checkpoints`, placed by
  `shardings`; only the params are read."""
  directory = epath.Path(workdir) / "checkpoints"
  if not directory.is_dir():
    raise ValueError(f"no checkpoints in {directory}")
  manager = ocp.CheckpointManager(directory, item_names=("state", "data"))  # only restores: nothing is written
  try:
    available = sorted(manager.all_steps())
    if not available or (step is not None and step not in available):
      raise ValueError(f"{directory} has no checkpoint at step {step if step is not None else '(any)'}; "
                       f"it has steps {available}")
    step = available[-1] if step is None else step
    target = {"params": _target(abstract_params, shardings)}
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(state=args))
    except Exception as e:  # orbax raises ValueError / KeyError / TypeError for a mismatched tree
      raise ValueError(f"the checkpoint at {directory}/{step} does not match its config.json: "
                       f"{_first_line(e)}") from None
  finally:
    manager.close()
  return restored["state"]["params"], step


def save_params(directory: str, params) -> None:
  """A params-only orbax checkpoint in `directory` (which must not exist yet)."""
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(epath.Path(directory).absolute(), params)


def load_params(directory: str, abstract_params, shardings):
  """The params written by `save_params`, placed by `shardings`."""
  path = epath.Path(directory).absolute()
  if not path.is_dir():
    raise ValueError(f"no params checkpoint at {path}")
  with ocp.StandardCheckpointer() as checkpointer:
    try:
      return checkpointer.restore(path, _target(abstract_params, shardings))
    except Exception as e:  # a tree or shape mismatch
      raise ValueError(f"the params at {path} do not match the model config: {_first_line(e)}") from None


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
