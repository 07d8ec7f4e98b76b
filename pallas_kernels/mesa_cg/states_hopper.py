"""Chunk-state scan for Hopper (sm_90): Pallas Mosaic GPU, the carry in registers, chunks arriving by TMA.

Same contract and math as `states.chunk_states`: carry ← d_n · carry + Σ_{s in chunk n} w_s a_s b_sᵀ at every chunk
boundary, for one b or for several scans that share a and the decays (the forward's H_kk and H_kv: a = k; the
backward's two state gradients: a = x), each chunk of a then loaded and staged once. One warpgroup per (batch·head,
64 rows of the carries, `block` columns) walks the chunks; the scan is bound by the states it writes ([N+1, D, E]
f32 each). The loads of the next `stages` − 1 chunks are in flight while chunk n is summed, and each boundary state
leaves by a TMA store while the next chunk's products run. A chunk's product is one round of wgmma over fp16 parts
(1 or 3 passes, as the Hopper solve's, `hopper.py`): Ã = T a / σ_a and B̃ = T (w ⊙ b) / σ_b, each scaled by its
max |·| (T = 2^15), and carry += (σ_a σ_b / T²) Ãᵀ B̃ with Ãᵀ read transposed from shared memory. a and the b's
land in their own dtype (16-bit rows of a bf16 model: half the bytes and landing memory) and are converted to f32
as threads load them from their slots.
On an H100 (B=8 T=2048 H=16 D=128, "default"; benchmarks/RESULTS.md), one kernel per scan: the forward's two scans
took 0.53 ms against the Triton kernel's 0.66, the backward's two 0.57 against 0.79, at 64 columns and 3 stages (2
stages: 0.56 / 0.61; 128 columns, 2 stages: 0.53 / 0.62). Two scans in one kernel, in one process on another
H100: forward 0.51 ms against 0.70 for one kernel per scan, reversed 0.77 against 0.67 (timed last; measured once).
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mesa_cg.hopper import (
    COMPILER_PARAMS, F16_TILES, F32_TILES, ROW, ROWS, SHARED_MEMORY, TOP, WGMMA, is_hopper, kernel_rows,
    landing_tiles, max_abs, per_row, split_passes, store_parts, wgmma_sum)
from pallas_kernels.mesa_cg.params import target, use_interpret


def _shared_bytes(block: int, passes: int, stages: int, scans: int, row_bytes: int = 4) -> int:
  """Per CTA: `stages` landing buffers of a chunk's a [64, 64] and b's [64, block] (row_bytes a number: 4 for f32,
  2 for 16-bit rows) and gates [scans + 1, 64] (f32), the fp16 parts of Ã and the B̃'s, one f32 boundary state per
  scan on its way out, and 2 KiB for the barriers and the buffers' alignment."""
  landing = row_bytes * ROWS * (ROWS + scans * block) + 4 * ROWS * (scans + 1)
  parts = 2 * (passes // 2 + 1) * ROWS * (ROWS + scans * block)
  return stages * landing + parts + scans * 4 * ROWS * block + 2048


def default_stages(block: int, passes: int, scans: int, row_bytes: int = 4) -> int | None:
  """Chunks in flight: 3 (fastest measured, one scan on an H100, benchmarks/RESULTS.md) or fewer where shared memory
  is short; None if not even one fits."""
  return next((stages for stages in (3, 2, 1)
               if _shared_bytes(block, passes, stages, scans, row_bytes) <= SHARED_MEMORY), None)


def unsupported_reason(chunk_size: int, key_dim: int, widths: tuple[int, ...], dtype, *, block: int = 64,
                       passes: int = 1, stages: int | None = None, row_bytes: int = 4) -> str | None:
  """Why the Hopper scan cannot take these sizes (widths: the value dim of each scan sharing a; dtype: the carries'),
  or None."""
  if chunk_size != ROWS:
    return f"chunk_size={chunk_size}: the Hopper scan takes 64 (a chunk's tokens are a wgmma's 64-row operand)"
  if key_dim % ROWS or block % ROWS or any(width % block for width in widths):
    return (f"key_dim={key_dim}, value dims {widths}, block={block}: the Hopper scan takes multiples of 64 "
            f"(128-byte fp16 operand rows), the value dims multiples of the block")
  if len(set(widths)) != 1:
    return f"value dims {widths}: scans sharing a kernel take one value dim (one grid)"
  if jnp.dtype(dtype) != jnp.float32:
    return f"dtype={jnp.dtype(dtype)}: the Hopper scan keeps f32 carries (its rows may be f32, bf16 or f16)"
  stages = stages or default_stages(block, passes, len(widths), row_bytes) or 1
  if (needed := _shared_bytes(block, passes, stages, len(widths), row_bytes)) > SHARED_MEMORY:
    return (f"block={block}, {passes} fp16 passes, {stages} stages, {len(widths)} scans need {needed // 1024} KiB of "
            f"shared memory, more than sm_90's {SHARED_MEMORY // 1024}")
  return None


def use_hopper_states(chunk_size: int, key_dim: int, widths: tuple[int, ...], dtype, precision) -> bool:
  """Whether the kernels' target takes these scans in one Hopper kernel (else `states.chunk_states`' Triton kernel,
  one scan each): GPU kernels built for sm_90, a lax.Precision, sizes and dtype as `unsupported_reason` allows at
  the default tiling."""
  return (target() == "gpu" and is_hopper() and isinstance(precision, lax.Precision)
          and unsupported_reason(chunk_size, key_dim, widths, dtype, passes=split_passes(precision)) is None)


def _kernel(*refs, scans: int, reverse: bool, passes: int, stages: int):
  """The CTA of (batch·head, 64 carry rows, `block` carry columns) for every scan. refs: gmem a [N, 64, D], each
  scan's b [N, 64, E], gates [N, scans + 1, 64] (each scan's w per token, then d_n repeated along the row, so that it
  broadcasts over the carry's rows as a per-row value), each scan's initial [D, E]; each scan's bounds [N+1, D, E];
  scratch: landing slots of a, of each b and of the gates, the parts of Ã and of each B̃, each scan's outgoing state,
  and the barriers (one per landing slot and operand)."""
  a_gmem, b_gmems, gates_gmem = refs[0], refs[1:1 + scans], refs[1 + scans]
  initial_gmems, bounds_gmems = refs[2 + scans:2 + 2 * scans], refs[2 + 2 * scans:2 + 3 * scans]
  a_smem, *b_smems, gates_smem = refs[2 + 3 * scans:4 + 4 * scans]
  a_parts, *b_parts = refs[4 + 4 * scans:5 + 5 * scans]
  *out_smems, barriers = refs[5 + 5 * scans:]
  bh, r, j = lax.axis_index("bh"), lax.axis_index("rows"), lax.axis_index("cols")
  num_chunks, block = a_gmem.shape[1], out_smems[0].shape[-1]
  rows, cols = pl.ds(r * ROWS, ROWS), pl.ds(j * block, block)
  chunk = (lambda i: num_chunks - 1 - i) if reverse else (lambda i: i)
  operands = ([(a_gmem, rows, a_smem)] + [(b_gmem, cols, b_smem) for b_gmem, b_smem in zip(b_gmems, b_smems)]
              + [(gates_gmem, slice(None), gates_smem)])

  def fetch(i):  # chunk i's operands into landing slot i % stages
    slot, n = i % stages, chunk(i)
    for o, (gmem, columns, smem) in enumerate(operands):
      plgpu.copy_gmem_to_smem(gmem.at[bh, n, :, columns], smem.at[slot], barriers.at[o, slot])

  for i in range(min(stages, num_chunks)):
    fetch(i)

  def write(carries, boundary):
    for carry, out_smem, bounds_gmem in zip(carries, out_smems, bounds_gmems):
      plgpu.wait_smem_to_gmem(scans - 1, wait_read_only=True)  # this buffer's previous store (the oldest) has read it
      out_smem[...] = carry
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(out_smem, bounds_gmem.at[bh, boundary, rows, cols])

  def stage(x, parts):  # the fp16 parts of T x / σ in `parts`; returns σ
    sigma = max_abs(x)
    store_parts(parts, x * (TOP / sigma), passes)
    return sigma

  def step(i, carries):
    slot, n = i % stages, chunk(i)
    write(carries, n + int(reverse))
    for o in range(len(operands)):
      plgpu.barrier_wait(barriers.at[o, slot])
    load = lambda ref, layout=WGMMA: plgpu.load(ref, layout=layout, optimized=False).astype(jnp.float32)
    sigma_a = stage(load(a_smem.at[slot]), a_parts)
    sigma_b = []
    for p in range(scans):
      b = load(b_smems[p].at[slot])
      sigma_b.append(stage(b * per_row(load(gates_smem.at[slot, p], ROW), b.shape), b_parts[p]))
    decay = load(gates_smem.at[slot, scans], ROW)
    plgpu.commit_smem()  # the parts visible to the wgmma, and every thread done with the landing slot

    @pl.when(i + stages < num_chunks)
    def _():
      fetch(i + stages)

    a_t = [a_parts.at[q].T for q in range(passes // 2 + 1)]
    products = [wgmma_sum([(a_t, lambda q, p=p: b_parts[p].at[q])], carries[p].shape, passes) for p in range(scans)]
    return tuple(per_row(decay, carry.shape) * carry + product * (sigma_a * sigma / TOP ** 2)
                 for carry, product, sigma in zip(carries, products, sigma_b))

  initials = tuple(plgpu.load(gmem.at[bh, rows, cols], layout=WGMMA, optimized=False) for gmem in initial_gmems)
  last = lax.fori_loop(0, num_chunks, step, initials)
  write(last, 0 if reverse else num_chunks)
  plgpu.wait_smem_to_gmem(0)


def hopper_chunk_states(a, bs: tuple, weights: tuple, chunk_decay, initials: tuple, *, reverse: bool = False,
                        precision, block: int = 64, stages: int | None = None) -> tuple:
  """`states.chunk_states(a, b, w, chunk_decay, initial)` for each (b, w, initial) of bs, weights, initials, in one
  Hopper kernel that loads and stages each chunk of a once.

  Args: a: [B, H, N, 64, D]; bs: [B, H, N, 64, E] each (f32, or 16-bit floats: they land as they are and are
  converted as the kernel loads them from its landing slots); weights: [B, H, N, 64] each; chunk_decay: [B, H, N];
  initials: [B, H, D, E] each; reverse: scan from the last chunk to the first. precision: lax.Precision
  (HIGHEST/HIGH: 3 fp16 passes, DEFAULT: 1) or SplitDot(fp16, n). block: carry columns per CTA (64 or 128);
  stages: chunks in flight (None: `default_stages`).
  Returns a tuple of [B, H, N+1, D, E] f32, one per scan: entry n is the carry at the boundary before chunk n
  (reversed: after chunk n − 1, i.e. initial plus chunks ≥ n).
  """
  batch, heads, num_chunks, size, dim = a.shape
  scans, widths = len(bs), tuple(b.shape[-1] for b in bs)
  passes = split_passes(precision)
  a, bs = kernel_rows(a), tuple(map(kernel_rows, bs))
  if len({a.dtype, *(b.dtype for b in bs)}) != 1:  # one landing layout for a and the b's
    a, bs = a.astype(jnp.float32), tuple(b.astype(jnp.float32) for b in bs)
  row_bytes = a.dtype.itemsize
  stages = stages or default_stages(block, passes, scans, row_bytes) or 1
  if (reason := unsupported_reason(size, dim, widths, initials[0].dtype, block=block, passes=passes, stages=stages,
                                   row_bytes=row_bytes)):
    raise ValueError(reason)
  width = widths[0]
  flat = lambda x: x.reshape(batch * heads, *x.shape[2:])
  wide = lambda x: flat(x).astype(jnp.float32)
  decays = jnp.broadcast_to(chunk_decay[..., None], weights[0].shape)
  gates = jnp.stack([*weights, decays], axis=3)  # [B, H, N, scans + 1, 64]
  landing = lambda cols: plgpu.SMEM((stages, size, cols), a.dtype, transforms=landing_tiles(a.dtype))
  parts = lambda cols: plgpu.SMEM((passes // 2 + 1, size, cols), jnp.float16, transforms=F16_TILES)
  scratch = [landing(ROWS), *(landing(block) for _ in bs), plgpu.SMEM((stages, scans + 1, size), jnp.float32),
             parts(ROWS), *(parts(block) for _ in bs),
             *(plgpu.SMEM((ROWS, block), jnp.float32, transforms=F32_TILES) for _ in bs),
             plgpu.Barrier(num_barriers=(scans + 2, stages))]
  out_type = [jax.ShapeDtypeStruct((batch * heads, num_chunks + 1, dim, width), jnp.float32) for _ in bs]
  kernel = plgpu.kernel(
      functools.partial(_kernel, scans=scans, reverse=reverse, passes=passes, stages=stages),
      out_type=out_type, scratch_types=scratch, grid=(batch * heads, dim // ROWS, width // block),
      grid_names=("bh", "rows", "cols"), compiler_params=COMPILER_PARAMS,
      interpret=plgpu.InterpretGPUParams() if use_interpret() else None)
  bounds = kernel(flat(a), *map(flat, bs), wide(gates), *map(wide, initials))
  return tuple(x.reshape(batch, heads, num_chunks + 1, dim, width) for x in bounds)
