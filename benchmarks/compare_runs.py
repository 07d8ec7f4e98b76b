"""Loss curves of several training runs in one PNG, and a table of their eval losses at the common eval steps.

    python benchmarks/compare_runs.py --runs="30 steps highest=runs/a,seed 1=runs/a2,tol 1e-4 default=runs/b" \
      --out=benchmarks/results/quality.png

Each run is LABEL=WORKDIR (or a metrics.jsonl file); torn lines are skipped (`train.metrics.read_metrics`). The
table gives each run's eval loss and its difference from the first run's, so a second seed of the first run shows
the run-to-run noise the other differences are judged against.
"""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)
from absl import app, flags  # noqa: E402

from mesanet_jax.train.metrics import read_metrics  # noqa: E402

_RUNS = flags.DEFINE_list("runs", None, "LABEL=WORKDIR entries; the first is the reference", required=True)
_OUT = flags.DEFINE_string("out", "runs.png", "the PNG")


def load(entry: str) -> tuple[str, list[dict]]:
  label, sep, path = entry.partition("=")
  if not sep:
    raise SystemExit(f"--runs entry {entry!r} is not LABEL=WORKDIR")
  return label, read_metrics(os.path.dirname(path) if path.endswith(".jsonl") else path)


def main(argv):
  del argv
  runs = [load(entry) for entry in _RUNS.value]
  fig, (train_ax, eval_ax) = plt.subplots(1, 2, figsize=(11, 4))
  for label, rows in runs:
    train_ax.plot([r["step"] for r in rows if "loss" in r], [r["loss"] for r in rows if "loss" in r], label=label)
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if evals:
      eval_ax.plot(*zip(*evals), "o-", label=label)
  for ax, title in ((train_ax, "train loss"), (eval_ax, "eval loss")):
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.savefig(_OUT.value, dpi=100, bbox_inches="tight")
  evals = {label: {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r} for label, rows in runs}
  steps = sorted(set.intersection(*(set(e) for e in evals.values())))
  reference = runs[0][0]
  print("| eval loss at step | " + " | ".join(str(s) for s in steps) + " |")
  print("|---" * (len(steps) + 1) + "|")
  for label, by_step in evals.items():
    cells = [f"{by_step[s]:.4f}" + ("" if label == reference else f" ({by_step[s] - evals[reference][s]:+.4f})")
             for s in steps]
    print(f"| {label} | " + " | ".join(cells) + " |")
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
