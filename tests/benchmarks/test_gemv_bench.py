"""benchmarks/gemv_bench.py's products agree with an f32 product in every layout (Pallas kernels interpreted)."""
import pathlib
import re
import subprocess
import sys

import pytest

from tests.environment import subprocess_env


@pytest.mark.slow
def test_every_variant_computes_the_product():
  run = subprocess.run([sys.executable, "-m", "benchmarks.gemv_bench", "--check_only", "--shapes=256x64",
                        "--rows=1,20", "--blocks=32", "--warps=4"], capture_output=True, text=True,
                       env=subprocess_env(), timeout=600, cwd=pathlib.Path(__file__).parents[2])
  assert run.returncode == 0, run.stderr[-2000:]
  errors = [float(e) for e in re.findall(r"error (\S+)", run.stdout)]
  # M=1: two XLA layouts + two Pallas kernels; M=20 (padded to 32 rows): two XLA + one Pallas.
  assert len(errors) == 7, run.stdout
  # bf16 inputs and outputs, f32 sums over K = 256: the output's rounding, ≤ 2⁻⁸ relative, dominates.
  assert max(errors) <= 2 ** -7, run.stdout
