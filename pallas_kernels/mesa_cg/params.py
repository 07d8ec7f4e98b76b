"""Per-backend choices for the Mesa CG kernels: interpret mode on CPU, Triton on GPU, Mosaic on TPU."""
import contextlib
import contextvars
import re
from unittest import mock

import jax
import jax.numpy as jnp
from jax import export, lax
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.mesa_cg.chunk import SplitDot

_TARGET = contextvars.ContextVar("mesa_cg_target", default=None)


def target() -> str:
  """The backend the kernels are built for: JAX's default backend, unless inside `lowering_for`."""
  return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def _scoped(variable: contextvars.ContextVar, value):
  """`variable` set to `value` inside the block."""
  token = variable.set(value)
  try:
    yield
  finally:
    variable.reset(token)


def lowering_for(backend: str):
  """Builds the kernels traced inside for `backend` ("gpu" or "tpu") on any host, e.g. to `jax.export` them for
  another platform from a CPU host. Trace inside the block: JAX may reuse a trace made outside it for the same
  shapes."""
  return _scoped(_TARGET, backend)


_EMULATE_GPU_DOTS = contextvars.ContextVar("mesa_cg_emulate_gpu_dots", default=False)


def emulating_gpu_dots():
  """Interpret mode (CPU) computes the kernels' f32 products as the GPU kernels do at each precision, so that a CPU
  run shows the GPU's accuracy: the fp16 splits as they are; "high"'s three bf16 passes (a DotAlgorithmPreset, which
  XLA:CPU computes in f32) as `SplitDot` bf16 parts, the same ~16 bits. Trace inside the block, as for
  `lowering_for`."""
  return _scoped(_EMULATE_GPU_DOTS, True)


# Per kernel backend: the jax.export platform and the custom call that carries a kernel there.
EXPORT_PLATFORMS = {"gpu": ("cuda", "__gpu$xla.gpu.triton"), "tpu": ("tpu", "tpu_custom_call")}


def export_for(backend: str, fn, *args, mesh_axes: tuple[str, ...] = ()):
  """`jax.export` of jit(fn)(*args) for `backend` ("gpu" or "tpu") from any host, with the kernels built for it.

  The Triton lowering asks for the GPU's compute capability: an abstract H200 names one, on an abstract mesh whose
  axes are `mesh_axes`, each of size 1: () traces fn as a program without a mesh (as the MAD populations run);
  `mesanet_jax.sharding.MESH_AXES` as the trainer's one-device mesh (Pallas calls then go through `per_shard`). The
  kernels' custom calls are allowed through export's safety check (they are this package's own).
  """
  platform, custom_call = EXPORT_PLATFORMS[backend]
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
  mesh = jax.sharding.AbstractMesh((1,) * len(mesh_axes), tuple(mesh_axes),
                                   (jax.sharding.AxisType.Auto,) * len(mesh_axes), abstract_device=device)
  with lowering_for(backend), jax.sharding.use_abstract_mesh(mesh):
    return export.export(jax.jit(fn), platforms=[platform],
                         disabled_checks=[export.DisabledSafetyCheck.custom_call(custom_call)])(*args)


def triton_irs(fn, *args) -> dict[str, str]:
  """Kernel name -> Triton IR text of every Pallas-Triton kernel in jit(fn)(*args), as exported for an (abstract) H200:
  what the kernels hand to Triton's compiler (dot operand types, loops), read on any host. Through jax 0.11's private
  hook `lower_jaxpr_to_triton_module`."""
  from jax._src.pallas.triton import pallas_call_registration
  lowering = pallas_call_registration.lowering
  lower, irs = lowering.lower_jaxpr_to_triton_module, {}

  def keep(*lower_args, **lower_kwargs):
    result = lower(*lower_args, **lower_kwargs)
    text = result.module.operation.get_asm(enable_debug_info=False)
    irs[re.search(r"tt\.func public @(\w+)", text).group(1)] = text
    return result

  with mock.patch.object(lowering, "lower_jaxpr_to_triton_module", keep):
    export_for("gpu", fn, *args)
  return irs


def use_interpret() -> bool:
  """Pallas has no CPU lowering: on a CPU-only host the kernels run in interpret mode."""
  return target() == "cpu"


