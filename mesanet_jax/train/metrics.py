"""Step flops and MFU, and the metric writers: `<workdir>/metrics.jsonl` (one JSON line per logged step with
"step" and "loss"), TensorBoard event files, and a loss-curve PNG.

Flops are analytic matmul flops (2 per multiply-add) of forward + backward (= 3× forward for dense layers):
parameter matmuls 6·N·tokens, attention scores and values 3·4·T_eff·D per token and head, and the Mesa op from
`mesa_chunked_flops(backward=True)`, which counts every CG step of both solves. Gated DeltaNet layers are counted
like a Mesa op with no CG steps (its chunked form reads and writes the same states), an approximation.
MFU is against the dense bf16 peak of the device kind; unknown kinds (and CPUs) report "n/a".
CG steps per Mesa layer (adaptive CG): `cg/layer_03/fwd_mean` … `adj_max` per train step, `eval_cg/layer_03/fwd_mean`
and `fwd_max` per evaluation (layer = block index).
"""
import json
import os

import numpy as np

from mesanet_jax.models.config import LMConfig
from mesanet_jax.ops.flops import mesa_chunked_flops

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets, matched against jax's `device_kind`.
PEAK_FLOPS = {
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def peak_flops(device_kind: str) -> float | None:
  """Peak for a jax device_kind such as "NVIDIA H100 80GB HBM3"; None when unknown."""
  for prefix, peak in PEAK_FLOPS.items():
    if device_kind.startswith(prefix):
      return peak
  return None


CG_STEPS_KEYS = ("fwd_mean", "fwd_max", "adj_mean", "adj_max")  # the columns of ops.cg_steps.STATS


def cg_steps_metrics(layers: list[int], stats, prefix: str = "cg") -> dict:
  """{"<prefix>/layer_<i>/<column>": scalar} from CG steps per Mesa layer, stats [L, 4] (forward and adjoint) or
  [L, 2] (forward), row r of block layers[r]; jax or numpy arrays."""
  return {f"{prefix}/layer_{layer:02d}/{key}": stats[row, column] for row, layer in enumerate(layers)
          for column, key in enumerate(CG_STEPS_KEYS[:stats.shape[1]])}


def train_flops(lm: LMConfig, num_params: int, batch: int, seq_len: int) -> float:
  """Flops of one forward + backward over [batch, seq_len] tokens (embedding lookups are free; the tied
  read-out is a matmul)."""
  tokens = batch * seq_len
  flops = 6.0 * num_params * tokens
  for mixer in lm.mixers:
    if mixer in ("attention", "swa"):
      a = lm.attention
      span = seq_len / 2 if mixer == "attention" else min(a.window, seq_len)
      flops += 3 * 4 * tokens * span * a.num_heads * a.head_dim
    elif mixer in ("mesa", "gdn"):
      c = lm.mesa if mixer == "mesa" else lm.gdn
      steps = lm.mesa.cg_steps_train if mixer == "mesa" else 0
      flops += mesa_chunked_flops(batch, seq_len, c.num_heads, c.head_dim, c.head_dim, chunk_size=c.chunk_size,
                                  cg_steps=steps, backward=True)
  return flops


class MetricWriter:
  """Writes on process 0 only: JSONL (always), TensorBoard (when tensorboardX is installed)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      try:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        pass

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    row = {"step": int(step), **{k: (float(v) if isinstance(v, (int, float, np.number, np.ndarray)) else v)
                                 for k, v in metrics.items()}}
    with open(self.path, "a") as f:  # one write per row: a kill tears at most the last line (readers skip it)
      f.write(json.dumps(row) + "\n")
    if self.tb is not None:
      for key, value in row.items():
        if key != "step" and isinstance(value, float):
          self.tb.add_scalar(key, value, step)
      self.tb.flush()

  def close(self):
    if self.tb is not None:
      self.tb.close()


def _rows(path: str) -> list[dict]:
  """The rows of a metrics.jsonl; lines that do not parse as a JSON object with a "step" (a line torn by a kill)
  are skipped."""
  rows = []
  with open(path, errors="replace") as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if isinstance(row, dict) and isinstance(row.get("step"), int):
        rows.append(row)
  return rows


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  return _rows(path) if os.path.exists(path) else []


def reconcile_metrics(workdir: str, step: int) -> int:
  """Makes `<workdir>/metrics.jsonl` the log of a run restored at `step`: keeps the rows of steps ≤ `step` in
  increasing step order (a row is dropped when its step is not above the one before) and drops torn lines and the
  rows of steps the restored run will train again; rewrites the file atomically. Returns the lines dropped."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path, errors="replace") as f:
    lines = f.read().splitlines()
  kept, last = [], 0
  for row in _rows(path):
    if last < row["step"] <= step:
      kept.append(row)
      last = row["step"]
  if len(kept) == len(lines):
    return 0
  with open(path + ".tmp", "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in kept)
  os.replace(path + ".tmp", path)
  return len(lines) - len(kept)


def plot_losses(workdir: str, filename: str = "loss.png") -> str | None:
  """Train loss (and eval loss where logged) against step, from metrics.jsonl; returns the PNG path."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  rows = read_metrics(workdir)
  train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
  evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
  if not train:
    return None
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(*zip(*train), label="train")
  if evals:
    ax.plot(*zip(*evals), "o-", label="eval")
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_title(os.path.basename(os.path.normpath(workdir)))
  ax.grid(alpha=0.3)
  ax.legend()
  path = os.path.join(workdir, filename)
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)
  return path
