"""Fused chunkwise CG solve for Hopper (sm_90): Pallas Mosaic GPU, one warpgroup per 64 tokens, systems as rows.

Same contract as `solve.chunked_cg_solve`: x_t = (H_kk[t] + Λ)⁻¹ rhs_t for every token, with the chunked matvec of
DESIGN.md §1. A CTA of one warpgroup takes 64 tokens (a chunk of 64, or two chunks of 32 on the first one's start
state: `_pair_chunks`), stages their Sᵀ and K in shared memory once as fp16 parts (`chunk.SplitDot`: 3 passes
f32-accurate, 1 pass TF32-class) and runs every CG step on chip. The CG vectors are [64, Dk] arrays in the wgmma
accumulator layout (row t = token t), so `mesanet_jax.ops.cg.conjugate_gradient` is traced as it is: its row dots
reduce within a quad of lanes, with no shared memory and no barrier. A matvec is two rounds of wgmma whose left
operands are the fp16 parts of register arrays (as flash attention 3 feeds P·V), the right ones staged:

    scores = p̂ K̃ᵀ                                   (M = 64 tokens, N = 64 keys, K = Dk)
    κ (A − Λ) p = â S̃ᵀ + (W ⊙ scores) K̃              (N = Dk; K = Dk, then 64 keys)
    A p = that / κ + λ ⊙ p

with p̂ = T p / σ_P (σ_P = max |p| per row), S̃ᵀ = T Sᵀ / max |S|, K̃ = T K / max |K|, T = 2^15: every fp16 operand at
the top of fp16's range, so that the parts of its small entries stay normal. κ_t = T² τ_t / σ_P,t, and τ_t puts the
larger of row t's two terms, e^{G_t} σ_S and σ_K² Dk max_s M_ts (|p̂·k̃_s| ≤ Dk T²), at T: â = T τ e^{G_t} σ_S p / σ_P
and W = τ σ_K² M / T, M_ts = e^{G_t − G_s} β_s [s ≤ t]; the smaller term loses only what lies below fp16's range.
Shared memory (Dk = 128): Sᵀ 32 KiB and K 16 KiB per fp16 part, W 16 KiB; the Jacobi diagonal's (K / σ_K)² and the
output borrow Sᵀ's memory before and after the loop. 1 pass fits two CTAs per SM, 3 passes just (113 KiB each).
x, r, p (192 of 255 registers per thread at Dk = 128) and a matvec's operands do not all fit: ptxas spills some
(benchmarks/mosaic_resources.py shows how much), so x, which the loop only adds to, stays in shared memory where
that costs no CTA an SM (`x_in_shared_memory`). At one pass a CTA can also make o = H_kvᵀx after its loop (`read`, the
forward) or its right-hand side u = H_kv do before it (`rhs_read`, the backward's adjoint systems), the causal read
on chip (`_read_on_chip`). Mosaic GPU's interpreter takes wgmma left operands from shared
memory only: `lhs_in_registers=False` stages them there (the CPU tests run it; on the GPU the three-pass solve uses
it too: it trades spills for shared memory, and measured faster there).
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from mesanet_jax.ops.cg import CARRIED, Iterate
from mesanet_jax.ops.chunked import HALF_ROWS
from mesanet_jax.ops.inputs import CGOptions, inverse_diagonal, solve_from_diagonal
from pallas_kernels.mesa_cg.chunk import SMALLEST_SCALE
from pallas_kernels.mesa_cg.hopper import (
    COL, COMPILER_PARAMS, F16_TILES, F32_TILES, ROW, ROWS, TOP, WGMMA, is_hopper, kernel_rows, landing_tiles,
    max_abs, pass_pairs, per_col, per_row, split_passes, stage_scaled, staged_lhs, store_parts, wgmma_sum)
from pallas_kernels.mesa_cg.params import target, use_interpret

def unsupported_reason(chunk_size: int, key_dim: int, dtype) -> str | None:
  """Why the Hopper solve cannot take these sizes, or None."""
  if chunk_size not in (32, 64):
    return f"chunk_size={chunk_size}: the Hopper solve takes 32 or 64 (64 tokens a warpgroup: one chunk or two)"
  if key_dim not in (64, 128):
    return f"key_dim={key_dim}: the Hopper solve takes 64 or 128 (128-byte fp16 operand rows)"
  if jnp.dtype(dtype) != jnp.float32 and jnp.dtype(dtype) not in HALF_ROWS:
    return f"dtype={jnp.dtype(dtype)}: the Hopper solve takes f32 right-hand sides, or bf16 / f16 ones"
  return None


def use_hopper_solve(chunk_size: int, key_dim: int, dtype) -> bool:
  """Whether the kernels' target takes this solve (else `solve.chunked_cg_solve`): GPU kernels built for sm_90,
  sizes and dtype as `unsupported_reason` allows."""
  return target() == "gpu" and is_hopper() and unsupported_reason(chunk_size, key_dim, dtype) is None


def fuses_read(value_dim: int, precision) -> bool:
  """Whether `hopper_cg_solve(read=...)` or `(rhs_read=...)` takes these: one fp16 pass (Ṽ's part takes W's memory,
  free after the CG loop or before W is made, so the CTA's shared memory stays as without the read) and Dv 64 or
  128."""
  return split_passes(precision) == 1 and value_dim in (64, 128)


def _kernel(*refs, cg: CGOptions, passes: int, state_stride: int, read: bool, rhs_read: bool, x_in_smem: bool,
            solution: bool, token_major: bool):
  """The CTA of (batch·head, chunk of 64): x for the chunk's rows (unless not `solution`; and the steps each took,
  with a tolerance; and, with `read`, the causal read o of x; with `rhs_read`, rhs is do and the right-hand side
  u = H_kv[t] do_t is made on chip first, and written out). The chunk's start states are entry state_stride · chunk
  of the boundary states, read in place (a slice outside would copy them all). With `staging` refs the wgmma left
  operands go through shared memory.

  refs: inputs rhs (do with `rhs_read`), k, gates, features, Sᵀ (and V, S_kv with `read` or `rhs_read`); outputs x
  with `solution`, the steps with a tolerance, o with `read`, u with `rhs_read`; scratch: the union (Sᵀ's parts; x
  and steps (u on its way out); S̃_kv's parts with `read` or `rhs_read`, then o with `read`; (K / σ_K)² where
  diag(A) is needed), K̃, W (a union with Ṽ's part with `read` or `rhs_read`), 1 / diag(A) with Jacobi's
  preconditioner, x through the CG loop with `x_in_smem`, and the staged left operands if any. With `token_major`,
  rhs and o are [B, T, H, D] and the CTA reads and writes its 64 tokens of head h as strided [64, D] slices."""
  counted, preconditioned, needs_diagonal = cg.tol is not None, cg.preconditioned, cg.uses_diagonal
  reads_values = read or rhs_read
  num_inputs = 7 if reads_values else 5
  (rhs_gmem, k_gmem, gates_gmem, features_gmem, states_gmem, *read_gmem), refs = refs[:num_inputs], refs[num_inputs:]
  num_outputs = solution + counted + read + rhs_read
  outputs, refs = iter(refs[:num_outputs]), refs[num_outputs:]
  x_gmem, steps_gmem, o_gmem, u_gmem = (next(outputs) if wanted else None
                                        for wanted in (solution, counted, read, rhs_read))
  union, k_parts, weights, *staging = refs
  inverse_smem = staging.pop(0) if preconditioned else None  # 1 / diag(A), [64, Dk] f32
  loop_x_smem = staging.pop(0) if x_in_smem else None  # x through the CG loop, [64, Dk] f32
  weights_smem, v_parts = weights if reads_values else (weights, None)
  lhs_smem, z_smem = staging if staging else (None, None)
  do_lhs_smem = None  # d̂o staged (with rhs_read): p̂'s memory seen as [64, Dv]
  if rhs_read and lhs_smem is not None:
    lhs_smem, do_lhs_smem = lhs_smem
  st_parts, (x_smem, steps_smem), *rest = union
  kv_parts = rest.pop(0) if reads_values else None
  o_smem = rest.pop(0) if read else None
  k2_parts = rest.pop(0) if needs_diagonal else None
  bh, n = lax.axis_index("bh"), lax.axis_index("chunk")
  key_dim, pairs = k_gmem.shape[-1], pass_pairs(passes)
  if token_major:  # [B, T, H, D]: batch bh // H, tokens 64 n ..., head bh % H
    heads = rhs_gmem.shape[2]
    rows_of = lambda gmem: gmem.at[bh // heads, pl.ds(ROWS * n, ROWS), bh % heads]
  else:
    rows_of = lambda gmem: gmem.at[bh, n]
  # λ per column (Dk / 4 registers a thread; ptxas spills it or not: read from shared memory in the loop instead, it
  # spilled as much and took another KiB).
  load_lam = lambda: plgpu.load(features_gmem.at[bh, n, 0], layout=COL, optimized=False)

  keys = plgpu.load(k_gmem.at[bh, n], layout=WGMMA, optimized=False).astype(jnp.float32)  # [64, Dk]
  sigma_k = max_abs(keys)
  keys = keys * (1.0 / sigma_k)
  store_parts(k_parts, keys * TOP, passes)  # K̃
  if needs_diagonal:
    store_parts(k2_parts, keys * keys * TOP, passes)

  shape = (ROWS, ROWS)

  def causal_mask():
    """M [64, 64], M_ts = e^{G_t − G_s} β_s [s ≤ t], and G_t per row (G_t per system t, G_s and β_s per key s)."""
    log_decay_t = plgpu.load(gates_gmem.at[bh, n, 0], layout=ROW, optimized=False)
    log_decay_s, beta_s = (plgpu.load(gates_gmem.at[bh, n, j], layout=COL, optimized=False) for j in (1, 2))
    keep = (plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=WGMMA)
            >= plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=WGMMA))
    diff = per_row(log_decay_t, shape) - per_col(log_decay_s, shape)
    return jnp.where(keep, jnp.exp(jnp.where(keep, diff, 0.0)), 0.0) * per_col(beta_s, shape), log_decay_t

  mask, log_decay_t = causal_mask()
  mask_max = jnp.maximum(jnp.max(mask, axis=1), SMALLEST_SCALE)
  plgpu.commit_smem()  # K̃ and (K / σ_K)² visible to the wgmma

  diagonal = None
  if needs_diagonal:  # diag(A_t)_i = e^{G_t} S_ii + Σ_s M_ts K_si² + λ_i, the middle term a product with (K / σ_K)²
    scaled_mask = staged_lhs(mask * per_row(TOP / mask_max, shape), passes, z_smem)

    def squares(acc):
      for a, b in pairs:
        plgpu.wgmma(acc, scaled_mask[a], k2_parts.at[b])
      return acc[...]

    out = (ROWS, key_dim)
    squared = pl.run_scoped(squares, plgpu.ACC(out, jnp.float32))
    diagonal = (per_row(sigma_k * sigma_k * mask_max / TOP ** 2, out) * squared
                + per_col(load_lam(), out))

  if rhs_read:  # u = H_kv[t] do_t = `read.causal_read(do, V, K, S_kvᵀ)`, in the union and W's memory before Sᵀ and W
    values_gmem, kv_gmem = read_gmem
    sigma_kv = stage_scaled(kv_gmem, (bh, n * state_stride), kv_parts, passes)
    sigma_v = stage_scaled(values_gmem, (bh, n), v_parts, passes)
    plgpu.commit_smem()
    do = plgpu.load(rows_of(rhs_gmem), layout=WGMMA, optimized=False).astype(jnp.float32)  # [64, Dv]
    rhs = _read_on_chip(do, (v_parts, sigma_v), (k_parts, sigma_k), (kv_parts, sigma_kv), True, mask, log_decay_t,
                        passes, do_lhs_smem, z_smem)
    x_smem[...] = rhs  # S̃_kv's memory: every wgmma of the read has completed
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(x_smem, u_gmem.at[bh, n])
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # Sᵀ is staged in that memory below

  # S̃ᵀ, scaled by σ_S = max |S| (k2_parts is no longer read: the wgmma above has completed). S is positive
  # semidefinite, as every Mesa state is, so max |S_ij| = max_i S_ii: σ_S comes from the diagonal and S streams in.
  state_diagonal = plgpu.load(features_gmem.at[bh, n, 1], layout=COL, optimized=False)
  sigma_s = stage_scaled(states_gmem, (bh, n * state_stride), st_parts, passes,
                         sigma=jnp.maximum(jnp.max(state_diagonal), SMALLEST_SCALE))
  if needs_diagonal:
    diagonal = diagonal + per_row(jnp.exp(log_decay_t), diagonal.shape) * per_col(state_diagonal, diagonal.shape)
  plgpu.commit_smem()

  # Round 2 computes κ_t (A_t − Λ) p_t with κ_t = T² τ_t / σ_P,t: τ_t puts the larger of its two terms, e^{G_t} σ_S and
  # σ_K² Dk max_s M_ts (|p̂·k̃_s| ≤ Dk T²), at T in fp16; the smaller one loses only what lies below fp16's range.
  state_term = jnp.exp(log_decay_t) * sigma_s
  inverse_tau = jnp.maximum(jnp.maximum(state_term, (sigma_k * sigma_k * key_dim) * mask_max), SMALLEST_SCALE)
  state_factor = TOP * state_term / inverse_tau
  weights_smem[...] = mask * per_row((sigma_k * sigma_k / TOP) / inverse_tau, shape)  # W = τ σ_K² M / T
  plgpu.commit_smem()

  def matvec(p):  # [64, Dk] -> A p, row t by A_t
    sigma_p = jnp.maximum(jnp.max(jnp.abs(p), axis=1), SMALLEST_SCALE)
    inverse_sigma_p = 1.0 / sigma_p
    p_parts = staged_lhs(p * per_row(TOP * inverse_sigma_p, p.shape), passes, lhs_smem)  # p̂ = T p / σ_P

    # T τ e^G σ_S p / σ_P, the state term's left operand
    state = lambda: staged_lhs(p * per_row(state_factor * inverse_sigma_p, p.shape), passes, lhs_smem)

    def scores_round(acc):  # p̂ K̃ᵀ; in registers, the state term's operand is made while the tensor cores work
      for a, b in pairs:
        plgpu.wgmma(acc, p_parts[a], k_parts.at[b].T)
      return acc[...], (state() if lhs_smem is None else ())

    scores, state_parts = pl.run_scoped(scores_round, plgpu.ACC((ROWS, ROWS), jnp.float32))
    state_parts = state_parts or state()  # staged: in p̂'s memory, which the scores round has read
    z_parts = staged_lhs(scores * plgpu.load(weights_smem, layout=WGMMA), passes, z_smem)  # W ⊙ p̂ K̃ᵀ

    def matvec_round(acc):
      for a, b in pairs:
        plgpu.wgmma(acc, state_parts[a], st_parts.at[b])
      for a, b in pairs:
        plgpu.wgmma(acc, z_parts[a], k_parts.at[b])
      return acc[...]

    scaled = pl.run_scoped(matvec_round, plgpu.ACC(p.shape, jnp.float32))  # κ (A − Λ) p
    return (scaled * per_row(sigma_p * (inverse_tau / TOP ** 2), p.shape)
            + per_col(load_lam(), p.shape) * p)

  preconditioner = None
  if preconditioned:  # 1 / diag(A) in shared memory: in registers it would take another 64 a thread through the loop
    inverse_smem[...] = inverse_diagonal(diagonal)
    preconditioner = lambda r: r * plgpu.load(inverse_smem, layout=WGMMA)
  iterate = CARRIED
  if x_in_smem:  # x in shared memory: the loop writes it (each thread its own entries) and carries a token
    def start(x0):
      loop_x_smem[...] = x0
      return jnp.zeros((), jnp.int32)

    def add(token, increment):
      loop_x_smem[...] = plgpu.load(loop_x_smem, layout=WGMMA) + increment
      return token
    iterate = Iterate(start, add)
  if not rhs_read:
    rhs = plgpu.load(rows_of(rhs_gmem), layout=WGMMA, optimized=False).astype(jnp.float32)  # [64, Dk]
  x, steps = solve_from_diagonal(matvec, rhs, diagonal, cg, preconditioner, iterate)

  if x_in_smem:
    x_smem = loop_x_smem
    x = plgpu.load(loop_x_smem, layout=WGMMA) if read else None
  elif solution:
    x_smem[...] = x  # Sᵀ's memory: every wgmma has completed
  if counted:
    steps_smem[...] = steps
  plgpu.commit_smem()
  if solution:
    plgpu.copy_smem_to_gmem(x_smem, x_gmem.at[bh, n])
  if counted:
    plgpu.copy_smem_to_gmem(steps_smem, steps_gmem.at[bh, n])
  plgpu.wait_smem_to_gmem(0, wait_read_only=read)  # with the read: x's memory is staged again below
  if not read:
    return

  # o = `read.causal_read(x, K, V, S_kv)` from x on chip: S̃_kv in the union (x has been copied out), Ṽ in W's memory.
  values_gmem, kv_gmem = read_gmem
  sigma_kv = stage_scaled(kv_gmem, (bh, n * state_stride), kv_parts, passes)
  sigma_v = stage_scaled(values_gmem, (bh, n), v_parts, passes)
  plgpu.commit_smem()
  mask, log_decay_t = causal_mask()  # again: kept through the CG loop, M would take 32 registers a thread
  o = _read_on_chip(x, (k_parts, sigma_k), (v_parts, sigma_v), (kv_parts, sigma_kv), False, mask, log_decay_t, passes,
                    lhs_smem, z_smem)
  o_smem[...] = o.astype(o_smem.dtype)  # S̃_kv's memory: read by the state term's round
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_smem, rows_of(o_gmem))
  plgpu.wait_smem_to_gmem(0)


def _read_on_chip(rows, keys, values, state, transpose_state: bool, mask, log_decay_t, passes: int, lhs_smem,
                  z_smem):
  """`read.causal_read` of 64 rows [64, D] in registers: row t is e^{G_t} rows_t S + Σ_s M_ts (rows_t·keys_s) values_s,
  from staged fp16 parts scaled by their max |·| (T = 2^15 over σ): keys (parts [64, D], σ), values (parts [64, E],
  σ), the state S (parts [D, E], σ; with `transpose_state` the parts of Sᵀ, [E, D], read transposed). With r̂ = T rows /
  σ_r per row: r̂ K̃ᵀ = T² rows Kᵀ / (σ_r σ_K), r̂ S̃ = T² rows S / (σ_r σ_S) and, with Z = r̂ K̃ᵀ ⊙ M and Ẑ = T Z / σ_Z
  per row, Ẑ Ṽ = T² Z V / (σ_Z σ_V). Returns [64, E] f32."""
  (key_parts, sigma_keys), (value_parts, sigma_values), (state_parts, sigma_state) = keys, values, state
  shape, out = (ROWS, ROWS), (ROWS, value_parts.shape[-1])
  sigma_rows = jnp.maximum(jnp.max(jnp.abs(rows), axis=1), SMALLEST_SCALE)
  row_parts = staged_lhs(rows * per_row(TOP / sigma_rows, rows.shape), passes, lhs_smem)
  scores = wgmma_sum([(row_parts, lambda b: key_parts.at[b].T)], shape, passes)
  state_operand = (lambda b: state_parts.at[b].T) if transpose_state else (lambda b: state_parts.at[b])
  state_term = wgmma_sum([(row_parts, state_operand)], out, passes)
  z = scores * mask
  sigma_z = jnp.maximum(jnp.max(jnp.abs(z), axis=1), SMALLEST_SCALE)
  z_parts = staged_lhs(z * per_row(TOP / sigma_z, shape), passes, z_smem)
  intra_term = wgmma_sum([(z_parts, lambda b: value_parts.at[b])], out, passes)
  state_scale = jnp.exp(log_decay_t) * (sigma_rows / TOP) * (sigma_state / TOP)
  intra_scale = ((sigma_z / TOP) * (sigma_rows / TOP)) * ((sigma_values / TOP) * (sigma_keys / TOP))
  return state_term * per_row(state_scale, out) + intra_term * per_row(intra_scale, out)


def hopper_cg_solve(rhs, k, log_decay, beta, lam, states_kk_t, *, cg_steps: int, cg_init: str,
                    cg_tol: float | None = None, cg_preconditioner: str = "none", precision,
                    lhs_in_registers: bool | None = None, x_in_shared_memory: bool | None = None, read=None,
                    rhs_read=None, solution: bool = True, token_major: bool = False):
  """`chunked_cg_solve` on Hopper tensor cores.

  Args (chunk-major, as inside `mesa_chunked`): rhs, k: [B, H, N, C, Dk] f32, or bf16 / f16 (converted to f32 as
  the kernel loads them, as are the read's values); log_decay (within-chunk cumulative log
  decay G), beta: [B, H, N, C]; lam: [H, Dk]; states_kk_t: [B, H, N (or more), Dk, Dk] = Sᵀ (entry n for chunk n),
  positive semidefinite as every Mesa state (its scale is read from its diagonal).
  cg_tol: None for exactly cg_steps steps; else each row stops once ‖r‖ ≤ cg_tol·‖r₀‖, and a chunk's loop ends when
  its rows have. cg_preconditioner: "none" or "jacobi" (1 / diag(A) kept in shared memory, 32 KiB at Dk = 128).
  precision: lax.Precision (HIGHEST/HIGH: 3 fp16 passes, DEFAULT: 1) or SplitDot(fp16, n).
  lhs_in_registers: wgmma left operands in registers (default on GPU at one pass; three passes stage them in shared
  memory, which spills less; Mosaic GPU's interpreter takes them only from shared memory).
  x_in_shared_memory: x kept in shared memory through the CG loop (32 KiB more at Dk = 128) instead of 64
  registers a thread; default: where the CTAs per SM stay as they were, i.e. without the preconditioner, at one
  pass with the left operands in registers (two CTAs) or at three passes (one). ptxas at Dk = 128 with a
  tolerance, x in registers → in shared memory: one pass (left operands in registers) a CG step of 1,458 → 1,186
  instructions, 354 → 23 local loads and stores, 18 → 82 shared ones; three passes (staged) 2,239 → 2,122,
  277 → 97 and 58 → 122. On an H100 (`solve_bench.py --kernels=rows,rows_x_registers`, B=8 T=2048 H=16, one
  pass): 30 steps 1.64 ms against 2.50 with x in registers, tol 1e-4 0.89 against 1.37 (benchmarks/RESULTS.md).
  read: None, or (values [B, H, N, C, Dv], states_kv [B, H, N (or more), Dk, Dv] = H_kv at every chunk start): the
  kernel also returns o = `read.causal_read(x, k, values, states_kv, log_decay, beta)`, made from x on chip (where
  `fuses_read` allows).
  rhs_read: None, or (values [B, H, N, C, Dv], states_kv as for `read`): rhs is do [B, H, N, C, Dv], and the kernel
  solves for the right-hand side u = H_kv[t] do_t = `read.causal_read(do, values, k, states_kv,
  transpose_states=True)` (the backward's adjoint systems), which it makes from do on chip and also returns (where
  `fuses_read` allows; not with `read`).
  solution: whether x is written out; without it (o alone is wanted: a forward no gradient is taken of) the kernel
  writes o and the steps only, 4 bytes a row entry less, and x is returned as None. Needs `read`.
  token_major: rhs is [B, N·C, H, Dk] and o [B, N·C, H, Dv], as the op's caller lays out q and o: the kernel reads
  and writes them in place, with no chunk-major copy (`ChunkedOperator.solve_and_output`).
  Returns x: [B, H, N, C, Dk] (f32; None without `solution`), with `read` o: [B, H, N, C, Dv] ([B, N·C, H, Dv]
  with `token_major`) in rhs's dtype (f32, or the 16-bit float q came in: the op's output dtype, rounded once), with
  `rhs_read` u: [B, H, N, C, Dk] f32, and the steps each row took, int32 [B, H, N, C].
  """
  batch, heads, num_chunks, size, key_dim = k.shape
  if read is not None and rhs_read is not None:
    raise ValueError("read and rhs_read: the Hopper solve fuses one read, after its loop (o) or before it (u)")
  rows_dim = rhs_read[0].shape[-1] if rhs_read is not None else key_dim  # rhs is do, [.., Dv], with rhs_read
  expected = ((batch, num_chunks * size, heads, rows_dim) if token_major
              else (batch, heads, num_chunks, size, rows_dim))
  if rhs.shape != expected:
    raise ValueError(f"rhs has shape {rhs.shape}, expected {expected} ({'token' if token_major else 'chunk'}-major, "
                     f"from k's {k.shape})")
  if (reason := unsupported_reason(size, key_dim, rhs.dtype)) is not None:
    raise ValueError(reason)
  passes = split_passes(precision)
  fused = read if read is not None else rhs_read
  values, states_kv = fused if fused is not None else (None, None)
  if fused is not None and not fuses_read(values.shape[-1], precision):
    raise ValueError(f"{'read' if read is not None else 'rhs_read'}: the Hopper solve fuses a read at one fp16 pass "
                     f"and Dv 64 or 128, got {passes} passes and Dv={values.shape[-1]}")
  if lhs_in_registers is None:  # fastest on an H200 (RESULTS.md): registers at 1 pass, staged at 3 (fewer spills)
    lhs_in_registers = not use_interpret() and passes == 1
  cg = CGOptions(cg_steps, cg_init, cg_tol, cg_preconditioner)
  if x_in_shared_memory is None:  # 1 / diag(A) or one pass's staged operands: with x too, fewer CTAs would fit an SM
    x_in_shared_memory = not cg.preconditioned and (lhs_in_registers or passes == 3)
  counted = cg_tol is not None
  if not solution and read is None:
    raise ValueError("solution=False needs read=(values, states_kv): the kernel would return nothing")
  rhs, k = kernel_rows(rhs), kernel_rows(k)  # 16-bit rows are converted as the kernel loads them
  log_decay, beta, states_kk_t = (x.astype(jnp.float32) for x in (log_decay, beta, states_kk_t))
  by_token = {"k": k, "beta": beta}  # chunk-major rows, 64 a program
  if fused is not None:
    by_token["values"] = kernel_rows(values)
  if not token_major:
    by_token["rhs"] = rhs
  state_stride = 1
  if size < ROWS:
    # A_t (and the read) depends on the tokens before t alone: a pair runs on its first chunk's start state.
    paired, log_decay = _pair_chunks(list(by_token.values()), log_decay)
    by_token = dict(zip(by_token, paired))
    state_stride = 2
  k, beta = by_token["k"], by_token["beta"]
  programs = k.shape[2]
  if not token_major:
    rhs = by_token["rhs"]
  elif programs * ROWS > rhs.shape[1]:  # an odd count of chunks of 32: zero rows after the last
    rhs = jnp.pad(rhs, [(0, 0), (0, programs * ROWS - rhs.shape[1]), (0, 0), (0, 0)])
  flat = lambda x: x.reshape(batch * heads, *x.shape[2:])
  # G twice: the kernel loads it per row and per column, and Mosaic GPU would merge two loads of one row into one.
  gates = jnp.stack([log_decay, log_decay, beta], axis=3)  # [B, H, N, 3, 64]
  f32_rows = lambda cols: plgpu.SMEM((ROWS, cols), jnp.float32, transforms=F32_TILES)
  parts = lambda rows, cols=key_dim: plgpu.SMEM((passes // 2 + 1, rows, cols), jnp.float16, transforms=F16_TILES)
  union = [parts(key_dim),  # Sᵀ; before it (K̃)² (Jacobi), after it x and the steps, then S̃_kv, then o
           (f32_rows(key_dim), plgpu.SMEM((ROWS,), jnp.int32))]
  weights = f32_rows(ROWS)  # W
  if fused is not None:
    value_dim = states_kv.shape[-1]
    union.append(parts(key_dim, value_dim))  # S̃_kv
    weights = plgpu.RefUnion(weights, parts(ROWS, value_dim))  # W, and Ṽ before it (u) or after it (o)
  if read is not None:
    o_dtype = rhs.dtype  # f32, or the 16-bit float q came in: o leaves in the op's output dtype
    union.append(plgpu.SMEM((ROWS, value_dim), o_dtype, transforms=landing_tiles(o_dtype)))
  if cg.uses_diagonal:  # (K / σ_K)²
    union.append(parts(ROWS))
  scratch = [plgpu.RefUnion(*union), parts(ROWS), weights]  # ..., K̃, W
  if cg.preconditioned:
    scratch.append(f32_rows(key_dim))  # 1 / diag(A)
  if x_in_shared_memory:
    scratch.append(f32_rows(key_dim))  # x through the loop
  if not lhs_in_registers:  # left operands staged: p̂ then the state term's, and Ẑ (or the Jacobi mask)
    # (with rhs_read also d̂o, [64, Dv], in p̂'s memory before the loop)
    rows_lhs = parts(ROWS) if rhs_read is None else plgpu.RefUnion(parts(ROWS), parts(ROWS, value_dim))
    scratch += [rows_lhs, parts(ROWS, ROWS)]
  out_type = [jax.ShapeDtypeStruct((batch * heads, programs, ROWS, key_dim), jnp.float32)] if solution else []
  if counted:
    out_type.append(jax.ShapeDtypeStruct((batch * heads, programs, ROWS), jnp.int32))
  if read is not None:
    o_shape = (batch, programs * ROWS, heads, value_dim) if token_major else (batch * heads, programs, ROWS, value_dim)
    out_type.append(jax.ShapeDtypeStruct(o_shape, o_dtype))
  if rhs_read is not None:
    out_type.append(jax.ShapeDtypeStruct((batch * heads, programs, ROWS, key_dim), jnp.float32))
  kernel = plgpu.kernel(
      functools.partial(_kernel, cg=cg, passes=passes, state_stride=state_stride, read=read is not None,
                        rhs_read=rhs_read is not None, x_in_smem=x_in_shared_memory, solution=solution,
                        token_major=token_major),
      out_type=out_type, scratch_types=scratch, grid=(batch * heads, programs), grid_names=("bh", "chunk"),
      compiler_params=COMPILER_PARAMS, interpret=plgpu.InterpretGPUParams() if use_interpret() else None)
  # Per program: λ and diag(S) (S's scale and the Jacobi start; a gather here, where the kernel would reduce across
  # warps).
  start_states = states_kk_t[:, :, 0:state_stride * programs:state_stride]  # read by the gather alone, not copied
  features = jnp.stack([jnp.broadcast_to(lam.astype(jnp.float32)[None, :, None], (batch, heads, programs, key_dim)),
                        jnp.diagonal(start_states, axis1=-2, axis2=-1)], axis=3)  # [B, H, N, 2, Dk]
  read_operands = [flat(by_token["values"]), flat(states_kv.astype(jnp.float32))] if fused is not None else []
  outputs = list(kernel(rhs if token_major else flat(rhs), flat(k), flat(gates), flat(features), flat(states_kk_t),
                        *read_operands))
  unpair = lambda y: y.reshape(batch, heads, -1, size, *y.shape[3:])[:, :, :num_chunks]
  x = unpair(outputs.pop(0)) if solution else None
  steps = unpair(outputs[0]) if counted else jnp.full((batch, heads, num_chunks, size), cg_steps, jnp.int32)
  if read is not None:
    o = outputs[-1][:, :num_chunks * size] if token_major else unpair(outputs[-1])
    return x, o, steps
  if rhs_read is not None:
    return x, unpair(outputs[-1]), steps
  return x, steps


def _pair_chunks(rows: list, log_decay):
  """Chunks of 32 as chunks of 64 rows: chunks 2m and 2m + 1 as one, with G continued across the pair (an odd count
  gets an empty last chunk: zero rows, G flat). rows: arrays [B, H, N, 32, ...]; log_decay: [B, H, N, 32] (G within
  each chunk). Returns the rows [B, H, ⌈N/2⌉, 64, ...] and G [B, H, ⌈N/2⌉, 64]; a pair starts from its first
  chunk's start state."""
  num_chunks = log_decay.shape[2]
  pairs = -(-num_chunks // 2)
  two = lambda x: jnp.pad(x, [(0, 0), (0, 0), (0, 2 * pairs - num_chunks)] + [(0, 0)] * (x.ndim - 3)).reshape(
      *x.shape[:2], pairs, 2, *x.shape[3:])
  merge = lambda x: x.reshape(*x.shape[:3], 2 * x.shape[4], *x.shape[5:])
  log_decay = two(log_decay)
  log_decay = log_decay.at[:, :, :, 1].add(log_decay[:, :, :, 0, -1:])
  return [merge(two(x)) for x in rows], merge(log_decay)
