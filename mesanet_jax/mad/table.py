"""Table 9 of the MesaNet paper from the grid's results, scored both ways, the per-variant table and a figure.

- mad-lab's score (`mad/analysis.py:120-160`, then 164-199): the best (lr, weight decay) per variant, then the mean
  over the task's variants. Always ≥ the paper's.
- The paper's wording (App. F.1): the best over the grid of the mean accuracy across the variants.
Table 9's first column merges in-context and noisy recall (how is not stated: we average the two task scores); Avg
is the mean of the five columns. A task counts only once every variant has every grid point (else "—", and the
missing count is shown). Early stopping at 99.9 % test accuracy as in mad-lab, and each job's accuracy that of its
epoch of least test perplexity (mad-lab's best checkpoint).
"""
import collections
import json
import statistics

COLUMNS = ("IC & Noisy Recall", "Fuzzy Recall", "Memorize", "Selective Copy", "Compress")
TASK_COLUMN = {"in_context_recall": 0, "noisy_recall": 0, "fuzzy_recall": 1, "memorize": 2, "selective_copy": 3,
               "compress": 4}
NAMES = {"mesanet": "MesaNet", "transformer": "Transformer", "gdn": "Gated DeltaNet", "hawk": "Hawk",
         "hawk_mesa": "Hawk-MesaNet"}
# Paper Table 9 (% accuracy): the five columns and Avg (PAPER_NOTES §6.7).
PAPER = {
    "gdn": (100.0, 32.7, 81.7, 95.7, 45.0, 71.0),
    "hawk": (93.0, 13.6, 91.3, 77.0, 47.7, 64.5),
    "mesanet": (100.0, 58.5, 77.2, 99.2, 45.4, 76.1),
    "hawk_mesa": (100.0, 30.2, 85.6, 99.6, 52.3, 73.5),
    "transformer": (100.0, 48.6, 84.7, 96.0, 49.5, 75.8),
}


# Job settings that change the model or its training (not only how it computes): one table holds one value of each
# per architecture. A record written before a setting existed had its default.
# "selection": which evaluation a record's accuracy is of: "least_test_perplexity" (mad-lab's best checkpoint) or
# "final" (the last one: records written before the grid kept the best checkpoint). "cg_tol": Mesa's CG tolerance in
# training (None: every solve runs cg_steps, the paper's fixed steps). "residual_dtype": the residual stream's dtype
# where it differs from "dtype" (None: the stream in "dtype"; "float32" with bf16 compute: autocast's mixed precision).
# "decay_embedding": weight decay on the embedding table too (mad-lab's AdamW groups). "seed": the data and init seed
# (one file per seed; `replicate_markdown` sets several side by side). "max_epochs": the epochs a job trains unless it
# stops early (the paper's 200). "num_examples": a cap on every variant's training and test sets (smoke runs; None:
# each variant's own sizes). "autoencoder_linear_std": the compression autoencoder's linear kernels all N(0, std²)
# (mad-lab's autoencoder: 0.02), None: as the language model's.
PROTOCOL = {"dtype": "float32", "residual_dtype": None, "tie_embeddings": True, "embed_std": None,
            "decay_embedding": False, "linear_init_variance": 1.0, "cg_steps": 30, "cg_tol": None,
            "selection": "final", "seed": 0, "max_epochs": 200, "num_examples": None, "autoencoder_linear_std": None}
# The settings that concern some tasks only: a record of another task holds any value of them.
SETTING_TASKS = {"autoencoder_linear_std": {"compress"}}


def applies(setting: str, tasks) -> bool:
  """Whether `setting` (of `PROTOCOL`) concerns jobs of any of `tasks`."""
  return setting not in SETTING_TASKS or bool(SETTING_TASKS[setting] & set(tasks))


def settings_that_differ(recorded: dict, ours: dict, tasks) -> list[str]:
  """The `PROTOCOL` settings concerning jobs of `tasks` in which `recorded` (a record, or a save's settings; one it
  lacks had its default) differs from `ours`, in `PROTOCOL`'s order."""
  return [k for k, default in PROTOCOL.items() if applies(k, tasks) and recorded.get(k, default) != ours[k]]


KEY_FIELDS = ("architecture", "task", "variant", "lr", "weight_decay")


def record_key(record: dict) -> tuple:
  """The key of the job a record is of (`training.Job.key`): architecture, task, variant, lr, weight decay."""
  return tuple(record[k] for k in KEY_FIELDS)


def settings_by_architecture(records: list[dict]) -> dict:
  """{architecture: {setting: Counter of its values as JSON}} over `PROTOCOL`'s settings (a record without one had
  its default)."""
  out = collections.defaultdict(lambda: collections.defaultdict(collections.Counter))
  for r in records:
    for key, default in PROTOCOL.items():
      if applies(key, [r["task"]]):
        out[r["architecture"]][key][json.dumps(r.get(key, default))] += 1
  return out


