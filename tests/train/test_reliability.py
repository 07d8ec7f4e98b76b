"""A trainer that loses nothing and reports nothing wrong: the workdir lock, resume validation before any write,
metrics.jsonl reconciled on resume, corrupt checkpoints, params restored only whole, one-line errors, and the
fault-injection script at a small size. The end-to-end cases share one 6-step run (checkpoints at 3 and 6)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from mesanet_jax.train import checkpoint, metrics
from mesanet_jax.train.config import ConfigError, config_changes, lm_config, run_config_dict, save_run_config
from mesanet_jax.train.lock import LOCK_FILE, WorkdirBusy, WorkdirLock
from tests import cli_runs
from tests.environment import subprocess_env
from tests.train import tiny

ROOT = Path(__file__).resolve().parents[2]


def test_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path):
  held = WorkdirLock(str(tmp_path), say=lambda *_: None)
  owner = json.loads((tmp_path / LOCK_FILE).read_text())
  assert owner["pid"] == os.getpid() and {"user", "host", "start_time"} <= owner.keys()
  with pytest.raises(WorkdirBusy, match=f"in use by another trainer: pid {os.getpid()} on "):
    WorkdirLock(str(tmp_path))  # another open file description: flock refuses it while `held` lives
  held.release()
  assert not (tmp_path / LOCK_FILE).exists()
  # A lock file that no process holds: what a SIGKILLed trainer leaves behind.
  (tmp_path / LOCK_FILE).write_text(json.dumps({"user": "u", "host": "h", "pid": 123456, "start_time": 0}))
  said = []
  WorkdirLock(str(tmp_path), say=said.append).release()
  assert said and "taking over the stale lock of pid 123456 on h" in said[0]


def test_metrics_reconciled_on_resume_and_torn_lines_skipped(tmp_path):
  rows = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4, 2, 3)]  # logged twice after an unreconciled resume
  text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo'  # and a line torn by a kill
  (tmp_path / "metrics.jsonl").write_text(text)
  assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [1, 2, 3, 4, 2, 3]  # the torn line skipped
  assert metrics.plot_losses(str(tmp_path)) is not None  # the plot reads through it too
  assert metrics.reconcile_metrics(str(tmp_path), 3) == 4  # restored at step 3: steps 4, 2, 3 again, torn
  assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [1, 2, 3]
  assert metrics.reconcile_metrics(str(tmp_path), 3) == 0  # nothing else to drop: the file stays as it is


def test_config_changes_name_the_keys(tmp_path):
  config = tiny.get_config()
  lm = lm_config(config.model, 256)
  assert config_changes(str(tmp_path), run_config_dict(config, lm)) == {}  # no config.json yet: a new run
  save_run_config(run_config_dict(config, lm), str(tmp_path))
  config.train.num_steps, config.model.num_layers = 30, 2
  changes = config_changes(str(tmp_path), run_config_dict(config, lm))
  assert changes == {"train.num_steps": (6, 30), "model.num_layers": (1, 2)}


def test_params_check_names_missing_extra_and_reshaped():
  shape = lambda *s: jax.ShapeDtypeStruct(s, np.float32)
  model = {"blocks": {0: {"w": shape(2, 2)}, 1: {"w": shape(2, 2)}}, "embed": shape(4, 2)}
  checkpoint._check_same_params(model, model, "here")
  with pytest.raises(ValueError, match=r"1 of the model's params missing \(blocks/1/w\)"):
    checkpoint._check_same_params({"blocks": {0: {"w": shape(2, 2)}}, "embed": shape(4, 2)}, model, "here")
  with pytest.raises(ValueError, match=r"1 params of another shape \(embed\)"):
    checkpoint._check_same_params({**model, "embed": shape(5, 2)}, model, "here")


# ---- end to end -----------------------------------------------------------------------------------------------------


def _one_line(result) -> str:
  assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  return [line for line in result.stderr.splitlines() if line.strip()][-1]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
  """A finished 6-step tiny.py:text run, checkpoints at steps 3 and 6."""
  from mesanet_jax.train.trainer import train_and_evaluate
  workdir = tmp_path_factory.mktemp("run")
  config = tiny.get_config()
  config.checkpoint.every_steps = 3
  train_and_evaluate(config, str(workdir))
  return workdir


@pytest.mark.slow
@pytest.mark.xdist_group("reliability")
def test_refused_resume_writes_nothing(run, tmp_path):
  from mesanet_jax.train.trainer import train_and_evaluate
  workdir = tmp_path / "run"
  shutil.copytree(run, workdir)
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file() and "compilation_cache" not in p.parts}
  config = tiny.get_config()
  config.model.num_layers = 2
  with pytest.raises(ConfigError, match=r"holds a run trained with model.num_layers=1 \(this config: 2\)"):
    train_and_evaluate(config, str(workdir))
  after = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file() and "compilation_cache" not in p.parts}
  assert after == before  # config.json, metrics, checkpoints as they were; the lock file removed again
  with WorkdirLock(str(workdir)):  # a live trainer
    with pytest.raises(ConfigError, match="is in use by another trainer"):
      train_and_evaluate(tiny.get_config(), str(workdir))


@pytest.mark.slow
@pytest.mark.xdist_group("reliability")
@pytest.mark.parametrize("damage", ["array data lost", "sharding metadata torn"])
def test_corrupt_checkpoint_named_and_skipped(run, tmp_path, damage):
  from mesanet_jax.eval import runs
  from mesanet_jax.train.trainer import train_and_evaluate
  workdir = tmp_path / "run"
  shutil.copytree(run, workdir)
  newest = workdir / "checkpoints" / "6" / "state"
  if damage == "array data lost":
    for array in (newest / "ocdbt.process_0" / "d").iterdir():
      array.write_bytes(b"")
  else:  # the restore itself does not read it (shardings come from the target), evaluation's metadata read does
    torn = newest / "_sharding"
    torn.write_bytes(torn.read_bytes()[:torn.stat().st_size // 2])
  with pytest.raises(ValueError, match=r"checkpoints/6 is corrupt or incomplete .*pass --step with another one of "
                                       r"\[3\]"):
    runs.load_run(str(workdir))
  assert runs.load_run(str(workdir), 3).step == 3
  losses = {r["step"]: r["loss"] for r in metrics.read_metrics(str(run))}
  train_and_evaluate(tiny.get_config(), str(workdir))  # falls back to step 3, trains 4-6 again
  assert (workdir / "corrupt_checkpoints").is_dir()
  assert {r["step"]: r["loss"] for r in metrics.read_metrics(str(workdir))} == losses


@pytest.mark.slow
@pytest.mark.xdist_group("reliability")
def test_bad_inputs_are_one_line(run, tmp_path):
  # eval on a config.json that describes another model than the checkpoint: refused, never evaluated
  shutil.copytree(run, tmp_path / "other", ignore=shutil.ignore_patterns("compilation_cache"))
  saved = json.loads((tmp_path / "other" / "config.json").read_text())
  saved["model"]["num_layers"] = 2
  (tmp_path / "other" / "config.json").write_text(json.dumps(saved))
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  results = cli_runs.run([  # one process start for the seven command lines
      ("experiments.evaluate", [f"--workdir={tmp_path / 'other'}", "--cg_steps=", "--cg_tols="], 1),
      ("experiments.train", [tiny.TEXT_FLAG, f"--workdir={blocker / 'run'}"], 1),
      ("experiments.evaluate", [f"--workdir={run}", f"--out={blocker / 'eval'}", "--cg_steps=", "--cg_tols="], 1),
      ("experiments.export", [f"--workdir={run}", f"--out={blocker / 'export'}", "--format=params"], 1),
      ("experiments.train", ["--config.train.num_stepz=30"], 1),
      ("experiments.train", [tiny.TEXT_FLAG, "--config.train.num_stepz=30"], 1),
      ("experiments.train", ["--config=/nonexistent.py"], 1)])
  lines = [_one_line(result) for result in results]
  assert "holds another model than its config.json describes: 17 of the model's params missing" in lines[0]
  assert "cannot create --workdir" in lines[1]
  assert "Not a directory" in lines[2]
  assert "Not a directory" in lines[3]
  assert "unknown config key 'train.num_stepz'" in lines[4]
  assert "unknown config key 'train.num_stepz'" in lines[5]
  assert "cannot load --config: [Errno 2] No such file" in lines[6]


@pytest.mark.slow
def test_fault_injection_short(tmp_path):
  result = subprocess.run([sys.executable, "benchmarks/faults.py", "--faults=3", "--seed=1", "--steps=6",
                           "--every=3", f"--workdir={tmp_path}"], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
  assert "3/3 faults recovered exactly" in result.stdout
