"""One Mesa token in constant memory: update the two decayed sums, then a small CG solve per head.

`solve_token` (the start of CG and the solve) is shared with the fused Pallas decode kernel
(`pallas_kernels/mesa_cg/decode.py`), which traces it with its own in-kernel matvec.
"""
from typing import Callable

import jax
import jax.numpy as jnp

from mesanet_jax.ops.cg import conjugate_gradient, rowdot, safe_divide
from mesanet_jax.ops.inputs import MesaState, check_cg_options, check_inputs, check_values, compute_dtype, initial_guess
from mesanet_jax.ops.operator import register


def solve_token(matvec: Callable[[jax.Array], jax.Array], q: jax.Array, diagonal: jax.Array,
                previous: jax.Array | None, *, cg_steps: int, tol: float | None, cg_init: str):
  """x = A⁻¹q per row by CG, from cg_init's guess or, with `previous`, warm-started (paper §6).

  The warm start is the previous token's solution scaled to fit the new system best, x0 = α x_prev with
  α = x_prevᵀq / x_prevᵀA x_prev: the start on the line through x_prev nearest to A⁻¹q in A-norm, so never further
  from it than x0 = 0 (plain x_prev would be, e.g. when q flips sign). Rows whose x_prev is zero (no token decoded
  since the prefill) start from cg_init's guess. With a warm start the tolerance is relative to ‖q‖, which does not
  depend on the start (relative to ‖r_0‖ a closer start would only ask for a smaller residual).

  Args: matvec maps [..., Dk] -> A applied per row; q, diagonal (diag A), previous: [..., Dk].
  Returns x [..., Dk] and the CG steps per row [...] int32.
  """
  x0 = initial_guess(q, diagonal, cg_init)
  if previous is None:
    return conjugate_gradient(matvec, q, x0, steps=cg_steps, tol=tol)
  alpha = safe_divide(rowdot(previous, q), rowdot(previous, matvec(previous)))
  has_previous = rowdot(previous, previous) > 0
  x0 = jnp.where(has_previous[..., None], alpha[..., None] * previous, x0)
  return conjugate_gradient(matvec, q, x0, steps=cg_steps, tol=tol, relative_to="rhs")


@register("xla", "decode_step")
def mesa_decode_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    lam: jax.Array,
    state: MesaState,
    *,
    cg_steps: int,
    tol: float | None = None,
    cg_init: str = "jacobi",
    previous: jax.Array | None = None,
) -> tuple[jax.Array, MesaState, jax.Array, jax.Array]:
  """Advances the Mesa recurrence by one token and reads out o = H_kvᵀ (H_kk + Λ)⁻¹ q.

  Args:
    q, k: [B, H, Dk] query and key of the new token (L2-normalised by the layer).
    v: [B, H, Dv] value.
    g: [B, H] log forget gate (≤ 0); beta: [B, H] input gate in (0, 1).
    lam: [H, Dk] diagonal regulariser, > 0.
    state: MesaState with h_kk [B, H, Dk, Dk] and h_kv [B, H, Dk, Dv] before this token.
    cg_steps: maximum CG steps per head.
    tol: optional relative-residual tolerance; each head stops once ‖r‖ ≤ tol·‖r_0‖ (with `previous`: tol·‖q‖).
    cg_init: "jacobi" (x0 = q / diag(H_kk + Λ), the paper's choice) or "zero".
    previous: optional [B, H, Dk], the previous token's solution x: CG warm-starts from it (`solve_token`); zeros
      where there is none.

  All products run at full f32 precision (no TF32 on GPU); decoding is a few matvecs per token, bound by memory.

  Returns:
    o: [B, H, Dv] in q's dtype; the new MesaState (compute dtype); iters: [B, H] int32 CG steps used;
    x: [B, H, Dk] the solution (compute dtype), the next token's `previous`.
  """
  check_inputs(q, k, v, g, beta, lam, state, per_token=False)
  check_values(q=q, k=k, v=v, g=g, beta=beta, lam=lam, **state._asdict())
  check_cg_options(cg_steps, cg_init, tol)
  if previous is not None and (not hasattr(previous, "shape") or tuple(previous.shape) != tuple(q.shape)):
    raise ValueError(f"previous must have shape [B, H, Dk] = {tuple(q.shape)}, got "
                     f"{getattr(previous, 'shape', type(previous).__name__)}")
  out_dtype, dtype = q.dtype, compute_dtype(q, k, v, g, beta, lam, *state)
  q, k, v, g, beta, lam = (x.astype(dtype) for x in (q, k, v, g, beta, lam))
  decay = jnp.exp(g)[..., None, None]
  weighted_k = beta[..., None] * k
  h_kk = decay * state.h_kk.astype(dtype) + weighted_k[..., :, None] * k[..., None, :]
  h_kv = decay * state.h_kv.astype(dtype) + weighted_k[..., :, None] * v[..., None, :]

  def matvec(x: jax.Array) -> jax.Array:
    return jnp.einsum("bhij,bhj->bhi", h_kk, x, precision="highest") + lam * x

  diagonal = jnp.diagonal(h_kk, axis1=-2, axis2=-1) + lam
  x, iters = solve_token(matvec, q, diagonal, None if previous is None else previous.astype(dtype),
                         cg_steps=cg_steps, tol=tol, cg_init=cg_init)
  o = jnp.einsum("bhkv,bhk->bhv", h_kv, x, precision="highest")
  return o.astype(out_dtype), MesaState(h_kk, h_kv), iters, x