def read(path: str) -> list[dict]:
  """The grid's records; a ValueError naming the line if one is not a record (not JSON, or without a job's key), or
  if one architecture's records mix values of a `PROTOCOL` setting."""
  records = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {number}: not a JSON record ({e.msg}): {line.strip()[:80]!r}") from None
      missing = [k for k in KEY_FIELDS if k not in record] if isinstance(record, dict) else list(KEY_FIELDS)
      if missing:
        raise ValueError(f"{path}, line {number}: not a MAD grid record (no {missing[0]!r}): {line.strip()[:80]!r}")
      records.append(record)
  by_architecture = settings_by_architecture(records)
  for key in PROTOCOL:
    for architecture, settings in by_architecture.items():
      counts = settings[key]
      if len(counts) > 1:
        found = ", ".join(f"{value} ({count} jobs)" for value, count in counts.items())
        raise ValueError(f"{path}: the {architecture} jobs mix {key} = {found}; keep runs of different settings "
                         f"in separate --results files")
  return records


def task_scores(records: list[dict], expected: dict, metric: str = "accuracy") -> dict:
  """{(architecture, task): {"madlab": %, "paper": %, "missing": n, "best": {variant: (%, lr, wd)}}}.

  expected: {task: (variant names, number of grid points)}; a score is None while a job is missing."""
  runs = collections.defaultdict(dict)  # (arch, task) -> {(variant, lr, wd): accuracy}
  for r in records:
    runs[(r["architecture"], r["task"])][(r["variant"], r["lr"], r["weight_decay"])] = 100.0 * r[metric]
  out = {}
  for (arch, task), points in runs.items():
    names, grid_size = expected[task]
    by_variant = collections.defaultdict(dict)
    by_point = collections.defaultdict(dict)
    for (variant, lr, wd), accuracy in points.items():
      by_variant[variant][(lr, wd)] = accuracy
      by_point[(lr, wd)][variant] = accuracy
    missing = sum(max(0, grid_size - len(by_variant[v])) for v in names)
    best = {v: max((acc, lr, wd) for (lr, wd), acc in by_variant[v].items()) for v in names if by_variant[v]}
    complete = missing == 0
    madlab = sum(best[v][0] for v in names) / len(names) if complete else None
    full_points = [p for p in by_point.values() if all(v in p for v in names)]
    paper = max(sum(p[v] for v in names) / len(names) for p in full_points) if complete and full_points else None
    partial = sum(b[0] for b in best.values()) / len(best) if best else None  # mad-lab's, over what is there
    out[(arch, task)] = {"madlab": madlab, "paper": paper, "partial": partial, "missing": missing, "best": best}
  return out


def table9(scores: dict) -> dict:
  """{architecture: {"madlab": [5 columns + Avg], "paper": [...]}} (None where a task is incomplete)."""
  out = {}
  for arch in sorted({a for a, _ in scores}, key=lambda a: list(NAMES).index(a) if a in NAMES else 99):
    row = {}
    for way in ("madlab", "paper"):
      columns = []
      for column in range(len(COLUMNS)):
        values = [scores.get((arch, t), {}).get(way) for t, c in TASK_COLUMN.items() if c == column]
        columns.append(None if None in values else sum(values) / len(values))
      columns.append(None if None in columns else sum(columns) / len(columns))
      row[way] = columns
    out[arch] = row
  return out


def _cell(value) -> str:
  return "—" if value is None else f"{value:.1f}"


def markdown(table: dict) -> str:
  """Each architecture: the paper's row, then ours scored mad-lab's way and the paper's way."""
  lines = ["| model | " + " | ".join(COLUMNS) + " | Avg |", "|---" * (len(COLUMNS) + 2) + "|"]
  for arch, row in table.items():
    name = NAMES.get(arch, arch)
    if arch in PAPER:
      lines.append(f"| {name} (paper) | " + " | ".join(_cell(v) for v in PAPER[arch]) + " |")
    lines.append(f"| {name} (ours, mad-lab score) | " + " | ".join(_cell(v) for v in row["madlab"]) + " |")
    lines.append(f"| {name} (ours, paper score) | " + " | ".join(_cell(v) for v in row["paper"]) + " |")
  return "\n".join(lines)


