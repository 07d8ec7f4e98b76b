"""Causal read: every row t of a chunk times the state at t, one kernel program per (batch·head, chunk).

    out_t = e^{G_t} x_t S + Σ_{s≤t} e^{G_t − G_s} β_s (x_t·keys_s) values_s          (`chunk.causal_product`)

The forward output o = read(x; k, v, S_kv) and the backward's adjoint right-hand side u_t = H_kv[t] do_t =
read(do; v, k, S_kvᵀ) are this one kernel; the transposed state is a dot dimension number, not a copy. It is a
separate kernel rather than the solve kernel's epilogue: u is needed before its solve, and the extra traffic (x
written by the solve and read back, k and the gates read twice) is ~C·D per chunk against the D² of the state.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.mesa_cg.chunk import causal_product, chunk_spec, decay_mask, dots, flat, gate_operands, gate_specs
from pallas_kernels.mesa_cg.params import compiler_params, dot_precision, use_interpret


def _read_kernel(x_ref, keys_ref, values_ref, decay_col_ref, decay_row_ref, beta_row_ref, states_ref, out_ref, *,
                 transpose_states: bool, precision: lax.Precision):
  """One chunk: x, keys [C, D]; values [C, E]; gates as in the solve kernel; states [D, E] ([E, D] if transposed).
  Writes out [C, E]."""
  decay_col = decay_col_ref[...]
  mask = decay_mask(decay_col, decay_row_ref[...]) * beta_row_ref[...]
  keys, values = keys_ref[...].astype(out_ref.dtype), values_ref[...].astype(out_ref.dtype)  # 16-bit rows: on load
  out_ref[...] = causal_product(x_ref[...], keys, values, states_ref[...], jnp.exp(decay_col), mask,
                                dots(precision, out_ref.dtype), transpose_states=transpose_states)


def causal_read(x, keys, values, states, log_decay, beta, *, transpose_states: bool = False,
                precision: lax.Precision | lax.DotAlgorithmPreset, num_warps: int | None = None, num_stages: int = 1):
  """Row t of every chunk: x_t times the state at t, with the chunk start states S (or Sᵀ).

  Args: x, keys: [B, H, N, C, D]; values: [B, H, N, C, E] (keys and values may be narrower than x: the kernel
  converts them to x's dtype as it loads them); states: [B, H, N (or more), D, E], entry n the start
  state of chunk n ([..., E, D] if transpose_states); log_decay, beta: [B, H, N, C]. Returns [B, H, N, C, E].
  """
  batch, heads, num_chunks, size, dim = x.shape
  width = values.shape[-1]
  kernel = functools.partial(_read_kernel, transpose_states=transpose_states,
                             precision=dot_precision(precision, x.dtype))
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((batch * heads, num_chunks, size, width), x.dtype),
      grid=(batch * heads, num_chunks),
      in_specs=[chunk_spec(size, dim), chunk_spec(size, dim), chunk_spec(size, width), *gate_specs(size),
                chunk_spec(*states.shape[-2:])],
      out_specs=chunk_spec(size, width),
      compiler_params=compiler_params(size, max(dim, width), num_warps, num_stages),
      interpret=use_interpret(),
      name="mesa_causal_read",
  )(flat(x), flat(keys), flat(values), *gate_operands(log_decay, beta), flat(states))
  return out.reshape(batch, heads, num_chunks, size, width)
