"""Prints the MAD results beside the paper's Table 9: `mesanet-mad-table` or `python -m experiments.mad_table`.

    mesanet-mad-table --results=runs/mad/results.jsonl            # Table 9 (both scorings), per-variant table, PNG

Scores (mesanet_jax/mad/table.py): mad-lab's (best lr × wd per variant, then the mean over variants) and the
paper's wording (best lr × wd of the mean over variants). Writes table9.md, variants.md, table9.json and table9.png
beside --results (or into --out).
"""
import json
import os

from absl import app, flags

from . import cli

_RESULTS = flags.DEFINE_string("results", "runs/mad/results.jsonl", "the grid's JSONL (mesanet-mad-grid --results)")
_OUT = flags.DEFINE_string("out", "", "output directory (default: the results file's)")
_METRIC = flags.DEFINE_enum("metric", "accuracy", ["accuracy", "accuracy_micro"],
                            "accuracy: mad-lab's (macro per test batch, batch mean); accuracy_micro: share of "
                            "scored tokens right")
_GRID_POINTS = flags.DEFINE_integer("grid_points", 8, "lr × wd points a variant needs to count as complete")


def main(argv):
  cli.start(argv)
  from mesanet_jax.mad import table, variants
  with cli.one_line_errors("mesanet-mad-table"):
    records = table.read(_RESULTS.value)
    if not records:
      raise ValueError(f"--results {_RESULTS.value}: no finished jobs")
    expected = {t: ([v.name for v in variants.variants(t)], _GRID_POINTS.value) for t in variants.TASKS}
    scores = table.task_scores(records, expected, _METRIC.value)
    rows = table.table9(scores)
    out = _OUT.value or os.path.dirname(os.path.abspath(_RESULTS.value))
    os.makedirs(out, exist_ok=True)
    main_table, per_variant = table.markdown(rows), table.variant_markdown(scores, expected)
    print(f"MAD accuracy (%), {len(records)} jobs, metric {_METRIC.value}; early stopping at 99.9 % test accuracy "
          f"(mad-lab)\n\n{main_table}\n\nbest accuracy per variant (lr, wd)\n\n{per_variant}")
    with open(os.path.join(out, "table9.md"), "w") as f:
      f.write(main_table + "\n")
    with open(os.path.join(out, "variants.md"), "w") as f:
      f.write(per_variant + "\n")
    with open(os.path.join(out, "table9.json"), "w") as f:
      json.dump({"table9": rows, "scores": {"/".join(k): v for k, v in scores.items()}}, f, indent=1)
    table.plot(rows, os.path.join(out, "table9.png"))
  print(f"\nwrote table9.md, variants.md, table9.json and table9.png in {out}")


def run():
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
