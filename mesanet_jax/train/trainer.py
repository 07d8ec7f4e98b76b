"""The train loop, top to bottom: config → mesh → workdir lock → data → sharded state (fresh or the latest good
checkpoint) → jitted steps → loop (log, eval, checkpoint, SIGTERM) → final save, PNG.

Nothing in the workdir is written before a resume is validated (config.json against the checkpoint's run, the
checkpoint restored), except the lock file, which is removed again on exit."""
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from mesanet_jax import sharding
from mesanet_jax.data import pipeline
from mesanet_jax.layers.mesa import cg_steps_layer_indices
from mesanet_jax.models import fast_path
from mesanet_jax.ops.cg_steps import combine_calls
from mesanet_jax.train import checkpoint, metrics as metrics_lib, steps
from mesanet_jax.train.config import (RESUMABLE, RUN_CONFIG, config_changes, config_errors, lm_config, run_config_dict,
                                      save_run_config, validate)
from mesanet_jax.train.lock import WorkdirBusy, WorkdirLock
from mesanet_jax.train.loss import task_type
from mesanet_jax.train.sigterm import SigtermFlag
from mesanet_jax.train.state import init_state, setup


def _mesh(config):
  m = config.mesh
  try:
    return sharding.make_mesh(data=m.data, fsdp=m.fsdp, tensor=m.tensor)
  except ValueError as e:
    raise ValueError(f"mesh: {e} (set mesh.data, mesh.fsdp, mesh.tensor)") from None


def _data_vocab(config, tokenizer) -> int | None:
  """The vocabulary the data needs: the tokenizer's or the synthetic task's; None for regression (no tokens)."""
  if task_type(config) == "regression":
    return None
  return tokenizer.vocab_size if tokenizer is not None else config.data.vocab_size


def _writable_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ValueError(f"cannot create --workdir {workdir}: {e.strerror or e}") from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise ValueError(f"--workdir {workdir} is not writable")


def _lock(workdir: str, lead: bool, say) -> WorkdirLock | None:
  """Process 0 takes the workdir's lock; with several processes the others learn whether it could."""
  lock, busy = None, ""
  if lead:
    try:
      lock = WorkdirLock(workdir, say)
    except WorkdirBusy as e:
      busy = str(e)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    if not int(multihost_utils.broadcast_one_to_all(np.int32(lock is not None or not lead))):
      raise ValueError(busy or f"process 0 could not lock {workdir} (another trainer holds it; see its log)")
  elif busy:
    raise ValueError(busy)
  return lock


def _check_resumable(changes: dict, workdir: str) -> None:
  fixed = {key: change for key, change in changes.items() if key not in RESUMABLE}
  if fixed:
    differences = ", ".join(f"{key}={old!r} (this config: {new!r})" for key, (old, new) in fixed.items())
    raise ValueError(f"--workdir {workdir} holds a run trained with {differences}; a resume may change only "
                     f"{', '.join(RESUMABLE)}: use another --workdir")


def _summarise_eval(sums: dict, kind: str, cg_steps: list, layers: list[int]) -> dict:
  """Eval metrics from the summed losses and each batch's forward CG steps per Mesa layer ([L, 2] each, or None)."""
  count = max(float(sums["count"]), 1.0)
  out = {"eval_loss": float(sums["loss"]) / count}
  if kind == "lm":
    out["eval_accuracy"] = float(sums["correct"]) / count
    out["eval_ppl"] = math.exp(min(out["eval_loss"], 50.0))
  if layers:
    out.update(metrics_lib.cg_steps_metrics(layers, np.asarray(combine_calls(np.stack(cg_steps))), prefix="eval_cg"))
  return out


