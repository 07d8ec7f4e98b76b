"""Evaluates trained runs: `mesanet-eval` or `python -m experiments.evaluate`.

    mesanet-eval --workdir=runs/default                                  # latest checkpoint, held-out split
    mesanet-eval --workdir=runs/mesa --baseline_workdir=runs/transformer  # + ΔNLL by position vs a Transformer

For --workdir (a language-model run; the checkpoint at --step, restored onto the --mesh): perplexity and accuracy on
a data split (for Mesa models with the CG steps each layer's forward solves took, mean and max over the tokens); loss by token position as a table and positions.png (with --baseline_workdir, evaluated on the same
tokens: ΔNLL = NLL − NLL_baseline); for Mesa models a sweep of inference CG budgets (fixed steps and tolerances,
teacher-forced decoding, CG steps actually used per token, paired ΔNLL against generation's default budget) as a
table and cg_sweep.png. Everything is written to <out>/eval.json next to the plots (default out:
<workdir>/eval/step_<N>). One process. MAD has its own commands: mesanet-mad-grid and mesanet-mad-table.
"""
import dataclasses
import json
import math
import os

from absl import app, flags

from . import cli

_WORKDIR = flags.DEFINE_string("workdir", "", "the run to evaluate (its config.json and checkpoints/)")
_STEP = flags.DEFINE_integer("step", -1, "checkpoint step (-1: the latest)")
_MESH = flags.DEFINE_list("mesh", ["1", "-1", "1"], "data,fsdp,tensor mesh sizes (one may be -1: the rest)")
_SPLIT = flags.DEFINE_enum("split", "eval", ["eval", "train"], "data split (the run's data config)")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 0, "sequences per batch (0: the run's train.batch_size)")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 0, "batches to evaluate (0: the run's train.eval_batches)")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 0, "evaluation length (0: the run's data.seq_len)")
_BASELINE = flags.DEFINE_string("baseline_workdir", "", "a run (e.g. a Transformer) for ΔNLL by position")
_CG_STEPS = flags.DEFINE_list("cg_steps", ["1", "2", "4", "8", "16", "30"], "fixed CG budgets of the sweep")
_CG_TOLS = flags.DEFINE_list("cg_tols", ["1e-2", "1e-3", "1e-4"], "tolerances of the sweep (at most 30 steps, "
                             "or the largest of --cg_steps)")
_CG_BATCHES = flags.DEFINE_integer("cg_batches", 1, "batches for the CG sweep (it decodes token by token)")
_CG_WARM_START = flags.DEFINE_bool("cg_warm_start", False, "also sweep the tolerances with CG warm-started from "
                                   "the previous token's solution")
_CG_REFERENCE = flags.DEFINE_integer("cg_reference_steps", 0, "fixed steps of the budget every other is compared "
                                     "with (paired ΔNLL; 0: the run's mesa.cg_steps_decode, generation's default)")
_IMPL = flags.DEFINE_enum("impl", "", ["", "xla", "pallas"], "Mesa implementation ('': the run's; pallas: the "
                          "chunked kernels and the fused decode kernel, on GPU much faster)")
_OUT = flags.DEFINE_string("out", "", "output directory (default: <workdir>/eval/step_<N>)")


def _numbers(flag, kind) -> list:
  try:
    return [kind(v) for v in flag.value]
  except ValueError:
    raise ValueError(f"--{flag.name} must be a comma-separated list of {kind.__name__}s, got "
                     f"{','.join(flag.value)!r}") from None


def _finite(values) -> list:
  return [None if v is None or not math.isfinite(v) else float(v) for v in values]


def _batches(config, split: str, batch_size: int, num_batches: int) -> list[dict]:
  from mesanet_jax.data import pipeline
  train, held_out, _ = pipeline.make_sources(config.data)
  return pipeline.eval_batches(train if split == "train" else held_out, batch_size or config.train.batch_size,
                               num_batches or config.train.eval_batches)


def _run_config(run):
  """The run's config with this evaluation's sequence length."""
  config = run.config
  if _SEQ_LEN.value:
    with config.unlocked():
      config.data.seq_len = _SEQ_LEN.value
  return config


