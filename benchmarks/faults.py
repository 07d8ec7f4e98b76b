"""Fault injection for the trainer: tiny CPU runs (tests/train/tiny.py:text) hit by random faults, each resumed to
the end and compared with one uninterrupted run.

    .venv/bin/python benchmarks/faults.py --faults=20 --seed=0 --workdir=/tmp/faults

Faults (drawn at random): SIGTERM or SIGKILL at a random moment of a run (setup, steps, evals, checkpoint saves);
a torn last line appended to metrics.jsonl after a SIGKILL; a file of the newest checkpoint truncated or deleted
after a finished run (the trainer must fall back to the step before); two trainers started at once on one workdir.
After the fault the run is resumed (`mesanet-train` again) until it exits 0, then checked: every step's loss equal
to the uninterrupted run's (bit for bit), metrics.jsonl strictly increasing in step with every step once, no lock
file left, one writer (of two trainers started at once, the second is refused), and the params that evaluation
restores equal to the uninterrupted run's (no number is ever computed from another model). Prints one line per fault
and a summary; exit 1 if any fault broke a check. Kills come no earlier than 0.5 s after the start: before that the
interpreter has not yet installed the trainer's SIGTERM handler.
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("sigterm", "sigkill", "torn_metrics", "corrupt_checkpoint", "two_trainers")


def _command(workdir: Path, steps: int, every: int) -> list[str]:
  return [sys.executable, "-m", "experiments.train", f"--config={ROOT}/tests/train/tiny.py:text",
          f"--workdir={workdir}", f"--config.train.num_steps={steps}", f"--config.checkpoint.every_steps={every}",
          "--config.train.log_every=1", "--config.train.eval_every=5", "--config.train.progress_bar=False"]


def _env() -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
              XLA_FLAGS="--xla_backend_optimization_level=0",
              JAX_COMPILATION_CACHE_DIR=os.environ.get("JAX_COMPILATION_CACHE_DIR", ""))


def _start(workdir, args) -> subprocess.Popen:
  return subprocess.Popen(_command(workdir, args.steps, args.every), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _run(workdir, args) -> tuple[int, str]:
  process = _start(workdir, args)
  output, _ = process.communicate(timeout=600)
  return process.returncode, output


def _interrupt(workdir, args, sig, rng, wall: float) -> tuple[int, str, float]:
  """Starts a run, sends `sig` after a random delay within the uninterrupted run's wall time."""
  process = _start(workdir, args)
  delay = rng.uniform(0.5, wall)
  try:
    output, _ = process.communicate(timeout=delay)
  except subprocess.TimeoutExpired:
    process.send_signal(sig)
    output, _ = process.communicate(timeout=600)
  return process.returncode, output, delay


def _rows(workdir) -> list[dict]:
  path = Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _final_params(workdir):
  import jax
  import numpy as np
  from mesanet_jax.eval import runs
  run = runs.load_run(str(workdir))
  return run.step, [np.asarray(x) for x in jax.tree.leaves(run.params)]


def _check(workdir, args, reference: dict, reference_params) -> list[str]:
  """What is wrong with a finished workdir (empty: nothing)."""
  problems = []
  try:
    rows = _rows(workdir)
  except ValueError as e:
    return [f"metrics.jsonl has a line that is not JSON ({e})"]
  steps = [r["step"] for r in rows]
  if steps != list(range(1, args.steps + 1)):
    problems.append(f"metrics.jsonl steps are not 1..{args.steps} once each in order: {steps}")
  differing = {r["step"]: (r["loss"], reference.get(r["step"])) for r in rows if r["loss"] != reference.get(r["step"])}
  if differing:
    problems.append(f"losses differ from the uninterrupted run at steps {sorted(differing)[:5]}: "
                    f"{list(differing.values())[:2]}")
  if (Path(workdir) / "trainer.lock").exists():
    problems.append("trainer.lock left behind by a finished run")
  import numpy as np
  try:
    step, params = _final_params(workdir)
  except ValueError as e:  # evaluation refused the run's final checkpoint
    return problems + [f"evaluation refused the finished run: {e}"]
  if step != args.steps or any(not np.array_equal(a, b) for a, b in zip(params, reference_params)):
    problems.append(f"the params evaluation restores (step {step}) are not the uninterrupted run's")
  return problems


