"""`mesanet_jax.ops.cg.conjugate_gradient` for systems held in columns, as the Hopper solve holds its CG vectors.

The first Hopper kernel (`solve_hopper_columns`) keeps a warpgroup's vectors as [Dk, systems]: its wgmma
accumulators put Dk across the warps, and Mosaic GPU has no register transpose to give `conjugate_gradient` the
[systems, Dk] rows it reduces over. This is the same recursion over axis 0, line for line;
tests/pallas/test_solve_hopper_columns.py checks that both give the same iterate after every step and the same stops.
(`solve_hopper`, systems as rows, traces `conjugate_gradient` itself; this module goes with the first kernel.)
"""
import jax.numpy as jnp
from jax import lax


def column_cg(matvec, rhs, x0, *, steps: int, tol: float | None):
  """`mesanet_jax.ops.cg.conjugate_gradient` for systems in columns: rhs, x0 [D, S] -> x [D, S], iters int32 [S].

  The same recursion, guards and stopping rule (a system stops once ‖r‖ ≤ tol·‖r₀‖; the loop ends when all have).
  """
  rowdot = lambda a, b: jnp.sum(a * b, axis=0)
  divide = lambda num, den: jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
  r = rhs - matvec(x0)
  delta = rowdot(r, r)
  stop_below = None if tol is None else (tol * tol) * delta

  def active(delta):
    return jnp.full(delta.shape, True) if stop_below is None else delta > stop_below

  def step(state):
    x, r, p, delta, iters = state
    running = active(delta)
    ap = matvec(p)
    alpha = jnp.where(running, divide(delta, rowdot(p, ap)), 0.0)
    x = x + alpha[None, :] * p
    r = r - alpha[None, :] * ap
    delta_new = rowdot(r, r)
    beta = divide(delta_new, delta)
    p = jnp.where(running[None, :], r + beta[None, :] * p, p)
    delta = jnp.where(running, delta_new, delta)
    return x, r, p, delta, iters + running.astype(jnp.int32)

  init = (x0, r, r, delta, jnp.zeros(delta.shape, jnp.int32))
  if tol is None:
    final = lax.fori_loop(0, steps, lambda _, state: step(state), init)
  else:
    keep_going = lambda c: (c[0] < steps) & (jnp.max(jnp.where(active(c[1][3]), 1.0, 0.0)) > 0)
    _, final = lax.while_loop(keep_going, lambda c: (c[0] + 1, step(c[1])), (jnp.int32(0), init))
  return final[0], final[4]
