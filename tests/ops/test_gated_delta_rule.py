"""Gated delta rule: the chunkwise (WY) form equals the token-by-token recurrence, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesanet_jax.ops import gated_delta_rule
from tests.ops.mesa_inputs import as_f64, max_abs, random_inputs, scale

# Jitted: one compiled program per op and shape instead of an eager compile per primitive.
gated_delta_chunked = jax.jit(gated_delta_rule.gated_delta_chunked, static_argnames="chunk_size")
gated_delta_recurrent = jax.jit(gated_delta_rule.gated_delta_recurrent)


def _inputs(length=29, seed=0):
  q, k, v, g, beta, _, state = random_inputs(2, length, 3, 8, 6, seed=seed, with_state=True, decay_bias=2.0)
  return q, k, v, g, beta, state.h_kv  # any [B, H, Dk, Dv] start state will do


@pytest.mark.slow
def test_chunked_matches_recurrent_f64(x64):
  args = as_f64(_inputs())
  o_ref, s_ref = gated_delta_recurrent(*args)
  for chunk in (1, 8, 64):  # 29 tokens: several padded chunks, one chunk per token, one partial chunk
    o, s = gated_delta_chunked(*args, chunk_size=chunk)
    # Same algebra reordered; in f64 only rounding (~1e-15 of scale) separates them.
    assert max_abs(o, o_ref) < 1e-12 * scale(o_ref), chunk
    assert max_abs(s, s_ref) < 1e-12 * scale(s_ref), chunk


@pytest.mark.slow  # compile-heavy (~10 s on 2 cores)
def test_chunked_gradients_match_recurrent_f64(x64):
  args = as_f64(_inputs(length=13, seed=1))
  weights = jax.random.normal(jax.random.key(5), (2, 13, 3, 6), jnp.float64)
  loss = lambda op: lambda *a: jnp.sum(weights * op(*a)[0]) + jnp.sum(op(*a)[1])
  grads = jax.jit(jax.grad(loss(lambda *a: gated_delta_chunked(*a, chunk_size=4)), argnums=range(6)))(*args)
  grads_ref = jax.jit(jax.grad(loss(gated_delta_recurrent), argnums=range(6)))(*args)
  for grad, grad_ref in zip(grads, grads_ref):
    assert max_abs(grad, grad_ref) < 1e-11 * scale(grad_ref)


@pytest.mark.slow
def test_chunked_f32_and_bf16_inputs():
  args = _inputs(length=40, seed=2)
  o_ref, _ = gated_delta_recurrent(*args)
  o, state = gated_delta_chunked(*args, chunk_size=16)
  # f32 rounding of ≤ 40-term sums and a 16×16 triangular solve: ~1e-6 of scale.
  assert max_abs(o, o_ref) < 1e-5 * scale(o_ref)
  o_bf16, state_bf16 = gated_delta_chunked(*(x.astype(jnp.bfloat16) for x in args[:5]), args[5], chunk_size=16)
  assert o_bf16.dtype == jnp.bfloat16 and state_bf16.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(o_bf16, np.float32)))