def _inject(kind: str, workdir: Path, args, rng, wall: float) -> tuple[str, list[str]]:
  """Applies one fault to a fresh `workdir`; returns (what happened, problems seen on the way)."""
  problems = []
  if kind in ("sigterm", "sigkill", "torn_metrics"):
    sig = signal.SIGTERM if kind == "sigterm" else signal.SIGKILL
    code, output, delay = _interrupt(workdir, args, sig, rng, wall)
    expected = (0,) if sig == signal.SIGTERM else (0, -signal.SIGKILL)  # 0: finished before the signal came
    if code not in expected:
      problems.append(f"{sig.name} at {delay:.1f} s: exit {code}: {output.strip().splitlines()[-1:]}")
    if "SIGTERM during setup" in output:
      landed = "during setup"
    elif "SIGTERM: saved step" in output:
      landed = "during the steps"
    else:
      landed = "killed" if code == -signal.SIGKILL else "after the run had ended"
    what = f"{sig.name} at {delay:.1f} s (exit {code}, {landed})"
    if kind == "torn_metrics":
      workdir.mkdir(parents=True, exist_ok=True)  # killed before the trainer made it
      with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "loss": 1.2')  # a row cut off by the kill
      what += ", then a torn metrics line"
    return what, problems
  if kind == "corrupt_checkpoint":
    code, output = _run(workdir, args)
    if code:
      problems.append(f"the run to corrupt failed: {output.strip().splitlines()[-1:]}")
    newest = workdir / "checkpoints" / str(args.steps)
    files = sorted(p for p in (newest / "state").rglob("*") if p.is_file() and p.name != "commit_success.txt")
    victim = rng.choice(files)
    if rng.random() < 0.5:
      victim.unlink()
      what = f"deleted {victim.relative_to(workdir)}"
    else:
      victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 2])
      what = f"truncated {victim.relative_to(workdir)}"
    return what, problems
  # two_trainers
  first, second = _start(workdir, args), _start(workdir, args)
  outputs = [p.communicate(timeout=600)[0] for p in (first, second)]
  codes = sorted(p.returncode for p in (first, second))
  refused = [o for o in outputs if "is in use by another trainer" in o]
  if codes != [0, 2] or len(refused) != 1:
    problems.append(f"two trainers at once: exit codes {codes}, {len(refused)} refused")
  return f"two trainers at once (exit codes {codes})", problems


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--faults", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", default="/tmp/mesanet_faults")
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--every", type=int, default=10, help="checkpoint.every_steps")
  args = parser.parse_args()
  root = Path(args.workdir).absolute()
  shutil.rmtree(root, ignore_errors=True)
  root.mkdir(parents=True)
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(root / "compilation_cache"))
  os.environ["JAX_PLATFORMS"] = "cpu"
  start = time.time()
  for name in ("warmup", "reference"):  # the second one runs compiled (from the cache), as the faulted runs do
    began = time.time()
    code, output = _run(root / name, args)
    if code:
      sys.exit(f"the uninterrupted run failed: {output[-2000:]}")
  wall = time.time() - began  # kills come at random moments within it
  reference = {r["step"]: r["loss"] for r in _rows(root / "reference")}
  if reference != {r["step"]: r["loss"] for r in _rows(root / "warmup")}:
    sys.exit("two uninterrupted runs gave different losses: the trainer is not deterministic here")
  reference_params = _final_params(root / "reference")[1]
  print(f"uninterrupted run: {args.steps} steps in {wall:.1f} s (compiled)", flush=True)

  rng = random.Random(args.seed)
  failures = 0
  for i in range(args.faults):
    kind = rng.choice(KINDS)
    workdir = root / f"fault_{i}"
    what, problems = _inject(kind, workdir, args, rng, wall)
    for attempt in range(3):  # resume to the end (a SIGKILL can leave nothing to resume from: then from scratch)
      code, output = _run(workdir, args)
      if code == 0:
        break
      problems.append(f"resume {attempt + 1}: exit {code}: {output.strip().splitlines()[-1:]}")
    else:
      problems.append("never finished")
    notes = [line for line in output.splitlines() if "corrupt" in line or "stale" in line or "dropped" in line]
    if code == 0:
      problems += _check(workdir, args, reference, reference_params)
    failures += bool(problems)
    print(f"fault {i:3d} {kind:18s} {'FAIL' if problems else 'ok  '} {what}"
          + "".join(f"\n    {line}" for line in notes + problems), flush=True)
    if not problems:
      shutil.rmtree(workdir)
  print(f"{args.faults - failures}/{args.faults} faults recovered exactly ({time.time() - start:.0f} s; seed "
        f"{args.seed})")
  sys.exit(1 if failures else 0)


if __name__ == "__main__":
  main()
