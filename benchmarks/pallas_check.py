"""tests/pallas's comparisons at real shapes, for the device: impl="pallas" against the XLA path and the exact solve.

Outputs, final state and all seven gradients (q, k, v, g, β, λ, initial state) with f32 inputs and a genuine initial
state; every comparison prints its error and its bound, and the script exits 1 if any is outside. Ground truth runs
under `jax.default_matmul_precision("highest")` (XLA uses TF32 on GPU otherwise).

  python benchmarks/pallas_check.py                      # B=2 T=2048 H=4 D=128, C=64, 30 CG steps
  python benchmarks/pallas_check.py --matmul_precision=default
  python benchmarks/pallas_check.py --cg_tol=1e-4         # adaptive CG (at most --cg_steps) in both chunked paths
  python benchmarks/pallas_check.py --cg_tol=1e-4 --cg_preconditioner=jacobi   # CG preconditioned by diag(A)
  python benchmarks/pallas_check.py --solve_precision=default  # one-pass solves refined against "highest" residuals
  python benchmarks/pallas_check.py --shape=2,128,8,16,16 --chunk_size=16 --cg_steps=16 --matmul_precision=high \
      --emulate_gpu_dots                                  # on CPU: the GPU's products, emulated (its accuracy)

It also prints the CG steps each chunked path's solves took (mean, max; forward and adjoint): with --cg_tol the
Pallas kernels stop per program and the XLA path per row within one loop, so the two should agree.
"""
import contextlib
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from mesanet_jax.ops import cg_steps, mesa_chunked, mesa_exact
from pallas_kernels.mesa_cg import params
from tests.ops.mesa_inputs import loss_weights, max_abs, random_inputs, scale, weighted_sum_loss

_SHAPE = flags.DEFINE_list("shape", ["2", "2048", "4", "128", "128"], "B, T, H, Dk, Dv")
_CHUNK = flags.DEFINE_integer("chunk_size", 64, "C")
_CG_STEPS = flags.DEFINE_integer("cg_steps", 30, "CG steps")
_PRECISION = flags.DEFINE_enum("matmul_precision", "highest", ["highest", "high", "default"], "of both chunked paths")
_CG_TOL = flags.DEFINE_float("cg_tol", 0.0, "stop each system once ‖r‖ ≤ tol·‖r₀‖ (0: fixed --cg_steps)")
_EMULATE = flags.DEFINE_bool("emulate_gpu_dots", False, "on CPU: the kernels' products as the GPU computes them at "
                              "--matmul_precision (params.emulating_gpu_dots), to see the GPU's accuracy here")
_CG_PRECONDITIONER = flags.DEFINE_enum("cg_preconditioner", "none", ["none", "jacobi"], "of both chunked paths")
_SOLVE_PRECISION = flags.DEFINE_enum("solve_precision", "", ["", "highest", "high", "default"],
                                     "both chunked paths' solves at this precision, each refined once (mesa_chunked's "
                                     "solve_precision; '': at --matmul_precision); held to --matmul_precision's bounds")

# Relative to the reference's max |entry|. "highest": both paths are f32-accurate CGs (the kernel's dots keep ≥ 16
# mantissa bits, tests/pallas/precision.py), amplified by the solve's conditioning; vs exact, the 30-step CG's own
# truncation (measured on an H200: ≤ 1.5e-6 for the XLA path) dominates. "default": TF32-class dots (10-11 bits).
# "high": the Pallas kernels' three bf16 passes are f32-class (~1.7e-6 a product), so against the exact solve it is held
# to "highest"'s bound; the XLA path's "high" is XLA's own choice for the backend (TF32-class on some GPUs).
BOUNDS = {"highest": {"xla": 1e-4, "exact": 1e-4}, "high": {"xla": 2e-2, "exact": 1e-4},
          "default": {"xla": 2e-2, "exact": 2e-2}}
# With a tolerance, every solution is off by up to cond(A)·tol, and a row near the threshold may stop one step apart
# in the two paths. Measured on CPU (--shape=1,512,2,64,64 --cg_tol=1e-4): vs exact ≤ 2.1e-4 (dh_kk; dq 1.3e-4), vs
# XLA ≤ 5e-7, both paths 11.5 forward steps on average; the bound, 20·tol, leaves 10x.
TOL_BOUND = 20
NAMES = ("o", "h_kk", "h_kv", "dq", "dk", "dv", "dg", "dbeta", "dlam", "dh_kk", "dh_kv")


def outputs_and_grads(op, args, weights):
  loss = weighted_sum_loss(op, weights)
  (o, state), grads = jax.jit(lambda *a: (op(*a), jax.grad(loss, argnums=range(7))(*a)))(*args)
  return [o, state.h_kk, state.h_kv, *grads[:6], grads[6].h_kk, grads[6].h_kv]


def main(argv):
  del argv
  batch, length, heads, key_dim, value_dim = (int(x) for x in _SHAPE.value)
  args = random_inputs(batch, length, heads, key_dim, value_dim, with_state=True, seed=11)
  tol = _CG_TOL.value or None
  chunked = lambda impl: functools.partial(mesa_chunked, chunk_size=_CHUNK.value, cg_steps=_CG_STEPS.value,
                                           cg_tol=tol, cg_preconditioner=_CG_PRECONDITIONER.value, impl=impl,
                                           matmul_precision=_PRECISION.value,
                                           solve_precision=_SOLVE_PRECISION.value or None)
  with jax.default_matmul_precision("highest"):
    weights = loss_weights(*mesa_exact(*args))
    references = {"exact": outputs_and_grads(mesa_exact, args, weights),
                  "xla": outputs_and_grads(chunked("xla"), args, weights)}
  with params.emulating_gpu_dots() if _EMULATE.value else contextlib.nullcontext():
    pallas = outputs_and_grads(chunked("pallas"), args, weights)
  print(f"B={batch} T={length} H={heads} Dk={key_dim} Dv={value_dim} C={_CHUNK.value} steps={_CG_STEPS.value} "
        f"tol={tol} preconditioner={_CG_PRECONDITIONER.value} precision={_PRECISION.value}"
        f"{f' solves at {_SOLVE_PRECISION.value}, refined' if _SOLVE_PRECISION.value else ''}"
        f"{' (GPU products emulated)' if _EMULATE.value else ''} "
        f"backend={jax.default_backend()}")
  loss = lambda outputs: sum(jnp.sum(w * x) for w, x in zip(weights, (outputs[0], *outputs[1])))
  for impl in ("xla", "pallas"):
    with jax.default_matmul_precision("highest"):
      steps = np.asarray(jax.jit(lambda *a: cg_steps.measure(chunked(impl), loss, *a))(*args))
    print(f"{impl:<6} CG steps: forward mean {steps[0]:.2f} max {steps[1]:.0f}, adjoint mean {steps[2]:.2f} "
          f"max {steps[3]:.0f}")
  failures = 0
  for reference_name, reference in references.items():
    bound = max(BOUNDS[_PRECISION.value][reference_name], TOL_BOUND * (tol or 0))
    for name, got, want in zip(NAMES, pallas, reference):
      error = max_abs(got, want) / scale(want)
      failures += not error <= bound
      print(f"pallas vs {reference_name:<5} {name:<6} {error:9.2e}  (bound {bound:.0e})"
            f"{'' if error <= bound else '  FAIL'}")
  for name, got, want in zip(NAMES, references["xla"], references["exact"]):
    print(f"xla    vs exact {name:<6} {max_abs(got, want) / scale(want):9.2e}")
  sys.exit(1 if failures else 0)


if __name__ == "__main__":
  app.run(main)
