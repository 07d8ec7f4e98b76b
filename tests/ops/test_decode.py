"""mesa_decode_step: prefill with the chunked path, then decode token by token ≡ the recurrence over everything;
CG warm-started from the previous token's solution reaches the same solution, in fewer steps on slowly-varying input."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesanet_jax.ops import MesaState, mesa_chunked, mesa_decode_step, mesa_exact, mesa_recurrent
from tests.ops.mesa_inputs import as_f64, max_abs, random_inputs, scale


# Every op below is jitted: one compiled program per op and shape instead of an eager compile per primitive (and per
# token index of an eager slice); the same math, so the same tolerances.
_exact = jax.jit(mesa_exact)


def _recurrent(**options):
  return jax.jit(functools.partial(mesa_recurrent, **options))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _prefill_then_decode(args, prefill_length, cg_steps, tol=None):
  """The chunked prefill of the first `prefill_length` tokens, then a scan of decode steps over the rest."""
  q, k, v, g, beta, lam, state = args
  o_prefill, state = mesa_chunked(*(x[:, :prefill_length] for x in (q, k, v, g, beta)), lam, state,
                                  chunk_size=8, cg_steps=cg_steps)

  def step(state, token):
    o_t, state, iters_t, _ = mesa_decode_step(*token, lam, state, cg_steps=cg_steps, tol=tol)
    return state, (o_t, iters_t)
  tokens = [jnp.moveaxis(x[:, prefill_length:], 1, 0) for x in (q, k, v, g, beta)]
  state, (outputs, iters) = jax.lax.scan(step, state, tokens)
  return jnp.concatenate([o_prefill, jnp.moveaxis(outputs, 0, 1)], axis=1), state, jnp.moveaxis(iters, 0, 1)


@pytest.mark.slow
def test_prefill_then_decode_matches_recurrent_f64(x64):
  args = as_f64(random_inputs(2, 29, 3, 8, 6, with_state=True))
  o, state, iters = _prefill_then_decode(args, 21, cg_steps=24)
  o_ref, state_ref, _ = _recurrent(cg_steps=24)(*args)
  # Both converge CG (3·Dk steps, f64); the chunked prefill state equals the sequential one to rounding.
  assert max_abs(o, o_ref) < 1e-10 * scale(o_ref)
  assert max_abs(state, state_ref) < 1e-12 * scale(state_ref)
  assert iters.shape == (2, 8, 3) and np.all(iters == 24)


@pytest.mark.slow
def test_prefill_then_decode_matches_recurrent_f32():
  args = random_inputs(2, 80, 2, 32, 32, seed=1)
  o, state, _ = _prefill_then_decode(args, 64, cg_steps=30)
  o_ref, state_ref, _ = _recurrent(cg_steps=30)(*args)
  # Same math in a different order (chunk sums vs token sums): f32 rounding of sums over ≤ 80 tokens, ~1e-6 of scale.
  assert max_abs(o, o_ref) < 1e-4 * scale(o_ref)
  assert max_abs(state, state_ref) < 1e-5 * scale(state_ref)


@pytest.mark.slow
def test_decode_with_tolerance_reports_steps_and_stays_accurate():
  args = random_inputs(2, 72, 4, 32, 32, seed=2)
  o, _, iters = _prefill_then_decode(args, 64, cg_steps=30, tol=1e-4)
  with jax.enable_x64(True):
    o_exact, _ = _exact(*as_f64(args))
  assert iters.dtype == jnp.int32 and np.all(iters >= 1) and np.all(iters <= 30)
  assert np.mean(iters) < 20  # measured ≈ 12 for these inputs
  assert max_abs(o[:, 64:], o_exact[:, 64:]) < 2e-3 * scale(o_exact)


def test_decode_bf16_inputs_keep_f32_state():
  q, k, v, g, beta, lam, state = random_inputs(2, 1, 2, 16, 8, with_state=True)
  token = [x[:, 0].astype(jnp.bfloat16) for x in (q, k, v, g, beta)]
  o, new_state, _, x = jax.jit(functools.partial(mesa_decode_step, cg_steps=20))(*token, lam, state)
  assert o.dtype == jnp.bfloat16 and new_state.h_kk.dtype == jnp.float32 and x.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(o.astype(jnp.float32))))


@pytest.mark.parametrize("bad, message", [
    ({"q": np.zeros((2, 1, 3, 8))}, r"q must have shape \[B, H, Dk\]"),
    ({"k": np.zeros((2, 3, 7))}, r"k must have shape \[B, H, Dk\] = \(2, 3, 8\)"),
    ({"g": np.zeros((2, 1))}, r"g must have shape \[B, H\] = \(2, 3\)"),
    ({"state": MesaState(np.zeros((2, 3, 8, 8)), np.zeros((1, 3, 8, 5)))}, r"state.h_kv must have shape"),
    ({"tol": 0.0}, r"tol must be a positive float"),
    ({"previous": np.zeros((2, 3, 5))}, r"previous must have shape \[B, H, Dk\] = \(2, 3, 8\)"),
])
def test_bad_decode_arguments_raise_clear_errors(bad, message):
  q, k, v, g, beta, lam, state = random_inputs(2, 1, 3, 8, 5, with_state=True)
  kwargs = dict(q=q[:, 0], k=k[:, 0], v=v[:, 0], g=g[:, 0], beta=beta[:, 0], lam=lam, state=state, cg_steps=10)
  with pytest.raises(ValueError, match=message):
    mesa_decode_step(**(kwargs | bad))


def _slowly_varying(length=40, heads=4, key_dim=32, seed=3):
  """γ ≈ 1, a long history of random keys (a spread spectrum: CG from scratch needs many steps) and new tokens whose
  q, k drift by small random steps with a small β: consecutive systems and solutions are close (the paper's §6 case)."""
  rng = np.random.default_rng(seed)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  past = unit(rng.normal(size=(1, heads, 200, key_dim)))
  decay = 0.999 ** np.arange(199, -1, -1)[:, None]
  h_kk = np.einsum("bhrk,bhrl->bhkl", 0.5 * decay * past, past)
  walk = lambda: unit(unit(rng.normal(size=(1, 1, heads, key_dim)))
                      + np.cumsum(0.005 * rng.normal(size=(1, length, heads, key_dim)), axis=1))
  q, k, v = walk(), walk(), rng.normal(size=(1, length, heads, key_dim))
  g, beta = np.full((1, length, heads), np.log(0.999)), np.full((1, length, heads), 0.05)
  lam = np.full((heads, key_dim), 0.25)
  state = MesaState(h_kk, np.zeros((1, heads, key_dim, key_dim)))
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), (q, k, v, g, beta, lam, state))


