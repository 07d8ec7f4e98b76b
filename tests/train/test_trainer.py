"""End-to-end trainer runs on the tiny test config, in a subprocess (`python -m experiments.train`) where the command
line, a signal or the devices are what is tested, else in this process (`_train_here`): exact resume after SIGTERM,
8 fake devices ≡ 1 device (and restore onto another mesh, with impl="pallas" run per shard), 2 processes through
jax.distributed on 127.0.0.1, and the one-line config errors.

One 1-device run of tiny.py:text (`reference`, 6 steps) serves as the default-outputs check and as the single-device
losses the sharded and two-process runs are compared with. Runs share the session's compilation cache (conftest sets
JAX_COMPILATION_CACHE_DIR, the trainer's default), except where a test checks the workdir's own cache."""
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mesanet_jax import sharding
from mesanet_jax.data import pipeline
from mesanet_jax.eval import losses, runs
from mesanet_jax.train.config import ConfigError
from mesanet_jax.train.trainer import train_and_evaluate
from tests import cli_runs
from tests.environment import subprocess_env
from tests.train import tiny

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _env(devices: int = 1) -> dict:
  return subprocess_env(devices, PYTHONUNBUFFERED="1")


def _command(workdir, *flags, config=tiny.TEXT_FLAG):
  return [sys.executable, "-m", "experiments.train", config, f"--workdir={workdir}", *flags]


def _train(workdir, *flags, devices: int = 1, config=tiny.TEXT_FLAG):
  result = subprocess.run(_command(workdir, *flags, config=config), cwd=ROOT, env=_env(devices),
                          capture_output=True, text=True, timeout=240)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result


def _train_here(workdir, **changes):
  """The run `_train` starts, of tiny.py:text with `changes` (flattened keys: "train.num_steps"), in this process:
  the same trainer without a process start (imports, backend) for runs whose command line is not what is tested."""
  config = tiny.get_config()
  config.update_from_flattened_dict(changes)
  train_and_evaluate(config, str(workdir))