def train_and_evaluate(config, workdir: str, sigterm: SigtermFlag | None = None) -> dict:
  """Trains `config` in `workdir` (resuming from its latest good checkpoint) and returns the last logged metrics.
  `sigterm`: a flag installed earlier (mesanet-train installs one before importing JAX); one process only."""
  workdir = os.path.abspath(workdir)  # orbax needs absolute paths
  if jax.process_count() > 1:
    sigterm = None  # several processes: orbax's preemption sync point, so that all stop at the same step
  own_flag = sigterm is None and jax.process_count() == 1
  if own_flag:
    sigterm = SigtermFlag()
  lock = None
  try:
    with config_errors():  # everything up to the loop: config, mesh, data, checkpoint problems → one line
      validate(config)
      lead = jax.process_index() == 0
      say = print if lead else (lambda *_: None)
      _writable_workdir(workdir)
      lock = _lock(workdir, lead, say)
    return _train(config, workdir, sigterm, lead, say)
  finally:
    if lock is not None:
      lock.release()
    if own_flag:
      sigterm.restore()


def _train(config, workdir: str, sigterm: SigtermFlag | None, lead: bool, say) -> dict:
  with config_errors():
    # ---- mesh -------------------------------------------------------------------------------------------------
    mesh = _mesh(config)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = config.train.batch_size // config.train.grad_accum
    if micro % shards:
      raise ValueError(f"train.batch_size / train.grad_accum = {micro} is not divisible by the {shards} data "
                       f"shards (mesh.data × mesh.fsdp)")

    # ---- data ---------------------------------------------------------------------------------------------------
    train_source, eval_source, tokenizer = pipeline.make_sources(config.data)
    lm = lm_config(config.model, _data_vocab(config, tokenizer))  # the run's model, built once
    say(fast_path.summary_line(lm))
    train_iter = iter(pipeline.train_dataset(train_source, config.data, config.train.batch_size))
    eval_data = pipeline.eval_batches(eval_source, config.train.batch_size, config.train.eval_batches)
    batch_sh = sharding.batch_shardings(eval_data[0], mesh)

    # ---- model, optimiser, state ------------------------------------------------------------------------------
    graphdef, tx, abstract, state_sh, probes = setup(config, lm, mesh)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
    ckpt = checkpoint.Checkpointer(workdir, config.checkpoint.keep, config.checkpoint.use_async,
                                   config.checkpoint.best_metric)
    saved_config = run_config_dict(config, lm)  # what mesanet-eval / -export / -generate rebuild the model from
    changes = config_changes(workdir, saved_config)
    latest = ckpt.latest_step()
    if latest is None:
      start = time.perf_counter()
      state = jax.block_until_ready(init_state(config, lm, tx, state_sh))
      say(f"initialised the train state in {time.perf_counter() - start:.1f} s")
    else:
      _check_resumable(changes, workdir)
      state, latest = ckpt.restore_latest(abstract, state_sh, train_iter, say)
      say(f"resumed from {ckpt.directory} at step {latest}")
    say(f"model: {config.model.size} {config.model.architecture}, {num_params:,} parameters; "
        f"mesh {dict(mesh.shape)} over {jax.device_count()} devices, {jax.process_count()} process(es)")
    if sigterm is not None and sigterm.raised:
      say(f"SIGTERM during setup: exiting before the first step; {workdir} is unchanged")
      ckpt.close()
      return {}

    # ---- the resume is valid: now the workdir may change ------------------------------------------------------
    if lead:
      if latest is not None:
        for key, (old, new) in changes.items():
          say(f"{RUN_CONFIG}: {key} {old!r} -> {new!r} on resume")
      if changes or not os.path.exists(os.path.join(workdir, RUN_CONFIG)):
        save_run_config(saved_config, workdir)
      dropped = metrics_lib.reconcile_metrics(workdir, latest or 0)
      if dropped:
        say(f"metrics.jsonl: dropped {dropped} line(s) logged after step {latest or 0} or torn (those steps are "
            f"trained again)")

  # ---- jitted steps -----------------------------------------------------------------------------------------
  def under_mesh(step_fn):
    """Calls (and so traces) step_fn with the mesh in context, so Pallas kernels run per shard (sharding.per_shard)."""
    def call(*args):
      with jax.set_mesh(mesh):
        return step_fn(*args)
    return call

  replicated = sharding.replicated(mesh)
  train_step = under_mesh(jax.jit(steps.make_train_step(config, graphdef, tx, probes),
                                  in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
                                  donate_argnums=0))
  eval_step = under_mesh(jax.jit(steps.make_eval_step(config, graphdef, probes),
                                 in_shardings=(state_sh.params, batch_sh), out_shardings=replicated))
  kind = task_type(config)

  def evaluate(params) -> dict:
    sums, cg_steps = None, []
    for batch in eval_data:
      out, steps_used = eval_step(params, pipeline.to_global(batch, batch_sh))
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
      cg_steps.append(steps_used)
    return _summarise_eval(jax.device_get(sums), kind, jax.device_get(cg_steps), cg_steps_layer_indices(probes))

  # ---- throughput -------------------------------------------------------------------------------------------
  tokens_per_step = config.train.batch_size * config.data.seq_len
  flops_per_step = metrics_lib.train_flops(lm, num_params, config.train.batch_size, config.data.seq_len)
  peak = metrics_lib.peak_flops(jax.devices()[0].device_kind)

  # ---- loop -------------------------------------------------------------------------------------------------
  writer = metrics_lib.MetricWriter(workdir, enabled=lead)
  bar = None
  if lead and config.train.progress_bar:
    from tqdm import tqdm
    bar = tqdm(total=config.train.num_steps, initial=int(state.step), desc="train", dynamic_ncols=True)
  step = int(jax.device_get(state.step))
  if step >= config.train.num_steps:
    say(f"{workdir} is already at step {step} (train.num_steps = {config.train.num_steps}); nothing to train")
  pending, last_logged, last_time, last = None, step, time.perf_counter(), {}
  first_row = fast_path.describe(lm)  # the first metrics line also says how Mesa ran

  def flush(pending):
    """Writes the metrics of an earlier step (fetched only now, after the next step was dispatched)."""
    nonlocal last_logged, last_time, first_row
    at, device_metrics, extra = pending
    row = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    now = time.perf_counter()
    seconds = (now - last_time) / max(at - last_logged, 1)
    last_logged, last_time = at, now
    row["step_time_s"] = seconds
    row["tokens_per_s"] = tokens_per_step / seconds
    row["tflops_per_s_per_device"] = flops_per_step / seconds / jax.device_count() / 1e12
    row["mfu"] = flops_per_step / seconds / jax.device_count() / peak if peak else "n/a"
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]  # None on CPU
    if all(peaks):
      row["peak_memory_gib"] = max(peaks) / 2**30  # the fullest local device
    if kind == "lm":
      row["ppl"] = math.exp(min(row["loss"], 50.0))
    row.update(extra)
    row.update(first_row)
    first_row = {}
    writer.write(at, row)
    if bar is not None:
      bar.set_postfix(loss=f"{row['loss']:.4f}", **({"eval": f"{extra['eval_loss']:.4f}"} if extra else {}))
    return row

  try:
    while step < config.train.num_steps:
      batch = pipeline.to_global(next(train_iter), batch_sh)
      state, step_metrics = train_step(state, batch)
      step += 1
      if pending is not None:
        last = flush(pending)
        pending = None
      extra = evaluate(state.params) if step % config.train.eval_every == 0 else {}
      if step % config.train.log_every == 0 or extra or step == config.train.num_steps:
        pending = (step, step_metrics, extra)
      if bar is not None:
        bar.update(1)
      stop = sigterm.raised if sigterm is not None else ckpt.reached_preemption(step)
      last_step = step == config.train.num_steps or stop
      if last_step or step % config.checkpoint.every_steps == 0:  # the one place that decides when to save
        if pending is not None:  # the rows of the saved steps are on disk before the checkpoint
          last = flush(pending)
          pending = None
        ckpt.save(step, state, train_iter, metrics=extra)
      if last_step:
        break

    if pending is not None:
      last = flush(pending)
    ckpt.wait()
  finally:
    ckpt.close()
    if bar is not None:
      bar.close()
    writer.close()
  if lead:
    metrics_lib.plot_losses(workdir)
  if sigterm is not None and sigterm.raised:
    say(f"SIGTERM: saved step {step} to {ckpt.directory}; exiting")
  return last
