"""Group claims: grid processes sharing a state directory never train one group at once; a claim whose process is
gone is taken over; a run re-reads what another process finished or saved once it holds a group."""
import json
import os
import socket
import subprocess

import pytest

from mesanet_jax.mad import claims, grid, table, training, variants


@pytest.fixture
def live_pid():
  sleeper = subprocess.Popen(["sleep", "60"])
  yield sleeper.pid
  sleeper.kill()
  sleeper.wait()


def _dead_pid() -> int:
  finished = subprocess.Popen(["true"])
  finished.wait()
  return finished.pid


def _claim_as(state_dir, group: str, pid: int, host: str = ""):
  os.makedirs(state_dir, exist_ok=True)
  with open(claims.path(str(state_dir), group), "w") as f:
    f.write(json.dumps({"host": host or socket.gethostname(), "pid": pid}))


def test_a_group_is_claimed_once_and_released_by_its_holder(tmp_path, live_pid):
  state = str(tmp_path)
  assert claims.holder(state, "g") is None
  assert claims.take(state, "g")
  assert claims.holder(state, "g") == {"host": socket.gethostname(), "pid": os.getpid()}
  assert claims.take(state, "g")  # already ours
  assert claims.take(state, "g.L1") and claims.holder(state, "g.L1")["pid"] == os.getpid()  # another group
  claims.release(state, "g")
  assert claims.holder(state, "g") is None and claims.take(state, "g")
  _claim_as(tmp_path, "h", live_pid)
  assert not claims.take(state, "h")
  claims.release(state, "h")  # not ours: left alone
  assert claims.holder(state, "h")["pid"] == live_pid


def test_a_claim_of_a_finished_process_is_taken_over_one_of_another_host_is_not(tmp_path):
  state = str(tmp_path)
  _claim_as(tmp_path, "g", _dead_pid())
  assert claims.take(state, "g") and claims.holder(state, "g")["pid"] == os.getpid()
  assert sorted(os.listdir(tmp_path)) == ["g.claim"]  # the stale claim renamed aside and removed
  _claim_as(tmp_path, "h", _dead_pid(), host="another-host")
  assert not claims.take(state, "h")  # its process cannot be checked from here


def _jobs():
  """Two groups of two jobs each: transformer.lm.L32 (memorize) and transformer.autoencoder.L32 (compression)."""
  chosen = [variants.shrunk(variants.find(task, "baseline"), 32) for task in ("memorize", "compress")]
  return training.jobs(["transformer"], chosen, lrs=(1e-3, 3e-3), weight_decays=(0.1,))


def _settings(tmp_path):
  return grid.Settings(results=str(tmp_path / "results.jsonl"), protocol=training.Protocol(epochs=1),
                       state_dir=str(tmp_path / "state"), steps_per_call=1, workers=1)


@pytest.mark.slow
def test_the_grid_skips_a_group_another_live_process_trains(tmp_path, live_pid, capsys):
  settings, jobs = _settings(tmp_path), _jobs()
  _claim_as(settings.state_dir, "transformer.lm.L32", live_pid)
  assert grid.run(settings, jobs) == 2
  assert {r["task"] for r in table.read(settings.results)} == {"compress"}
  assert "transformer.lm.L32: skipped, another process trains it" in capsys.readouterr().out
  assert os.listdir(settings.state_dir) == ["transformer.lm.L32.claim"]  # its own claim released, the other kept


def test_a_run_holding_a_group_skips_the_jobs_another_process_finished_meanwhile(tmp_path, monkeypatch, capsys):
  settings, jobs = _settings(tmp_path), _jobs()
  recorded = grid.protocol_settings(settings)
  take = claims.take

  def finished_by_another_process_first(state_dir, group):  # between this run's listing and its claim
    with open(settings.results, "a") as f:
      for job in jobs:
        if grid.group_name(grid.group_key(job)) == group:
          f.write(json.dumps({"architecture": job.architecture, "task": job.variant.task,
                              "variant": job.variant.name, "lr": job.lr, "weight_decay": job.weight_decay,
                              "accuracy": 1.0, **recorded}) + "\n")
    return take(state_dir, group)

  monkeypatch.setattr(claims, "take", finished_by_another_process_first)
  assert grid.run(settings, jobs) == 0
  out = capsys.readouterr().out
  assert out.count("finished by another process") == 2, out
  assert len(table.read(settings.results)) == 4 and os.listdir(settings.state_dir) == []
