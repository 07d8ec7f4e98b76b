"""mesanet-mad-grid refuses bad flags in one line naming the flag, before any data or model is built."""
import pytest

from tests import cli_runs


@pytest.mark.slow  # one subprocess start
def test_bad_flags_are_refused_in_one_line(tmp_path):
  results = cli_runs.run([("experiments.mad_grid", [f"--results={tmp_path / 'r.jsonl'}", *flags], 1) for flags in (
      ["--architectures=mesanet,mamba"], ["--tasks=memorize", "--num_examples=40"], ["--state_budget_mib=-1"],
      ["--tasks=memorize", "--variants=nonesuch"], ["--lrs=1e-3,fast"])])
  expected = ["--architectures: 'mamba' is not one of", "--num_examples must be a multiple of 32 (the batch), got 40",
              "--state_budget_mib must be ≥ 0", "--variants ['nonesuch'] match no variant",
              "--lrs must be a comma-separated list of numbers, got '1e-3,fast'"]
  for result, message in zip(results, expected):
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("mesanet-mad-grid: error: ")
    assert message in result.stderr
  assert not (tmp_path / "r.jsonl").exists()
