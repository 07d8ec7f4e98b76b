"""Batched conjugate gradient: many small SPD systems solved at once, one per row.

Every op in this package reduces to "solve A_i x_i = b_i for a large batch of SPD systems i" where the matvec of all
systems is one fused computation (a dense Dk×Dk product when decoding, a chunkwise product in training). Each system
keeps its own step sizes, so rows never mix. Divisions are guarded: a system whose residual is exactly zero simply
stops moving, so finite input never gives NaN. With a preconditioner M (z = M⁻¹ r, e.g. Jacobi's r / diag(A)) the
same recursion is preconditioned CG: its step sizes use rᵀz, its stopping rule still the residual ‖r‖.
"""
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class Iterate(NamedTuple):
  """Where CG keeps its iterate x: `start(x0)` gives what the loop carries, `add(carried, increment)` adds α·p to it.
  `CARRIED` carries x itself. A kernel may keep x in memory of its own and carry a token, which frees x's registers
  through the loop (x is written there, never read, until the loop ends)."""
  start: Callable[[jax.Array], Any]
  add: Callable[[Any, jax.Array], Any]


CARRIED = Iterate(start=lambda x0: x0, add=lambda x, increment: x + increment)


class _CGState(NamedTuple):
  x: Any  # [..., D] current iterate (or what `Iterate.start` made of it)
  r: jax.Array  # [..., D] residual b - A x
  p: jax.Array  # [..., D] search direction
  delta: jax.Array  # [...] rᵀ M⁻¹ r (the squared residual norm without a preconditioner)
  residual: jax.Array | None  # [...] ‖r‖² with a preconditioner (the stopping rule's); None: delta is ‖r‖²
  iters: jax.Array  # [...] int32, steps taken by each system


def rowdot(a: jax.Array, b: jax.Array) -> jax.Array:
  """Row-wise dot product over the last axis: [..., D], [..., D] -> [...]."""
  return jnp.sum(a * b, axis=-1)


def safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
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
    relative_to: str = "start",
    preconditioner: Callable[[jax.Array], jax.Array] | None = None,
    iterate: Iterate = CARRIED,
) -> tuple[Any, jax.Array]:
  """Solves A x = rhs for every row of `rhs` with at most `steps` CG steps.

  Args:
    matvec: maps a block of vectors [..., D] to A applied row by row, [..., D]; A must be SPD for every row.
    rhs: [..., D] right-hand sides.
    x0: [..., D] initial guess.
    steps: maximum number of CG steps (static).
    tol: if given, a system stops once ‖r_k‖ ≤ tol·‖r_0‖ (a system with r_0 = 0 takes no step) and the loop (a
      `while_loop`) ends when all have stopped; if None, exactly `steps` steps run (a `fori_loop`, so the solve is
      differentiable by unrolling).
    relative_to: what tol is relative to: "start", ‖r_0‖ (the paper's rule), or "rhs", ‖rhs‖ (independent of x0, so a
      better start stops sooner: with "start" a start k times closer asks for a k times smaller residual).
    preconditioner: None (plain CG), or r ↦ M⁻¹ r row by row for an SPD M fixed over the steps (Jacobi's r / diag(A):
      `inputs.solve_from_diagonal`): preconditioned CG, the same solution in fewer steps where M captures A's scales.
    iterate: where x is kept (`Iterate`); by default the loop carries it.

  Returns:
    x: [..., D] the solution estimate (with another `iterate`, what it carries); iters: [...] int32, the steps each
    system took.
  """
  if relative_to not in ("start", "rhs"):
    raise ValueError(f"relative_to must be 'start' or 'rhs', got {relative_to!r}")
  precondition = preconditioner or (lambda r: r)
  r = rhs - matvec(x0)
  z = precondition(r)
  delta = rowdot(r, z)
  residual = None if preconditioner is None else rowdot(r, r)
  init = _CGState(x=iterate.start(x0), r=r, p=z, delta=delta, residual=residual,
                  iters=jnp.zeros(delta.shape, jnp.int32))
  squared_norm = lambda state: state.delta if state.residual is None else state.residual  # ‖r‖²
  # Squared form of the stopping rule: ‖r‖² ≤ tol²‖r_0‖² (or tol²‖rhs‖²).
  stop_below = None if tol is None else (tol * tol) * (
      squared_norm(init) if relative_to == "start" else rowdot(rhs, rhs))

  def active(state: _CGState) -> jax.Array:
    if stop_below is None:
      return jnp.ones(state.delta.shape, bool)
    return squared_norm(state) > stop_below

  def step(state: _CGState) -> _CGState:
    running = active(state)
    ap = matvec(state.p)
    alpha = jnp.where(running, safe_divide(state.delta, rowdot(state.p, ap)), 0)
    x = iterate.add(state.x, alpha[..., None] * state.p)
    r = state.r - alpha[..., None] * ap
    z = precondition(r)
    delta_new = rowdot(r, z)
    beta = safe_divide(delta_new, state.delta)
    p = jnp.where(running[..., None], z + beta[..., None] * state.p, state.p)
    delta = jnp.where(running, delta_new, state.delta)
    residual = None if preconditioner is None else jnp.where(running, rowdot(r, r), state.residual)
    return _CGState(x=x, r=r, p=p, delta=delta, residual=residual, iters=state.iters + running.astype(jnp.int32))

  if tol is None:
    final = lax.fori_loop(0, steps, lambda _, state: step(state), init)
  else:
    def keep_going(carry: tuple[jax.Array, _CGState]) -> jax.Array:
      k, state = carry
      # A max, not jnp.any: this loop also runs inside the Pallas kernels, and Triton has no or-reduction.
      return (k < steps) & (jnp.max(jnp.where(active(state), 1.0, 0.0)) > 0)

    _, final = lax.while_loop(keep_going, lambda c: (c[0] + 1, step(c[1])), (jnp.int32(0), init))
  return final.x, final.iters
