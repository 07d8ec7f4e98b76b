"""conjugate_gradient on dense SPD systems, against numpy's direct solve."""
import jax.numpy as jnp
import numpy as np
import pytest

from mesanet_jax.ops import conjugate_gradient


def _spd_systems(num=6, dim=12, seed=0):
  rng = np.random.default_rng(seed)
  factors = rng.normal(size=(num, dim, dim))
  matrices = factors @ factors.transpose(0, 2, 1) / dim + 0.25 * np.eye(dim)
  return matrices, rng.normal(size=(num, dim))


def _matvec(matrices):
  return lambda x: jnp.einsum("nij,nj->ni", matrices, x)


def test_fixed_steps_solve_matches_direct_solve(x64):
  matrices, rhs = _spd_systems()
  x, iters = conjugate_gradient(_matvec(matrices), rhs, jnp.zeros_like(rhs), steps=24)
  # f64, 2·dim steps of CG on condition numbers ≲ 1e2: converged to rounding.
  np.testing.assert_allclose(x, np.linalg.solve(matrices, rhs[..., None])[..., 0], atol=1e-10)
  np.testing.assert_array_equal(iters, 24)


def test_tolerance_stops_each_system_at_its_own_step(x64):
  matrices, rhs = _spd_systems(num=8, dim=16, seed=1)
  matrices[0] = np.eye(16) * 3.0  # one eigenvalue: solved in one step
  tol = 1e-6
  x, iters = conjugate_gradient(_matvec(matrices), rhs, jnp.zeros_like(rhs), steps=50, tol=tol)
  residual = np.linalg.norm(rhs - np.einsum("nij,nj->ni", matrices, x), axis=-1)
  assert np.all(residual <= tol * np.linalg.norm(rhs, axis=-1))
  assert iters[0] == 1
  assert np.all(iters[1:] > 1) and np.all(iters <= 16 + 2)


def test_zero_rhs_takes_no_step_and_stays_finite():
  matrices, rhs = _spd_systems()
  rhs = rhs.astype(np.float32)
  rhs[2] = 0.0
  for tol in (None, 1e-4):
    x, iters = conjugate_gradient(_matvec(jnp.float32(matrices)), rhs, jnp.zeros_like(rhs), steps=20, tol=tol)
    assert np.all(np.isfinite(x))
    np.testing.assert_array_equal(x[2], 0.0)
    if tol is not None:
      assert iters[2] == 0


def test_step_budget_bounds_the_tolerance_loop():
  matrices, rhs = _spd_systems(dim=32)
  _, iters = conjugate_gradient(_matvec(jnp.float32(matrices)), jnp.float32(rhs), jnp.zeros((6, 32)), steps=3,
                                tol=1e-12)
  np.testing.assert_array_equal(iters, 3)


def test_tolerance_relative_to_rhs_rewards_a_close_start(x64):
  matrices, rhs = _spd_systems(num=8, dim=16, seed=2)
  exact = np.linalg.solve(matrices, rhs[..., None])[..., 0]
  close = exact + 1e-3 * np.random.default_rng(3).normal(size=exact.shape)
  tol = 1e-6
  _, from_zero = conjugate_gradient(_matvec(matrices), rhs, jnp.zeros_like(rhs), steps=50, tol=tol)
  _, start_rule = conjugate_gradient(_matvec(matrices), rhs, close, steps=50, tol=tol)
  x, rhs_rule = conjugate_gradient(_matvec(matrices), rhs, close, steps=50, tol=tol, relative_to="rhs")
  residual = np.linalg.norm(rhs - np.einsum("nij,nj->ni", matrices, x), axis=-1)
  assert np.all(residual <= tol * np.linalg.norm(rhs, axis=-1))
  # Relative to ‖r_0‖ a start 1e3 times closer asks for a 1e3 times smaller residual: no step saved; relative to
  # ‖rhs‖ it saves the steps that reduce the residual by 1e3.
  assert np.all(rhs_rule < start_rule) and np.all(start_rule >= from_zero - 2)
  with pytest.raises(ValueError, match="relative_to must be"):
    conjugate_gradient(_matvec(matrices), rhs, close, steps=5, tol=tol, relative_to="x0")


def _badly_scaled_systems(num=8, dim=24, seed=4):
  """SPD systems D B D with B well conditioned and D's entries spread over two decades: plain CG needs many steps,
  CG preconditioned by diag(A) few."""
  matrices, rhs = _spd_systems(num, dim, seed)
  scales = np.exp(np.random.default_rng(seed + 1).uniform(-2.3, 2.3, size=(num, dim)))
  return matrices * scales[:, :, None] * scales[:, None, :], rhs


def test_jacobi_preconditioned_cg_solves_in_fewer_steps(x64):
  matrices, rhs = _badly_scaled_systems()
  tol = 1e-8
  inverse_diagonal = 1 / np.einsum("nii->ni", matrices)
  _, plain_steps = conjugate_gradient(_matvec(matrices), rhs, jnp.zeros_like(rhs), steps=200, tol=tol)
  x, steps = conjugate_gradient(_matvec(matrices), rhs, jnp.zeros_like(rhs), steps=200, tol=tol,
                                preconditioner=lambda r: r * inverse_diagonal)
  # The stopping rule reads ‖r‖ (not rᵀM⁻¹r): the residual itself is below tol·‖r₀‖ (‖r₀‖ = ‖rhs‖ from zero).
  residual = np.linalg.norm(rhs - np.einsum("nij,nj->ni", matrices, x), axis=-1)
  assert np.all(residual <= tol * np.linalg.norm(rhs, axis=-1))
  exact = np.linalg.solve(matrices, rhs[..., None])[..., 0]
  # ‖x − x*‖ ≤ cond(A)·tol·‖x*‖ (cond 1e4 – 3e4 with the spread scales).
  np.testing.assert_allclose(x, exact, atol=1e-3 * np.abs(exact).max())
  # Measured: 38-48 steps plain (rounding makes CG exceed dim = 24 at this conditioning), 23-25 preconditioned.
  assert np.all(steps < 0.7 * plain_steps), (steps, plain_steps)


def test_identity_preconditioner_is_plain_cg(x64):
  matrices, rhs = _spd_systems(num=5, dim=10, seed=6)
  for tol in (None, 1e-9):
    plain = conjugate_gradient(_matvec(matrices), rhs, jnp.zeros_like(rhs), steps=7, tol=tol)
    identity = conjugate_gradient(_matvec(matrices), rhs, jnp.zeros_like(rhs), steps=7, tol=tol,
                                  preconditioner=lambda r: r)
    np.testing.assert_allclose(identity[0], plain[0], rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(identity[1], plain[1])
