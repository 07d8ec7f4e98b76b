"""Fused Mesa decode step: the state update, the CG solve and the read-out of one token in one kernel per layer.

One program per (batch, head). It reads H_kk once, writes γ H_kk + β k kᵀ back in place (input_output_aliases),
runs every CG step on chip (`mesanet_jax.ops.decode.solve_token`: the warm start and the one CG recursion of
`mesanet_jax.ops.cg`, traced here with tolerance support), then reads H_kv once, writes γ H_kv + β k vᵀ back and
reads out o = H_kvᵀ x. The XLA op `mesa_decode_step` runs the same math as a few hundred small kernels per token
(one matvec, reduction and update fusion per CG step and head block, each CG step a device round trip when the
tolerance loop is a while loop); this is one launch per layer.

Products are f32 multiply-and-reduce on the vector units (a matvec is too thin for tensor cores): exact f32, as the
XLA op's precision="highest" einsums, on every backend.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mesanet_jax.ops.decode import solve_token
from mesanet_jax.ops.inputs import MesaState, check_cg_options, check_inputs, check_values, compute_dtype
from mesanet_jax.ops.operator import register
from pallas_kernels.mesa_cg.params import decode_compiler_params, use_interpret


def _decode_kernel(q_ref, k_ref, k_col_ref, v_ref, g_ref, beta_ref, lam_ref, h_kk_ref, h_kv_ref, *refs,
                   cg_steps: int, tol: float | None, cg_init: str, warm_start: bool):
  """One (batch, head): q, k, lam [1, Dk]; k_col [Dk, 1] (k as a column: no in-kernel transpose of inputs);
  v [1, Dv]; g, beta [1, 1]; h_kk [Dk, Dk]; h_kv [Dk, Dv]; with warm_start the previous solution [1, Dk].
  Writes o [1, Dv], the new h_kk and h_kv (aliased to the inputs), iters [1, 1] and the solution x [1, Dk]."""
  previous_ref, (o_ref, h_kk_out, h_kv_out, iters_ref, x_ref) = (refs[0], refs[1:]) if warm_start else (None, refs)
  q, k, lam, decay, beta = q_ref[...], k_ref[...], lam_ref[...], jnp.exp(g_ref[...]), beta_ref[...]
  weighted_k_col = beta * k_col_ref[...]
  h_kk = decay * h_kk_ref[...] + weighted_k_col * k
  h_kk_out[...] = h_kk

  def matvec(x):  # [1, Dk] -> (H_kk x)ᵀ + λ ⊙ x
    return jnp.sum(h_kk * x, axis=1)[None, :] + lam * x

  dk = h_kk.shape[0]
  eye = lax.broadcasted_iota(jnp.int32, (dk, dk), 0) == lax.broadcasted_iota(jnp.int32, (dk, dk), 1)
  diagonal = jnp.sum(jnp.where(eye, h_kk, 0.0), axis=0, keepdims=True) + lam
  previous = previous_ref[...] if warm_start else None
  x, iters = solve_token(matvec, q, diagonal, previous, cg_steps=cg_steps, tol=tol, cg_init=cg_init)
  x_ref[...] = x
  iters_ref[...] = iters.reshape(1, 1)

  h_kv = decay * h_kv_ref[...] + weighted_k_col * v_ref[...]
  h_kv_out[...] = h_kv
  o_ref[...] = jnp.sum(h_kv * x.T, axis=0, keepdims=True).astype(o_ref.dtype)


def unsupported_reason(key_dim: int, value_dim: int) -> str | None:
  """Why the decode kernel cannot take these head sizes, or None (Triton blocks are powers of two)."""
  for name, size in (("key_dim", key_dim), ("value_dim", value_dim)):
    if size < 16 or size & (size - 1):
      return f"{name}={size}: the Pallas decode kernel needs powers of two >= 16 (Triton block sizes)"
  return None


@register("pallas", "decode_step")
def mesa_decode_fused(q, k, v, g, beta, lam, state: MesaState, *, cg_steps: int, tol: float | None = None,
                      cg_init: str = "jacobi", previous=None, num_warps: int | None = None):
  """`mesanet_jax.ops.mesa_decode_step` as one Pallas kernel: same arguments, same results.

  Args:
    q, k: [B, H, Dk]; v: [B, H, Dv]; g, beta: [B, H]; lam: [H, Dk]; state: MesaState (h_kk [B, H, Dk, Dk],
      h_kv [B, H, Dk, Dv]), updated in place when the caller no longer holds it (under jit: donated or a loop carry);
    cg_steps, tol, cg_init, previous: as `mesa_decode_step`.
    num_warps: GPU warps per program (default: `params.decode_compiler_params`).
  Returns o [B, H, Dv] in q's dtype, the new MesaState, iters [B, H] int32 and the solution x [B, H, Dk].
  """
  batch, heads, key_dim, value_dim = check_inputs(q, k, v, g, beta, lam, state, per_token=False)
  check_values(q=q, k=k, v=v, g=g, beta=beta, lam=lam, **state._asdict())
  check_cg_options(cg_steps, cg_init, tol)
  if reason := unsupported_reason(key_dim, value_dim):
    raise ValueError(f"impl='pallas' cannot decode this layer: {reason}; use impl='xla'")
  if previous is not None and (not hasattr(previous, "shape") or tuple(previous.shape) != tuple(q.shape)):
    raise ValueError(f"previous must have shape [B, H, Dk] = {tuple(q.shape)}, got "
                     f"{getattr(previous, 'shape', type(previous).__name__)}")
  dtype = compute_dtype(q, k, v, g, beta, lam, *state)
  rows = batch * heads
  as_rows = lambda x, *shape: x.astype(dtype).reshape(rows, *shape)  # [B, H, ...] -> [B·H, ...]
  operands = [as_rows(q, 1, key_dim), as_rows(k, 1, key_dim), as_rows(k, key_dim, 1), as_rows(v, 1, value_dim),
              as_rows(g, 1, 1), as_rows(beta, 1, 1), lam.astype(dtype).reshape(heads, 1, key_dim),
              as_rows(state.h_kk, key_dim, key_dim), as_rows(state.h_kv, key_dim, value_dim)]
  block = lambda *shape: pl.BlockSpec((None, *shape), lambda i: (i, 0, 0))
  in_specs = [block(1, key_dim), block(1, key_dim), block(key_dim, 1), block(1, value_dim), block(1, 1),
              block(1, 1), pl.BlockSpec((None, 1, key_dim), lambda i: (i % heads, 0, 0)),
              block(key_dim, key_dim), block(key_dim, value_dim)]
  aliases = {7: 1, 8: 2}  # h_kk, h_kv in place
  if previous is not None:
    operands.append(as_rows(previous, 1, key_dim))
    in_specs.append(block(1, key_dim))
    aliases[9] = 4  # the solution too
  out_shapes = [((1, value_dim), q.dtype), ((key_dim, key_dim), dtype), ((key_dim, value_dim), dtype),
                ((1, 1), jnp.int32), ((1, key_dim), dtype)]
  kernel = functools.partial(_decode_kernel, cg_steps=cg_steps, tol=tol, cg_init=cg_init,
                             warm_start=previous is not None)
  o, h_kk, h_kv, iters, x = pl.pallas_call(
      kernel,
      out_shape=[jax.ShapeDtypeStruct((rows, *shape), dt) for shape, dt in out_shapes],
      grid=(rows,),
      in_specs=in_specs,
      out_specs=[block(*shape) for shape, _ in out_shapes],
      input_output_aliases=aliases,
      compiler_params=decode_compiler_params(num_warps),
      interpret=use_interpret(),
      name="mesa_decode_step",
  )(*operands)
  state = MesaState(h_kk.reshape(state.h_kk.shape), h_kv.reshape(state.h_kv.shape))
  return (o.reshape(batch, heads, value_dim), state, iters.reshape(batch, heads), x.reshape(batch, heads, key_dim))
