"""mesa_chunked with cg_tol (adaptive CG): the exact solve's outputs and gradients once the tolerance is tight, finite
differences, and the CG steps it reports equal to an independent count by `mesa_recurrent` (dense CG per token)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mesanet_jax.ops import cg_steps, mesa_chunked, mesa_exact, mesa_recurrent
from tests.ops.mesa_inputs import (as_f64, max_abs, output_weights, random_inputs, scale, value_and_gradients,
                                  weighted_sum_loss)
from tests.ops.test_chunked import ARGNAMES, F64_TOL

# (B, T, H, Dk, Dv, C): T not a multiple of C with Dk ≠ Dv (padded tokens), T a multiple of C.
SHAPES = [(2, 37, 3, 8, 5, 8), (1, 48, 2, 16, 16, 16)]


# Jitted and cached, as in test_chunked.py: one compiled program per op and shape instead of an eager compile per
# primitive.
@functools.cache
def _adaptive(chunk_size, cg_steps, cg_tol, **kwargs):
  return jax.jit(functools.partial(mesa_chunked, chunk_size=chunk_size, cg_steps=cg_steps, cg_tol=cg_tol, **kwargs),
                 static_argnames="return_cg_steps")


_exact = jax.jit(mesa_exact)
_recurrent = jax.jit(mesa_recurrent, static_argnames=("cg_steps", "tol"))


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_tight_tolerance_matches_exact_in_f64(x64, shape):
  batch, length, heads, key_dim, value_dim, chunk = shape
  args = as_f64(random_inputs(batch, length, heads, key_dim, value_dim, with_state=True, seed=1))
  # ‖r‖ ≤ 1e-13‖r₀‖ with cond(A) ≲ 1e2 leaves errors ~1e-11 of scale, inside F64_TOL (the fixed-step tests' bound);
  # 3·Dk steps is only the cap.
  _assert_matches_exact(args, _adaptive(chunk, 3 * key_dim, 1e-13, return_cg_steps=True))


def _assert_matches_exact(args, op):
  """op (returning its CG steps) against the exact solve in f64: outputs, final state, every gradient; every system
  stopped before the cap of 3·Dk steps."""
  key_dim = args[0].shape[-1]
  (o, state, forward_steps), grads = value_and_gradients(op, args)
  (o_exact, state_exact), grads_exact = value_and_gradients(_exact, args)
  assert max_abs(o, o_exact) < F64_TOL * scale(o_exact)
  assert max_abs(state, state_exact) < F64_TOL * scale(state_exact)
  assert float(cg_steps.combine(forward_steps)[1]) < 3 * key_dim  # every system stopped before the cap
  for name, grad, grad_exact in zip(ARGNAMES, grads, grads_exact):
    assert max_abs(grad, grad_exact) < F64_TOL * scale(grad_exact), name


@pytest.mark.slow
@pytest.mark.parametrize("tol", [1e-3, 1e-5])
def test_loose_tolerance_keeps_every_gradient_at_its_accuracy(x64, tol):
  """A loose tolerance costs accuracy in proportion, in every gradient: the backward's H_kk[t] x_t is q_t − λ ⊙ x_t
  (equal at the solution), whose difference from the read of the x found is the residual, ≤ tol·‖r₀‖. Measured:
  max error / scale 0.1 – 2.2 × tol over the gradients (dq the largest); the bound is 10 × tol."""
  batch, length, heads, key_dim, value_dim, chunk = SHAPES[1]
  args = as_f64(random_inputs(batch, length, heads, key_dim, value_dim, with_state=True, seed=6))
  _, grads = value_and_gradients(_adaptive(chunk, 3 * key_dim, tol), args)
  _, grads_exact = value_and_gradients(_exact, args)
  for name, grad, grad_exact in zip(ARGNAMES, grads, grads_exact):
    error = max_abs(grad, grad_exact) / scale(grad_exact)
    assert error < 10 * tol, (name, error)


@pytest.mark.slow
def test_gradients_match_finite_differences(x64):
  """The implicit backward of the adaptive solve against numerical derivatives (tolerance far below their error)."""
  args = as_f64(random_inputs(1, 11, 2, 4, 3, with_state=True, seed=2))
  op = _adaptive(4, 12, 1e-11)
  loss = jax.jit(lambda *a: jnp.sum(jnp.sin(op(*a)[0])) + jnp.sum(jnp.cos(op(*a)[1].h_kk)))
  check_grads(loss, args, order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def _token_h_kv(k, v, g, beta, state):
  """H_kv[t] for every token, [B, T, H, Dk, Dv], by the plain recurrence."""
  def step(h_kv, token):
    k_t, v_t, g_t, beta_t = token
    h_kv = jnp.exp(g_t)[..., None, None] * h_kv + (beta_t[..., None] * k_t)[..., :, None] * v_t[..., None, :]
    return h_kv, h_kv
  _, h_kv = jax.lax.scan(step, state.h_kv, tuple(jnp.moveaxis(x, 1, 0) for x in (k, v, g, beta)))
  return jnp.moveaxis(h_kv, 0, 1)


def _per_head_stats(iters):
  """(mean, max) over tokens of iters [B, T, H] -> [B, H, 2]."""
  iters = np.asarray(iters, np.float64)
  return np.stack([iters.mean(axis=1), iters.max(axis=1)], axis=-1)


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reported_steps_equal_an_independent_count(x64, shape):
  """Forward: the steps `mesa_recurrent` (dense CG, token by token) takes on q; adjoint: on u_t = H_kv[t] do_t, the
  same systems. f64 keeps both CGs equal to ~1e-15, far from any row's stopping threshold."""
  batch, length, heads, key_dim, value_dim, chunk = shape
  args = as_f64(random_inputs(batch, length, heads, key_dim, value_dim, with_state=True, seed=3))
  tol, cap = 1e-6, 3 * key_dim
  op = _adaptive(chunk, cap, tol)
  weights = output_weights(mesa_exact, args)
  q, k, v, g, beta, lam, state = args
  forward_iters = _recurrent(*args, cg_steps=cap, tol=tol)[2]
  u = jnp.einsum("bthkv,bthv->bthk", _token_h_kv(k, v, g, beta, state), weights[0])  # do = ∂loss/∂o = weights[0]
  adjoint_iters = _recurrent(u, k, v, g, beta, lam, state, cg_steps=cap, tol=tol)[2]
  expected = np.concatenate([_per_head_stats(forward_iters), _per_head_stats(adjoint_iters)], axis=-1)

  probe = jnp.zeros((batch, heads, len(cg_steps.STATS)))
  reported = jax.jit(jax.grad(lambda p: weighted_sum_loss(functools.partial(op, cg_probe=p), weights)(*args)))(probe)
  # Equal counts; the statistics are f32 (a mean of ≤ 48 integers: rounding ≤ 6e-8 relative).
  np.testing.assert_allclose(reported, expected, rtol=1e-6)
  np.testing.assert_allclose(op(*args, return_cg_steps=True)[2], expected[..., :2], rtol=1e-6)
  assert 1 < expected[..., 0].mean() < cap  # the count is neither trivial nor capped
  # Over the whole batch (what a layer reports): means of the per-head means, maxima of the maxima.
  loss_of_outputs = lambda outputs: weighted_sum_loss(lambda: outputs, weights)()
  measured = cg_steps.measure(op, loss_of_outputs, *args)
  np.testing.assert_allclose(measured, [expected[..., 0].mean(), expected[..., 1].max(), expected[..., 2].mean(),
                                        expected[..., 3].max()], rtol=1e-6)


