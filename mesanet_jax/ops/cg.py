"""Batched conjugate gradient: many small SPD systems solved at once, one per row.

Every op in this package reduces to "solve A_i x_i = b_i for a large batch of SPD systems i" where the matvec of all
systems is one fused computation (a dense Dk×Dk product when decoding, a chunkwise product in training). Each system
keeps its own step sizes, so rows never mix. Divisions are guarded: a system whose residual is exactly zero simply
stops moving, so finite input never gives NaN.
"""
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class _CGState(NamedTuple):
  x: jax.Array  # [..., D] current iterate
  r: jax.Array  # [..., D] residual b - A x
  p: jax.Array  # [..., D] search direction
  delta: jax.Array  # [...] squared residual norm
  iters: jax.Array  # [...] int32, steps taken by each system


def rowdot(a: jax.Array, b: jax.Array) -> jax.Array:
  """Row-wise dot product over the last axis: [..., D], [..., D] -> [...]."""
  return jnp.sum(a * b, axis=-1)


def _safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
  """num / den where den > 0, else 0 (den is a squared norm or pᵀAp of an SPD A, so never negative)."""
  positive = den > 0
  return jnp.where(positive, num / jnp.where(positive, den, 1), 0)


def conjugate_gradient(
    matvec: Callable[[jax.Array], jax.Array],
    rhs: jax.Array,
    x0: jax.Array,
    *,
    steps: int,
    tol: float | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Solves A x = rhs for every row of `rhs` with at most `steps` CG steps.

  Args:
    matvec: maps a block of vectors [..., D] to A applied row by row, [..., D]; A must be SPD for every row.
    rhs: [..., D] right-hand sides.
    x0: [..., D] initial guess.
    steps: maximum number of CG steps (static).
    tol: if given, a system stops once ‖r_k‖ ≤ tol·‖r_0‖ and the loop ends when all have stopped; if None, exactly
      `steps` steps run (a `fori_loop`, so the solve is differentiable by unrolling).

  Returns:
    x: [..., D] the solution estimate; iters: [...] int32, the steps each system took.
  """
  r = rhs - matvec(x0)
  delta = rowdot(r, r)
  # Squared form of the stopping rule: ‖r‖² ≤ tol²‖r_0‖².
  stop_below = None if tol is None else (tol * tol) * delta
  init = _CGState(x=x0, r=r, p=r, delta=delta, iters=jnp.zeros(delta.shape, jnp.int32))

  def active(state: _CGState) -> jax.Array:
    if stop_below is None:
      return jnp.ones(state.delta.shape, bool)
    return state.delta > stop_below

  def step(state: _CGState) -> _CGState:
    running = active(state)
    ap = matvec(state.p)
    alpha = jnp.where(running, _safe_divide(state.delta, rowdot(state.p, ap)), 0)
    x = state.x + alpha[..., None] * state.p
    r = state.r - alpha[..., None] * ap
    delta_new = rowdot(r, r)
    beta = _safe_divide(delta_new, state.delta)
    p = jnp.where(running[..., None], r + beta[..., None] * state.p, state.p)
    delta = jnp.where(running, delta_new, state.delta)
    return _CGState(x=x, r=r, p=p, delta=delta, iters=state.iters + running.astype(jnp.int32))

  if tol is None:
    final = lax.fori_loop(0, steps, lambda _, state: step(state), init)
  else:
    def keep_going(carry: tuple[jax.Array, _CGState]) -> jax.Array:
      k, state = carry
      # A max, not jnp.any: this loop also runs inside the Pallas kernels, and Triton has no or-reduction.
      return (k < steps) & (jnp.max(jnp.where(active(state), 1.0, 0.0)) > 0)

    _, final = lax.while_loop(keep_going, lambda c: (c[0] + 1, step(c[1])), (jnp.int32(0), init))
  return final.x, final.iters
