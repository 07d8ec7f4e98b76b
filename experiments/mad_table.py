"""Prints the MAD results beside the paper's Table 9: `mesanet-mad-table` or `python -m experiments.mad_table`.

    mesanet-mad-table --results=runs/mad/results.jsonl            # Table 9 (both scorings), per-variant table, PNG
    mesanet-mad-table --results=runs/mad/results.jsonl --compare=runs/mad_ab/results.jsonl  # and the A/B per variant
    mesanet-mad-table --results=runs/mad/results.jsonl --replicates=runs/mad_seed1/results.jsonl  # seeds side by side

Scores (mesanet_jax/mad/table.py): mad-lab's (best lr × wd per variant, then the mean over variants) and the
paper's wording (best lr × wd of the mean over variants). Writes table9.md, variants.md, table9.json and table9.png
beside --results (or into --out). Then the device hours per architecture from the grid's usage.jsonl and, at those
rates with the early stopping measured so far, the hours the jobs left would take (mesanet_jax/mad/usage.py).
"""
import json
import os

from absl import app, flags

from . import cli

_RESULTS = flags.DEFINE_string("results", "runs/mad/results.jsonl", "the grid's JSONL (mesanet-mad-grid --results)")
_OUT = flags.DEFINE_string("out", "", "output directory (default: the results file's)")
_METRIC = flags.DEFINE_enum("metric", "accuracy", ["accuracy", "accuracy_micro", "final_accuracy"],
                            "accuracy: mad-lab's (macro per test batch, batch mean) at the job's best checkpoint "
                            "(least test perplexity); accuracy_micro: share of scored tokens right there; "
                            "final_accuracy: mad-lab's at the job's last evaluation")
_GRID_POINTS = flags.DEFINE_integer("grid_points", 8, "lr × wd points a variant needs to count as complete")
_USAGE = flags.DEFINE_string("usage", "", "the grid's device-time JSONL (default: usage.jsonl beside --results)")
_REPLICATES = flags.DEFINE_list("replicates", [], "the same grid under other seeds (mesanet-mad-grid --seed, each "
                                 "its own JSONL): prints, per variant all hold at the same (lr, wd) points, the best "
                                 "point in each, its mean ± sd over the seeds, and the mean over the points in each")
_COMPARE = flags.DEFINE_string("compare", "", "another grid's JSONL (e.g. an A/B of one setting): prints the "
                               "settings in which they differ and, per variant both hold at the same (lr, wd) "
                               "points, the best point and the mean over those points in each")


