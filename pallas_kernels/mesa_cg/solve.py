"""Fused chunkwise CG solve: x_t = (H_kk[t] + Λ)⁻¹ rhs_t for every token, one kernel program per (batch·head, chunk).

Each program loads its chunk's start state S (Dk×Dk), keys and gates once and runs every CG step on-chip, where the
XLA path re-reads the state from memory at each step. The CG recursion itself is `mesanet_jax.ops.cg`, traced inside
the kernel; the matvec is the chunked form of DESIGN.md §1:

    A X = (X ⊙ e^G) Sᵀ + ((X Kᵀ) ⊙ W ⊙ β_s) K + X ⊙ λ
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mesanet_jax.ops.cg import conjugate_gradient
from mesanet_jax.ops.inputs import initial_guess
from pallas_kernels.mesa_cg.params import compiler_params, dot_precision, use_interpret


def _solve_kernel(rhs_ref, k_ref, decay_col_ref, decay_row_ref, beta_row_ref, lam_ref, states_t_ref, x_ref, *,
                  cg_steps: int, cg_init: str, precision: lax.Precision):
  """One chunk: rhs, k [C, Dk]; decay_col [C, 1] and decay_row, beta_row [1, C] (log-decay G and β as column and
  row, so no in-kernel transposes); lam [1, Dk]; states_t [Dk, Dk] = Sᵀ. Writes x [C, Dk]."""
  rhs, k, lam, states_t = rhs_ref[...], k_ref[...], lam_ref[...], states_t_ref[...]
  decay_col, decay_row = decay_col_ref[...], decay_row_ref[...]
  size = rhs.shape[0]
  causal = lax.broadcasted_iota(jnp.int32, (size, size), 0) >= lax.broadcasted_iota(jnp.int32, (size, size), 1)
  mask = jnp.where(causal, jnp.exp(jnp.where(causal, decay_col - decay_row, 0.0)), 0.0) * beta_row_ref[...]
  to_chunk_start = jnp.exp(decay_col)
  dot = functools.partial(jnp.dot, precision=precision, preferred_element_type=rhs.dtype)
  dot_t = functools.partial(lax.dot_general, dimension_numbers=(((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=rhs.dtype)  # a @ bᵀ

  def matvec(x):
    return dot(x * to_chunk_start, states_t) + dot(dot_t(x, k) * mask, k) + lam * x

  dk = states_t.shape[0]
  eye = lax.broadcasted_iota(jnp.int32, (dk, dk), 0) == lax.broadcasted_iota(jnp.int32, (dk, dk), 1)
  state_diagonal = jnp.sum(jnp.where(eye, states_t, 0.0), axis=0, keepdims=True)
  diagonal = to_chunk_start * state_diagonal + dot(mask, k * k) + lam
  x, _ = conjugate_gradient(matvec, rhs, initial_guess(rhs, diagonal, cg_init), steps=cg_steps)
  x_ref[...] = x.astype(x_ref.dtype)


def chunked_cg_solve(rhs, k, log_decay, beta, lam, states_kk, *, cg_steps: int, cg_init: str,
                     precision: lax.Precision | lax.DotAlgorithmPreset, num_warps: int | None = None,
                     num_stages: int = 1):
  """Solves (H_kk[t] + Λ) x_t = rhs_t for all tokens with a fused Pallas kernel.

  Args (chunk-major, as inside `mesa_chunked`): rhs, k: [B, H, N, C, Dk]; log_decay (within-chunk cumulative log
  decay G), beta: [B, H, N, C]; lam: [H, Dk]; states_kk: [B, H, N, Dk, Dk] chunk start states.
  precision: a lax.Precision, mapped per backend by `dot_precision`, or an explicit DotAlgorithmPreset.
  Returns x: [B, H, N, C, Dk].
  """
  batch, heads, num_chunks, size, key_dim = rhs.shape
  flat = lambda x: x.reshape(batch * heads, num_chunks, *x.shape[3:])
  lam_rows = jnp.broadcast_to(lam[None, :, None, :], (batch, heads, 1, key_dim)).reshape(batch * heads, 1, key_dim)
  operands = (
      flat(rhs), flat(k), flat(log_decay[..., :, None]), flat(log_decay[..., None, :]), flat(beta[..., None, :]),
      lam_rows, flat(jnp.swapaxes(states_kk, -1, -2)))
  chunk_block = lambda rows, cols: pl.BlockSpec((None, None, rows, cols), lambda i, n: (i, n, 0, 0))
  in_specs = [
      chunk_block(size, key_dim), chunk_block(size, key_dim), chunk_block(size, 1), chunk_block(1, size),
      chunk_block(1, size), pl.BlockSpec((None, 1, key_dim), lambda i, n: (i, 0, 0)),
      chunk_block(key_dim, key_dim)]
  kernel = functools.partial(_solve_kernel, cg_steps=cg_steps, cg_init=cg_init,
                             precision=dot_precision(precision, rhs.dtype))
  x = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(operands[0].shape, rhs.dtype),
      grid=(batch * heads, num_chunks),
      in_specs=in_specs,
      out_specs=chunk_block(size, key_dim),
      compiler_params=compiler_params(size, num_warps, num_stages),
      interpret=use_interpret(),
      name="mesa_cg_solve",
  )(*operands)
  return x.reshape(rhs.shape)