def _losses(workdir) -> dict[int, float]:
  """step -> loss from metrics.jsonl; a step logged twice (after a resume) keeps its last value."""
  rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
  """The workdir of a default tiny.py:text run (6 steps, eval at 3 and 6) on one device."""
  cwd = tmp_path_factory.mktemp("reference")
  # A relative --workdir, as in the README (orbax itself needs absolute paths).
  result = subprocess.run(_command("run", "--config.train.eval_every=3"), cwd=cwd,
                          env=dict(_env(), PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=240)
  assert result.returncode == 0, result.stderr[-3000:]
  return cwd / "run"


@pytest.mark.xdist_group("reference")
def test_default_outputs_and_metrics_schema(reference):
  tmp_path = reference
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  for key in ("loss", "ppl", "accuracy", "grad_norm", "lr", "skipped", "tokens_per_s", "mfu"):
    assert key in rows[-1], key
  assert rows[-1]["mfu"] == "n/a"  # CPU: no peak in the table
  # The Mesa path impl="auto" resolved to (CPU: XLA, the tiny preset's chunk 16): first line and config.json.
  assert (rows[0]["mesa_impl"], rows[0]["mesa_chunk_size"], rows[0]["backend"]) == ("xla", 16, "cpu")
  assert "mesa_impl" not in rows[1]
  assert json.loads((tmp_path / "config.json").read_text())["mesa_path"]["mesa_impl"] == "xla"
  assert rows[0]["lr"] == 1e-6 or abs(rows[0]["lr"] - 1e-6) < 1e-9  # warmup starts at init_lr
  assert "eval_loss" in rows[2] and "eval_loss" in rows[5]
  assert rows[-1]["loss"] < rows[0]["loss"]
  assert (tmp_path / "loss.png").stat().st_size > 1000
  assert any((tmp_path / "tensorboard").iterdir())
  assert (tmp_path / "checkpoints" / "6").is_dir()


def test_trains_on_a_prepared_tfds_dataset(tmp_path):
  from tests.data import tfds_fixture
  name = tfds_fixture.prepare(str(tmp_path / "tfds"))
  _train_here(tmp_path / "run", **{"data.source": "tfds", "data.tfds_name": name,  # 6 steps: the reference run's
                                   "data.tfds_data_dir": str(tmp_path / "tfds")})  # compiled programs
  assert sorted(_losses(tmp_path / "run")) == [1, 2, 3, 4, 5, 6]


def test_sigterm_then_resume_gives_identical_losses(tmp_path):
  steps = ["--config.train.num_steps=40"]
  _train_here(tmp_path / "straight", **{"train.num_steps": 40})  # the same programs as the subprocesses below
  interrupted = tmp_path / "interrupted"
  own_cache = "--compilation_cache_dir=<workdir>/compilation_cache"  # checked below (not the session's cache)
  process = subprocess.Popen(_command(interrupted, *steps, own_cache), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  metrics = interrupted / "metrics.jsonl"
  deadline = time.time() + 180
  while time.time() < deadline and process.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
      process.send_signal(signal.SIGTERM)
      break
    time.sleep(0.005)
  output, _ = process.communicate(timeout=180)
  assert process.returncode == 0, output[-3000:]
  stopped = max(_losses(interrupted))
  assert 3 <= stopped < 40, f"SIGTERM did not interrupt the run (stopped at {stopped})"
  assert "SIGTERM: saved step" in output
  assert (interrupted / "checkpoints" / str(stopped)).is_dir()
  compiled = {p.name for p in (interrupted / "compilation_cache").glob("jit_train_step*")}
  assert compiled, "no train step in the workdir's compilation cache"
  _train(interrupted, *steps, own_cache)
  # The resumed run found its train step compiled (same program: nothing new written to the cache).
  assert {p.name for p in (interrupted / "compilation_cache").glob("jit_train_step*")} == compiled
  expected, resumed = _losses(tmp_path / "straight"), _losses(interrupted)
  assert sorted(resumed) == list(range(1, 41))
  # Bit-identical: the same programs on the same device from the same restored state and data position.
  assert resumed == expected, {s: (resumed[s], expected[s]) for s in expected if resumed[s] != expected[s]}


@pytest.mark.xdist_group("reference")
def test_sharded_8_devices_matches_1_device_and_restores_onto_another_mesh(tmp_path, reference):
  reference = _losses(reference)
  sharded = tmp_path / "eight"
  _train(sharded, "--config.mesh.fsdp=8", "--config.checkpoint.every_steps=3", devices=8)
  first = _losses(sharded)
  shutil.rmtree(sharded / "checkpoints" / "6")  # resume from step 3 ...
  _train(sharded, "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
         "--config.model.impl=pallas", devices=8)
  second = _losses(sharded)  # ... on a (2, 2, 2) mesh, with the Pallas kernel run per shard: steps 4-6 again
  ref = np.array([reference[s] for s in range(1, 7)])
  # f32 sums in another order across shards: ~1e-6 relative per step, amplified a little by the updates.
  np.testing.assert_allclose([first[s] for s in range(1, 7)], ref, rtol=2e-5)
  np.testing.assert_allclose([second[s] for s in range(1, 7)], ref, rtol=2e-5)


def test_scan_layers_with_remat_trains_and_resumes(tmp_path):
  changes = {"model.scan_layers": True, "model.remat": "True", "model.num_layers": 2, "train.num_steps": 4,
             "checkpoint.every_steps": 2}
  _train_here(tmp_path / "run", **changes)
  first = _losses(tmp_path / "run")
  assert sorted(first) == [1, 2, 3, 4] and np.all(np.isfinite(list(first.values())))
  shutil.rmtree(tmp_path / "run" / "checkpoints" / "4")  # resume the stacked-layout checkpoint of step 2
  _train_here(tmp_path / "run", **changes)
  assert _losses(tmp_path / "run") == first  # steps 3-4 again: the same programs from the same state


@pytest.mark.xdist_group("reference")
def test_two_processes_with_jax_distributed_through_the_local_launcher(tmp_path, reference):
  """launch/local.sh starts 2 trainer processes joined by jax.distributed (also the launcher's real run: one
  two-process run checks both, as each costs ~25 s of CPU)."""
  workdir = tmp_path / "two"
  result = subprocess.run(["bash", "launch/local.sh", "2", tiny.TEXT_FLAG, f"--workdir={workdir}",
                           "--config.train.num_steps=3"], cwd=ROOT, env=_env() | {"PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=240)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "launch/local.sh: 2 processes finished" in result.stdout
  assert "2 process(es)" in (workdir / "logs" / "process_0.log").read_text()
  assert (workdir / "logs" / "process_1.log").stat().st_size > 0
  two = _losses(workdir)
  assert sorted(two) == [1, 2, 3]
  # Process i reads examples i, i+2, …: together the same global batch as one process, in another row order.
  # One process's first 3 losses: the reference's (6 steps; the losses of steps 1-3 come from the updates of steps
  # 1-2, whose learning rates lie in the 2-step warmup, the same for any num_steps >= 3).
  one = _losses(reference)
  np.testing.assert_allclose([two[s] for s in (1, 2, 3)], [one[s] for s in (1, 2, 3)], rtol=2e-5)
  assert (workdir / "checkpoints" / "3").is_dir()


def test_adaptive_cg_logs_cg_steps_per_mesa_layer(tmp_path):
  # In this process: 3 steps of 2 micro-batches, evaluated at step 3.
  config = tiny.get_config()
  config.model.update(num_layers=2, cg_steps=10, cg_tol=1e-2)
  config.train.update(num_steps=3, eval_every=3, grad_accum=2)
  train_and_evaluate(config, str(tmp_path))
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3]
  for row in rows:
    for layer in ("layer_00", "layer_01"):
      for solve, least in (("fwd", 1), ("adj", 0)):  # an adjoint system with a zero right-hand side takes no step
        mean, most = row[f"cg/{layer}/{solve}_mean"], row[f"cg/{layer}/{solve}_max"]
        assert least <= mean <= most <= 10 and 1 <= most == int(most), (row["step"], layer, solve, mean, most)
  evaluated = {key: value for key, value in rows[-1].items() if key.startswith("eval_cg/")}
  assert sorted(evaluated) == [f"eval_cg/layer_0{i}/fwd_{s}" for i in (0, 1) for s in ("max", "mean")]
  events = b"".join(path.read_bytes() for path in (tmp_path / "tensorboard").iterdir())
  assert b"cg/layer_01/adj_max" in events and b"eval_cg/layer_00/fwd_mean" in events
  # mesanet-eval's per-layer CG steps on the same eval batch, from the checkpoint of step 3: the trainer's.
  run = runs.load_run(str(tmp_path))
  batches = pipeline.eval_batches(pipeline.make_sources(run.config.data)[1], run.config.train.batch_size, 1)
  token = losses.token_losses(runs.model_from(run.lm, run.params), batches, sharding.make_mesh())
  logged = [[rows[-1][f"eval_cg/layer_0{i}/fwd_{s}"] for s in ("mean", "max")] for i in (0, 1)]
  np.testing.assert_allclose(token.cg_steps, logged, rtol=1e-6)  # the same program's counts; f32 means


def test_best_by_eval_keeps_the_lowest_eval_loss(tmp_path):
  _train_here(tmp_path, **{"train.num_steps": 8, "train.eval_every": 2, "checkpoint.every_steps": 2,
                           "checkpoint.keep": 1, "checkpoint.best_metric": "eval_loss"})
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
  assert sorted(evals) == [2, 4, 6, 8]
  kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert kept == [min(evals, key=evals.get)], (kept, evals)


def _error_line(result) -> str:
  assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  return lines[-1]


@pytest.mark.xdist_group("reference")
def test_config_errors_are_one_line(tmp_path, reference):
  # Through the command line: a bad flag (absl's parser) and a ConfigError raised while setting up (4 devices) each
  # end as one line on stderr with exit code 2.
  cases = [
      (["--config.train.nonsense=1"], 1, "unknown config key 'train.nonsense'"),
      (["--config.mesh.fsdp=4", "--config.train.batch_size=6"], 4, "not divisible by the 4 data shards"),
  ]
  # Both command lines in one process start.
  results = cli_runs.run([("experiments.train", [tiny.TEXT_FLAG, f"--workdir={tmp_path / 'e'}", *flags], devices)
                          for flags, devices, _ in cases])
  for (flags, _, expected), result in zip(cases, results):
    line = _error_line(result)
    assert expected in line, (flags, line)
  # Every other setup problem is a ConfigError too (the same path to that one line), checked in this process.
  cases = [({"mesh.data": 3}, "do not multiply to 1 devices"),
           ({"data.path": "/nonexistent/corpus.txt"}, "cannot read '/nonexistent/corpus.txt'"),
           ({"model.num_layers": 2}, "does not match this config")]  # a workdir holding another model's checkpoint
  shutil.copytree(reference / "checkpoints", tmp_path / "other" / "checkpoints")
  for changes, expected in cases:
    config = tiny.get_config()
    config.update_from_flattened_dict(changes)
    with pytest.raises(ConfigError, match=expected):
      train_and_evaluate(config, str(tmp_path / "other"))
