"""Backward accumulation: dk, dv and dβ of every token, one kernel program per (batch·head, chunk).

Row s of each gradient is the total state gradient at token s, D_s, applied to k_s or v_s: time-reversed reads
("writes", scale e^{G_last − G} and mask Wᵀ; `xla_operator.XlaOperator.token_gradients` is the XLA reference) of the
state gradients after the chunk. Three of the XLA path's four writes share their row scaling, so the kernel forms

    Z = D_kkᵀ k + D_kv v  = (k e) D_kkᵀ + (v e) D_kvᵀ + (((v doᵀ) − (k yᵀ)) ⊙ Wᵀ) x
    D_kk k                = (k e) D_kk − ((k xᵀ) ⊙ Wᵀ) y
    dv / β = D_kvᵀ k      = (k e) D_kv + ((k xᵀ) ⊙ Wᵀ) do

and dk = β (D_kk k + Z), dβ = k·Z (k·D_kk k = k·D_kkᵀ k). d log-decay needs H_kk[t] x_t, a causal read: the
operator takes it from `read.causal_read` rather than holding a third state here.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.mesa_cg.chunk import chunk_spec, decay_mask, dots, flat, gate_operands, rowdot
from pallas_kernels.mesa_cg.params import compiler_params, dot_precision, use_interpret


def _gradients_kernel(k_ref, v_ref, x_ref, y_ref, do_ref, decay_col_ref, decay_row_ref, beta_col_ref,
                      dkk_t_next_ref, dkv_next_ref, dk_ref, dv_ref, dbeta_ref, *, precision: lax.Precision):
  """One chunk: k, x, y [C, Dk]; v, do [C, Dv]; log-decay G as column [C, 1] and row [1, C]; β as a column [C, 1];
  dkk_t_next, dkv_next: the gradients w.r.t. H_kkᵀ and H_kv at the chunk's end [Dk, Dk], [Dk, Dv].
  Writes dk [C, Dk], dv [C, Dv], dbeta [C, 1]."""
  k, v, x, y, do = k_ref[...], v_ref[...], x_ref[...], y_ref[...], do_ref[...]
  decay_col, decay_row, beta = decay_col_ref[...], decay_row_ref[...], beta_col_ref[...]
  dkk_t, dkv = dkk_t_next_ref[...], dkv_next_ref[...]
  size = k.shape[0]
  is_last = lax.broadcasted_iota(jnp.int32, (1, size), 1) == size - 1
  to_end = jnp.exp(jnp.sum(jnp.where(is_last, decay_row, 0.0), axis=1, keepdims=True) - decay_col)
  mask_t = decay_mask(decay_col, decay_row, transpose=True)
  mm = dots(precision, k.dtype)
  k_end, v_end = k * to_end, v * to_end
  z = mm.nt(k_end, dkk_t) + mm.nt(v_end, dkv) + mm.nn((mm.nt(v, do) - mm.nt(k, y)) * mask_t, x)
  scores = mm.nt(k, x) * mask_t
  dk_ref[...] = beta * (mm.nn(k_end, dkk_t) - mm.nn(scores, y) + z)
  dv_ref[...] = beta * (mm.nn(k_end, dkv) + mm.nn(scores, do))
  dbeta_ref[...] = rowdot(k, z)


def chunk_gradients(k, v, x, y, do, log_decay, beta, d_bounds_kk_t, d_bounds_kv, *,
                    precision: lax.Precision | lax.DotAlgorithmPreset, num_warps: int | None = None,
                    num_stages: int = 1):
  """dk, dv, dβ of every token (the chunk-local part of the backward).

  Args: k, x, y: [B, H, N, C, Dk]; v, do: [B, H, N, C, Dv]; log_decay, beta: [B, H, N, C]; d_bounds_kk_t,
  d_bounds_kv: the gradients w.r.t. H_kkᵀ and H_kv at every chunk boundary, [B, H, N+1, Dk, Dk | Dv]
  (`states.chunk_states` layout). Returns dk [B, H, N, C, Dk], dv [B, H, N, C, Dv], dbeta [B, H, N, C].
  """
  batch, heads, num_chunks, size, key_dim = k.shape
  value_dim = v.shape[-1]
  k, v = k.astype(x.dtype), v.astype(x.dtype)  # 16-bit rows computed in x's dtype
  rows = lambda width: jax.ShapeDtypeStruct((batch * heads, num_chunks, size, width), k.dtype)
  kernel = functools.partial(_gradients_kernel, precision=dot_precision(precision, k.dtype))
  decay_col, decay_row, _ = gate_operands(log_decay, beta)
  dk, dv, dbeta = pl.pallas_call(
      kernel,
      out_shape=[rows(key_dim), rows(value_dim), rows(1)],
      grid=(batch * heads, num_chunks),
      in_specs=[chunk_spec(size, key_dim), chunk_spec(size, value_dim), chunk_spec(size, key_dim),
                chunk_spec(size, key_dim), chunk_spec(size, value_dim), chunk_spec(size, 1), chunk_spec(1, size),
                chunk_spec(size, 1), chunk_spec(key_dim, key_dim, shift=1), chunk_spec(key_dim, value_dim, shift=1)],
      out_specs=[chunk_spec(size, key_dim), chunk_spec(size, value_dim), chunk_spec(size, 1)],
      # Two f32 Dk×Dk state gradients and five row blocks: the warps of rows twice as wide (`default_warps`), 8 at
      # Dk = 128, C = 32 and 64, where 4 spill far more (ptxas report for sm_90).
      compiler_params=compiler_params(size, 2 * max(key_dim, value_dim), num_warps, num_stages),
      interpret=use_interpret(),
      name="mesa_chunk_gradients",
  )(flat(k), flat(v), flat(x), flat(y), flat(do), decay_col, decay_row, flat(beta[..., None]), flat(d_bounds_kk_t),
    flat(d_bounds_kv))
  chunks = lambda a: a.reshape(batch, heads, num_chunks, size, a.shape[-1])
  return chunks(dk), chunks(dv), chunks(dbeta)[..., 0]
