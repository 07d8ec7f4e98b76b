"""launch/sweep.py: grid expansion into workdirs and flags, the skip/re-run rule, launch commands, one-line errors
(its `main` in this process), and a real 2-point sweep on the tiny config, run as a script, that a second call (its
`main` again) skips."""
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.environment import subprocess_env

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("sweep", ROOT / "launch" / "sweep.py")
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def _spec_file(tmp_path, text, name="grid.py"):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def _sweep(capsys, *args) -> subprocess.CompletedProcess:
  """sweep.py's main in this process, its exit code and output as a subprocess's."""
  capsys.readouterr()
  code = sweep.main(list(args))
  out = capsys.readouterr()
  return subprocess.CompletedProcess(args, code, out.out, out.err)


def _sweep_script(*args) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "launch/sweep.py", *args], cwd=ROOT, env=subprocess_env(),
                        capture_output=True, text=True, timeout=180)


def test_expands_the_product_into_workdirs_and_flags(tmp_path):
  spec = _spec_file(tmp_path, 'CONFIG = "tests/train/tiny.py:mqar"\n'
                    'GRID = {"optim.lr": [1e-3, 3e-3], "model.cg_steps": [2, 4], "train.progress_bar": [False]}\n'
                    'FIXED = {"train.num_steps": 3}\n')
  runs = sweep.expand(spec, str(tmp_path / "root"))
  assert [r.name for r in runs] == [f"optim.lr={lr},model.cg_steps={cg},train.progress_bar=false"
                                    for lr in ("0.001", "0.003") for cg in (2, 4)]
  first = runs[0]
  assert first.workdir == str(tmp_path / "root" / first.name) and first.num_steps == 3
  assert first.flags == ["--config=tests/train/tiny.py:mqar", f"--workdir={first.workdir}",
                         "--config.train.num_steps=3", "--config.optim.lr=0.001", "--config.model.cg_steps=2",
                         "--config.train.progress_bar=false"]
  # Without FIXED, num_steps is the config's own (6 in tiny.py); the default root is runs/<spec name>.
  runs = sweep.expand(_spec_file(tmp_path, 'CONFIG = "tests/train/tiny.py"\nGRID = {"model.size": ["tiny"]}\n',
                                 "plain.py"))
  assert runs[0].num_steps == 6 and runs[0].workdir == os.path.abspath("runs/plain/model.size=tiny")


def test_finished_runs_are_skipped_and_others_rerun(tmp_path, capsys):
  spec = _spec_file(tmp_path, 'CONFIG = "tests/train/tiny.py"\nGRID = {"optim.lr": [0.1, 0.2, 0.3]}\n'
                    'FIXED = {"train.num_steps": 4}\n')
  done, interrupted, fresh = (tmp_path / "r" / f"optim.lr={lr}" for lr in ("0.1", "0.2", "0.3"))
  for workdir, steps in ((done, [1, 2, 3, 4]), (interrupted, [1, 2])):
    workdir.mkdir(parents=True)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in steps) + '{"st')
  assert [sweep.last_step(str(w)) for w in (done, interrupted, fresh)] == [4, 2, 0]
  result = _sweep(capsys, spec, f"--root={tmp_path / 'r'}", "--dry-run")
  assert result.returncode == 0, result.stderr
  assert result.stderr == "# skip optim.lr=0.1: done (4/4 steps)\n"
  commands = [shlex.split(line) for line in result.stdout.splitlines()]
  assert [c[:3] for c in commands] == [[sys.executable, "-m", "experiments.train"]] * 2
  assert [c[4] for c in commands] == [f"--workdir={interrupted}", f"--workdir={fresh}"]


def test_launch_commands_per_launcher(tmp_path, capsys):
  spec = _spec_file(tmp_path, 'GRID = {"optim.lr": [0.5]}\n')
  run = sweep.expand(spec, str(tmp_path))[0]
  assert sweep.command(run, "local", processes=4) == ["bash", "launch/local.sh", "4", *run.flags]
  assert sweep.command(run, "slurm") == ["sbatch", "launch/gpu_slurm.sbatch", *run.flags]
  assert sweep.command(run, "tpu", tpu_args="--name=p --zone=z") == [
      "bash", "launch/tpu_pod.sh", "--name=p", "--zone=z", "run", *run.flags]
  result = _sweep(capsys, spec, f"--root={tmp_path}", "--launcher=slurm")
  assert result.returncode == 0 and shlex.split(result.stdout) == ["sbatch", "launch/gpu_slurm.sbatch", *run.flags]
  assert run.flags[0] == f"--config={sweep.DEFAULT_CONFIG}"


def test_spec_errors_are_one_line(tmp_path, capsys):
  cases = [('GRID = {"optim.nope": [1]}\n', "config key 'optim.nope' is not in the config"),
           ('GRID = {"optim.lr": []}\n', "GRID must be a non-empty dict"),
           ('GRID = {"optim.lr": [[1]]}\n', "values must be bool, int, float or str"),
           ('GRID = {"train.num_steps": ["many"]}\n', "config key 'train.num_steps' cannot be 'many'"),
           ('CONFIG = "nowhere.py"\nGRID = {"optim.lr": [1.0]}\n', "CONFIG file 'nowhere.py' not found")]
  for text, expected in cases:
    result = _sweep(capsys, _spec_file(tmp_path, text), "--dry-run")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and expected in result.stderr, (text, result)


@pytest.mark.slow  # two trainer runs
def test_runs_in_sequence_then_skips_them(tmp_path, capsys):
  # Over the data seed: both runs compile the same programs, so the second finds them in the session's cache.
  spec = _spec_file(tmp_path, 'CONFIG = "tests/train/tiny.py:mqar"\n'
                    'GRID = {"data.seed": [0, 1]}\nFIXED = {"train.num_steps": 2, "train.progress_bar": False}\n')
  result = _sweep_script(spec, f"--root={tmp_path / 'r'}")
  assert result.returncode == 0, result.stderr[-3000:]
  for seed in (0, 1):
    metrics = tmp_path / "r" / f"data.seed={seed}" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
  again = _sweep(capsys, spec, f"--root={tmp_path / 'r'}")  # in this process: a process start (~2 s) less
  assert again.returncode == 0 and again.stderr.count("# skip") == 2 and "[1/" not in again.stderr, again.stderr
