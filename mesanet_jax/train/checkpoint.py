"""Checkpoints in `<workdir>/checkpoints/`: one orbax CheckpointManager saving the TrainState and the grain
iterator state together (async, at the steps the train loop picks, keep the last k), restoring the latest onto any
mesh, and a SIGTERM flag for preemption. For evaluation and export: the params alone restored from a trainer
checkpoint (no optimiser state is read), and a params-only checkpoint directory (`save_params` / `load_params`).

orbax's own preemption check only works under `jax.distributed`; a single-process run relies on the SIGTERM flag
(sigterm.py). orbax publishes a step by renaming its finished directory, so a kill leaves no half-written step
behind; a step that still fails to restore (files lost or truncated afterwards) is named as corrupt: the trainer
falls back to the newest good step and moves the bad ones to `<workdir>/corrupt_checkpoints/`, evaluation and
export name the other steps to pass as --step. Params are restored only when the checkpoint holds exactly the
model's params (names and shapes): a truncated or different model is refused, never evaluated.
"""
import os

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
        keep_checkpoints_without_metrics=not best_metric,
        cleanup_tmp_directories=True)  # the unfinished save of a killed run
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter, metrics: dict | None = None) -> None:
    """Starts saving `step` (the caller decides when: orbax's own save-interval policy is bypassed)."""
    if self.best_metric and (not metrics or self.best_metric not in metrics):
      metrics = None
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=data_state.Save(data_iter))
    self.manager.save(step, args=args, metrics=metrics, force=True)

  def restore_latest(self, abstract_state, shardings, data_iter, say=print) -> tuple[object, int]:
    """(TrainState, step) of the newest step that restores, placed by `shardings` (any mesh), the iterator set to
    where it was. Newer steps that fail while an older one restores are corrupt: moved to
    `<workdir>/corrupt_checkpoints/` (logged). When none restores, the checkpoints are not this config's."""
    target = _target(abstract_state, shardings)
    failed = {}
    for step in sorted(self.manager.all_steps(), reverse=True):
      args = ocp.args.Composite(state=ocp.args.StandardRestore(target), data=data_state.Restore(data_iter))
      try:
        _state_metadata(self.directory / str(step))  # what evaluation reads first: a step it refuses is not resumed
        restored = self.manager.restore(step, args=args)
      except Exception as e:  # orbax: ValueError / KeyError / TypeError for a mismatched tree, OSError, tensorstore
        failed[step] = _first_line(e)
        continue
      aside = self.directory.parent / "corrupt_checkpoints"
      for bad, reason in failed.items():
        aside.mkdir(exist_ok=True)
        os.replace(self.directory / str(bad), aside / f"{bad}.{os.getpid()}")
        say(f"the checkpoint at {self.directory}/{bad} is corrupt or incomplete ({reason}); moved it to "
            f"{aside}/ and resumed from step {step}, the newest good one")
      self.manager.reload()
      return restored["state"], step
    newest = max(failed)
    raise ValueError(f"the checkpoint at {self.directory}/{newest} does not match this config (a different model "
                     f"or optimiser?) or is corrupt, and no older step restores; use another --workdir. orbax: "
                     f"{failed[newest]}")

  def wait(self):
    self.manager.wait_until_finished()

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def close(self):
    self.manager.close()


def _target(abstract_params, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params, shardings)


def _first_line(e: Exception) -> str:
  message = str(e).strip().split(" See full TensorStore details")[0]  # the rest is a repr of the whole spec
  return message.splitlines()[0][:300] if message else type(e).__name__


def _leaf_names(tree) -> dict[str, tuple]:
  """{"blocks/0/mixer/q_proj/kernel": shape} of a params tree (abstract, restored or orbax metadata)."""
  def name(path):
    keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return "/".join(keys[:-1] if keys and keys[-1] == "value" else keys)
  return {name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _check_same_params(saved, abstract_params, where: str) -> None:
  """Raises ValueError unless the checkpoint's params (orbax metadata) are exactly the model's, names and shapes."""
  have, want = _leaf_names(saved), _leaf_names(abstract_params)
  missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
  reshaped = sorted(k for k in want.keys() & have.keys() if want[k] != have[k])
  if missing or extra or reshaped:
    parts = [f"{len(names)} {what} ({', '.join(names[:3])}{', …' if len(names) > 3 else ''})"
             for names, what in ((missing, "of the model's params missing"), (extra, "params not in the model"),
                                 (reshaped, "params of another shape")) if names]
    raise ValueError(f"the checkpoint at {where} holds another model than its config.json describes: "
                     f"{'; '.join(parts)}")


def _state_metadata(step_directory: epath.Path):
  """The saved TrainState's tree metadata (names, shapes, shardings); raises when a metadata file is lost or torn."""
  return ocp.PyTreeCheckpointHandler().metadata(step_directory / "state")


def restore_params(workdir: str, step: int | None, abstract_params, shardings) -> tuple[object, int]:
  """(params of the TrainState at `step` (None: the latest), the step) from `<workdir>/checkpoints`, placed by
  `shardings`; only the params are read (every one of the model's: see _check_same_params), nothing is written."""
  directory = epath.Path(workdir) / "checkpoints"
  if not directory.is_dir():
    raise ValueError(f"no checkpoints in {directory}")
  # Only restores: nothing is written (orbax's read_only option would say so in warnings on stderr).
  manager = ocp.CheckpointManager(directory, item_names=("state", "data"),
                                  options=ocp.CheckpointManagerOptions(create=False))
  try:
    available = sorted(manager.all_steps())
    if not available or (step is not None and step not in available):
      raise ValueError(f"{directory} has no checkpoint at step {step if step is not None else '(any)'}; "
                       f"it has steps {available}")
    step = available[-1] if step is None else step
    others = f"; pass --step with another one of {[s for s in available if s != step]}" if len(available) > 1 else ""
    try:
      saved = _state_metadata(directory / str(step)).tree["params"]
    except Exception as e:  # a lost or truncated metadata file
      raise ValueError(f"the checkpoint at {directory}/{step} is corrupt or incomplete ({_first_line(e)}){others}") \
          from None
    _check_same_params(saved, abstract_params, f"{directory}/{step}")
    target = {"params": _target(abstract_params, shardings)}
    # partial_restore: the params alone out of the TrainState (checked to be all of the model's just above)
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(state=args))
    except Exception as e:  # the tree matched: lost or truncated array files
      raise ValueError(f"the checkpoint at {directory}/{step} is corrupt or incomplete ({_first_line(e)}){others}") \
          from None
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