def variant_markdown(scores: dict, expected: dict) -> str:
  """Per task and variant, each architecture's best accuracy over the grid (lr, wd); per task the missing jobs and
  mad-lab's score over the variants present so far (a partial grid's progress, not a Table 9 number)."""
  archs = sorted({a for a, _ in scores}, key=lambda a: list(NAMES).index(a) if a in NAMES else 99)
  lines = ["| task | variant | " + " | ".join(NAMES.get(a, a) for a in archs) + " |", "|---" * (len(archs) + 2) + "|"]
  for task, (names, _) in expected.items():
    for variant in names:
      cells = []
      for arch in archs:
        best = scores.get((arch, task), {}).get("best", {}).get(variant)
        cells.append("—" if best is None else f"{best[0]:.1f} ({best[1]:g}, {best[2]:g})")
      lines.append(f"| {task} | {variant} | " + " | ".join(cells) + " |")
    cells = [f"{_cell(s['partial'])}, {s['missing']} jobs missing" if (s := scores.get((a, task))) else "—"
             for a in archs]
    lines.append(f"| {task} | mean of the best so far | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def setting_differences(records: list[dict], other: list[dict]) -> dict:
  """{architecture: {setting: (value here, value there)}} for the `PROTOCOL` settings in which two results files'
  jobs of an architecture both hold differ (`read` has made each file's value one per architecture; a setting of
  some tasks only is compared where both files hold such jobs)."""
  here, there = settings_by_architecture(records), settings_by_architecture(other)
  out = {}
  for arch in sorted(here.keys() & there.keys()):
    pairs = {k: (next(iter(here[arch][k])), next(iter(there[arch][k]))) for k in PROTOCOL
             if here[arch][k] and there[arch][k]}
    out[arch] = {k: v for k, v in pairs.items() if v[0] != v[1]}
  return out


def _points_all_hold(runs: list[list[dict]], metric: str) -> tuple[list[dict], dict]:
  """Each run's {record key: metric in %}, and {(architecture, task, variant): [(lr, wd)]} of the points every run
  holds."""
  values = [{record_key(r): 100.0 * r[metric] for r in rs} for rs in runs]
  variants = collections.defaultdict(list)
  for key in set.intersection(*(set(v) for v in values)):
    variants[key[:3]].append(key[3:])
  return values, variants


def _best_and_mean(values: dict, variant: tuple, points: list) -> tuple[tuple, float]:
  """Over `points` of (architecture, task, variant) in one run's `values`: (best %, its lr, its wd) and the mean %."""
  accuracies = [(values[(*variant, *p)], *p) for p in points]
  return max(accuracies), sum(a[0] for a in accuracies) / len(accuracies)


def comparison_markdown(records: list[dict], other: list[dict], metric: str = "accuracy") -> str:
  """Per (architecture, task, variant) that both files hold at the same (lr, wd) points: the best point here and
  there, and the mean over those points here and there (how much of the grid learns, not only its best corner)."""
  values, variants = _points_all_hold([records, other], metric)
  lines = ["| architecture | task | variant | points | best here (lr, wd) | best there (lr, wd) | "
           "Δ best (there − here) | mean here | mean there |", "|---" * 9 + "|"]
  for (arch, task, variant), points in sorted(variants.items()):
    (best, mean), (best_there, mean_there) = (_best_and_mean(v, (arch, task, variant), points) for v in values)
    lines.append(f"| {arch} | {task} | {variant} | {len(points)} | {best[0]:.1f} ({best[1]:g}, {best[2]:g}) "
                 f"| {best_there[0]:.1f} ({best_there[1]:g}, {best_there[2]:g}) | {best_there[0] - best[0]:+.1f} | "
                 f"{mean:.1f} | {mean_there:.1f} |")
  return "\n".join(lines)


def replicate_markdown(runs: list[list[dict]], metric: str = "accuracy") -> str:
  """Runs of one grid under different seeds (one results file each, `setting_differences` only in "seed"): per
  (architecture, task, variant) that every run holds at the same (lr, wd) points, the best point's accuracy in each
  run (its lr, wd), their mean ± sample standard deviation, and the mean over the points in each: how much of a
  one-seed grid's best point is its seed."""
  values, variants = _points_all_hold(runs, metric)
  seeds = [json.dumps(r.get("seed", PROTOCOL["seed"])) for r in (rs[0] for rs in runs)]
  lines = [f"| architecture | task | variant | points | best per seed ({', '.join(seeds)}) | best: mean ± sd | "
           "mean over the points per seed |", "|---" * 7 + "|"]
  for (arch, task, variant), points in sorted(variants.items()):
    best, means = zip(*(_best_and_mean(v, (arch, task, variant), points) for v in values))
    spread = statistics.stdev(b[0] for b in best) if len(best) > 1 else 0.0
    lines.append(f"| {arch} | {task} | {variant} | {len(points)} | "
                 + ", ".join(f"{b[0]:.1f} ({b[1]:g}, {b[2]:g})" for b in best)
                 + f" | {statistics.fmean(b[0] for b in best):.1f} ± {spread:.1f} | "
                 + ", ".join(f"{m:.1f}" for m in means) + " |")
  return "\n".join(lines)


def plot(table: dict, path: str) -> None:
  """Bars per Table 9 column: for each architecture the paper's value and ours (mad-lab's and the paper's score)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  labels = list(COLUMNS) + ["Avg"]
  fig, axes = plt.subplots(1, len(table), figsize=(4.2 * max(len(table), 1), 3.6), squeeze=False, sharey=True)
  for ax, (arch, row) in zip(axes[0], table.items()):
    series = [("paper", PAPER.get(arch)), ("ours, mad-lab", row["madlab"]), ("ours, paper", row["paper"])]
    for k, (name, values) in enumerate(series):
      if values is None:
        continue
      xs = [i + (k - 1) * 0.27 for i, v in enumerate(values) if v is not None]
      ax.bar(xs, [v for v in values if v is not None], width=0.27, label=name)
    ax.set_title(NAMES.get(arch, arch))
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 105)
  axes[0][0].set_ylabel("accuracy (%)")
  axes[0][-1].legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
