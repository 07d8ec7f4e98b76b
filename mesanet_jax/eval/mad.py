"""MAD accuracy in the paper's protocol (App. F; PAPER_NOTES §6.7), laid out like its Table 9.

Each run is one (task, architecture, lr, weight decay, difficulty variant) point, e.g. one grid point of
`launch/sweep.py` over `experiments/configs/mad.py:<task>`. Per task and architecture, the accuracies of runs that
share (lr, weight decay) are averaged over their variants (runs differing in data settings), and the best such mean
over the optimiser grid is reported. Table 9 merges in-context and noisy recall into one column (we average the two)
and its Avg is the mean of the five columns.
"""
import itertools

COLUMNS = ("IC & Noisy Recall", "Fuzzy Recall", "Memorize", "Selective Copy", "Compress")
TASK_COLUMN = {"in_context_recall": 0, "noisy_recall": 0, "fuzzy_recall": 1, "memorize": 2, "selective_copy": 3,
               "compress": 4}
# Paper Table 9 (% accuracy): the five columns and Avg.
PAPER_TABLE9 = {
    "MesaNet (paper)": (100.0, 58.5, 77.2, 99.2, 45.4, 76.1),
    "Gated DeltaNet (paper)": (100.0, 32.7, 81.7, 95.7, 45.0, 71.0),
    "Transformer (paper)": (100.0, 48.6, 84.7, 96.0, 49.5, 75.8),
}


def best_accuracy(runs: list[dict]) -> dict:
  """runs: [{"task", "lr", "weight_decay", "accuracy"}] of one task and architecture -> {"accuracy": best mean over
  variants (%), "lr", "weight_decay", "variants"}."""
  key = lambda r: (r["lr"], r["weight_decay"])
  means = []
  for (lr, wd), group in itertools.groupby(sorted(runs, key=key), key=key):
    group = list(group)
    means.append((sum(r["accuracy"] for r in group) / len(group), lr, wd, len(group)))
  accuracy, lr, wd, variants = max(means)
  return {"accuracy": 100.0 * accuracy, "lr": lr, "weight_decay": wd, "variants": variants}


def table9(runs: list[dict]) -> dict:
  """runs: [{"architecture", "task", "lr", "weight_decay", "accuracy"}] -> {architecture: {"tasks": {task: best},
  "columns": [% or None] × 5, "avg": % or None (only when every column has a value)}}."""
  out = {}
  for arch in sorted({r["architecture"] for r in runs}):
    tasks = {}
    for task in TASK_COLUMN:
      task_runs = [r for r in runs if r["architecture"] == arch and r["task"] == task]
      if task_runs:
        tasks[task] = best_accuracy(task_runs)
    columns = []
    for column in range(len(COLUMNS)):
      values = [best["accuracy"] for task, best in tasks.items() if TASK_COLUMN[task] == column]
      columns.append(sum(values) / len(values) if values else None)
    avg = sum(columns) / len(columns) if None not in columns else None
    out[arch] = {"tasks": tasks, "columns": columns, "avg": avg}
  return out


def markdown(table: dict) -> str:
  """Our rows (from `table9`) under the paper's Table 9 rows."""
  cell = lambda v: "—" if v is None else f"{v:.1f}"
  lines = ["| model | " + " | ".join(COLUMNS) + " | Avg |", "|---" * (len(COLUMNS) + 2) + "|"]
  for name, values in PAPER_TABLE9.items():
    lines.append(f"| {name} | " + " | ".join(cell(v) for v in values) + " |")
  for arch, row in table.items():
    lines.append(f"| {arch} (ours) | " + " | ".join(cell(v) for v in row["columns"]) + f" | {cell(row['avg'])} |")
  return "\n".join(lines)
