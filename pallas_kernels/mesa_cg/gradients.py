"""Backward accumulation: dk, dv, dβ and d log-decay of every token, one kernel program per (batch·head, chunk).

Given the solutions x, y, the output gradient do, u = H_kv do and the state gradients D after each chunk, row s of
each gradient is the total state gradient at token s applied to k_s or v_s — four time-reversed reads ("writes",
`chunk.causal_product` with scale e^{G_last − G} and mask Wᵀ) — plus row-wise dots (`chunked._Operator.
token_gradients` is the XLA reference). The scaling of the state handed to the next chunk, ⟨D_next, S_next⟩, is
summed here from the boundary states, so nothing of size N·D² is formed outside the kernel.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.mesa_cg.chunk import (causal_product, chunk_spec, decay_mask, dots, flat, gate_operands, gate_specs,
                                          rowdot)
from pallas_kernels.mesa_cg.params import compiler_params, dot_precision, use_interpret


def _gradients_kernel(k_ref, v_ref, x_ref, y_ref, do_ref, u_ref, decay_col_ref, decay_row_ref, beta_row_ref,
                      beta_col_ref, kk_t_ref, kk_t_next_ref, kv_next_ref, dkk_t_next_ref, dkv_next_ref,
                      dk_ref, dv_ref, dbeta_ref, d_log_decay_ref, *, precision: lax.Precision):
  """One chunk: k, x, y, u [C, Dk]; v, do [C, Dv]; gates as in the solve kernel, and β as a column [C, 1];
  kk_t, kk_t_next: H_kkᵀ at the chunk's start and end [Dk, Dk]; kv_next: H_kv at its end [Dk, Dv]; dkk_t_next,
  dkv_next: the gradients w.r.t. those end states (H_kk's transposed). Writes dk [C, Dk], dv [C, Dv], dbeta and
  d_log_decay [C, 1]."""
  k, v, x, y, do = k_ref[...], v_ref[...], x_ref[...], y_ref[...], do_ref[...]
  decay_col, decay_row, beta_col = decay_col_ref[...], decay_row_ref[...], beta_col_ref[...]
  size = k.shape[0]
  is_last = lax.broadcasted_iota(jnp.int32, (size, 1), 0) == size - 1
  is_last_col = lax.broadcasted_iota(jnp.int32, (1, size), 1) == size - 1
  to_end = jnp.exp(jnp.sum(jnp.where(is_last_col, decay_row, 0.0), axis=1, keepdims=True) - decay_col)
  mm = dots(precision, k.dtype)
  write = functools.partial(causal_product, row_scale=to_end, mask=decay_mask(decay_col, decay_row, transpose=True),
                            mm=mm)
  dkk_t, dkv = dkk_t_next_ref[...], dkv_next_ref[...]
  hkk_k = write(k, x, -y, dkk_t)
  hkk_t_k = write(k, -y, x, dkk_t, transpose_states=True)
  hkv_v = write(v, do, x, dkv, transpose_states=True)
  dk_ref[...] = beta_col * (hkk_k + hkk_t_k + hkv_v)
  dv_ref[...] = beta_col * write(k, x, do, dkv)
  dbeta = rowdot(k, hkk_k) + rowdot(k, hkv_v)
  dbeta_ref[...] = dbeta

  mask = decay_mask(decay_col, decay_row) * beta_row_ref[...]
  read_kk = causal_product(x, k, k, kk_t_ref[...], jnp.exp(decay_col), mask, mm)  # H_kk[t] x_t
  total = lambda a: jnp.sum(a, axis=(0, 1), keepdims=True)
  handed_on = total(dkk_t * kk_t_next_ref[...]) + total(dkv * kv_next_ref[...])
  d_log_decay_ref[...] = (-rowdot(y, read_kk) + rowdot(x, u_ref[...]) - beta_col * dbeta
                          + jnp.where(is_last, handed_on, 0.0))


def chunk_gradients(k, v, x, y, do, u, log_decay, beta, bounds_kk_t, bounds_kv, d_bounds_kk_t, d_bounds_kv, *,
                    precision: lax.Precision | lax.DotAlgorithmPreset, num_warps: int | None = None,
                    num_stages: int = 1):
  """dk, dv, d log_decay, dβ of every token (the chunk-local part of the backward).

  Args: k, x, y, u: [B, H, N, C, Dk]; v, do: [B, H, N, C, Dv]; log_decay, beta: [B, H, N, C]; bounds_kk_t,
  bounds_kv: H_kkᵀ and H_kv at every chunk boundary, [B, H, N+1, Dk, Dk | Dv]; d_bounds_kk_t, d_bounds_kv: the
  gradients w.r.t. them (`states.chunk_states` layout). Returns dk [B, H, N, C, Dk], dv [B, H, N, C, Dv],
  d_log_decay and dbeta [B, H, N, C].
  """
  batch, heads, num_chunks, size, key_dim = k.shape
  value_dim = v.shape[-1]
  rows = lambda width: jax.ShapeDtypeStruct((batch * heads, num_chunks, size, width), k.dtype)
  kernel = functools.partial(_gradients_kernel, precision=dot_precision(precision, k.dtype))
  dk, dv, dbeta, d_log_decay = pl.pallas_call(
      kernel,
      out_shape=[rows(key_dim), rows(value_dim), rows(1), rows(1)],
      grid=(batch * heads, num_chunks),
      in_specs=[chunk_spec(size, key_dim), chunk_spec(size, value_dim), chunk_spec(size, key_dim),
                chunk_spec(size, key_dim), chunk_spec(size, value_dim), chunk_spec(size, key_dim), *gate_specs(size),
                chunk_spec(size, 1), chunk_spec(key_dim, key_dim), chunk_spec(key_dim, key_dim, shift=1),
                chunk_spec(key_dim, value_dim, shift=1), chunk_spec(key_dim, key_dim, shift=1),
                chunk_spec(key_dim, value_dim, shift=1)],
      out_specs=[chunk_spec(size, key_dim), chunk_spec(size, value_dim), chunk_spec(size, 1), chunk_spec(size, 1)],
      compiler_params=compiler_params(size, num_warps, num_stages),
      interpret=use_interpret(),
      name="mesa_chunk_gradients",
  )(flat(k), flat(v), flat(x), flat(y), flat(do), flat(u), *gate_operands(log_decay, beta), flat(beta[..., None]),
    flat(bounds_kk_t), flat(bounds_kk_t), flat(bounds_kv), flat(d_bounds_kk_t), flat(d_bounds_kv))
  chunks = lambda a: a.reshape(batch, heads, num_chunks, size, a.shape[-1])
  return chunks(dk), chunks(dv), chunks(d_log_decay)[..., 0], chunks(dbeta)[..., 0]
