"""dk, dv and dβ of every token on Hopper (sm_90): Pallas Mosaic GPU, one warpgroup per 64 tokens.

Same contract and math as `gradients.chunk_gradients` (its docstring derives the three row blocks): per program of
one chunk of 64 rows, with e = e^{G_last − G} per row and Wᵀ_ts = e^{G_s − G_t} [s ≥ t],

    Q = ((v doᵀ) − (k yᵀ)) ⊙ Wᵀ,  S = (k xᵀ) ⊙ Wᵀ               (three [64, 64] products)
    Z = (k e) D_kkᵀ + (v e) D_kvᵀ + Q x,  dβ = k·Z                (one round of three products)
    dk = β ((k e) D_kk − S y + Z),  dv = β ((k e) D_kv + S do)    (a round of two products each)

(D_kkᵀ is the stored gradient; a product with D_kk reads it transposed.) Every product runs on the tensor cores as
the Hopper solve's do (`solve_hopper`): operands scaled to the top of fp16's range (T = 2^15 over their max |·|) and
split in 1 or 3 fp16 parts; the terms of one round share an accumulator, so each term's left operand also carries
its factor over the round's largest, and the smaller terms lose only what lies below fp16's range. The right operands
(x̃, ỹ, d̃o and both state gradients) are staged in shared memory once, the left ones in turn; the outputs leave
through the state gradients' memory once their last product has read it. Given the states too, a program also sums
⟨D, S⟩ at its chunk's end boundary in f32 while D is fresh in L2 (`BoundaryStates.handed_on`), so that XLA need not
read both boundary arrays of D and of S again (~1.1 GB at B=8 T=2048 H=16 D=128).
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mesa_cg.hopper import (
    COL, COMPILER_PARAMS, F16_TILES, ROW, ROWS, SHARED_MEMORY, TOP, WGMMA, is_hopper, kernel_rows, landing_tiles,
    max_abs, per_col, per_row, split_passes, stage_scaled, staged_lhs, wgmma_sum)
from pallas_kernels.mesa_cg.params import target, use_interpret


def _shared_bytes(key_dim: int, value_dim: int, passes: int) -> int:
  """The kernel's shared memory: fp16 parts (2 bytes, 1 or 2 parts) of every staged operand, and dβ."""
  fp16 = 2 * (passes // 2 + 1)
  states = sum(max(fp16 * key_dim * width, 4 * ROWS * width) for width in (key_dim, value_dim))  # D̃_kkᵀ, D̃_kv
  # (each shares its memory with an f32 [64, D] output: dk, dv)
  rows = fp16 * ROWS * (2 * key_dim + value_dim)  # x̃, ỹ, d̃o
  lhs = fp16 * ROWS * (key_dim + value_dim + ROWS)  # the left operands: k-, v- and [64, 64]-shaped
  return states + rows + lhs + 2 * 4 * ROWS  # dβ and ⟨D, S⟩'s row sums


def use_hopper_gradients(chunk_size: int, key_dim: int, value_dim: int, precision) -> bool:
  """Whether the kernels' target takes these gradients (else `gradients.chunk_gradients`): GPU kernels built for
  sm_90, a lax.Precision, sizes as `unsupported_reason` allows."""
  return (target() == "gpu" and is_hopper() and isinstance(precision, lax.Precision)
          and unsupported_reason(chunk_size, key_dim, value_dim, split_passes(precision)) is None)


def unsupported_reason(chunk_size: int, key_dim: int, value_dim: int, passes: int) -> str | None:
  """Why the Hopper gradients kernel cannot take these sizes, or None."""
  if chunk_size != ROWS:
    return (f"chunk_size={chunk_size}: the Hopper gradients take 64 (a chunk a warpgroup; at 32 the Triton kernel "
            f"measured faster and more accurate on an H200, benchmarks/RESULTS.md)")
  if key_dim not in (64, 128) or value_dim not in (64, 128):
    return f"key_dim={key_dim}, value_dim={value_dim}: the Hopper gradients take 64 or 128 (128-byte fp16 rows)"
  if (needed := _shared_bytes(key_dim, value_dim, passes)) > SHARED_MEMORY:
    return (f"{passes} fp16 passes at key_dim={key_dim}, value_dim={value_dim} need {needed // 1024} KiB of shared "
            f"memory, more than sm_90's {SHARED_MEMORY // 1024}")
  return None


def _kernel(*refs, passes: int, handed_on: bool):
  """The CTA of (batch·head, 64 rows): rows [64, D] (f32; k and v may be 16-bit floats), gates [4, 64] (G as rows,
  G as columns, β, e), state gradients after the rows [Dk, Dk] (D_kkᵀ) and [Dk, Dv] (D_kv): boundary m + 1 of the
  whole boundary arrays, read in place (a slice [1:] outside would copy both); with `handed_on` the states (H_kkᵀ,
  H_kv) there too. Writes dk [64, Dk], dv [64, Dv], dβ [64] and with `handed_on` ⟨D, S⟩ at boundary m + 1 as 64 row
  sums (a sum across the warpgroup is left to XLA)."""
  num_inputs, num_outputs = (10, 4) if handed_on else (8, 3)
  (k_gmem, v_gmem, x_gmem, y_gmem, do_gmem, gates_gmem, dkk_t_gmem, dkv_gmem, *states_gmem), refs = (
      refs[:num_inputs], refs[num_inputs:])
  (dk_gmem, dv_gmem, dbeta_gmem, *handed_gmem), refs = refs[:num_outputs], refs[num_outputs:]
  kk_union, kv_union, x_parts, y_parts, do_parts, lhs_k, lhs_v, lhs_square, dbeta_smem, *handed_smem = refs
  bh, m = lax.axis_index("bh"), lax.axis_index("chunk")
  dkk_t_parts, dk_smem = kk_union
  dkv_parts, dv_smem = kv_union
  load = lambda ref: plgpu.load(ref.at[bh, m], layout=WGMMA, optimized=False).astype(jnp.float32)  # [64, D] rows
  gate = lambda j, layout: plgpu.load(gates_gmem.at[bh, m, j], layout=layout, optimized=False)

  # D̃_kkᵀ, D̃_kv, x̃, ỹ, d̃o: each scaled by its max |·|
  sigma_kk, sigma_kv, sigma_x, sigma_y, sigma_do = (
      stage_scaled(gmem, (bh, index), parts, passes) for gmem, index, parts in (
          (dkk_t_gmem, m + 1, dkk_t_parts), (dkv_gmem, m + 1, dkv_parts), (x_gmem, m, x_parts), (y_gmem, m, y_parts),
          (do_gmem, m, do_parts)))
  plgpu.commit_smem()
  if handed_on:  # Σ_ij D_ij S_ij of both states, block by block of 64 rows (D from L2: stage_scaled just loaded it)
    block = lambda gmem, h: plgpu.load(gmem.at[bh, m + 1, pl.ds(ROWS * h, ROWS)], layout=WGMMA, optimized=False)
    handed_smem[0][...] = functools.reduce(jnp.add, [
        jnp.sum(block(gradient, h) * block(state, h), axis=1)
        for gradient, state in zip((dkk_t_gmem, dkv_gmem), states_gmem) for h in range(state.shape[2] // ROWS)])
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(handed_smem[0], handed_gmem[0].at[bh, m])

  square = (ROWS, ROWS)
  keep = (plgpu.broadcasted_iota(jnp.int32, square, 0, layout=WGMMA)
          <= plgpu.broadcasted_iota(jnp.int32, square, 1, layout=WGMMA))
  mask_t = jnp.where(keep, jnp.exp(jnp.where(keep, per_col(gate(1, COL), square) - per_row(gate(0, ROW), square), 0.0)),
                     0.0)  # Wᵀ_ts = e^{G_s − G_t} [s ≥ t]

  # Q and S: [64, 64] products of k̂ = T k / σ_k and v̂ with the staged rows, transposed.
  k, v = load(k_gmem), load(v_gmem)
  sigma_k, sigma_v = max_abs(k), max_abs(v)
  k_hat = staged_lhs(k * (TOP / sigma_k), passes, lhs_k)
  v_hat = staged_lhs(v * (TOP / sigma_v), passes, lhs_v)
  k_y = wgmma_sum([(k_hat, lambda b: y_parts.at[b].T)], square, passes) * (sigma_k * sigma_y / TOP ** 2)
  k_x = wgmma_sum([(k_hat, lambda b: x_parts.at[b].T)], square, passes) * (sigma_k * sigma_x / TOP ** 2)
  v_do = wgmma_sum([(v_hat, lambda b: do_parts.at[b].T)], square, passes) * (sigma_v * sigma_do / TOP ** 2)
  q = (v_do - k_y) * mask_t
  s = k_x * mask_t
  sigma_q, sigma_s = max_abs(q), max_abs(s)

  to_end = gate(3, ROW)
  # k and v again from global memory (L2) rather than kept live in registers across the three rounds above.
  k_end = load(k_gmem) * per_row(to_end * (TOP / sigma_k), k.shape)  # T (k e) / σ_k
  v_end = load(v_gmem) * per_row(to_end * (TOP / sigma_v), v.shape)

  def scaled_round(terms, shape):
    """terms: (left operand at T scale, its staging ref, its true factor, right parts); the round's sum of
    factor · left @ right, each left operand staged times its factor over the largest."""
    largest = functools.reduce(jnp.maximum, [factor for _, _, factor, _ in terms])
    staged = [(staged_lhs(lhs * (factor / largest), passes, ref), rhs) for lhs, ref, factor, rhs in terms]
    return wgmma_sum(staged, shape, passes) * largest

  key_dim, value_dim = k.shape[1], v.shape[1]
  z = scaled_round([(k_end, lhs_k, sigma_k * sigma_kk / TOP ** 2, lambda b: dkk_t_parts.at[b].T),
                    (v_end, lhs_v, sigma_v * sigma_kv / TOP ** 2, lambda b: dkv_parts.at[b].T),
                    (q * (TOP / sigma_q), lhs_square, sigma_q * sigma_x / TOP ** 2, lambda b: x_parts.at[b])],
                   (ROWS, key_dim))
  beta = gate(2, ROW)
  dk = scaled_round([(k_end, lhs_k, sigma_k * sigma_kk / TOP ** 2, lambda b: dkk_t_parts.at[b]),
                     (-s * (TOP / sigma_s), lhs_square, sigma_s * sigma_y / TOP ** 2, lambda b: y_parts.at[b])],
                    (ROWS, key_dim))
  dk_smem[...] = (per_row(beta, z.shape) * (dk + z)).astype(dk_smem.dtype)  # D_kkᵀ's memory: read by now
  dbeta_smem[...] = jnp.sum(load(k_gmem) * z, axis=1)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(dk_smem, dk_gmem.at[bh, m])
  plgpu.copy_smem_to_gmem(dbeta_smem, dbeta_gmem.at[bh, m])
  dv = scaled_round([(k_end, lhs_k, sigma_k * sigma_kv / TOP ** 2, lambda b: dkv_parts.at[b]),
                     (s * (TOP / sigma_s), lhs_square, sigma_s * sigma_do / TOP ** 2, lambda b: do_parts.at[b])],
                    (ROWS, value_dim))
  dv_smem[...] = (per_row(beta, dv.shape) * dv).astype(dv_smem.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(dv_smem, dv_gmem.at[bh, m])
  plgpu.wait_smem_to_gmem(0)


def hopper_chunk_gradients(k, v, x, y, do, log_decay, beta, d_bounds_kk_t, d_bounds_kv, *, precision, states=None):
  """`gradients.chunk_gradients` on Hopper tensor cores (same arguments and results; and ⟨D, S⟩ with `states`).

  Args: k, x, y: [B, H, N, C, Dk]; v, do: [B, H, N, C, Dv]; log_decay, beta: [B, H, N, C]; d_bounds_kk_t,
  d_bounds_kv: the gradients w.r.t. H_kkᵀ and H_kv at every chunk boundary, [B, H, N+1, Dk, Dk | Dv]. k and v may
  be 16-bit floats (converted as the kernel loads them).
  precision: lax.Precision (HIGHEST/HIGH: 3 fp16 passes, DEFAULT: 1) or SplitDot(fp16, n).
  states: None, or the `operator.BoundaryStates` (H_kkᵀ, H_kv at every boundary, f32) the state gradients are of.
  Returns dk [B, H, N, C, Dk], dv [B, H, N, C, Dv] (in k's and v's dtypes where 16-bit floats, written so by the
  kernel, rounded once, as the op returns them; else f32) and dbeta [B, H, N, C] (f32); with
  `states` also ⟨D, S⟩ at every chunk's end boundary, [B, H, N] (f32: `BoundaryStates.handed_on`).
  """
  batch, heads, num_chunks, size, key_dim = k.shape
  value_dim = v.shape[-1]
  passes = split_passes(precision)
  if (reason := unsupported_reason(size, key_dim, value_dim, passes)) is not None:
    raise ValueError(reason)
  log_decay, beta = log_decay.astype(jnp.float32), beta.astype(jnp.float32)
  to_end = jnp.exp(log_decay[..., -1:] - log_decay)
  gates = jnp.stack([log_decay, log_decay, beta, to_end], axis=3)  # [B, H, N, 4, 64]
  flat = lambda a: a.reshape(batch * heads, *a.shape[2:])
  wide = lambda a: flat(a).astype(jnp.float32)
  parts = lambda r, c: plgpu.SMEM((passes // 2 + 1, r, c), jnp.float16, transforms=F16_TILES)
  k, v = kernel_rows(k), kernel_rows(v)  # 16-bit floats as they come (converted as the kernel loads them), else f32
  out_rows = lambda c, dtype: plgpu.SMEM((ROWS, c), dtype, transforms=landing_tiles(dtype))
  scratch = [
      plgpu.RefUnion(parts(key_dim, key_dim), out_rows(key_dim, k.dtype)),  # D̃_kkᵀ, then dk
      plgpu.RefUnion(parts(key_dim, value_dim), out_rows(value_dim, v.dtype)),  # D̃_kv, then dv
      parts(ROWS, key_dim), parts(ROWS, key_dim), parts(ROWS, value_dim),  # x̃, ỹ, d̃o
      parts(ROWS, key_dim), parts(ROWS, value_dim), parts(ROWS, ROWS),  # left operands
      plgpu.SMEM((ROWS,), jnp.float32),  # dβ
  ] + ([plgpu.SMEM((ROWS,), jnp.float32)] if states is not None else [])  # ⟨D, S⟩'s row sums
  row_sums = jax.ShapeDtypeStruct((batch * heads, num_chunks, ROWS), jnp.float32)
  out_type = [jax.ShapeDtypeStruct((batch * heads, num_chunks, ROWS, key_dim), k.dtype),
              jax.ShapeDtypeStruct((batch * heads, num_chunks, ROWS, value_dim), v.dtype),
              row_sums] + ([row_sums] if states is not None else [])
  kernel = plgpu.kernel(
      functools.partial(_kernel, passes=passes, handed_on=states is not None), out_type=out_type,
      scratch_types=scratch, grid=(batch * heads, num_chunks), grid_names=("bh", "chunk"),
      compiler_params=COMPILER_PARAMS, interpret=plgpu.InterpretGPUParams() if use_interpret() else None)
  bounds = (d_bounds_kk_t, d_bounds_kv, *(() if states is None else states))
  dk, dv, dbeta, *handed_on = kernel(flat(k), flat(v), *map(wide, (x, y, do, gates, *bounds)))
  unflat = lambda a: a.reshape(batch, heads, *a.shape[1:])
  gradients = unflat(dk), unflat(dv), unflat(dbeta)
  return gradients + tuple(unflat(row_sums).sum(axis=-1) for row_sums in handed_on)

