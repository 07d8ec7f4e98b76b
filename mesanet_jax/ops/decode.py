"""One Mesa token in constant memory: update the two decayed sums, then a small CG solve per head."""
import jax
import jax.numpy as jnp

from mesanet_jax.ops.cg import conjugate_gradient
from mesanet_jax.ops.inputs import MesaState, check_cg_options, check_inputs, compute_dtype, initial_guess


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
) -> tuple[jax.Array, MesaState, jax.Array]:
  """Advances the Mesa recurrence by one token and reads out o = H_kvᵀ (H_kk + Λ)⁻¹ q.

  Args:
    q, k: [B, H, Dk] query and key of the new token (L2-normalised by the layer).
    v: [B, H, Dv] value.
    g: [B, H] log forget gate (≤ 0); beta: [B, H] input gate in (0, 1).
    lam: [H, Dk] diagonal regulariser, > 0.
    state: MesaState with h_kk [B, H, Dk, Dk] and h_kv [B, H, Dk, Dv] before this token.
    cg_steps: maximum CG steps per head.
    tol: optional relative-residual tolerance; each head stops once ‖r‖ ≤ tol·‖r_0‖.
    cg_init: "jacobi" (x0 = q / diag(H_kk + Λ), the paper's choice) or "zero".

  All products run at full f32 precision (no TF32 on GPU); decoding is a few matvecs per token, bound by memory.

  Returns:
    o: [B, H, Dv] in q's dtype; the new MesaState (compute dtype); iters: [B, H] int32 CG steps used.
  """
  check_inputs(q, k, v, g, beta, lam, state, per_token=False)
  check_cg_options(cg_steps, cg_init, tol)
  out_dtype, dtype = q.dtype, compute_dtype(q, k, v, g, beta, lam, *state)
  q, k, v, g, beta, lam = (x.astype(dtype) for x in (q, k, v, g, beta, lam))
  decay = jnp.exp(g)[..., None, None]
  weighted_k = beta[..., None] * k
  h_kk = decay * state.h_kk.astype(dtype) + weighted_k[..., :, None] * k[..., None, :]
  h_kv = decay * state.h_kv.astype(dtype) + weighted_k[..., :, None] * v[..., None, :]

  def matvec(x: jax.Array) -> jax.Array:
    return jnp.einsum("bhij,bhj->bhi", h_kk, x, precision="highest") + lam * x

  diagonal = jnp.diagonal(h_kk, axis1=-2, axis2=-1) + lam
  x, iters = conjugate_gradient(matvec, q, initial_guess(q, diagonal, cg_init), steps=cg_steps, tol=tol)
  o = jnp.einsum("bhkv,bhk->bhv", h_kv, x, precision="highest")
  return o.astype(out_dtype), MesaState(h_kk, h_kv), iters
