"""Gated delta rule: the chunkwise (WY) form equals the token-by-token recurrence, values and gradients, with either
way of solving the chunks' triangular systems; `unit_lower_inverse` against the dense inverse."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesanet_jax.ops import gated_delta_rule
from tests.ops.mesa_inputs import as_f64, max_abs, random_inputs, scale

# Jitted: one compiled program per op and shape instead of an eager compile per primitive.
gated_delta_chunked = jax.jit(gated_delta_rule.gated_delta_chunked, static_argnames=("chunk_size", "triangular"))
gated_delta_recurrent = jax.jit(gated_delta_rule.gated_delta_recurrent)
unit_lower_inverse = jax.jit(gated_delta_rule.unit_lower_inverse)


@jax.jit
def _solved_both_ways(lower, rhs):
  """(I + lower)⁻¹ rhs by the explicit inverse and by the triangular solve."""
  by_inverse = jnp.matmul(gated_delta_rule.unit_lower_inverse(lower), rhs, precision="highest")
  unit = jnp.eye(lower.shape[-1], dtype=lower.dtype)
  return by_inverse, jax.scipy.linalg.solve_triangular(unit + lower, rhs, lower=True, unit_diagonal=True)


def _inputs(length=29, seed=0):
  q, k, v, g, beta, _, state = random_inputs(2, length, 3, 8, 6, seed=seed, with_state=True, decay_bias=2.0)
  return q, k, v, g, beta, state.h_kv  # any [B, H, Dk, Dv] start state will do


@pytest.mark.slow
@pytest.mark.parametrize("triangular", gated_delta_rule.TRIANGULAR)
def test_chunked_matches_recurrent_f64(x64, triangular):
  args = as_f64(_inputs())
  o_ref, s_ref = gated_delta_recurrent(*args)
  for chunk in (1, 8, 64):  # 29 tokens: several padded chunks, one chunk per token, one partial chunk
    o, s = gated_delta_chunked(*args, chunk_size=chunk, triangular=triangular)
    # Same algebra reordered; in f64 only rounding (~1e-15 of scale) separates them.
    assert max_abs(o, o_ref) < 1e-12 * scale(o_ref), chunk
    assert max_abs(s, s_ref) < 1e-12 * scale(s_ref), chunk


@pytest.mark.slow  # compile-heavy (~10 s on 2 cores)
@pytest.mark.parametrize("triangular", gated_delta_rule.TRIANGULAR)
def test_chunked_gradients_match_recurrent_f64(x64, triangular):
  args = as_f64(_inputs(length=13, seed=1))
  weights = np.random.default_rng(5).normal(size=(2, 13, 3, 6))
  loss = lambda op: lambda *a: jnp.sum(weights * op(*a)[0]) + jnp.sum(op(*a)[1])
  chunked = lambda *a: gated_delta_chunked(*a, chunk_size=4, triangular=triangular)
  grads = jax.jit(jax.grad(loss(chunked), argnums=range(6)))(*args)
  grads_ref = jax.jit(jax.grad(loss(gated_delta_recurrent), argnums=range(6)))(*args)
  for grad, grad_ref in zip(grads, grads_ref):
    assert max_abs(grad, grad_ref) < 1e-11 * scale(grad_ref)


@pytest.mark.slow
@pytest.mark.parametrize("triangular", gated_delta_rule.TRIANGULAR)
def test_chunked_f32_and_bf16_inputs(triangular):
  args = _inputs(length=40, seed=2)
  o_ref, _ = gated_delta_recurrent(*args)
  o, state = gated_delta_chunked(*args, chunk_size=16, triangular=triangular)
  # f32 rounding of ≤ 40-term sums and a 16×16 triangular solve: ~1e-6 of scale.
  assert max_abs(o, o_ref) < 1e-5 * scale(o_ref)
  o_bf16, state_bf16 = gated_delta_chunked(*(x.astype(jnp.bfloat16) for x in args[:5]), args[5], chunk_size=16,
                                           triangular=triangular)
  assert o_bf16.dtype == jnp.bfloat16 and state_bf16.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(o_bf16, np.float32)))


def _delta_rule_lower(rng, batch: int, size: int) -> np.ndarray:
  """L of the chunked form (β_s e^{G_s−G_r} k_s·k_r, r < s) for unit keys, β ~ U(0, 1), decays in (0.9, 1]."""
  keys = rng.normal(size=(batch, size, 16))
  keys /= np.linalg.norm(keys, axis=-1, keepdims=True)
  beta = rng.uniform(size=(batch, size))
  log_decay = np.cumsum(-rng.uniform(0, 0.1, (batch, size)), axis=-1)
  decay = np.exp(log_decay[:, :, None] - log_decay[:, None, :])
  return np.tril(beta[:, :, None] * decay * (keys @ keys.transpose(0, 2, 1)), -1)


@pytest.mark.parametrize("size", [1, 2, 5, 16, 37, 64])  # powers of two and sizes padded to the next one
def test_unit_lower_inverse_is_the_inverse_f64(x64, size):
  lower = _delta_rule_lower(np.random.default_rng(size), 3, size)
  inverse = np.asarray(unit_lower_inverse(jnp.asarray(lower)))
  exact = np.linalg.inv(np.eye(size) + lower)
  assert np.abs(inverse - exact).max() < 1e-13 * np.abs(exact).max()  # f64 rounding (measured ≤ 3e-16 relative)
  assert np.all(np.triu(inverse, 1) == 0)


@pytest.mark.parametrize("case", ["delta_rule", "all_ones", "alternating"])
def test_unit_lower_inverse_in_f32_is_as_accurate_as_the_triangular_solve(case):
  """f32, C = 64, against the f64 solve: random delta-rule L, and two matrices whose powers grow like binomials
  (every entry below the diagonal 1, or −0.99: an inverse of size ~1e19), where an expanded Neumann series would lose
  every digit; the recursive blocks keep the error at the triangular solve's."""
  rng = np.random.default_rng(7)
  lower = {"delta_rule": _delta_rule_lower(rng, 4, 64), "all_ones": np.tril(np.ones((2, 64, 64)), -1),
           "alternating": np.tril(np.full((2, 64, 64), -0.99), -1)}[case]
  rhs = rng.normal(size=lower.shape[:-1] + (32,))
  exact = np.linalg.solve(np.eye(64) + lower, rhs)
  by_inverse, by_solve = _solved_both_ways(jnp.asarray(lower, jnp.float32), jnp.asarray(rhs, jnp.float32))
  error = lambda x: np.abs(np.asarray(x, np.float64) - exact).max() / np.abs(exact).max()
  # Measured: inverse 8e-8 / 5e-8 / 5e-7, solve 2e-7 / 8e-8 / 6e-7 of the solution's scale.
  assert error(by_inverse) < max(2 * error(by_solve), 1e-6), (error(by_inverse), error(by_solve))


def test_unknown_triangular_method_is_refused():
  q, k, v, g, beta, _ = _inputs(length=4)
  with pytest.raises(ValueError, match="triangular must be one of"):
    gated_delta_rule.gated_delta_chunked(q, k, v, g, beta, triangular="lu")
