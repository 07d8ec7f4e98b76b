"""What the Hopper (sm_90, Pallas Mosaic GPU) kernels share: 64-row warpgroup blocks in the wgmma accumulator layout,
f32 products as 1 or 3 fp16 passes of operands scaled to the top of fp16's range.

`solve_hopper` (the CG solve) and `gradients_hopper` (dk, dv, dβ) are built on these; `solve_hopper`'s docstring
explains the scaling.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from mesanet_jax.ops.chunked import HALF_ROWS
from pallas_kernels.mesa_cg.chunk import SMALLEST_SCALE, SplitDot

ROWS = 64  # systems (and keys) per chunk as the kernel holds them: one wgmma M group
# Every fp16 operand is scaled to max |·| ≤ T = 2^15: the parts of its small entries (lo ≈ 2^-11 hi) stay normal.
TOP = 2.0 ** 15
SHARED_MEMORY = 227 * 1024  # bytes a CTA may take on sm_90
WGMMA = plgpu.Layout.WGMMA
ROW, COL = WGMMA.reduce(1), WGMMA.reduce(0)  # a value per row (system) / per column (feature or key)
F16_TILES = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))  # every wgmma operand: 128-byte rows
# Every f32 array in shared memory goes to or from registers in the WGMMA layout (wgmma reads fp16 parts only): a
# warp's access is one 8 × 8 tile, a thread's two columns one 8-byte word, conflict-free under a 32-byte swizzle. With
# 8 × 32 tiles and a 128-byte swizzle each load or store also swapped register pairs, a select per element (ptxas:
# the two-scan chunk 872 → 803 instructions, its registers 170 → 140; W's load took 32 of a CG step's 40 selects).
F32_TILES = (plgpu.TilingTransform((8, 8)), plgpu.SwizzleTransform(32))
# The kernel orders its own shared memory accesses (commit_smem before a wgmma or TMA reads what threads wrote): Pallas'
# automatic barriers around every shared-memory load and store would put barriers inside the CG loop.
COMPILER_PARAMS = plgpu.CompilerParams(unsafe_no_auto_barriers=True, reduction_scratch_bytes=64)


def split_passes(precision) -> int:
  """fp16 passes per product: 3 ("highest"/"high", f32-accurate) or 1 ("default", TF32-class)."""
  if isinstance(precision, SplitDot) and precision.dtype == jnp.float16:
    return precision.passes
  if precision in (lax.Precision.HIGHEST, lax.Precision.HIGH):
    return 3
  if precision == lax.Precision.DEFAULT:
    return 1
  raise ValueError(f"precision must be a lax.Precision or SplitDot(jnp.float16, 1 | 3) for the Hopper kernels, "
                   f"got {precision!r}")


def is_hopper(device=None) -> bool:
  """Whether `device` (default: the abstract mesh's device when exporting, else JAX's first) is sm_90 (H100, H200):
  wgmma is sm_90a only. An abstract device has no compute capability: its kind decides."""
  device = device or jax.sharding.get_abstract_mesh().abstract_device or jax.devices()[0]
  capability = getattr(device, "compute_capability", None)
  if capability is not None:
    return capability == "9.0"
  return is_hopper_kind(device.device_kind)


def is_hopper_kind(device_kind: str) -> bool:
  """Whether a device kind (e.g. "NVIDIA H200", `jax.Device.device_kind`) names an sm_90 GPU."""
  return device_kind.startswith(("NVIDIA H100", "NVIDIA H200", "NVIDIA H800", "NVIDIA GH200"))


def kernel_rows(x):
  """x as a kernel takes a row operand: as it is if a 16-bit float (`chunked.HALF_ROWS`: the kernel converts it to
  f32 as it loads it, which halves its bytes in global memory), else in f32."""
  return x if x.dtype in HALF_ROWS else x.astype(jnp.float32)


def landing_tiles(dtype):
  """Shared-memory tiling of an array of `dtype` that threads load in the WGMMA layout: F32_TILES for f32, 128-byte
  rows (F16_TILES) for a 16-bit float."""
  return F32_TILES if jnp.dtype(dtype).itemsize == 4 else F16_TILES


def fp16_parts(x, passes: int):
  """fp16(x) and, for 3 passes, fp16(x − fp16(x)), for x already scaled into fp16's range."""
  hi = x.astype(jnp.float16)
  return (hi,) if passes == 1 else (hi, (x - hi.astype(jnp.float32)).astype(jnp.float16))


def store_parts(ref, x, passes: int):
  for i, part in enumerate(fp16_parts(x, passes)):
    ref[i] = part


def stage_scaled(gmem, index: tuple, parts, passes: int, sigma=None):
  """Stages gmem[index] ([R, D] in global memory, f32 or a 16-bit float; R a multiple of 64) in `parts` as the fp16
  parts of T · gmem[index] / σ, loaded in blocks of 64 rows; returns σ. σ: max |gmem[index]| (a scalar, floored), or
  the `sigma` given, a bound on it known beforehand: then each block is stored as it arrives (64 registers a thread
  for any R, and no reduction over the whole array)."""
  load = lambda h: plgpu.load(gmem.at[(*index, pl.ds(ROWS * h, ROWS))], layout=WGMMA, optimized=False).astype(
      jnp.float32)
  count = gmem.shape[len(index)] // ROWS
  if sigma is None:
    blocks = [load(h) for h in range(count)]
    sigma = functools.reduce(jnp.maximum, [max_abs(block) for block in blocks])
  else:
    blocks = map(load, range(count))
  for h, block in enumerate(blocks):
    store_parts(parts.at[:, pl.ds(ROWS * h, ROWS)], block * (TOP / sigma), passes)
  return sigma


def staged_lhs(x, passes: int, staging):
  """The fp16 parts of x as a wgmma left operand: in registers, or (staging, a shared-memory ref) stored there."""
  if staging is None:
    return fp16_parts(x, passes)
  store_parts(staging, x, passes)
  plgpu.commit_smem()
  return [staging.at[i] for i in range(passes // 2 + 1)]


def pass_pairs(passes: int):
  """(a part, b part) of each fp16 product: hi·hi, and for 3 passes lo·hi and hi·lo."""
  return [(0, 0)] if passes == 1 else [(0, 0), (1, 0), (0, 1)]


def wgmma_sum(terms, shape, passes: int):
  """Σ lhs @ rhs over the terms and the fp16 pass pairs, in a fresh f32 accumulator of `shape`. terms: (left
  operand's parts, in registers or staged; right operand's staged part as a function of the part index)."""
  def round_(acc):
    for lhs, rhs in terms:
      for a, b in pass_pairs(passes):
        plgpu.wgmma(acc, lhs[a], rhs(b))
    return acc[...]
  return pl.run_scoped(round_, plgpu.ACC(shape, jnp.float32))


def max_abs(x):
  """max |x| over a whole [64, D] array, floored at SMALLEST_SCALE (a scalar)."""
  return jnp.maximum(jnp.max(jnp.max(jnp.abs(x), axis=1)), SMALLEST_SCALE)


def per_row(v, shape):
  """A per-row [64] value broadcast along the columns of `shape`."""
  return lax.broadcast_in_dim(v, shape, [0])


def per_col(v, shape):
  """A per-column value broadcast along the rows of `shape`."""
  return lax.broadcast_in_dim(v, shape, [1])