def main(argv):
  cli.start(argv)
  from mesanet_jax.mad import models, table, training, usage, variants
  with cli.one_line_errors("mesanet-mad-table"):
    records = table.read(_RESULTS.value)
    if not records:
      raise ValueError(f"--results {_RESULTS.value}: no finished jobs")
    if lacking := sum(_METRIC.value not in r for r in records):
      raise ValueError(f"--metric={_METRIC.value}: {lacking} of the {len(records)} records in {_RESULTS.value} have "
                       f"none (written before it was recorded)")
    expected = {t: ([v.name for v in variants.variants(t)], _GRID_POINTS.value) for t in variants.TASKS}
    scores = table.task_scores(records, expected, _METRIC.value)
    rows = table.table9(scores)
    out = _OUT.value or os.path.dirname(os.path.abspath(_RESULTS.value))
    os.makedirs(out, exist_ok=True)
    main_table, per_variant = table.markdown(rows), table.variant_markdown(scores, expected)
    selection = records[0].get("selection", table.PROTOCOL["selection"])
    dtype_of = lambda r: r.get("dtype", table.PROTOCOL["dtype"])
    precisions = sorted({(dtype_of(r), r.get("residual_dtype") or dtype_of(r)) for r in records})
    precision = " / ".join(f"activations {dtype}, residual stream {stream}" for dtype, stream in precisions)
    print(f"MAD accuracy (%), {len(records)} jobs, metric {_METRIC.value} (evaluation: {selection}; {precision}); "
          f"early stopping at 99.9 % test accuracy (mad-lab)\n\n{main_table}\n\nbest accuracy per variant (lr, wd)"
          f"\n\n{per_variant}")
    with open(os.path.join(out, "table9.md"), "w") as f:
      f.write(main_table + "\n")
    with open(os.path.join(out, "variants.md"), "w") as f:
      f.write(per_variant + "\n")
    with open(os.path.join(out, "table9.json"), "w") as f:
      json.dump({"table9": rows, "scores": {"/".join(k): v for k, v in scores.items()}}, f, indent=1)
    table.plot(rows, os.path.join(out, "table9.png"))
    usage_path = _USAGE.value or os.path.join(os.path.dirname(os.path.abspath(_RESULTS.value)), "usage.jsonl")
    done = {table.record_key(r) for r in records}
    everything = training.jobs(models.ARCHITECTURES, variants.all_variants())
    print(f"\n{usage_markdown(usage.read(usage_path), records, [j for j in everything if j.key not in done])}")
    if _COMPARE.value:
      other = table.read(_COMPARE.value)
      differences = "; ".join(f"{arch}: " + ", ".join(f"{k} {a} here, {b} there" for k, (a, b) in d.items())
                              for arch, d in table.setting_differences(records, other).items() if d)
      print(f"\n{_RESULTS.value} (here) against {_COMPARE.value} (there), {_METRIC.value}; settings that differ: "
            f"{differences or 'none'}\n\n{table.comparison_markdown(records, other, _METRIC.value)}")
    if _REPLICATES.value:
      runs = [records] + [table.read(path) for path in _REPLICATES.value]
      _check_replicates(runs, [_RESULTS.value] + _REPLICATES.value)
      print(f"\nthe same grid under {len(runs)} seeds ({', '.join([_RESULTS.value] + _REPLICATES.value)}), "
            f"{_METRIC.value}\n\n{table.replicate_markdown(runs, _METRIC.value)}")
  print(f"\nwrote table9.md, variants.md, table9.json and table9.png in {out}")


def _check_replicates(runs: list, paths: list) -> None:
  """A ValueError unless the runs differ in their seed alone (`table.PROTOCOL`'s other settings the same), each
  another seed."""
  from mesanet_jax.mad import table
  for path, other in zip(paths[1:], runs[1:]):
    if not other:
      raise ValueError(f"--replicates: {path} holds no finished jobs")
    for arch, differences in table.setting_differences(runs[0], other).items():
      if other_settings := [k for k in differences if k != "seed"]:
        k = other_settings[0]
        raise ValueError(f"--replicates: {path} ran {arch} with {k} {differences[k][1]}, --results with "
                         f"{differences[k][0]}: replicates differ in their seed alone (--compare sets an A/B side by "
                         f"side)")
  seeds = [{r.get("seed", table.PROTOCOL["seed"]) for r in records} for records in runs]
  for n, (path, seed) in enumerate(zip(paths, seeds)):
    if shared := seed & set().union(*seeds[:n]):
      raise ValueError(f"--replicates: {path} holds seed {min(shared)}, as an earlier file does: each file another "
                       f"seed")


def usage_markdown(rows: list, records: list, jobs_left: list) -> str:
  """Device hours per architecture so far and, at those rates, for the jobs left (mesanet_jax/mad/usage.py)."""
  from mesanet_jax.mad import training, usage
  spent, ahead = usage.summary(rows), usage.projection(rows, records, jobs_left, training.Protocol())
  lines = ["device time (usage.jsonl: each group run's wall time over the processes sharing the device)", "",
           "| architecture | device hours so far | jobs finished in them | devices | jobs left | hours for them at "
           "these rates (early stopping as measured) |", "|---|---|---|---|---|---|"]
  for arch in dict.fromkeys([*spent, *ahead]):
    s, a = spent.get(arch), ahead.get(arch, {"jobs_left": 0, "device_hours": 0.0})
    hours = "no run recorded" if a["device_hours"] is None else f"{a['device_hours']:.2f}"
    lines.append(f"| {arch} | {s['device_hours']:.2f} | {s['jobs_finished']} | {', '.join(s['devices'])} | "
                 f"{a['jobs_left']} | {hours} |" if s else f"| {arch} | 0 | 0 | | {a['jobs_left']} | {hours} |")
  return "\n".join(lines)


def run():
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
