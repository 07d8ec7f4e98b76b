"""Fused chunkwise CG solve: x_t = (H_kk[t] + Λ)⁻¹ rhs_t for every token, one kernel program per (batch·head, chunk).

Each program loads its chunk's start state S (Dk×Dk), keys and gates once and runs every CG step on-chip, where the
XLA path re-reads the state from memory at each step. The CG recursion itself is `mesanet_jax.ops.cg`, traced inside
the kernel (with a tolerance, a `while_loop` that ends when every row of the program's chunk has converged); the
matvec is the chunked form of DESIGN.md §1 (`chunk.causal_product`):

    A X = (X ⊙ e^G) Sᵀ + ((X Kᵀ) ⊙ W ⊙ β_s) K + X ⊙ λ
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mesanet_jax.ops.inputs import CGOptions, solve_from_diagonal
from pallas_kernels.mesa_cg.chunk import causal_product, chunk_spec, decay_mask, dots, flat, gate_operands, gate_specs
from pallas_kernels.mesa_cg.params import compiler_params, dot_precision, use_interpret


def _solve_kernel(rhs_ref, k_ref, decay_col_ref, decay_row_ref, beta_row_ref, lam_ref, states_t_ref, x_ref, *steps_ref,
                  cg: CGOptions, precision: lax.Precision):
  """One chunk: rhs, k [C, Dk]; decay_col [C, 1] and decay_row, beta_row [1, C] (log-decay G and β as column and
  row, so no in-kernel transposes); lam [1, Dk]; states_t [Dk, Dk] = Sᵀ. Writes x [C, Dk] and, with a tolerance,
  the steps each row took [C, 1] (the loop ends once every row of the chunk has stopped)."""
  rhs, k, lam, states_t = rhs_ref[...], k_ref[...], lam_ref[...], states_t_ref[...]
  decay_col = decay_col_ref[...]
  mask = decay_mask(decay_col, decay_row_ref[...]) * beta_row_ref[...]
  to_chunk_start = jnp.exp(decay_col)
  mm = dots(precision, rhs.dtype)

  def matvec(x):
    return causal_product(x, k, k, states_t, to_chunk_start, mask, mm) + lam * x

  dk = states_t.shape[0]
  eye = lax.broadcasted_iota(jnp.int32, (dk, dk), 0) == lax.broadcasted_iota(jnp.int32, (dk, dk), 1)
  state_diagonal = jnp.sum(jnp.where(eye, states_t, 0.0), axis=0, keepdims=True)
  diagonal = to_chunk_start * state_diagonal + mm.nn(mask, k * k) + lam
  x, steps = solve_from_diagonal(matvec, rhs, diagonal, cg)
  x_ref[...] = x.astype(x_ref.dtype)
  if steps_ref:
    steps_ref[0][...] = steps[:, None]


def chunked_cg_solve(rhs, k, log_decay, beta, lam, states_kk_t, *, cg_steps: int, cg_init: str,
                     cg_tol: float | None = None, cg_preconditioner: str = "none",
                     precision: lax.Precision | lax.DotAlgorithmPreset,
                     num_warps: int | None = None, num_stages: int = 1):
  """Solves (H_kk[t] + Λ) x_t = rhs_t for all tokens with a fused Pallas kernel.

  Args (chunk-major, as inside `mesa_chunked`): rhs, k: [B, H, N, C, Dk] (computed in the states' dtype);
  log_decay (within-chunk cumulative log decay G), beta: [B, H, N, C]; lam: [H, Dk]; states_kk_t: [B, H, N (or
  more), Dk, Dk] the transposed chunk start states Sᵀ (entry n is read for chunk n, so the boundary states of
  `chunk_states` serve as they are).
  cg_tol: None for exactly cg_steps steps; else each row stops once ‖r‖ ≤ cg_tol·‖r₀‖ and a program's loop ends when
  all of its chunk's rows have. cg_preconditioner: "none" or "jacobi" (`mesa_chunked`'s).
  precision: a lax.Precision, mapped per backend by `dot_precision`, or an explicit DotAlgorithmPreset.
  Returns x: [B, H, N, C, Dk] and the steps each row took, int32 [B, H, N, C].
  """
  batch, heads, num_chunks, size, key_dim = rhs.shape
  rhs, k = rhs.astype(states_kk_t.dtype), k.astype(states_kk_t.dtype)  # 16-bit rows computed in the states' dtype
  lam_rows = jnp.broadcast_to(lam[None, :, None, :], (batch, heads, 1, key_dim)).reshape(batch * heads, 1, key_dim)
  kernel = functools.partial(_solve_kernel, cg=CGOptions(cg_steps, cg_init, cg_tol, cg_preconditioner),
                             precision=dot_precision(precision, rhs.dtype))
  rows = lambda width, dtype: jax.ShapeDtypeStruct((batch * heads, num_chunks, size, width), dtype)
  # With fixed steps every row takes cg_steps: the kernel then writes x only.
  counted = cg_tol is not None
  steps_shape, steps_spec = ([rows(1, jnp.int32)], [chunk_spec(size, 1)]) if counted else ([], [])
  x, *steps = pl.pallas_call(
      kernel,
      out_shape=[rows(key_dim, rhs.dtype), *steps_shape],
      grid=(batch * heads, num_chunks),
      in_specs=[chunk_spec(size, key_dim), chunk_spec(size, key_dim), *gate_specs(size),
                pl.BlockSpec((None, 1, key_dim), lambda i, n: (i, 0, 0)), chunk_spec(key_dim, key_dim)],
      out_specs=[chunk_spec(size, key_dim), *steps_spec],
      compiler_params=compiler_params(size, key_dim, num_warps, num_stages),
      interpret=use_interpret(),
      name="mesa_cg_solve",
  )(flat(rhs), flat(k), *gate_operands(log_decay, beta), lam_rows, flat(states_kk_t))
  steps = steps[0].reshape(rhs.shape[:-1]) if counted else jnp.full(rhs.shape[:-1], cg_steps, jnp.int32)
  return x.reshape(rhs.shape), steps
