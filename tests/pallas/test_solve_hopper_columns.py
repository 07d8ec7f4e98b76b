"""The first Hopper solve layout (systems as columns): its CG transcription against `conjugate_gradient`, one kernel
configuration interpreted against the f64 CG of the same steps, and its CUDA lowering. Kept while
benchmarks/solve_bench.py times it beside `solve_hopper`."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mesanet_jax.ops.cg import conjugate_gradient
from pallas_kernels.mesa_cg.column_cg import column_cg
from pallas_kernels.mesa_cg.params import export_for
from pallas_kernels.mesa_cg.solve_hopper_columns import hopper_cg_solve
from tests.ops.mesa_inputs import as_f64, max_abs, scale
from tests.pallas.test_solve_hopper import TOLERANCE, problem


def test_column_cg_is_conjugate_gradient(x64):
  """`column_cg` on transposed vectors gives conjugate_gradient's iterate after every step, and the same stops."""
  keys = jax.random.split(jax.random.key(0), 3)
  factors = jax.random.normal(keys[0], (5, 6, 6), jnp.float64)
  matrices = factors @ jnp.matrix_transpose(factors) + 0.1 * jnp.eye(6)
  rhs, x0 = (jax.random.normal(key, (5, 6), jnp.float64) for key in keys[1:])
  by_rows = lambda x: jnp.einsum("sij,sj->si", matrices, x)
  by_columns = lambda x: jnp.einsum("sij,js->is", matrices, x)
  with jax.disable_jit():  # 16 loops of a few steps: run them eagerly rather than compile each
    for tol, steps in itertools.product((None, 1e-3), range(8)):
      x, iters = conjugate_gradient(by_rows, rhs, x0, steps=steps, tol=tol)
      x_columns, iters_columns = column_cg(by_columns, rhs.T, x0.T, steps=steps, tol=tol)
      assert max_abs(x_columns.T, x) <= 1e-13 * scale(x), (tol, steps)
      np.testing.assert_array_equal(iters_columns, iters)


def test_matches_f64_cg():
  """Two warpgroups (each tracing its own copy), zero start, 3 fp16 passes."""
  args, op = problem(64, 128, symmetric=False)
  x, steps = hopper_cg_solve(*args, cg_steps=4, cg_init="zero", precision=lax.Precision.HIGHEST)
  with jax.enable_x64(True):
    exact_steps = op.solve(as_f64(args[0]), 4, "zero")
  np.testing.assert_array_equal(steps, 4)
  assert max_abs(x, exact_steps) <= TOLERANCE[lax.Precision.HIGHEST] * scale(exact_steps)


def test_lowers_for_cuda():
  rows = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  args = (rows(1, 2, 3, 64, 128), rows(1, 2, 3, 64, 128), rows(1, 2, 3, 64), rows(1, 2, 3, 64), rows(2, 128),
          rows(1, 2, 4, 128, 128))
  solve = functools.partial(hopper_cg_solve, cg_steps=3, cg_init="jacobi", cg_tol=1e-4,
                            precision=lax.Precision.DEFAULT)
  assert export_for("gpu", solve, *args).mlir_module().count("custom_call @mosaic_gpu_v2(") == 1
