"""Expands a sweep spec into one trainer run per grid point, each with its own workdir, and runs them here in
sequence or prints the launch command of each for launch/local.sh, launch/tpu_pod.sh or launch/gpu_slurm.sbatch.

    python launch/sweep.py SPEC.py [--root=DIR] [--launcher=here|local|tpu|slurm] [--dry-run]
                           [--processes=N] [--tpu_args="--name=NAME --zone=ZONE"]

The spec is a Python file defining
    CONFIG = "experiments/configs/lm.py:mesanet,small,15b"   # the --config value (default: the embedded default)
    GRID = {"model.size": ["small", "medium"], "optim.lr": [1e-3, 3e-3]}   # config key -> values: their product
    FIXED = {"train.num_steps": 2000}                         # optional: set in every run
A point's workdir is <root>/<key=value,...> (root default: runs/<spec name>) and its flags are
`--config=CONFIG --workdir=... --config.<key>=<value>` for FIXED, then the point. Paths in CONFIG are relative to the
repository root. Idempotent: a run whose metrics.jsonl reached train.num_steps is skipped; any other run is (re)started
and resumes from its own checkpoint. `--dry-run` lists the runs and their commands and starts nothing.
"""
import argparse
import importlib.util
import itertools
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "experiments/configs/default.py"


class SweepError(ValueError):
  """A problem with the spec: one line on stderr, exit code 2."""


@dataclass
class Run:
  name: str
  workdir: str
  flags: list[str]  # for experiments.train
  num_steps: int


def _value(v) -> str:
  if isinstance(v, bool):
    return "true" if v else "false"
  if isinstance(v, (int, float, str)):
    return repr(v) if isinstance(v, float) else str(v)
  raise SweepError(f"values must be bool, int, float or str, got {v!r}")


def _load_config(config: str):
  path, _, arg = config.partition(":")
  spec = importlib.util.spec_from_file_location("sweep_config", ROOT / path)
  if spec is None or not (ROOT / path).is_file():
    raise SweepError(f"CONFIG file {path!r} not found (paths are relative to {ROOT})")
  if str(ROOT) not in sys.path:  # configs import mesanet_jax
    sys.path.insert(0, str(ROOT))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _set(config, key: str, value) -> None:
  *parents, leaf = key.split(".")
  node = config
  try:
    for part in parents:
      node = node[part]
    if leaf not in node:
      raise KeyError(leaf)
    node[leaf] = value
  except (KeyError, AttributeError, TypeError) as e:
    problem = "is not in the config" if not isinstance(e, TypeError) else f"cannot be {value!r} ({e})"
    raise SweepError(f"config key {key!r} {problem}") from None


def expand(spec_path: str, root: str | None = None) -> list[Run]:
  """The runs of a spec, in grid order (the last key varies fastest)."""
  spec = runpy.run_path(spec_path)
  grid, fixed, config_arg = spec.get("GRID"), spec.get("FIXED", {}), spec.get("CONFIG", DEFAULT_CONFIG)
  if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
    raise SweepError(f"{spec_path}: GRID must be a non-empty dict of config key -> non-empty list of values")
  root = os.path.abspath(root or os.path.join("runs", Path(spec_path).stem))
  runs = []
  for point in itertools.product(*grid.values()):
    name = ",".join(f"{key}={_value(value)}" for key, value in zip(grid, point))
    config = _load_config(config_arg)
    settings = {**fixed, **dict(zip(grid, point))}
    for key, value in settings.items():
      _set(config, key, value)
    workdir = os.path.join(root, re.sub(r"[^A-Za-z0-9._=,+-]", "-", name))
    flags = [f"--config={config_arg}", f"--workdir={workdir}"]
    flags += [f"--config.{key}={_value(value)}" for key, value in settings.items()]
    runs.append(Run(name, workdir, flags, config.train.num_steps))
  return runs


def last_step(workdir: str) -> int:
  """The highest step in <workdir>/metrics.jsonl (0 if none); a torn last line is ignored."""
  step = 0
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      for line in f:
        try:
          step = max(step, json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
          pass
  except FileNotFoundError:
    pass
  return step


def command(run: Run, launcher: str, processes: int = 2, tpu_args: str = "") -> list[str]:
  if launcher == "here":
    return [sys.executable, "-m", "experiments.train", *run.flags]
  if launcher == "local":
    return ["bash", "launch/local.sh", str(processes), *run.flags]
  if launcher == "tpu":
    return ["bash", "launch/tpu_pod.sh", *shlex.split(tpu_args), "run", *run.flags]
  if launcher == "slurm":
    return ["sbatch", "launch/gpu_slurm.sbatch", *run.flags]
  raise SweepError(f"unknown launcher {launcher!r} (here, local, tpu, slurm)")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("spec", help="a Python file defining GRID (and optionally CONFIG, FIXED)")
  parser.add_argument("--root", help="parent of the run workdirs (default runs/<spec name>)")
  parser.add_argument("--launcher", default="here", choices=["here", "local", "tpu", "slurm"],
                      help="here: run in sequence now; local/tpu/slurm: print one launch command per pending run")
  parser.add_argument("--processes", type=int, default=2, help="processes per run for --launcher=local")
  parser.add_argument("--tpu_args", default="", help="options for launch/tpu_pod.sh, e.g. '--name=p --zone=z'")
  parser.add_argument("--dry-run", action="store_true", help="list the runs and their commands; start nothing")
  args = parser.parse_args(argv)
  try:
    runs = expand(args.spec, args.root)
    pending = []
    for run in runs:
      done = last_step(run.workdir)
      if done >= run.num_steps:
        print(f"# skip {run.name}: done ({done}/{run.num_steps} steps)", file=sys.stderr)
      else:
        pending.append((run, command(run, args.launcher, args.processes, args.tpu_args)))
  except SweepError as e:
    print(f"sweep.py: error: {e}", file=sys.stderr)
    return 2
  if args.dry_run or args.launcher != "here":
    for _, cmd in pending:
      print(shlex.join(cmd))
    return 0
  failed = []
  for i, (run, cmd) in enumerate(pending):
    print(f"sweep.py: [{i + 1}/{len(pending)}] {run.name}", file=sys.stderr, flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
      failed.append(run.name)
  if failed:
    print(f"sweep.py: {len(failed)} of {len(pending)} runs failed: {'; '.join(failed)}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
