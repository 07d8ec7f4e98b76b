"""mesanet-mad-grid refuses bad flags in one line naming the flag, before any data or model is built; a dry run
prints the plan; a SIGTERM saves the population in flight and exits 0."""
import signal
import subprocess
import sys

import pytest

from mesanet_jax.mad import slot_state
from tests import cli_runs
from tests.environment import subprocess_env


@pytest.mark.slow  # one subprocess start
def test_bad_flags_are_refused_in_one_line_and_a_dry_run_prints_the_plan(tmp_path):
  *results, dry_run = cli_runs.run([("experiments.mad_grid", [f"--results={tmp_path / 'r.jsonl'}", *flags], 1)
                                    for flags in (["--architectures=mesanet,mamba"],
                                                  ["--tasks=memorize", "--num_examples=40"], ["--state_budget_mib=-1"],
                                                  ["--tasks=memorize", "--variants=nonesuch"], ["--lrs=1e-3,fast"],
                                                  ["--cg_tol=0"],
                                                  ["--tasks=memorize", "--architectures=gdn", "--num_examples=64",
                                                   "--epochs=3", "--dry_run"],
                                                  ["--tasks=memorize,compress", "--architectures=gdn", "--dry_run"])])
  *results, smoke = results
  assert dry_run.returncode == 0, dry_run.stderr[-2000:]
  assert smoke.returncode == 0 and "| gdn.lm.L32 | 48 | 6 | 48 | 6 | 0 |" in smoke.stdout  # 3 epochs of 2 batches
  assert "| gdn.lm.L32 | 48 | 1600 | 48 | 1600 | 0 |" in dry_run.stdout  # memorize's 6 variants × 8 points
  assert dry_run.stdout.strip().endswith("136 jobs left in 5 groups")  # + compress: 11 variants in 4 lengths
  expected = ["--architectures: 'mamba' is not one of", "--num_examples must be a multiple of 32 (the batch), got 40",
              "--state_budget_mib must be ≥ 0", "--variants ['nonesuch'] match no variant",
              "--lrs must be a comma-separated list of numbers, got '1e-3,fast'", "--cg_tol must be > 0"]
  for result, message in zip(results, expected):
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("mesanet-mad-grid: error: ")
    assert message in result.stderr
  assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.slow  # a subprocess trains until it is stopped
def test_sigterm_saves_the_population_in_flight_and_exits_0(tmp_path):
  flags = [f"--results={tmp_path / 'r.jsonl'}", f"--state_dir={tmp_path / 'state'}", "--architectures=transformer",
           "--tasks=memorize", "--variants=baseline", "--num_examples=32", "--epochs=100000", "--lrs=1e-3",
           "--weight_decays=0.1", "--workers=1"]
  process = subprocess.Popen([sys.executable, "-m", "experiments.mad_grid", *flags], cwd=cli_runs.ROOT,
                             env=subprocess_env(1, PYTHONPATH=str(cli_runs.ROOT), PYTHONUNBUFFERED="1"),
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  try:
    lines = []
    for line in process.stdout:  # the group's line comes once its population is built: training follows
      lines.append(line)
      if "1 jobs, 1 slots" in line:
        break
    process.send_signal(signal.SIGTERM)
    out = "".join(lines) + process.communicate(timeout=120)[0]
  finally:
    process.kill()
  assert process.returncode == 0, out
  assert "transformer.lm.L32: SIGTERM; of 1 jobs in flight 1 saved" in out and "finished 0 jobs" in out
  saved = slot_state.load(str(tmp_path / "state"), "transformer.lm.L32")
  assert saved["jobs"] == [("transformer", "memorize", "baseline", 1e-3, 0.1)]
  assert not (tmp_path / "r.jsonl").exists() or not (tmp_path / "r.jsonl").read_text()
