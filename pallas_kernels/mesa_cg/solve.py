"""Fused chunkwise CG solve: x_t = (H_kk[t] + Λ)⁻¹ rhs_t for every token, one kernel program per (batch·head, chunk).

Each program loads its chunk's start state S (Dk×Dk), keys and gates once and runs every CG step on-chip, where the
XLA path re-reads the state from memory at each step. The CG recursion itself is `mesanet_jax.ops.cg`, traced inside
the kernel (with a tolerance, a `while_loop` that ends when every row of the program's chunk has converged); the
matvec is the chunked form of DESIGN.md §1 (`chunk.causal_product`):

    A X = (X ⊙ e^G) Sᵀ + ((X Kᵀ) ⊙ W ⊙ β_s) K + X ⊙ λ

For small heads (`fuses_reads`: the MAD models' 16 × 16) a program also makes the forward's o from its x after the
loop (`read=`) or the adjoint's right-hand side u = H_kv do before it (`rhs_read=`), the causal read of `read.py`
in the same program: two kernel launches fewer per layer and step, where launches are most of the cost.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mesanet_jax.ops.inputs import CGOptions, solve_from_diagonal
from pallas_kernels.mesa_cg.chunk import causal_product, chunk_spec, decay_mask, dots, flat, gate_operands, gate_specs
from pallas_kernels.mesa_cg.params import compiler_params, dot_precision, use_interpret


FUSED_READ_MAX_STATE = 32 * 32  # Dk·Dv up to which the kernel fuses a read (`fuses_reads`)


def fuses_reads(key_dim: int, value_dim: int) -> bool:
  """Whether `chunked_cg_solve(read=...)` / `(rhs_read=...)` is the operator's choice for these head sizes: small
  states (Dk·Dv ≤ 32², e.g. the MAD heads' 16 × 16), whose programs are short enough that a separate read kernel's
  launch and reloads are what it costs. Larger heads keep the read kernel (a [Dk, Dv] state block more in a program
  that already holds Sᵀ; unmeasured)."""
  return key_dim * value_dim <= FUSED_READ_MAX_STATE


def _solve_kernel(rhs_ref, k_ref, decay_col_ref, decay_row_ref, beta_row_ref, lam_ref, states_t_ref, *refs,
                  cg: CGOptions, precision: lax.Precision, read: bool, rhs_read: bool):
  """One chunk: rhs, k [C, Dk]; decay_col [C, 1] and decay_row, beta_row [1, C] (log-decay G and β as column and
  row, so no in-kernel transposes); lam [1, Dk]; states_t [Dk, Dk] = Sᵀ; with `read` or `rhs_read` also values
  [C, Dv] and the chunk's start H_kv [Dk, Dv]. Writes x [C, Dk] and, with a tolerance, the steps each row took
  [C, 1] (the loop ends once every row of the chunk has stopped); with `read` o = the causal read of x [C, Dv]
  (`read.causal_read(x, k, v, S_kv)`); with `rhs_read` rhs is do [C, Dv], the right-hand side is u = H_kv[t] do_t
  (`causal_read(do, v, k, S_kv, transpose_states=True)`), made here first, and u [C, Dk] is written too."""
  counted, reads_values = cg.tol is not None, read or rhs_read
  (values_ref, kv_ref), refs = (refs[:2], refs[2:]) if reads_values else ((None, None), refs)
  x_ref, *refs = refs
  steps_ref = refs.pop(0) if counted else None
  o_ref = refs.pop(0) if read else None
  u_ref = refs.pop(0) if rhs_read else None
  k, lam, states_t = k_ref[...], lam_ref[...], states_t_ref[...]
  decay_col = decay_col_ref[...]
  mask = decay_mask(decay_col, decay_row_ref[...]) * beta_row_ref[...]
  to_chunk_start = jnp.exp(decay_col)
  mm = dots(precision, x_ref.dtype)

  def matvec(x):
    return causal_product(x, k, k, states_t, to_chunk_start, mask, mm) + lam * x

  values = values_ref[...].astype(x_ref.dtype) if reads_values else None  # 16-bit rows: converted on load
  rhs = rhs_ref[...]
  if rhs_read:
    rhs = causal_product(rhs, values, k, kv_ref[...], to_chunk_start, mask, mm, transpose_states=True)
    u_ref[...] = rhs.astype(u_ref.dtype)
  dk = states_t.shape[0]
  eye = lax.broadcasted_iota(jnp.int32, (dk, dk), 0) == lax.broadcasted_iota(jnp.int32, (dk, dk), 1)
  state_diagonal = jnp.sum(jnp.where(eye, states_t, 0.0), axis=0, keepdims=True)
  diagonal = to_chunk_start * state_diagonal + mm.nn(mask, k * k) + lam
  x, steps = solve_from_diagonal(matvec, rhs, diagonal, cg)
  x_ref[...] = x.astype(x_ref.dtype)
  if counted:
    steps_ref[...] = steps[:, None]
  if read:
    o_ref[...] = causal_product(x, k, values, kv_ref[...], to_chunk_start, mask, mm).astype(o_ref.dtype)


def chunked_cg_solve(rhs, k, log_decay, beta, lam, states_kk_t, *, cg_steps: int, cg_init: str,
                     cg_tol: float | None = None, cg_preconditioner: str = "none",
                     precision: lax.Precision | lax.DotAlgorithmPreset,
                     num_warps: int | None = None, num_stages: int = 1, read=None, rhs_read=None):
  """Solves (H_kk[t] + Λ) x_t = rhs_t for all tokens with a fused Pallas kernel.

  Args (chunk-major, as inside `mesa_chunked`): rhs, k: [B, H, N, C, Dk] (computed in the states' dtype);
  log_decay (within-chunk cumulative log decay G), beta: [B, H, N, C]; lam: [H, Dk]; states_kk_t: [B, H, N (or
  more), Dk, Dk] the transposed chunk start states Sᵀ (entry n is read for chunk n, so the boundary states of
  `chunk_states` serve as they are).
  cg_tol: None for exactly cg_steps steps; else each row stops once ‖r‖ ≤ cg_tol·‖r₀‖ and a program's loop ends when
  all of its chunk's rows have. cg_preconditioner: "none" or "jacobi" (`mesa_chunked`'s).
  precision: a lax.Precision, mapped per backend by `dot_precision`, or an explicit DotAlgorithmPreset.
  read: None, or (values [B, H, N, C, Dv] (16-bit floats converted as loaded, as the read kernel does), states_kv
  [B, H, N (or more), Dk, Dv] = H_kv at every chunk start): the kernel also returns o = `read.causal_read(x, k,
  values, states_kv, log_decay, beta)` of the x it found (the forward's output, at the same precision).
  rhs_read: None, or (values, states_kv) as for `read`: rhs is do [B, H, N, C, Dv], and the kernel solves for u =
  H_kv[t] do_t = `read.causal_read(do, values, k, states_kv, transpose_states=True)` (the backward's adjoint
  systems), which it makes first and also returns. Not with `read`.
  Returns x: [B, H, N, C, Dk], with `read` o [B, H, N, C, Dv] (x's dtype), with `rhs_read` u [B, H, N, C, Dk],
  and the steps each row took, int32 [B, H, N, C].
  """
  if read is not None and rhs_read is not None:
    raise ValueError("read and rhs_read: the solve fuses one read, after its loop (o) or before it (u)")
  fused = read if read is not None else rhs_read
  batch, heads, num_chunks, size, key_dim = k.shape
  dtype = states_kk_t.dtype
  rhs, k = rhs.astype(dtype), k.astype(dtype)  # 16-bit rows computed in the states' dtype
  lam_rows = jnp.broadcast_to(lam[None, :, None, :], (batch, heads, 1, key_dim)).reshape(batch * heads, 1, key_dim)
  kernel = functools.partial(_solve_kernel, cg=CGOptions(cg_steps, cg_init, cg_tol, cg_preconditioner),
                             precision=dot_precision(precision, dtype), read=read is not None,
                             rhs_read=rhs_read is not None)
  rows = lambda width, out_dtype=dtype: jax.ShapeDtypeStruct((batch * heads, num_chunks, size, width), out_dtype)
  width = max(key_dim, rhs.shape[-1])
  in_specs = [chunk_spec(size, rhs.shape[-1]), chunk_spec(size, key_dim), *gate_specs(size),
              pl.BlockSpec((None, 1, key_dim), lambda i, n: (i, 0, 0)), chunk_spec(key_dim, key_dim)]
  operands = [flat(rhs), flat(k), *gate_operands(log_decay, beta), lam_rows, flat(states_kk_t)]
  if fused is not None:
    values, states_kv = fused
    value_dim = values.shape[-1]
    width = max(width, value_dim)
    in_specs += [chunk_spec(size, value_dim), chunk_spec(key_dim, value_dim)]
    operands += [flat(values), flat(states_kv.astype(dtype))]  # values as they come: converted as loaded
  # With fixed steps every row takes cg_steps: the kernel then writes x only (and o or u).
  counted = cg_tol is not None
  out_shape, out_specs = [rows(key_dim)], [chunk_spec(size, key_dim)]
  if counted:
    out_shape.append(rows(1, jnp.int32))
    out_specs.append(chunk_spec(size, 1))
  if read is not None:
    out_shape.append(rows(value_dim))
    out_specs.append(chunk_spec(size, value_dim))
  if rhs_read is not None:
    out_shape.append(rows(key_dim))
    out_specs.append(chunk_spec(size, key_dim))
  x, *outputs = pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=(batch * heads, num_chunks),
      in_specs=in_specs,
      out_specs=out_specs,
      compiler_params=compiler_params(size, width, num_warps, num_stages),
      interpret=use_interpret(),
      name="mesa_cg_solve",
  )(*operands)
  shape = (batch, heads, num_chunks, size)
  steps = outputs.pop(0).reshape(shape) if counted else jnp.full(shape, cg_steps, jnp.int32)
  x = x.reshape(*shape, key_dim)
  if fused is None:
    return x, steps
  return x, outputs[0].reshape(*shape, -1), steps
