"""Chunk-state scan for Hopper (sm_90): Pallas Mosaic GPU, the carry in registers, chunks arriving by TMA.

Same contract and math as `states.chunk_states`: carry ← d_n · carry + Σ_{s in chunk n} w_s a_s b_sᵀ at every chunk
boundary. One warpgroup per (batch·head, 64 rows of the carry, `block` columns) walks the chunks; the scan is bound
by the states it writes ([N+1, D, E] f32). The loads of the next `stages` − 1 chunks are in flight while chunk n is
summed, and each boundary state leaves by a TMA store while the next chunk's product runs. A chunk's product is one
round of wgmma over fp16 parts (1 or 3 passes, as the Hopper solve's, `hopper.py`): Ã = T (a ⊙ w) / σ_a and
B̃ = T b / σ_b, each scaled by its max |·| (T = 2^15), and carry += (σ_a σ_b / T²) Ãᵀ B̃ with Ãᵀ read transposed from
shared memory. On an H100 (B=8 T=2048 H=16 D=128, "default"; benchmarks/RESULTS.md) the forward's two scans took
0.53 ms against the Triton kernel's 0.66, the backward's two 0.57 against 0.79, at 64 columns and 3 stages (2
stages: 0.56 / 0.61; 128 columns, 2 stages: 0.53 / 0.62).
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mesa_cg.hopper import (
    COMPILER_PARAMS, F16_TILES, F32_TILES, ROW, ROWS, TOP, WGMMA, is_hopper, max_abs, per_row, split_passes,
    store_parts, wgmma_sum)
from pallas_kernels.mesa_cg.params import target, use_interpret

SHARED_MEMORY = 227 * 1024  # bytes a CTA may take on sm_90


def _shared_bytes(block: int, passes: int, stages: int) -> int:
  """Per CTA: `stages` f32 landing buffers of a chunk's a [64, 64], b [64, block] and gates [2, 64], the fp16 parts
  of Ã and B̃, one f32 boundary state on its way out, and 2 KiB for the barriers and the buffers' alignment."""
  landing = 4 * ROWS * (ROWS + block + 2)
  parts = 2 * (passes // 2 + 1) * ROWS * (ROWS + block)
  return stages * landing + parts + 4 * ROWS * block + 2048


def unsupported_reason(chunk_size: int, key_dim: int, value_dim: int, dtype, *, block: int = 64, passes: int = 1,
                       stages: int = 3) -> str | None:
  """Why the Hopper scan cannot take these sizes, or None."""
  if chunk_size != ROWS:
    return f"chunk_size={chunk_size}: the Hopper scan takes 64 (a chunk's tokens are a wgmma's 64-row operand)"
  if key_dim % ROWS or block % ROWS or value_dim % block:
    return (f"key_dim={key_dim}, value_dim={value_dim}, block={block}: the Hopper scan takes multiples of 64 "
            f"(128-byte fp16 operand rows), the value dim a multiple of the block")
  if jnp.dtype(dtype) != jnp.float32:
    return f"dtype={jnp.dtype(dtype)}: the Hopper scan takes f32 inputs"
  if (needed := _shared_bytes(block, passes, stages)) > SHARED_MEMORY:
    return (f"block={block}, {passes} fp16 passes, {stages} stages need {needed // 1024} KiB of shared memory, more "
            f"than sm_90's {SHARED_MEMORY // 1024}")
  return None


def use_hopper_states(chunk_size: int, key_dim: int, value_dim: int, dtype, precision) -> bool:
  """Whether the kernels' target takes this scan (else `states.chunk_states`' Triton kernel): GPU kernels built for
  sm_90, a lax.Precision, sizes and dtype as `unsupported_reason` allows at the default tiling."""
  return (target() == "gpu" and is_hopper() and isinstance(precision, lax.Precision)
          and unsupported_reason(chunk_size, key_dim, value_dim, dtype, passes=split_passes(precision)) is None)


def _kernel(a_gmem, b_gmem, gates_gmem, initial_gmem, bounds_gmem,
            a_smem, b_smem, gates_smem, a_parts, b_parts, out_smem, barriers, *, reverse: bool, passes: int,
            stages: int):
  """The CTA of (batch·head, 64 carry rows, `block` carry columns). gmem: a [N, 64, D], b [N, 64, E], gates
  [N, 2, 64] (w per token; d_n repeated along the row, so that it broadcasts over the carry's rows as a per-row
  value), initial [D, E]; bounds [N+1, D, E]. barriers: one per landing slot and operand (a, b, gates)."""
  bh, r, j = lax.axis_index("bh"), lax.axis_index("rows"), lax.axis_index("cols")
  num_chunks, block = a_gmem.shape[1], b_smem.shape[-1]
  rows, cols = pl.ds(r * ROWS, ROWS), pl.ds(j * block, block)
  chunk = (lambda i: num_chunks - 1 - i) if reverse else (lambda i: i)
  operands = ((a_gmem, rows, a_smem), (b_gmem, cols, b_smem), (gates_gmem, slice(None), gates_smem))

  def fetch(i):  # chunk i's operands into landing slot i % stages
    slot, n = i % stages, chunk(i)
    for o, (gmem, columns, smem) in enumerate(operands):
      plgpu.copy_gmem_to_smem(gmem.at[bh, n, :, columns], smem.at[slot], barriers.at[o, slot])

  for i in range(min(stages, num_chunks)):
    fetch(i)

  def write(carry, boundary):
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous boundary's store has read out_smem
    out_smem[...] = carry
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, bounds_gmem.at[bh, boundary, rows, cols])

  def step(i, carry):
    slot, n = i % stages, chunk(i)
    write(carry, n + int(reverse))
    for o in range(len(operands)):
      plgpu.barrier_wait(barriers.at[o, slot])
    weights, decay = (plgpu.load(gates_smem.at[slot, g], layout=ROW, optimized=False) for g in (0, 1))
    a = plgpu.load(a_smem.at[slot], layout=WGMMA, optimized=False)
    a = a * per_row(weights, a.shape)
    b = plgpu.load(b_smem.at[slot], layout=WGMMA, optimized=False)
    sigma_a, sigma_b = max_abs(a), max_abs(b)
    store_parts(a_parts, a * (TOP / sigma_a), passes)
    store_parts(b_parts, b * (TOP / sigma_b), passes)
    plgpu.commit_smem()  # the parts visible to the wgmma, and every thread done with the landing slot

    @pl.when(i + stages < num_chunks)
    def _():
      fetch(i + stages)

    a_t = [a_parts.at[p].T for p in range(passes // 2 + 1)]
    product = wgmma_sum([(a_t, lambda p: b_parts.at[p])], carry.shape, passes)
    return per_row(decay, carry.shape) * carry + product * (sigma_a * sigma_b / TOP ** 2)

  initial = plgpu.load(initial_gmem.at[bh, rows, cols], layout=WGMMA, optimized=False)
  last = lax.fori_loop(0, num_chunks, step, initial)
  write(last, 0 if reverse else num_chunks)
  plgpu.wait_smem_to_gmem(0)


def hopper_chunk_states(a, b, weights, chunk_decay, initial, *, reverse: bool = False, precision,
                        block: int = 64, stages: int = 3):
  """`states.chunk_states` on Hopper tensor cores (same arguments and result).

  Args: a: [B, H, N, 64, D]; b: [B, H, N, 64, E]; weights: [B, H, N, 64]; chunk_decay: [B, H, N]; initial:
  [B, H, D, E]; reverse: scan from the last chunk to the first. precision: lax.Precision (HIGHEST/HIGH: 3 fp16
  passes, DEFAULT: 1) or SplitDot(fp16, n). block: carry columns per CTA (64 or 128); stages: chunks in flight.
  Returns [B, H, N+1, D, E] f32: entry n is the carry at the boundary before chunk n (reversed: after chunk n − 1,
  i.e. initial plus chunks ≥ n).
  """
  batch, heads, num_chunks, size, dim = a.shape
  width = b.shape[-1]
  passes = split_passes(precision)
  if (reason := unsupported_reason(size, dim, width, a.dtype, block=block, passes=passes, stages=stages)) is not None:
    raise ValueError(reason)
  flat = lambda x: x.reshape(batch * heads, *x.shape[2:]).astype(jnp.float32)
  gates = jnp.stack([weights, jnp.broadcast_to(chunk_decay[..., None], weights.shape)], axis=3)  # [B, H, N, 2, 64]
  landing = lambda cols: plgpu.SMEM((stages, size, cols), jnp.float32, transforms=F32_TILES)
  parts = lambda cols: plgpu.SMEM((passes // 2 + 1, size, cols), jnp.float16, transforms=F16_TILES)
  scratch = [landing(ROWS), landing(block), plgpu.SMEM((stages, 2, size), jnp.float32),
             parts(ROWS), parts(block), plgpu.SMEM((ROWS, block), jnp.float32, transforms=F32_TILES),
             plgpu.Barrier(num_barriers=(3, stages))]
  kernel = plgpu.kernel(
      functools.partial(_kernel, reverse=reverse, passes=passes, stages=stages),
      out_type=jax.ShapeDtypeStruct((batch * heads, num_chunks + 1, dim, width), jnp.float32),
      scratch_types=scratch, grid=(batch * heads, dim // ROWS, width // block), grid_names=("bh", "rows", "cols"),
      compiler_params=COMPILER_PARAMS, interpret=plgpu.InterpretGPUParams() if use_interpret() else None)
  bounds = kernel(flat(a), flat(b), flat(gates), flat(initial))
  return bounds.reshape(batch, heads, num_chunks + 1, dim, width)