def evaluate_run(run, mesh, out: str) -> dict:
  """Perplexity, loss by position (± baseline) and the CG sweep of one run; plots into `out`."""
  from mesanet_jax.eval import cg_sweep, losses, plots, runs
  batches = _batches(_run_config(run), _SPLIT.value, _BATCH_SIZE.value, _NUM_BATCHES.value)
  token = losses.token_losses(runs.model_from(run.lm, run.params), batches, mesh)
  name = run.config.model.architecture
  report = {"workdir": os.path.abspath(_WORKDIR.value), "step": run.step, "architecture": name,
            "split": _SPLIT.value, "seq_len": int(batches[0]["inputs"].shape[1]), **losses.summary(token)}
  print(f"{name} step {run.step}, {report['tokens']:,} {_SPLIT.value} tokens: loss {report['loss']:.4f}, "
        f"ppl {report['ppl']:.3f}, accuracy {report['accuracy']:.4f}")
  if token.cg_steps is not None:
    mesa = run.lm.mesa
    layers = [i for i, mixer in enumerate(run.lm.mixers) if mixer == "mesa"]
    report["cg_steps_forward"] = [{"layer": layer, "mean": float(mean), "max": float(most)}
                                  for layer, (mean, most) in zip(layers, token.cg_steps)]
    budget = f"tol {mesa.cg_tol:g}, at most {mesa.cg_steps_train}" if mesa.cg_tol else f"{mesa.cg_steps_train} fixed"
    print(f"CG steps of the forward solves per Mesa layer ({budget}): "
          + ", ".join(f"layer {r['layer']} mean {r['mean']:.2f} max {r['max']:.0f}" for r in report["cg_steps_forward"]))

  nll = losses.by_position(token.nll, token.mask)
  buckets = losses.position_buckets(len(nll))
  report.update(loss_by_position=_finite(nll), position_buckets=buckets,
                loss_by_bucket=losses.bucketed(token.nll, token.mask))
  baseline_nll = None
  if _BASELINE.value:
    base = runs.load_run(_BASELINE.value, None, mesh)
    if base.lm.vocab_size < run.lm.vocab_size:
      raise ValueError(f"--baseline_workdir {_BASELINE.value}: vocabulary {base.lm.vocab_size} is smaller than the "
                       f"evaluated run's {run.lm.vocab_size}")
    base_token = losses.token_losses(runs.model_from(base.lm, base.params), batches, mesh)
    baseline_nll = losses.by_position(base_token.nll, base_token.mask)
    delta = losses.bucketed(token.nll - base_token.nll, token.mask)
    report["baseline"] = {"workdir": os.path.abspath(_BASELINE.value), "step": base.step,
                          "architecture": base.config.model.architecture, **losses.summary(base_token),
                          "loss_by_position": _finite(baseline_nll),
                          "loss_by_bucket": losses.bucketed(base_token.nll, base_token.mask)}
    report["delta_loss_by_bucket"] = delta
  plots.plot_positions(os.path.join(out, "positions.png"), nll, name, baseline_nll,
                       report["baseline"]["architecture"] if baseline_nll is not None else "baseline")
  cell = lambda v: "—" if v is None else f"{v:.4f}"
  columns = ["positions", "NLL"] + (["baseline NLL", "ΔNLL"] if baseline_nll is not None else [])
  print("\nloss by token position\n| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
  for i, (first, last) in enumerate(buckets):
    row = f"| {first}–{last} | {cell(report['loss_by_bucket'][i])} |"
    if baseline_nll is not None:
      row += f" {cell(report['baseline']['loss_by_bucket'][i])} | {cell(report['delta_loss_by_bucket'][i])} |"
    print(row)

  if "mesa" in run.lm.mixers and (_CG_STEPS.value or _CG_TOLS.value):
    fixed = _numbers(_CG_STEPS, int)
    most = max(fixed + [run.lm.mesa.cg_steps_decode])
    tols = _numbers(_CG_TOLS, float)
    budgets = ([cg_sweep.Budget(s) for s in fixed] + [cg_sweep.Budget(most, t) for t in tols]
               + [cg_sweep.Budget(most, t, warm_start=True) for t in tols if _CG_WARM_START.value])
    reference = cg_sweep.Budget(_CG_REFERENCE.value or run.lm.mesa.cg_steps_decode)
    rows = cg_sweep.sweep(run.lm, run.params, batches[:max(_CG_BATCHES.value, 1)], budgets, reference)
    report["cg_sweep"] = rows
    plots.plot_cg_sweep(os.path.join(out, "cg_sweep.png"), rows)
    print(f"\ninference CG budget (teacher-forced decoding; Δ: paired against {reference.label}, ± one standard "
          f"error)\n| budget | NLL | ppl | CG steps / token | ΔNLL | max abs ΔNLL | same top-1 |\n"
          + "|---" * 7 + "|")
    for r in rows:
      print(f"| {r['budget']} | {r['loss']:.4f} | {r['ppl']:.3f} | {r['mean_cg_steps']:.2f} | "
            f"{r['delta_loss']:+.2e} ± {r['delta_loss_se']:.1e} | {r['max_abs_delta']:.1e} | "
            f"{r['argmax_agreement']:.2%} |")
  return report


def main(argv):
  cli.start(argv)
  from mesanet_jax import sharding
  from mesanet_jax.eval import runs
  from mesanet_jax.models import fast_path
  with cli.one_line_errors("mesanet-eval"):
    if not _WORKDIR.value:
      raise ValueError("give --workdir (a run); MAD results are read by mesanet-mad-table")
    mesh = sharding.make_mesh(*_numbers(_MESH, int))
    run = runs.load_run(_WORKDIR.value, None if _STEP.value < 0 else _STEP.value, mesh)
    if _IMPL.value:
      run = run._replace(lm=dataclasses.replace(run.lm, mesa=dataclasses.replace(run.lm.mesa, impl=_IMPL.value)))
    print(fast_path.summary_line(run.lm))
    out = _OUT.value or os.path.join(_WORKDIR.value, "eval", f"step_{run.step}")
    os.makedirs(out, exist_ok=True)
    report = {"mesa_path": fast_path.describe(run.lm), **evaluate_run(run, mesh, out)}
    with open(os.path.join(out, "eval.json"), "w") as f:
      json.dump(report, f, indent=1)
  print(f"\nwrote {os.path.join(out, 'eval.json')} and the plots beside it")


def run():
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
