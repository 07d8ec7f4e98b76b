"""mesanet-eval, mesanet-export and mesanet-generate end to end (as processes of their own, forked by one subprocess:
tests/cli_runs.py) on tiny runs trained once per module: an fla-compatible MesaNet and a Transformer baseline (MAD:
tests/mad)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from mesanet_jax import sharding
from mesanet_jax.data import pipeline
from mesanet_jax.eval import hf_export, losses, runs
from mesanet_jax.train.trainer import train_and_evaluate
from tests import cli_runs
from tests.train import tiny

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("eval_cli")]  # a subprocess; one worker trains the runs


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
  """<root>/mesa (fla-compatible), <root>/transformer: 6 steps each."""
  root = tmp_path_factory.mktemp("runs")
  for name, source, changes in (("mesa", "text", {"fla_compatible": True}),
                                ("transformer", "text", {"architecture": "transformer"})):
    config = tiny.get_config(source)
    config.model.update(changes)
    train_and_evaluate(config, str(root / name))
  return root


@pytest.fixture(scope="module")
def cli(trained, tmp_path_factory) -> dict:
  """Every command line below, run in one process start (tests/cli_runs.py: each a fresh child, in this order): the
  8-device evaluation, the export and the same export again, generation, an export fla cannot express, and each CLI on
  a missing --workdir. "root": a directory for their outputs."""
  root, mesa = tmp_path_factory.mktemp("cli"), trained / "mesa"
  missing = f"--workdir={root / 'missing'}"
  cases = {
      # Trained on one device, evaluated on a 2 × 2 × 2 mesh of 8 (the params restored onto it).
      "evaluate": ("experiments.evaluate", [f"--workdir={mesa}", f"--baseline_workdir={trained / 'transformer'}",
                                            "--num_batches=1", "--cg_steps=1,4", "--cg_tols=1e-3", "--cg_warm_start",
                                            "--mesh=2,2,2"], 8),
      "export": ("experiments.export", [f"--workdir={mesa}", f"--out={root / 'export'}"], 1),
      "export again": ("experiments.export", [f"--workdir={mesa}", f"--out={root / 'export'}", "--format=params"], 1),
      "generate": ("experiments.generate", [f"--workdir={mesa}", "--prompt=The ", "--max_new_tokens=8",
                                            "--cg_tol=1e-3"], 1),
      "fla": ("experiments.export", [f"--workdir={trained / 'transformer'}", f"--out={root / 'x'}"], 1),
      "evaluate missing": ("experiments.evaluate", [missing], 1),
      "export missing": ("experiments.export", [missing, "--out=unused"], 1),
      "generate missing": ("experiments.generate", [missing, "--prompt=x"], 1)}
  return {"root": root, **dict(zip(cases, cli_runs.run(list(cases.values()), timeout=600)))}


def test_evaluate_writes_json_and_plots(trained, cli):
  result = cli["evaluate"]
  assert result.returncode == 0, result.stderr[-3000:]
  out = trained / "mesa" / "eval" / "step_6"
  report = json.loads((out / "eval.json").read_text())
  run = runs.load_run(str(trained / "mesa"))
  batches = pipeline.eval_batches(pipeline.make_sources(run.config.data)[1], run.config.train.batch_size, 1)
  one_device = losses.summary(losses.token_losses(runs.model_from(run.lm, run.params), batches, sharding.make_mesh()))
  assert report["loss"] == pytest.approx(one_device["loss"], abs=1e-5)
  assert 0 < report["loss"] < math.log(256) + 1 and report["ppl"] == pytest.approx(math.exp(report["loss"]))
  assert report["tokens"] > 0 and 0 <= report["accuracy"] <= 1
  assert report["cg_steps_forward"] == [{"layer": 0, "mean": 4.0, "max": 4.0}]  # trained with 4 fixed steps
  assert "CG steps of the forward solves per Mesa layer (4 fixed): layer 0 mean 4.00 max 4" in result.stdout
  assert len(report["loss_by_position"]) == 32 and report["position_buckets"][-1] == [32, 32]
  assert report["baseline"]["architecture"] == "transformer"
  assert len(report["delta_loss_by_bucket"]) == len(report["position_buckets"]) == 6
  sweep = {row["budget"]: row for row in report["cg_sweep"]}
  assert sweep["steps=1"]["mean_cg_steps"] == 1 and sweep["steps=4"]["mean_cg_steps"] == 4
  assert 0 < sweep["tol=0.001"]["mean_cg_steps"] <= 30 and 0 < sweep["tol=0.001+warm"]["mean_cg_steps"] <= 30
  assert sweep["steps=30"]["delta_loss"] == 0 and sweep["steps=1"]["reference"] == "steps=30"  # generation's default
  # Trained with 4 CG steps from x₀ = 0: decoding with the same budget reproduces the full forward's loss on the
  # same batch (the CG sweep's batch is the first evaluated one; here the only one).
  assert sweep["steps=4"]["loss"] == pytest.approx(report["loss"], abs=1e-4)
  for png in ("positions.png", "cg_sweep.png"):
    assert (out / png).stat().st_size > 1000
  assert "| 1–1 |" in result.stdout


def test_export_round_trip_and_hf_tensors(trained, cli):
  out, result = cli["root"] / "export", cli["export"]
  assert result.returncode == 0, result.stderr[-3000:]
  run = runs.load_run(str(trained / "mesa"))
  lm, params = runs.load_params_export(str(out))
  assert lm == run.lm
  for (path, a), (_, b) in zip(nnx.to_flat_state(params), nnx.to_flat_state(run.params)):
    np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
  tensors = load_file(str(out / "model.safetensors"))
  expected = hf_export.hf_tensors(run.lm, run.params)
  assert tensors.keys() == expected.keys() and all(np.array_equal(tensors[k], expected[k]) for k in expected)
  assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 32

  again = cli["export again"]
  assert again.returncode == 2 and "already exists" in again.stderr


def test_export_refuses_what_fla_cannot_express(cli):
  result = cli["fla"]
  assert result.returncode == 2 and "mixers=" in result.stderr and len(result.stderr.strip().splitlines()) == 1
  assert not (cli["root"] / "x").exists()


def test_generate_streams_tokens_and_cg_steps(cli):
  result = cli["generate"]
  assert result.returncode == 0, result.stderr[-3000:]
  text, summary, steps = result.stdout.rstrip("\n").rsplit("\n", 2)
  assert text.startswith("The ") and "CG steps per decoded token" in summary
  assert "Mesa path: impl=xla" in result.stderr  # the resolved path, once, beside the text
  assert len(steps.split()) == 7 and all(0 < float(s) <= 30 for s in steps.split())


@pytest.mark.parametrize("module", ["evaluate", "export", "generate"])
def test_bad_workdir_is_one_line_and_exit_2(module, cli):
  result = cli[f"{module} missing"]
  assert result.returncode == 2
  assert str(cli["root"] / "missing") in result.stderr and len(result.stderr.strip().splitlines()) == 1
