"""Multi-GPU training throughput: one `experiments/train.py` run per mesh at the same per-device batch, then a table of
tokens/s, MFU, peak memory per GPU and loss, with the scaling efficiency against the first (single-device) run.

  python benchmarks/train_scaling.py --workdir=/tmp/scaling --meshes=1gpu:1,1,1,dp:4,1,1,fsdp:1,4,1,fsdp_tp:1,2,2 \
      --config=experiments/configs/lm.py:mesanet,medium,15b --per_device_batch=8 --num_steps=200 \
      --overrides=model.impl=pallas

Each run gets the first data·fsdp·tensor GPUs of --gpus (CUDA_VISIBLE_DEVICES; on CPU as many fake devices) and a global batch of per_device_batch ·
data · fsdp (tensor parallelism splits heads, not the batch). Steady-state numbers are medians over the logged
intervals after the first two (which include compilation). Writes <workdir>/scaling.json and scaling_losses.png.
`--summarize_only` rebuilds the table from runs already in workdir.
"""
import json
import os
import statistics
import subprocess
import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/mesanet_scaling", "one sub-directory per run")
_MESHES = flags.DEFINE_list("meshes", ["1gpu:1,1,1", "dp:2,1,1", "fsdp:1,2,1"],
                            "name:data,fsdp,tensor entries (comma-joined); the first is the scaling baseline")
_CONFIG = flags.DEFINE_string("config", "experiments/configs/lm.py:mesanet,medium,15b", "trainer config")
_PER_DEVICE_BATCH = flags.DEFINE_integer("per_device_batch", 8, "sequences per data shard per step")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 200, "train steps per run")
_LOG_EVERY = flags.DEFINE_integer("log_every", 10, "steps per logged interval")
_OVERRIDES = flags.DEFINE_list("overrides", ["model.impl=pallas"], "extra key=value config overrides for every run")
_GPUS = flags.DEFINE_list("gpus", [str(i) for i in range(8)], "GPU ids to take runs from (a run uses the first N)")
_SUMMARIZE_ONLY = flags.DEFINE_bool("summarize_only", False, "only summarise runs already in workdir")


def parse_meshes(entries: list[str]) -> dict[str, tuple[int, int, int]]:
  """["1gpu:1", "1", "1", "dp:2", "1", "1"] (absl splits the flag on commas) -> {"1gpu": (1, 1, 1), "dp": (2, 1, 1)}."""
  if len(entries) % 3 or not all(":" in e for e in entries[::3]):
    raise ValueError(f"--meshes must be name:data,fsdp,tensor entries, got {','.join(entries)!r}")
  meshes = {}
  for i in range(0, len(entries), 3):
    name, data = entries[i].split(":")
    meshes[name] = (int(data), int(entries[i + 1]), int(entries[i + 2]))
  return meshes


def train(name: str, mesh: tuple[int, int, int]) -> None:
  """One trainer run in <workdir>/<name> on the first data·fsdp·tensor GPUs; raises if it fails."""
  data, fsdp, tensor = mesh
  devices = data * fsdp * tensor
  overrides = [f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}",
               f"train.batch_size={_PER_DEVICE_BATCH.value * data * fsdp}", f"train.num_steps={_NUM_STEPS.value}",
               f"train.log_every={_LOG_EVERY.value}", f"train.eval_every={10 * _NUM_STEPS.value}",
               "train.progress_bar=False", f"checkpoint.every_steps={_NUM_STEPS.value}", *_OVERRIDES.value]
  command = [sys.executable, "-m", "experiments.train", f"--config={_CONFIG.value}",
             f"--workdir={os.path.join(_WORKDIR.value, name)}", *(f"--config.{o}" for o in overrides)]
  # GPUs: the first `devices` of --gpus. CPU (a smoke test): as many fake host devices.
  host_devices = f"--xla_force_host_platform_device_count={devices}"
  env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(_GPUS.value[:devices]),
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {host_devices}".strip())
  print(f"== {name}: mesh data={data} fsdp={fsdp} tensor={tensor} on {devices} GPU(s)\n$ {' '.join(command)}",
        flush=True)
  subprocess.run(command, env=env, check=True)


def summarize(name: str, mesh: tuple[int, int, int]) -> dict:
  """Steady-state medians of one run's metrics.jsonl (the first two logged intervals include compilation)."""
  with open(os.path.join(_WORKDIR.value, name, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if '"loss"' in line]
  steady = rows[2:] or rows
  def median(key):  # NaN where the trainer logged none (MFU on CPU)
    values = [float(r[key]) for r in steady if isinstance(r.get(key), (int, float))]
    return statistics.median(values) if values else float("nan")

  return dict(
      name=name, devices=mesh[0] * mesh[1] * mesh[2], mesh=dict(data=mesh[0], fsdp=mesh[1], tensor=mesh[2]),
      step_time_s=median("step_time_s"), tokens_per_s=median("tokens_per_s"), mfu=median("mfu"),
      peak_memory_gib=max(r.get("peak_memory_gib", 0.0) for r in rows),
      first_loss=rows[0]["loss"], last_loss=rows[-1]["loss"],
      losses=[(r["step"], r["loss"]) for r in rows])


def plot(results: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for r in results:
    steps, losses = zip(*r["losses"])
    ax.plot(steps, losses, label=f"{r['name']} ({r['devices']} GPU)")
  ax.set(xlabel="step", ylabel="train loss", title="loss per mesh")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  del argv
  meshes = parse_meshes(_MESHES.value)
  if not _SUMMARIZE_ONLY.value:
    for name, mesh in meshes.items():
      train(name, mesh)
  results = [summarize(name, mesh) for name, mesh in meshes.items()]
  base = results[0]["tokens_per_s"] / results[0]["devices"]
  print("| run | GPUs | mesh (data, fsdp, tensor) | step | tokens/s | MFU | peak GiB/GPU | loss first → last "
        "| scaling eff. |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for r in results:
    r["scaling_efficiency"] = r["tokens_per_s"] / (r["devices"] * base)
    m = r["mesh"]
    print(f"| {r['name']} | {r['devices']} | {m['data']}, {m['fsdp']}, {m['tensor']} | {r['step_time_s'] * 1e3:.0f} ms "
          f"| {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {r['peak_memory_gib']:.1f} "
          f"| {r['first_loss']:.3f} → {r['last_loss']:.3f} | {r['scaling_efficiency']:.1%} |")
  with open(os.path.join(_WORKDIR.value, "scaling.json"), "w") as f:
    json.dump(results, f, indent=1)
  plot(results, os.path.join(_WORKDIR.value, "scaling_losses.png"))


if __name__ == "__main__":
  app.run(main)
