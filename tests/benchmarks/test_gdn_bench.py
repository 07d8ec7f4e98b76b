"""benchmarks/gdn_bench.py: every variant's output and gradients agree with the recurrence (kernels interpreted)."""
import json
import pathlib
import subprocess
import sys

import pytest

from tests.environment import subprocess_env


@pytest.mark.slow
def test_every_variant_matches_the_recurrence(tmp_path):
  out = tmp_path / "rows.jsonl"
  run = subprocess.run([sys.executable, "-m", "benchmarks.gdn_bench", "--shapes=2x24", "--heads=2", "--repeats=1",
                        "--variants=xla:16,xla:8:inverse,pallas:8,pallas:32:2", f"--out={out}"],
                       capture_output=True, text=True, env=subprocess_env(), timeout=600,
                       cwd=pathlib.Path(__file__).parents[2])
  assert run.returncode == 0, run.stderr[-2000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["variant"] for r in rows] == ["xla:16", "xla:8:inverse", "pallas:8", "pallas:32:2"]
  for row in rows:
    # f32 against the f32 recurrence over 24 tokens: rounding (measured ≤ 4e-7 of scale).
    assert row["o_error"] < 1e-5 and max(row["grad_errors"]) < 1e-5, row
    assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0
