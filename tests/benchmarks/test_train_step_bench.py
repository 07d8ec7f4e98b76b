"""benchmarks/train_step_bench.py end to end at the tiny size on CPU: one subprocess per variant, the JSON rows, a
variant that cannot run (fla without CUDA) recorded with its error, bad variant names refused before anything runs."""
import json
import subprocess
import sys

import pytest

from tests.environment import subprocess_env

SCRIPT = "benchmarks/train_step_bench.py"


@pytest.mark.slow  # two subprocesses, each compiling a whole train step
def test_tiny_run_writes_a_row_per_variant(tmp_path):
  out = tmp_path / "bench.json"
  subprocess.run([sys.executable, SCRIPT, "--tiny", "--variants=ours@full+states,fla", "--repeats=1", f"--out={out}"],
                 check=True, env=subprocess_env(), capture_output=True, text=True, timeout=900)
  ours, fla = json.loads(out.read_text())
  assert ours["variant"] == "ours@full+states" and ours["remat"] == "full" and ours["mesa_impl"] == "xla"
  assert ours["save_mesa_states"]
  assert ours["ms_per_step"] > 0 and ours["tokens_per_s"] == pytest.approx(2 * 64 / ours["ms_per_step"] * 1e3)
  assert ours["loss"] > 0 and ours["params"] > 0 and ours["mfu"] is None  # no peak flops for a CPU
  assert fla["variant"] == "fla" and "error" in fla  # no torch / CUDA here


def test_unknown_variant_is_refused():
  # Every name is checked before anything runs: ours-states (the fast path's states off) parses, flash does not.
  done = subprocess.run([sys.executable, SCRIPT, "--variants=ours-states,flash"], env=subprocess_env(),
                        capture_output=True, text=True, timeout=300)
  assert done.returncode != 0 and "unknown variant 'flash'" in done.stderr
  done = subprocess.run([sys.executable, SCRIPT, "--variants=ours+saved"], env=subprocess_env(), capture_output=True,
                        text=True, timeout=300)
  assert done.returncode != 0 and "the only suffixes are +states and -states" in done.stderr

