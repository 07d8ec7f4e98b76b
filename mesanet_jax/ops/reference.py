"""Reference Mesa ops: the exact dense solve (ground truth) and the token-by-token recurrence with CG.

Both walk the sequence one token at a time and keep the full Dk×Dk state, so they are slow and simple on purpose:
they are what the chunked and kernel paths are tested against.
"""
import jax
import jax.numpy as jnp
from jax import lax

from mesanet_jax.ops.decode import mesa_decode_step
from mesanet_jax.ops.inputs import MesaState, check_inputs, compute_dtype, zero_state


def _time_major(*arrays: jax.Array) -> tuple[jax.Array, ...]:
  return tuple(jnp.moveaxis(x, 1, 0) for x in arrays)


def mesa_exact(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    lam: jax.Array,
    state: MesaState | None = None,
) -> tuple[jax.Array, MesaState]:
  """Mesa layer output with a dense `jnp.linalg.solve` at every token: the ground truth. Differentiable.

  Args:
    q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; g (log forget gate ≤ 0), beta (input gate): [B, T, H];
    lam: [H, Dk] regulariser > 0; state: optional MesaState (h_kk [B, H, Dk, Dk], h_kv [B, H, Dk, Dv]).

  Returns:
    o: [B, T, H, Dv] in q's dtype, o_t = H_kv[t]ᵀ (H_kk[t] + Λ)⁻¹ q_t; the final MesaState (compute dtype).
  """
  batch, _, heads, key_dim, value_dim = check_inputs(q, k, v, g, beta, lam, state, per_token=True)
  dtype = compute_dtype(q, k, v, g, beta, lam, *(state or ()))
  if state is None:
    state = zero_state(batch, heads, key_dim, value_dim, dtype)
  regulariser = jnp.eye(key_dim, dtype=dtype) * lam.astype(dtype)[:, None, :]  # [H, Dk, Dk] = diag(λ_h)

  def step(carry: MesaState, token):
    q_t, k_t, v_t, g_t, beta_t = (x.astype(dtype) for x in token)
    decay = jnp.exp(g_t)[..., None, None]
    weighted_k = beta_t[..., None] * k_t
    h_kk = decay * carry.h_kk + weighted_k[..., :, None] * k_t[..., None, :]
    h_kv = decay * carry.h_kv + weighted_k[..., :, None] * v_t[..., None, :]
    x_t = jnp.linalg.solve(h_kk + regulariser, q_t[..., None])[..., 0]
    return MesaState(h_kk, h_kv), jnp.einsum("bhkv,bhk->bhv", h_kv, x_t, precision="highest")

  initial = MesaState(state.h_kk.astype(dtype), state.h_kv.astype(dtype))
  final, o = lax.scan(step, initial, _time_major(q, k, v, g, beta))
  return jnp.moveaxis(o, 0, 1).astype(q.dtype), final


def mesa_recurrent(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    lam: jax.Array,
    state: MesaState | None = None,
    *,
    cg_steps: int,
    tol: float | None = None,
    cg_init: str = "jacobi",
    warm_start: bool = False,
) -> tuple[jax.Array, MesaState, jax.Array]:
  """The Mesa recurrence token by token (a `lax.scan` of `mesa_decode_step`), one CG solve per token.

  Args: as `mesa_exact`, plus cg_steps (max CG steps), tol (optional per-token, per-head relative-residual stopping),
    cg_init ("jacobi" or "zero") and warm_start (CG of token t starts from token t−1's solution, scaled; the first
    token from cg_init's guess; see `decode.solve_token`).

  Returns:
    o: [B, T, H, Dv] in q's dtype; the final MesaState; iters: [B, T, H] int32 CG steps used per token and head.
  """
  batch, _, heads, key_dim, value_dim = check_inputs(q, k, v, g, beta, lam, state, per_token=True)
  dtype = compute_dtype(q, k, v, g, beta, lam, *(state or ()))
  state = zero_state(batch, heads, key_dim, value_dim, dtype) if state is None else MesaState(
      state.h_kk.astype(dtype), state.h_kv.astype(dtype))

  def step(carry, token):
    state, previous = carry
    o_t, state, iters_t, x_t = mesa_decode_step(*token, lam, state, cg_steps=cg_steps, tol=tol, cg_init=cg_init,
                                                previous=previous)
    return (state, x_t if warm_start else None), (o_t, iters_t)

  previous = jnp.zeros((batch, heads, key_dim), dtype) if warm_start else None
  (final, _), (o, iters) = lax.scan(step, (state, previous), _time_major(q, k, v, g, beta))
  return jnp.moveaxis(o, 0, 1), final, jnp.moveaxis(iters, 0, 1)
