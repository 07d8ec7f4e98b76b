"""The benchmarks' exact reference solved a slice of (batch, head) pairs at a time (what lets kernel_bench.py
--compare_exact fit on a GPU at B=8 T=2048 H=16 D=128), and kernel_bench's report against it, at a tiny size."""
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from benchmarks.ops_bench import exact_forward_and_backward, make_inputs
from tests.environment import subprocess_env

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # compiles the exact solve's gradient twice in f64 (~35 s on 2 cores)
def test_sliced_exact_reference_equals_the_whole(x64):
  args = make_inputs(2, 12, 3, 4, np.float64)  # B·H = 6 pairs: slices of 4 leave a remainder of 2
  w = jax.random.normal(jax.random.key(1), args[0].shape, np.float64)
  grads, o = exact_forward_and_backward(w, *args)
  sliced_grads, sliced_o = exact_forward_and_backward(w, *args, slice_size=4)
  # The same solves per pair in f64; only dλ sums the pairs in another order.
  np.testing.assert_allclose(sliced_o, o, rtol=1e-12, atol=1e-14)
  for name, a, b in zip(("q", "k", "v", "g", "beta", "lam"), sliced_grads, grads):
    assert a.shape == b.shape, name
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13, err_msg=name)


def test_float64_reference_rounds_o_as_the_op_does_and_leaves_x64_off():
  """bf16 q/k/v: both references return a bf16 o, so the loss's cotangent is rounded to bf16 in both (else the f64
  one's gradients would differ from any bf16 op's by that rounding, ~2e-3, whatever its solve)."""
  args = make_inputs(1, 6, 2, 4, jax.numpy.bfloat16)
  w = jax.random.normal(jax.random.key(1), args[0].shape, np.float32)
  grads, o = exact_forward_and_backward(w, *args)
  wide_grads, wide_o = exact_forward_and_backward(w, *args, float64=True)
  assert wide_o.dtype == o.dtype == jax.numpy.bfloat16 and all(g.dtype == np.float64 for g in wide_grads)
  assert jax.numpy.zeros(1).dtype == np.float32  # x64 was switched on for the call only
  to64 = lambda x: np.asarray(x, np.float64)
  np.testing.assert_allclose(to64(wide_o), to64(o), rtol=1e-2)  # the same bf16 rounding of nearly the same o
  for name, a, b in zip(("q", "k", "v", "g", "beta", "lam"), wide_grads, grads):
    # dq, dk, dv come in their inputs' bf16 from the f32 reference (2^-8 of the scale at most); dg, dβ, dλ in f32:
    # f32 solves of 4 dims, ~1e-6.
    bound = 2.0 ** -8 if b.dtype == jax.numpy.bfloat16 else 1e-5
    np.testing.assert_allclose(a, to64(b), atol=bound * float(np.max(np.abs(a))), err_msg=name)


@pytest.mark.slow  # a subprocess compiling the op and the reference
def test_kernel_bench_reports_errors_against_the_sliced_exact_solve():
  flags = ["--batch=2", "--length=32", "--heads=2", "--head_dim=8", "--chunk_size=16", "--cg_steps=16",
           "--variants=xla:16:highest,xla:16:highest:save", "--nofla", "--nostages", "--compare_exact", "--exact_slice=3", "--repeats=1",
           "--dtype=float32"]
  result = subprocess.run([sys.executable, "benchmarks/kernel_bench.py", *flags], cwd=ROOT, capture_output=True,
                          text=True, env=subprocess_env(1, PYTHONPATH=str(ROOT)), timeout=240)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  row = lines[lines.index("error against the exact solve (f64): max |diff| / max |exact|") + 1]
  errors = dict(item.split("=") for item in row.split(":", 1)[1].split())
  assert sorted(errors) == sorted(["o", "dq", "dk", "dv", "dg", "dbeta", "dlam"]), row
  # 16 CG steps on 8-dimensional systems: converged; f32 rounding of the chunked op vs the exact solve (~1e-6).
  assert all(float(e) < 1e-4 for e in errors.values()), row
  saved = next(line for line in lines if line.strip().startswith("xla C=16 highest saved: fwd"))
  agreement = dict(item.split("=") for item in saved.split(";", 1)[1].split())  # the same op, states kept
  assert len(agreement) == 7 and all(float(e) < 1e-6 for e in agreement.values()), saved
