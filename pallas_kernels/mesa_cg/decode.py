"""Fused Mesa decode step: the state update, the CG solve and the read-out of one token in one kernel per layer
(or two, for many (batch, head) rows on a GPU).

One program per (batch, head). It reads H_kk once, writes γ H_kk + β k kᵀ back in place (input_output_aliases),
runs every CG step on chip (`mesanet_jax.ops.decode.solve_token`: the warm start and the one CG recursion of
`mesanet_jax.ops.cg`, traced here with tolerance support), then reads H_kv once, writes γ H_kv + β k vᵀ back and
reads out o = H_kvᵀ x. The XLA op `mesa_decode_step` runs the same math as a few hundred small kernels per token
(one matvec, reduction and update fusion per CG step and head block, each CG step a device round trip when the
tolerance loop is a while loop); this is one launch per layer.

With many rows (`split_read_out`, by default from `SPLIT_ROWS` rows on a GPU) the H_kv half runs as a second kernel
over (row, value block) programs: the solve's programs then hold H_kk alone (fewer registers, more programs per SM)
and the H_kv update, pure memory traffic, spreads over many small programs instead of trailing each solve.

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
from pallas_kernels.mesa_cg.params import decode_compiler_params, decode_value_block, target, use_interpret

# From this many (batch, head) rows per call on a GPU, the H_kv update and read-out run as their own kernel
# (measured on an H200 at Dk = Dv = 128: benchmarks/RESULTS.md "Decoding").
SPLIT_ROWS = 96
READ_OUT_WARPS = 4  # warps per program of the split read-out kernel


def _update_and_solve(q_ref, k_ref, k_col_ref, g_ref, beta_ref, lam_ref, h_kk_ref, previous_ref, h_kk_out, x_ref,
                      iters_ref, *, cg_steps: int, tol: float | None, cg_init: str) -> jax.Array:
  """H_kk ← γ H_kk + β k kᵀ (written to h_kk_out), then x = (H_kk + Λ)⁻¹ q by CG (written to x_ref, its steps to
  iters_ref). q, k, lam, previous, x [1, Dk]; k_col [Dk, 1]; g, beta, iters [1, 1]; h_kk [Dk, Dk]. Returns x."""
  q, k, lam = q_ref[...], k_ref[...], lam_ref[...]
  h_kk = jnp.exp(g_ref[...]) * h_kk_ref[...] + beta_ref[...] * k_col_ref[...] * k
  h_kk_out[...] = h_kk

  def matvec(x):  # [1, Dk] -> (H_kk x)ᵀ + λ ⊙ x
    return jnp.sum(h_kk * x, axis=1)[None, :] + lam * x

  dk = h_kk.shape[0]
  eye = lax.broadcasted_iota(jnp.int32, (dk, dk), 0) == lax.broadcasted_iota(jnp.int32, (dk, dk), 1)
  diagonal = jnp.sum(jnp.where(eye, h_kk, 0.0), axis=0, keepdims=True) + lam
  previous = None if previous_ref is None else previous_ref[...]
  x, iters = solve_token(matvec, q, diagonal, previous, cg_steps=cg_steps, tol=tol, cg_init=cg_init)
  x_ref[...] = x
  iters_ref[...] = iters.reshape(1, 1)
  return x


def _update_and_read_out(x_col, k_col_ref, v_ref, g_ref, beta_ref, h_kv_ref, h_kv_out, o_ref):
  """H_kv ← γ H_kv + β k vᵀ (written to h_kv_out), o = H_kvᵀ x (to o_ref), for one block of value columns.
  x_col, k_col [Dk, 1]; v, o [1, Dv block]; g, beta [1, 1]; h_kv [Dk, Dv block]."""
  h_kv = jnp.exp(g_ref[...]) * h_kv_ref[...] + beta_ref[...] * k_col_ref[...] * v_ref[...]
  h_kv_out[...] = h_kv
  o_ref[...] = jnp.sum(h_kv * x_col, axis=0, keepdims=True).astype(o_ref.dtype)


def _fused_kernel(q_ref, k_ref, k_col_ref, v_ref, g_ref, beta_ref, lam_ref, h_kk_ref, h_kv_ref, *refs,
                  warm_start: bool, **cg_options):
  """One (batch, head), the whole step: outputs o, h_kk, h_kv, iters, x (with warm_start, `previous` comes first)."""
  previous_ref, (o_ref, h_kk_out, h_kv_out, iters_ref, x_ref) = (refs[0], refs[1:]) if warm_start else (None, refs)
  x = _update_and_solve(q_ref, k_ref, k_col_ref, g_ref, beta_ref, lam_ref, h_kk_ref, previous_ref, h_kk_out, x_ref,
                        iters_ref, **cg_options)
  _update_and_read_out(x.T, k_col_ref, v_ref, g_ref, beta_ref, h_kv_ref, h_kv_out, o_ref)


def _solve_kernel(q_ref, k_ref, k_col_ref, g_ref, beta_ref, lam_ref, h_kk_ref, *refs, warm_start: bool,
                  **cg_options):
  """One (batch, head), the H_kk half: outputs h_kk, iters, x (with warm_start, `previous` comes first)."""
  previous_ref, (h_kk_out, iters_ref, x_ref) = (refs[0], refs[1:]) if warm_start else (None, refs)
  _update_and_solve(q_ref, k_ref, k_col_ref, g_ref, beta_ref, lam_ref, h_kk_ref, previous_ref, h_kk_out, x_ref,
                    iters_ref, **cg_options)


def _read_out_kernel(x_col_ref, k_col_ref, v_ref, g_ref, beta_ref, h_kv_ref, o_ref, h_kv_out):
  """One (batch, head) and block of value columns, the H_kv half: outputs o, h_kv."""
  _update_and_read_out(x_col_ref[...], k_col_ref, v_ref, g_ref, beta_ref, h_kv_ref, h_kv_out, o_ref)


def unsupported_reason(key_dim: int, value_dim: int) -> str | None:
  """Why the decode kernel cannot take these head sizes, or None (Triton blocks are powers of two)."""
  for name, size in (("key_dim", key_dim), ("value_dim", value_dim)):
    if size < 16 or size & (size - 1):
      return f"{name}={size}: the Pallas decode kernel needs powers of two >= 16 (Triton block sizes)"
  return None


@register("pallas", "decode_step")
def mesa_decode_fused(q, k, v, g, beta, lam, state: MesaState, *, cg_steps: int, tol: float | None = None,
                      cg_init: str = "jacobi", previous=None, num_warps: int | None = None,
                      split_read_out: bool | None = None):
  """`mesanet_jax.ops.mesa_decode_step` as one Pallas kernel (or two): same arguments, same results.

  Args:
    q, k: [B, H, Dk]; v: [B, H, Dv]; g, beta: [B, H]; lam: [H, Dk]; state: MesaState (h_kk [B, H, Dk, Dk],
      h_kv [B, H, Dk, Dv]), updated in place when the caller no longer holds it (under jit: donated or a loop carry);
    cg_steps, tol, cg_init, previous: as `mesa_decode_step`.
    num_warps: GPU warps per solve program (default: `params.decode_compiler_params`).
    split_read_out: run the H_kv update and read-out as a second kernel over (row, value block) programs; default:
      on a GPU from `SPLIT_ROWS` rows of B·H.
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
  if split_read_out is None:
    split_read_out = target() == "gpu" and rows >= SPLIT_ROWS
  as_rows = lambda x, *shape: x.astype(dtype).reshape(rows, *shape)  # [B, H, ...] -> [B·H, ...]
  q_row, k_row, k_col, v_row = as_rows(q, 1, key_dim), as_rows(k, 1, key_dim), as_rows(k, key_dim, 1), \
      as_rows(v, 1, value_dim)
  g_row, beta_row, h_kk, h_kv = as_rows(g, 1, 1), as_rows(beta, 1, 1), as_rows(state.h_kk, key_dim, key_dim), \
      as_rows(state.h_kv, key_dim, value_dim)
  lam_row = lam.astype(dtype).reshape(heads, 1, key_dim)
  warm = [] if previous is None else [as_rows(previous, 1, key_dim)]
  row = lambda *shape: pl.BlockSpec((None, *shape), lambda i, *_: (i, 0, 0))
  lam_spec = pl.BlockSpec((None, 1, key_dim), lambda i, *_: (i % heads, 0, 0))
  shape = lambda *dims, dt=dtype: jax.ShapeDtypeStruct((rows, *dims), dt)
  cg_options = dict(cg_steps=cg_steps, tol=tol, cg_init=cg_init, warm_start=previous is not None)
  call = functools.partial(pl.pallas_call, interpret=use_interpret())

  if not split_read_out:
    o, h_kk, h_kv, iters, x = call(
        functools.partial(_fused_kernel, **cg_options),
        out_shape=[shape(1, value_dim, dt=q.dtype), shape(key_dim, key_dim), shape(key_dim, value_dim),
                   shape(1, 1, dt=jnp.int32), shape(1, key_dim)],
        grid=(rows,),
        in_specs=[row(1, key_dim), row(1, key_dim), row(key_dim, 1), row(1, value_dim), row(1, 1), row(1, 1),
                  lam_spec, row(key_dim, key_dim), row(key_dim, value_dim)] + [row(1, key_dim)] * len(warm),
        out_specs=[row(1, value_dim), row(key_dim, key_dim), row(key_dim, value_dim), row(1, 1), row(1, key_dim)],
        input_output_aliases={7: 1, 8: 2, **({9: 4} if warm else {})},  # h_kk, h_kv, the solution: in place
        compiler_params=decode_compiler_params(num_warps),
        name="mesa_decode_step",
    )(q_row, k_row, k_col, v_row, g_row, beta_row, lam_row, h_kk, h_kv, *warm)
  else:
    h_kk, iters, x = call(
        functools.partial(_solve_kernel, **cg_options),
        out_shape=[shape(key_dim, key_dim), shape(1, 1, dt=jnp.int32), shape(1, key_dim)],
        grid=(rows,),
        in_specs=[row(1, key_dim), row(1, key_dim), row(key_dim, 1), row(1, 1), row(1, 1), lam_spec,
                  row(key_dim, key_dim)] + [row(1, key_dim)] * len(warm),
        out_specs=[row(key_dim, key_dim), row(1, 1), row(1, key_dim)],
        input_output_aliases={6: 0, **({7: 2} if warm else {})},  # h_kk, the solution: in place
        compiler_params=decode_compiler_params(num_warps),
        name="mesa_decode_solve",
    )(q_row, k_row, k_col, g_row, beta_row, lam_row, h_kk, *warm)
    block = decode_value_block(value_dim)
    columns = lambda *shape: pl.BlockSpec((None, *shape), lambda i, j: (i, 0, j))
    o, h_kv = call(
        _read_out_kernel,
        out_shape=[shape(1, value_dim, dt=q.dtype), shape(key_dim, value_dim)],
        grid=(rows, value_dim // block),
        in_specs=[row(key_dim, 1), row(key_dim, 1), columns(1, block), row(1, 1), row(1, 1),
                  columns(key_dim, block)],
        out_specs=[columns(1, block), columns(key_dim, block)],
        input_output_aliases={5: 1},  # h_kv in place
        compiler_params=decode_compiler_params(READ_OUT_WARPS, grid_rank=2),
        name="mesa_decode_read_out",
    )(x.reshape(rows, key_dim, 1), k_col, v_row, g_row, beta_row, h_kv)
  state = MesaState(h_kk.reshape(state.h_kk.shape), h_kv.reshape(state.h_kv.shape))
  return (o.reshape(batch, heads, value_dim), state, iters.reshape(batch, heads), x.reshape(batch, heads, key_dim))