def default_warps(chunk_size: int, width: int) -> int:
  """Triton warps for a program whose row blocks are [C, width] (width: its widest row, Dk or Dv) and whose masks
  are [C, C]: one warp per 1,024 elements of the larger, 1 to 8. Measured on an H200 (benchmarks/RESULTS.md, solve
  kernel sweeps): at Dk = 128, 4 for C = 32 and 8 for C = 64; at Dk = 16, 1 for C = 16 and 32 (2x faster than 4) and
  4 for C = 64."""
  return max(1, min(8, chunk_size * max(chunk_size, width) // 1024))


def compiler_params(chunk_size: int, width: int, num_warps: int | None = None, num_stages: int = 1, *,
                    grid_rank: int = 2):
  """Explicit compiler params for the target backend (the GPU lowering is chosen by their type: Triton); num_warps
  defaults to `default_warps(chunk_size, width)`; every one of the grid's `grid_rank` axes is parallel."""
  backend = target()
  if backend == "gpu":
    return pltriton.CompilerParams(num_warps=num_warps or default_warps(chunk_size, width), num_stages=num_stages)
  if backend == "tpu":
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * grid_rank)
  return None


def decode_compiler_params(num_warps: int | None = None):
  """Compiler params of the decode kernel (`decode.py`, a 1-D grid over batch·heads). num_warps defaults to 8: the
  [Dk, Dk] state tile stays in registers through the CG loop (64 f32 per thread at Dk = 128)."""
  backend = target()
  if backend == "gpu":
    return pltriton.CompilerParams(num_warps=num_warps or 8, num_stages=1)
  if backend == "tpu":
    return pltpu.CompilerParams(dimension_semantics=("parallel",))
  return None


def state_scan_tiling(key_dim: int, value_dim: int) -> tuple[int, int, int | None, int]:
  """(key-dim block, value-dim block, Triton warps, pipeline stages) of one chunk-state scan program
  (`states.chunk_states`). The scan over chunks is sequential, so smaller tiles give more programs. On GPU: tiles of
  at most 64 × 64, one warp per 1,024 carry entries (4 at 64 × 64, 1 for the MAD heads' 16 × 16), loads 3 chunks
  ahead; the forward's two scans took 0.57-0.60 ms against 0.78 ms with 128 × 64 tiles, 8 warps and no pipelining
  (H200, B=8 T=2048 H=16 D=128, C=64, "default"; at B=2 T=8192, 0.62-0.78 against 1.09 ms; benchmarks/RESULTS.md).
  TPU blocks are the full dim or multiples of 128."""
  if target() == "tpu":
    return key_dim, min(value_dim, 128), None, 1
  rows, columns = min(key_dim, 64), min(value_dim, 64)
  return rows, columns, max(1, min(8, rows * columns // 1024)), 3


def tile_size_reason(name: str, size: int) -> str | None:
  """Why a Triton kernel cannot take `size` as a block dimension, or None: tiles must be powers of two and dots at
  least 16."""
  if size < 16 or size & (size - 1):
    return f"{name}={size}: the Pallas kernels need powers of two >= 16 (Triton tile and dot sizes)"
  return None


def unsupported_reason(chunk_size: int, key_dim: int, value_dim: int) -> str | None:
  """Why the kernels cannot take these sizes, or None (`tile_size_reason` of each)."""
  reasons = (tile_size_reason(name, size)
             for name, size in (("chunk_size", chunk_size), ("key_dim", key_dim), ("value_dim", value_dim)))
  return next((reason for reason in reasons if reason), None)


# On GPU, Triton runs a true f32 dot on CUDA cores, 50-100x slower than tensor cores here, and its three-pass TF32
# dot needs more shared memory than an H200 has at C=64, Dk=128. The kernels instead split every f32 operand into fp16
# parts after scaling it to max |·| = 1 (`chunk.SplitDot`; fp16 has 11 mantissa bits, bf16 8, at the same tensor-core
# rate). Measured on an H200 (benchmarks/RESULTS.md, solve kernel, error vs the true-f32 CG): three fp16 passes 2.4e-7
# (three bf16 passes: 1.7e-6) at the same speed; one fp16 pass 7.0e-5, as accurate as one TF32 pass (7.1e-5) and 2.2x
# faster. "high" (JAX's bf16_3x) is Triton's own three bf16 passes: bf16 keeps f32's exponent range, so no operand is
# scaled, which at the MAD heads' Dk = 16 is most of a CG step's work: the solve's SASS issues 745 instructions a step
# instead of 1,054 at C = 32 (304 instead of 433 at C = 16; `kernel_resources.py --matmul_precision=high`), at
# 1.7e-6 instead of 2.4e-7 a product (the whole op at Dk = 16, `emulating_gpu_dots`: 9.6e-6 instead of 5.5e-7 of the
# exact solve). The Hopper kernels (fp16 wgmma) run three fp16 passes for it, as for "highest".
# Interpret mode (CPU) and Mosaic TPU take lax.Precision as is.
_GPU_SPLITS = {
    lax.Precision.HIGHEST: SplitDot(jnp.float16, 3),
    lax.Precision.HIGH: lax.DotAlgorithmPreset.BF16_BF16_F32_X3,
    lax.Precision.DEFAULT: SplitDot(jnp.float16, 1),
}


def dot_precision(precision: lax.Precision | lax.DotAlgorithmPreset | SplitDot, dtype):
  """The in-kernel dot precision for `mesa_chunked`'s matmul_precision, for f32 (or f64) operands: on the GPU (and in
  interpret mode inside `emulating_gpu_dots`) the GPU kernels' products for the lax.Precision (`_GPU_SPLITS`).

  A DotAlgorithmPreset or SplitDot passes through unchanged (benchmarks use them to compare algorithms); f64 keeps
  its precision.
  """
  if isinstance(precision, lax.Precision) and dtype == jnp.float32:
    if target() == "gpu":
      return _GPU_SPLITS[precision]
    if _EMULATE_GPU_DOTS.get():
      split = _GPU_SPLITS[precision]
      return SplitDot(jnp.bfloat16, 3) if split == lax.DotAlgorithmPreset.BF16_BF16_F32_X3 else split
  return precision
