"""The evaluation's PNGs: loss by token position (with ΔNLL against a baseline) and the CG-budget sweep."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)
import numpy as np  # noqa: E402


def _smooth(values: np.ndarray, width: int) -> np.ndarray:
  """Moving average over `width` positions (NaN-aware), so per-position curves of few sequences are readable."""
  valid = np.isfinite(values)
  kernel = np.ones(width)
  sums = np.convolve(np.where(valid, values, 0.0), kernel, "same")
  counts = np.convolve(valid.astype(float), kernel, "same")
  return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def plot_positions(path: str, nll: np.ndarray, label: str, baseline: np.ndarray | None = None,
                   baseline_label: str = "baseline") -> None:
  """NLL by position nll [T] (log-x, lightly smoothed) and, with a baseline [T], ΔNLL = nll − baseline below."""
  positions = np.arange(1, len(nll) + 1)
  width = max(1, len(nll) // 64)
  rows = 2 if baseline is not None else 1
  fig, axes = plt.subplots(rows, 1, figsize=(7, 3.2 * rows), sharex=True, squeeze=False)
  ax = axes[0, 0]
  ax.plot(positions, _smooth(nll, width), label=label)
  if baseline is not None:
    ax.plot(positions, _smooth(baseline, width), label=baseline_label)
    delta = axes[1, 0]
    delta.plot(positions, _smooth(nll - baseline, width), color="C2")
    delta.axhline(0.0, color="gray", lw=0.8)
    delta.set_ylabel(f"ΔNLL ({label} − {baseline_label})")
    delta.grid(alpha=0.3)
  ax.set_ylabel("NLL (nats)")
  ax.set_xscale("log")
  ax.grid(alpha=0.3)
  ax.legend()
  axes[-1, 0].set_xlabel("token position (context length)")
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)


def plot_cg_sweep(path: str, rows: list[dict]) -> None:
  """Loss against the mean CG steps per token, one line each for fixed budgets, tolerances and warm-started
  tolerances."""
  fig, ax = plt.subplots(figsize=(6, 4))
  tolerance = lambda warm: [r for r in rows if r["tol"] is not None and r.get("warm_start", False) == warm]
  for name, selected in (("fixed steps", [r for r in rows if r["tol"] is None]), ("tolerance", tolerance(False)),
                         ("tolerance, warm start", tolerance(True))):
    if selected:
      selected = sorted(selected, key=lambda r: r["mean_cg_steps"])
      ax.plot([r["mean_cg_steps"] for r in selected], [r["loss"] for r in selected], "o-", label=name)
      for r in selected:
        ax.annotate(r["budget"], (r["mean_cg_steps"], r["loss"]), fontsize=7, textcoords="offset points",
                    xytext=(3, 3))
  ax.set_xlabel("CG steps per token (mean over Mesa layers and heads)")
  ax.set_ylabel("NLL (nats)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)