def test_warm_start_needs_fewer_steps_on_slowly_varying_input():
  args = _slowly_varying()
  steps = {}
  for name, options in (("jacobi", {}), ("zero", {"cg_init": "zero"}), ("previous", {"warm_start": True})):
    o, _, iters = _recurrent(cg_steps=64, tol=1e-4, **options)(*args)
    steps[name] = float(jnp.mean(iters[:, 1:]))  # the first token has no previous solution
  with jax.enable_x64(True):
    o_exact, _ = _exact(*as_f64(args))
  # Every start converges to A⁻¹q: ‖r‖ ≤ 1e-4·‖q‖ with cond(A) ≈ 4 here; measured 2e-4 of the output's scale.
  assert max_abs(o, o_exact) < 1e-3 * scale(o_exact)
  # Measured: jacobi 8.8, zero (the same ‖q‖-relative rule as the warm start) 8.7, previous 5.8 steps per token.
  assert steps["previous"] < 0.8 * min(steps["jacobi"], steps["zero"]), steps


@pytest.mark.slow  # compiles over ~8 s on one core
def test_warm_start_converges_to_the_same_solution_f64(x64):
  args = as_f64(random_inputs(2, 24, 3, 8, 6, with_state=True, seed=5))
  o_exact, state_exact = _exact(*args)
  o, state, iters = _recurrent(cg_steps=40, tol=1e-10, warm_start=True)(*args)
  # ‖r‖ ≤ 1e-10·‖q‖ and cond(A) ≲ 1e2: the solution within ~1e-8 of scale, on unrelated random tokens too.
  assert max_abs(o, o_exact) < 1e-7 * scale(o_exact) and max_abs(state, state_exact) < 1e-12 * scale(state_exact)
  assert np.all(iters <= 40)


def test_warm_start_is_scaled_to_the_new_system():
  """A previous solution pointing the opposite way (q flipped) starts CG at exactly the new solution: x0 = α x_prev
  with α = x_prevᵀq / x_prevᵀA x_prev = −1 (plain x_prev would start at twice the error of x0 = 0)."""
  q, k, v, g, beta, lam, state = random_inputs(2, 1, 3, 8, 6, with_state=True, seed=6)
  token = [x[:, 0] for x in (q, k, v, g, beta)]
  _, _, _, x = jax.jit(functools.partial(mesa_decode_step, cg_steps=24))(*token, lam, state)
  flipped = [-token[0], *token[1:]]
  # The state after the token is the same for any q: the system the warm start is scaled against.
  o_flipped, _, iters, x_flipped = jax.jit(functools.partial(mesa_decode_step, cg_steps=24, tol=1e-4))(
      *flipped, lam, state, previous=x)
  assert np.all(iters == 0) and max_abs(x_flipped, -x) < 1e-6 * scale(x)
