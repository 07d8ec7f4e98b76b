"""mesa_decode_step: prefill with the chunked path, then decode token by token ≡ the recurrence over everything."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesanet_jax.ops import MesaState, mesa_chunked, mesa_decode_step, mesa_exact, mesa_recurrent
from tests.ops.mesa_inputs import as_f64, max_abs, random_inputs, scale


def _prefill_then_decode(args, prefill_length, cg_steps, tol=None):
  q, k, v, g, beta, lam, state = args
  o_prefill, state = mesa_chunked(*(x[:, :prefill_length] for x in (q, k, v, g, beta)), lam, state,
                                  chunk_size=8, cg_steps=cg_steps)
  step = jax.jit(lambda *a: mesa_decode_step(*a, cg_steps=cg_steps, tol=tol))
  outputs, iters = [o_prefill], []
  for t in range(prefill_length, q.shape[1]):
    o_t, state, iters_t = step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], lam, state)
    outputs.append(o_t[:, None])
    iters.append(iters_t)
  return jnp.concatenate(outputs, axis=1), state, jnp.stack(iters, axis=1)


def test_prefill_then_decode_matches_recurrent_f64(x64):
  args = as_f64(random_inputs(2, 29, 3, 8, 6, with_state=True))
  o, state, iters = _prefill_then_decode(args, 21, cg_steps=24)
  o_ref, state_ref, _ = mesa_recurrent(*args, cg_steps=24)
  # Both converge CG (3·Dk steps, f64); the chunked prefill state equals the sequential one to rounding.
  assert max_abs(o, o_ref) < 1e-10 * scale(o_ref)
  assert max_abs(state, state_ref) < 1e-12 * scale(state_ref)
  assert iters.shape == (2, 8, 3) and np.all(iters == 24)


def test_prefill_then_decode_matches_recurrent_f32():
  args = random_inputs(2, 80, 2, 32, 32, seed=1)
  o, state, _ = _prefill_then_decode(args, 64, cg_steps=30)
  o_ref, state_ref, _ = mesa_recurrent(*args, cg_steps=30)
  # Same math in a different order (chunk sums vs token sums): f32 rounding of sums over ≤ 80 tokens, ~1e-6 of scale.
  assert max_abs(o, o_ref) < 1e-4 * scale(o_ref)
  assert max_abs(state, state_ref) < 1e-5 * scale(state_ref)


def test_decode_with_tolerance_reports_steps_and_stays_accurate():
  args = random_inputs(2, 72, 4, 32, 32, seed=2)
  o, _, iters = _prefill_then_decode(args, 64, cg_steps=30, tol=1e-4)
  with jax.enable_x64(True):
    o_exact, _ = mesa_exact(*as_f64(args))
  assert iters.dtype == jnp.int32 and np.all(iters >= 1) and np.all(iters <= 30)
  assert np.mean(iters) < 20  # measured ≈ 12 for these inputs
  assert max_abs(o[:, 64:], o_exact[:, 64:]) < 2e-3 * scale(o_exact)


def test_decode_bf16_inputs_keep_f32_state():
  q, k, v, g, beta, lam, state = random_inputs(2, 1, 2, 16, 8, with_state=True)
  token = [x[:, 0].astype(jnp.bfloat16) for x in (q, k, v, g, beta)]
  o, new_state, _ = mesa_decode_step(*token, lam, state, cg_steps=20)
  assert o.dtype == jnp.bfloat16 and new_state.h_kk.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(o.astype(jnp.float32))))


@pytest.mark.parametrize("bad, message", [
    ({"q": np.zeros((2, 1, 3, 8))}, r"q must have shape \[B, H, Dk\]"),
    ({"k": np.zeros((2, 3, 7))}, r"k must have shape \[B, H, Dk\] = \(2, 3, 8\)"),
    ({"g": np.zeros((2, 1))}, r"g must have shape \[B, H\] = \(2, 3\)"),
    ({"state": MesaState(np.zeros((2, 3, 8, 8)), np.zeros((1, 3, 8, 5)))}, r"state.h_kv must have shape"),
    ({"tol": 0.0}, r"tol must be a positive float"),
])
def test_bad_decode_arguments_raise_clear_errors(bad, message):
  q, k, v, g, beta, lam, state = random_inputs(2, 1, 3, 8, 5, with_state=True)
  kwargs = dict(q=q[:, 0], k=k[:, 0], v=v[:, 0], g=g[:, 0], beta=beta[:, 0], lam=lam, state=state, cg_steps=10)
  with pytest.raises(ValueError, match=message):
    mesa_decode_step(**(kwargs | bad))