def test_fixed_steps_report_the_step_count():
  args = random_inputs(1, 20, 2, 8, 8, seed=4)
  _, _, steps = _adaptive(8, 7, None)(*args, return_cg_steps=True)  # cg_tol None: the fixed steps
  np.testing.assert_array_equal(steps, np.full((1, 2, 2), 7.0))


@pytest.mark.slow
def test_steps_and_error_fall_and_rise_with_the_tolerance(x64):
  args = as_f64(random_inputs(2, 64, 2, 16, 16, seed=8))
  o_exact, _ = _exact(*args)
  runs = jax.jit(lambda *args: [mesa_chunked(*args, chunk_size=16, cg_steps=48, cg_tol=tol, return_cg_steps=True)
                                for tol in (1e-2, 1e-4, 1e-6, 1e-8)])(*args)  # one program: chunk sums compile once
  errors = [max_abs(o, o_exact) for o, _, _ in runs]
  steps = [float(cg_steps.combine(s)[0]) for _, _, s in runs]
  assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
  assert all(later > earlier for earlier, later in zip(steps, steps[1:])), steps
  # ‖x − x*‖ ≤ cond(A)·tol·‖x*‖ with cond(A) ≲ 1e2 here.
  assert errors[-1] < 1e-6 * scale(o_exact)


@pytest.mark.slow
def test_jacobi_preconditioner_matches_exact_in_fewer_steps(x64):
  """cg_preconditioner="jacobi": at a tight tolerance the exact solve's outputs and gradients (as the plain solve's
  test above), in fewer steps than plain CG at a training tolerance: λ = 0.25 + softplus(N(0, 1)) spreads diag(A_t)
  over the dims as in the kernel benchmark's random inputs."""
  batch, length, heads, key_dim, value_dim, chunk = SHAPES[1]
  args = as_f64(random_inputs(batch, length, heads, key_dim, value_dim, with_state=True, seed=1))
  _assert_matches_exact(args, _adaptive(chunk, 3 * key_dim, 1e-13, cg_preconditioner="jacobi", return_cg_steps=True))
  steps = jax.jit(lambda *args: {preconditioner: mesa_chunked(  # one program: the chunk sums compile once
      *args, chunk_size=chunk, cg_steps=3 * key_dim, cg_tol=1e-4, cg_preconditioner=preconditioner,
      return_cg_steps=True)[2] for preconditioner in ("none", "jacobi")})(*args)
  mean_steps = {preconditioner: float(cg_steps.combine(s)[0]) for preconditioner, s in steps.items()}
  # Measured: 8.9 plain, 6.3 preconditioned (Dk = 16; at Dk = 128 on kernel_bench's inputs 12.6 and 5.8, computed
  # densely in numpy).
  assert mean_steps["jacobi"] < 0.8 * mean_steps["none"], mean_steps
