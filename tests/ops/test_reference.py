"""The references themselves: mesa_exact against a plain numpy loop, mesa_recurrent against mesa_exact."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mesanet_jax.ops import mesa_exact, mesa_recurrent
from tests.ops.mesa_inputs import as_f64, max_abs, random_inputs, scale

# The ops are jitted: one compiled program per op and shape instead of an eager compile per primitive (the same math,
# so the same tolerances).
_exact = jax.jit(mesa_exact)


def _recurrent(**options):
  return jax.jit(functools.partial(mesa_recurrent, **options))


def _numpy_mesa(q, k, v, g, beta, lam, state):
  """The definition, written out per batch, head and token in float64 numpy."""
  q, k, v, g, beta, lam = (np.asarray(x, np.float64) for x in (q, k, v, g, beta, lam))
  batch, length, heads, key_dim = q.shape
  o = np.zeros(v.shape)
  h_kk = np.array(state.h_kk, np.float64) if state else np.zeros((batch, heads, key_dim, key_dim))
  h_kv = np.array(state.h_kv, np.float64) if state else np.zeros((batch, heads, key_dim, v.shape[-1]))
  for b in range(batch):
    for h in range(heads):
      for t in range(length):
        gamma = np.exp(g[b, t, h])
        h_kk[b, h] = gamma * h_kk[b, h] + beta[b, t, h] * np.outer(k[b, t, h], k[b, t, h])
        h_kv[b, h] = gamma * h_kv[b, h] + beta[b, t, h] * np.outer(k[b, t, h], v[b, t, h])
        x = np.linalg.solve(h_kk[b, h] + np.diag(lam[h]), q[b, t, h])
        o[b, t, h] = h_kv[b, h].T @ x
  return o, (h_kk, h_kv)


@pytest.mark.slow
@pytest.mark.parametrize("with_state", [False, True])
def test_exact_matches_numpy_definition(x64, with_state):
  args = as_f64(random_inputs(2, 9, 2, 6, 4, with_state=with_state))
  o, state = _exact(*args)
  o_np, state_np = _numpy_mesa(*args)
  # Both f64 direct solves of systems with condition number ≲ 50: agree to rounding.
  assert max_abs(o, o_np) < 1e-12
  assert max_abs(tuple(state), state_np) < 1e-12


@pytest.mark.slow
def test_exact_gradients_match_finite_differences(x64):
  args = as_f64(random_inputs(1, 5, 2, 4, 3, with_state=True))
  loss = jax.jit(lambda *a: jnp.sum(jnp.sin(mesa_exact(*a)[0])))
  check_grads(loss, args, order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


@pytest.mark.slow  # compiles over ~8 s on one core
@pytest.mark.parametrize("cg_init", ["jacobi", "zero"])
def test_recurrent_matches_exact(x64, cg_init):
  args = as_f64(random_inputs(2, 23, 3, 8, 5, with_state=True))
  o, state, iters = _recurrent(cg_steps=24, cg_init=cg_init)(*args)
  o_exact, state_exact = _exact(*args)
  # 3·Dk CG steps in f64: CG has converged, what is left is rounding (scale ~3).
  assert max_abs(o, o_exact) < 1e-10
  assert max_abs(state, state_exact) < 1e-12
  assert iters.shape == (2, 23, 3) and np.all(iters == 24)


@pytest.mark.slow
def test_recurrent_tolerance_stops_early_with_small_error():
  args = random_inputs(2, 64, 4, 32, 32, seed=3)
  q = args[0].at[:, 5].set(0.0)  # a zero query is solved by the zero vector in no step
  o, _, iters = _recurrent(cg_steps=30, tol=1e-4)(q, *args[1:])
  with jax.enable_x64(True):
    o_exact, _ = _exact(*as_f64((q, *args[1:])))
  assert iters.shape == (2, 64, 4) and iters.dtype == jnp.int32
  assert np.all(iters <= 30) and np.all(iters[:, 5] == 0)
  assert np.mean(iters) < 20  # measured ≈ 12: far fewer than the 30-step budget
  # ‖r‖ ≤ 1e-4‖r_0‖ bounds the relative solution error by 1e-4·cond(A) ≲ 1e-2; measured ≈ 2e-4 of scale.
  assert max_abs(o, o_exact) < 2e-3 * scale(o_exact)
