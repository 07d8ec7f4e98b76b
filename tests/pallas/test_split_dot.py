"""chunk.SplitDot, the GPU kernels' f32 products as fp16 tensor-core passes: accuracy against f64 over a wide range
of magnitudes (the scaling keeps fp16 in range), the solve kernel built on it against the exact solve, and the whole
op with the GPU's products emulated at each precision.

On CPU the kernels run in interpret mode, where XLA computes the same fp16 parts and f32 sums the GPU does.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesanet_jax.ops import mesa_chunked, mesa_exact
from pallas_kernels.mesa_cg.chunk import SplitDot, dots
from pallas_kernels.mesa_cg.params import emulating_gpu_dots
from pallas_kernels.mesa_cg.solve import chunked_cg_solve
from tests.ops.mesa_inputs import max_abs, random_inputs, scale, value_and_gradients

# Worst-case error of one product term relative to max|a|·max|b| (after scaling both are ≤ 1): three fp16 passes drop
# lo·lo and round each part to 2^-11 of the one before, ~3·2^-22; one pass rounds both operands, ~2·2^-11. The bound
# is per term, so summing K terms gives at most K times it (measured: 1-2% of that bound, as random signs and
# half-ulp rounding make it).
TERM_ERROR = {3: 3 * 2.0 ** -22, 1: 2 * 2.0 ** -11}


def _wide_range_operands(seed, shape_a, shape_b):
  """Normal entries times per-row magnitudes from 1e-6 to 1e6 (a) and a tiny overall scale (b): plain fp16 would
  overflow on a and underflow on b."""
  keys = jax.random.split(jax.random.key(seed), 3)
  rows = 10.0 ** jax.random.uniform(keys[2], (shape_a[0], 1), minval=-6, maxval=6)
  a = jax.random.normal(keys[0], shape_a) * rows
  b = jax.random.normal(keys[1], shape_b) * 1e-7
  return a, b


@pytest.mark.parametrize("passes", [3, 1])
@pytest.mark.parametrize("form", ["nn", "nt", "tn"])
def test_split_products_match_f64(passes, form):
  a, b = _wide_range_operands(0, (32, 64), (64, 48) if form != "nt" else (48, 64))
  if form == "tn":
    a = a.T  # [K, M]: rows of a are contracted, so a is scaled as a whole
  product = getattr(dots(SplitDot(jnp.float16, passes), jnp.float32), form)(a, b)
  a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
  expected = {"nn": lambda: a64 @ b64, "nt": lambda: a64 @ b64.T, "tn": lambda: a64.T @ b64}[form]()
  # Rows of a carry their own scale in nn/nt, so each output row is held to its own row's magnitude.
  row_scale = np.max(np.abs(a64), axis=1, keepdims=True) if form != "tn" else np.max(np.abs(a64))
  bound = 64 * TERM_ERROR[passes] * row_scale * np.max(np.abs(b64))
  assert np.all(np.isfinite(np.asarray(product)))
  assert np.all(np.abs(np.asarray(product, np.float64) - expected) <= bound)


@pytest.mark.parametrize("passes", [3, 1])
def test_split_product_of_zero_and_tiny_rows_is_finite(passes):
  # Zero rows, and rows far below any scale fp16 can hold: the scale floor (2^-100) keeps 1/scale finite, so they give
  # zeros or their true small products, never inf·0 = NaN. (On a GPU an f32-subnormal row maximum made 1/scale inf:
  # a 146M model's loss was NaN on an H200 until the floor. On CPU, XLA flushes subnormals, so this test cannot
  # reproduce that case; it holds the floor's contract.)
  magnitudes = jnp.array([0.0, 1e-37, 1e-20, 1.0])[:, None]
  a = jax.random.normal(jax.random.key(3), (4, 64)) * magnitudes
  b = jax.random.normal(jax.random.key(4), (64, 16))
  product = np.asarray(dots(SplitDot(jnp.float16, passes), jnp.float32).nn(a, b), np.float64)
  assert np.all(np.isfinite(product))
  assert np.array_equal(product[0], np.zeros(16))
  expected = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
  row_bound = 64 * TERM_ERROR[passes] * np.max(np.abs(np.asarray(a[2:], np.float64)), axis=1, keepdims=True)
  assert np.all(np.abs(product[2:] - expected[2:]) <= row_bound * np.max(np.abs(np.asarray(b))))


def _system(seed, size=16, dim=32, chunks=2, state_scale=1e3, rhs_scale=1e-5):
  """A chunk-major system whose start states are ~state_scale and right-hand sides ~rhs_scale, and its f64 solution."""
  keys = jax.random.split(jax.random.key(seed), 6)
  shape = (1, 2, chunks, size, dim)
  rhs = jax.random.normal(keys[0], shape) * rhs_scale
  k = jax.random.normal(keys[1], shape)
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  log_decay = jnp.cumsum(-0.05 * jax.random.uniform(keys[2], shape[:-1]), axis=-1)
  beta = jax.random.uniform(keys[3], shape[:-1])
  lam = 0.25 + jax.random.uniform(keys[4], (2, dim)) * state_scale
  factors = jax.random.normal(keys[5], (*shape[:3], dim, dim))
  # PSD and exactly symmetric (so Sᵀ = S): on a GPU a TF32 product would leave it asymmetric by ~1e-3.
  gram = jnp.einsum("...ik,...jk->...ij", factors, factors, precision="highest")
  states = state_scale * (gram + jnp.matrix_transpose(gram)) / (2 * dim)
  f64 = lambda x: np.asarray(x, np.float64)
  weights = np.exp(f64(log_decay)[..., :, None] - f64(log_decay)[..., None, :]) * np.tril(np.ones((size, size)))
  systems = (np.exp(f64(log_decay))[..., None, None] * f64(states)[:, :, :, None]
             + np.einsum("bhnts,bhns,bhnsd,bhnse->bhntde", weights, f64(beta), f64(k), f64(k))
             + np.eye(dim) * f64(lam)[None, :, None, None, None, :])
  solution = np.linalg.solve(systems, f64(rhs)[..., None])[..., 0]
  return (rhs, k, log_decay, beta, lam, states), solution


@pytest.mark.parametrize("passes, bound", [(3, 4e-6), (1, 5e-3)])
def test_split_solve_matches_exact_across_scales(passes, bound):
  # States ~1e3 and right-hand sides ~1e-5: unscaled fp16 parts overflow (products > 65504) and underflow, and this
  # test fails without the scaling. Measured: three passes 4.0e-7 (true f32 dots: 2.4e-7), one pass 4.9e-4; the
  # bounds leave 10x.
  operands, solution = _system(seed=1)
  x, _ = chunked_cg_solve(*operands, cg_steps=64, cg_init="jacobi", precision=SplitDot(jnp.float16, passes))
  error = np.max(np.abs(np.asarray(x, np.float64) - solution)) / np.max(np.abs(solution))
  assert error <= bound


@pytest.mark.slow  # four interpreted forward + backward programs, ~15 s on one core
def test_gpu_precisions_emulated_at_the_mad_heads():
  # `params.emulating_gpu_dots`: the GPU kernels' products, computed here. The whole op (output and every gradient)
  # at the MAD heads (Dk = 16, C = 16, 16 CG steps) against the exact solve. Measured here: "highest" (three fp16
  # passes) 7.9e-7, "high" (three bf16) 1.4e-5, "default" (one fp16) 6.0e-4 (at B=2 T=128 H=8, `pallas_check.py
  # --emulate_gpu_dots`: 5.5e-7, 9.6e-6, 7.1e-4); the bounds leave 6-17x, and "high" sits between the others.
  args = random_inputs(1, 32, 2, 16, 16, seed=21, with_state=True)
  with jax.default_matmul_precision("highest"):
    exact = jax.tree.leaves(value_and_gradients(mesa_exact, args))
  errors = {}
  for precision in ("highest", "high", "default"):
    op = functools.partial(mesa_chunked, chunk_size=16, cg_steps=16, impl="pallas", matmul_precision=precision)
    with emulating_gpu_dots():
      got = jax.tree.leaves(value_and_gradients(op, args))
    errors[precision] = max(max_abs(g, e) / scale(e) for g, e in zip(got, exact))
  assert errors["highest"] <= 5e-6 and errors["high"] <= 1e-4 and errors["default"] <= 1e-2
  assert 3 * errors["highest"] <= errors["high"] <= errors["default"] / 3  # the emulation is on: three tiers
  # One-pass solves refined once against a "highest" residual (`mesa_chunked(solve_precision=)`) are as accurate
  # as "highest" throughout (measured 4.7e-7 against 4.9e-7; "default" alone 6.0e-4).
  refined = functools.partial(mesa_chunked, chunk_size=16, cg_steps=16, impl="pallas", matmul_precision="highest",
                              solve_precision="default")
  with emulating_gpu_dots():
    got = jax.tree.leaves(value_and_gradients(refined, args))
  assert max(max_abs(g, e) / scale(e) for g, e in zip(got, exact)) <= 2 * errors["highest"]
