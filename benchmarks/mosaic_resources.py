"""Registers, spills and shared memory of the Hopper kernels (Pallas Mosaic GPU) on sm_90a, read on a CPU host.

jaxlib compiles a Mosaic GPU kernel to PTX inside the CUDA plugin, which needs a GPU. This script takes the kernel's
MLIR as Mosaic GPU's Python lowering leaves it (before serialization), lowers it with upstream MLIR's own passes (the
pipeline of jaxlib's mosaic_gpu custom call, minus its private passes), compiles the PTX with ptxas and disassembles
it, and prints what ptxas reports (registers, stack, spills), the shared memory the kernel asks for and, for the CG
loop, its instruction mix per step. Another LLVM than jaxlib's builds the PTX and a few
spellings of jaxlib's newer MLIR are patched, so the numbers guide; the device's decide (the first layout's C=64
"highest": 255 registers, 1648 B spill stores here, 1828 B on an H200).

  apt-get install mlir-22-tools llvm-22                       # Debian: mlir-opt 22 with the NVPTX target
  python -m pip install nvidia-cuda-nvcc-cu12 nvidia-cuda-nvdisasm  # ptxas, libdevice, nvdisasm
  python benchmarks/mosaic_resources.py --chunk_size=64 --head_dim=128 --matmul_precision=default --cg_tol=0
  ... --mosaic_kernels=states,states_shared   # the chunk-state scan, one scan or two sharing a (forward)
  ... --mosaic_kernels=gradients,gradients_handed_on   # the token gradients, without / with ⟨D, S⟩
  ... --mosaic_kernels=rows_read,rows_adjoint   # the forward's solve making o after it, the adjoint's u before it
"""
import collections
import functools
import importlib.util
import os
import re
import subprocess
import tempfile
from unittest import mock

import jax
import jax.numpy as jnp
from absl import app, flags
from jax.experimental.mosaic.gpu import core as mosaic_core

from benchmarks.solve_bench import KERNELS
from mesanet_jax.ops.operator import BoundaryStates
from pallas_kernels.mesa_cg.gradients_hopper import hopper_chunk_gradients
from pallas_kernels.mesa_cg.params import export_for
from pallas_kernels.mesa_cg.states_hopper import hopper_chunk_states

# chunk_size, head_dim, matmul_precision, cg_init: ops_bench's flags; cg_tol (0: fixed steps): solve_bench's.
FLAGS = flags.FLAGS
_KERNELS = flags.DEFINE_string("mosaic_kernels", "rows,rows_smem", "Mosaic GPU solves (solve_bench's names), or "
                               "states / states_shared: the chunk-state scan, one scan or two sharing a, or "
                               "gradients / gradients_handed_on: the token gradients, without / with ⟨D, S⟩, or "
                               "rows_read / rows_adjoint: the solve making o = H_kvᵀx after its loop (read, token-"
                               "major q and o, no x: the forward) / its right-hand side u = H_kv·do first (rhs_read)")
SCANS = {"states": 1, "states_shared": 2}
GRADIENTS = {"gradients": False, "gradients_handed_on": True}  # name -> whether the states go in
_ROW_DTYPE = flags.DEFINE_enum("row_dtype", "float32", ["float32", "bfloat16"], "dtype of the rows (a solve's rhs and "
                                "k, a scan's a and b's) as the kernels take them")
_MLIR_BIN = flags.DEFINE_string("mlir_bin", "/usr/lib/llvm-22/bin", "folder of mlir-opt")
_NVIDIA = flags.DEFINE_string("nvidia", "", "folder of the pip `nvidia` packages (default: found by import)")

_PIPELINE = ("builtin.module(arith-expand,canonicalize,gpu-launch-sink-index-computations,convert-nvgpu-to-nvvm,"
             "gpu-kernel-outlining,convert-vector-to-scf{target-rank=1},convert-scf-to-cf,convert-nvvm-to-llvm,"
             "expand-strided-metadata,nvvm-attach-target{O=3 chip=sm_90a features=+ptx80 "
             "triple=nvptx64-nvidia-cuda l=LIBDEVICE},lower-affine,convert-arith-to-llvm,"
             "convert-index-to-llvm{index-bitwidth=64},canonicalize,cse,gpu.module(strip-debuginfo),"
             "gpu.module(convert-gpu-to-nvvm{index-bitwidth=64}),gpu.module(convert-vector-to-llvm),"
             "gpu.module(canonicalize),gpu.module(cse),gpu.module(reconcile-unrealized-casts),"
             "gpu-module-to-binary{format=isa})")


def kernel_call(name: str) -> tuple:
  """(function, abstract args) of the solve or scan `name` at the flags' sizes."""
  size, dim = FLAGS.chunk_size, FLAGS.head_dim
  rows = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)
  row_dtype = jnp.dtype(_ROW_DTYPE.value)
  precision = jax.lax.Precision(FLAGS.matmul_precision)
  if name in GRADIENTS:  # k, v, x, y, do, G, β, the state gradients (and the states) at 5 boundaries
    bounds = [rows(1, 2, 5, dim, dim)] * (4 if GRADIENTS[name] else 2)
    gradients = lambda *a: hopper_chunk_gradients(*a[:9], precision=precision,
                                                  states=BoundaryStates(*a[9:]) if GRADIENTS[name] else None)
    return gradients, (rows(1, 2, 4, size, dim, dtype=row_dtype), rows(1, 2, 4, size, dim, dtype=row_dtype),
                       *(rows(1, 2, 4, size, dim) for _ in range(3)), rows(1, 2, 4, size), rows(1, 2, 4, size),
                       *bounds)
  if name in ("rows_read", "rows_adjoint"):  # q token-major or do, k, G, β, λ, Sᵀ, v, S_kv (Dv = Dk)
    forward = name == "rows_read"
    solve = lambda rhs, k, g, b, lam, s_kk_t, v, s_kv: KERNELS["rows"](
        rhs, k, g, b, lam, s_kk_t, cg_steps=30, cg_init=FLAGS.cg_init, cg_tol=FLAGS.cg_tol or None, precision=precision,
        **({"read": (v, s_kv), "solution": False, "token_major": True} if forward else {"rhs_read": (v, s_kv)}))
    rhs = rows(1, 3 * size, 2, dim, dtype=row_dtype) if forward else rows(1, 2, 3, size, dim)
    return solve, (rhs, rows(1, 2, 3, size, dim, dtype=row_dtype), rows(1, 2, 3, size), rows(1, 2, 3, size),
                   rows(2, dim), rows(1, 2, 4, dim, dim), rows(1, 2, 3, size, dim, dtype=row_dtype),
                   rows(1, 2, 4, dim, dim))
  if name in SCANS:
    each = lambda *shape, dtype=jnp.float32: tuple(rows(*shape, dtype=dtype) for _ in range(SCANS[name]))
    scan = functools.partial(hopper_chunk_states, precision=precision)
    return scan, (rows(1, 2, 4, size, dim, dtype=row_dtype), each(1, 2, 4, size, dim, dtype=row_dtype),
                  each(1, 2, 4, size), rows(1, 2, 4), each(1, 2, dim, dim))
  solve = functools.partial(KERNELS[name], cg_steps=30, cg_init=FLAGS.cg_init, cg_tol=FLAGS.cg_tol or None,
                            precision=precision)
  return solve, (rows(1, 2, 3, size, dim, dtype=row_dtype), rows(1, 2, 3, size, dim, dtype=row_dtype),
                 rows(1, 2, 3, size), rows(1, 2, 3, size), rows(2, dim), rows(1, 2, 4, dim, dim))


def kernel_modules(name: str) -> list[str]:
  """Generic-form MLIR of every Mosaic GPU kernel in the solve or scan `name` at the flags' sizes, as lowered for
  CUDA."""
  modules = []
  serialize = mosaic_core._run_serde_pass

  def keep(module, **kwargs):
    modules.append(module.operation.get_asm(enable_debug_info=False, print_generic_op_form=True))
    return serialize(module, **kwargs)

  function, args = kernel_call(name)
  with mock.patch.object(mosaic_core, "_run_serde_pass", keep):
    export_for("gpu", function, *args)
  return modules


def upstream_mlir(text: str) -> str:
  """jaxlib's newer spellings as MLIR 22 reads them; the kernel's parameter block (passed byval by a private pass)
  as the host pointer it is loaded from."""
  text = text.replace("!mosaic_gpu.barrier", "i64")
  text = re.sub(r'"gpu\.barrier"\(\) <\{scope = [^}]*\}>', '"gpu.barrier"()', text)
  text = re.sub(r"#(gpu|nvvm)\.(dim|shfl_kind)<([a-z_0-9]+)>", r"#\1<\2 \3>", text)
  text = text.replace("array<i32: 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 0>", "array<i32: 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1>")
  block = re.search(r'(%\d+) = "llvm.alloca"\(%\d+\) <\{alignment = 64 : i64, elem_type = (!llvm.array<\d+ x i8>)\}> '
                    r'\{mosaic_gpu_smem_alloc\}', text)
  if block:
    pointer, array = block.groups()
    text = re.sub(r'(%\d+) = "builtin.unrealized_conversion_cast"\(%\d+\) : \(' + re.escape(array) + r'\) -> !llvm.ptr',
                  lambda m: f'{m.group(1)} = "llvm.getelementptr"({pointer}) <{{elem_type = i8, rawConstantIndices = '
                            'array<i32: 0>}> : (!llvm.ptr) -> !llvm.ptr', text)
  return text


def shared_memory_bytes(text: str) -> int:
  """The dynamic shared memory of the module's gpu.launch."""
  size = re.search(r'"gpu.launch"\((?:%\w+, ){7}(%\w+)\)', text).group(1)
  return int(re.search(rf'{size} = "arith.constant"\(\) <\{{value = (\d+)', text).group(1))


def loop_mix(sass: str, loop: str) -> str:
  """Instruction count and mix of the innermost loop around wgmma (the shortest backward branch around HGMMA: a
  solve's CG step, a scan's chunk) of a SASS listing, named `loop`."""
  instructions, labels, label = [], {}, None
  for line in sass.splitlines():
    if m := re.match(r"\s*\.(L_x_\d+):", line):
      label = m.group(1)
    elif m := re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line):
      instructions.append((int(m.group(1), 16), m.group(2)))
      if label:
        labels[label], label = instructions[-1][0], None
  loops = [(labels[m.group(1)], address) for address, text in instructions
           if (m := re.search(r"BRA.*`\(\.(L_x_\d+)\)", text)) and labels.get(m.group(1), address) < address]
  opcodes = lambda start, end: [re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]
                                for address, text in instructions if start <= address <= end]
  loops = [loop for loop in loops if "HGMMA" in opcodes(*loop)]
  if not loops:
    return "no loop with wgmma"
  body = opcodes(*min(loops, key=lambda bounds: bounds[1] - bounds[0]))  # the innermost: one warpgroup's loop
  mix = collections.Counter(body)
  keys = ("HGMMA", "LDL", "STL", "BAR", "SHFL", "LDS", "STS", "STSM", "FFMA", "FMUL", "FMNMX", "MUFU")
  return f"{loop}: {len(body)} instructions per iteration; " + ", ".join(f"{k} {mix[k]}" for k in keys if mix[k])


def compile_module(text: str, tools: dict, folder: str, loop: str) -> str:
  path = lambda suffix: os.path.join(folder, f"kernel.{suffix}")
  with open(path("mlir"), "w") as f:
    f.write(upstream_mlir(text))
  pipeline = _PIPELINE.replace("LIBDEVICE", tools["libdevice"])
  subprocess.run([tools["mlir-opt"], "--allow-unregistered-dialect", f"--pass-pipeline={pipeline}", path("mlir"),
                  "-o", path("lowered")], check=True)
  lowered = open(path("lowered")).read()
  ptx = re.search(r'assembly = "(.*?)"', lowered, re.S).group(1)
  ptx = re.sub(r"\\([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), ptx)
  with open(path("ptx"), "w") as f:
    f.write(ptx)
  report = subprocess.run([tools["ptxas"], "-arch=sm_90a", "-v", "-O3", path("ptx"), "-o", path("cubin")],
                          check=True, capture_output=True, text=True).stderr
  lines = [line.strip() for line in report.splitlines() if re.search(r"spill|registers|Performance|warning", line)]
  sass = subprocess.run([tools["nvdisasm"], "-c", path("cubin")], check=True, capture_output=True, text=True).stdout
  return "\n  ".join(lines + [loop_mix(sass, loop)])


def tools() -> dict:
  nvidia = _NVIDIA.value or os.path.dirname(importlib.util.find_spec("nvidia").submodule_search_locations[0] + "/")
  find = lambda *names: next(os.path.join(root, name) for root, _, files in os.walk(nvidia) for name in names
                             if name in files)
  return {"mlir-opt": os.path.join(_MLIR_BIN.value, "mlir-opt"), "ptxas": find("ptxas"),
          "nvdisasm": find("nvdisasm"), "libdevice": find("libdevice.10.bc")}


def main(argv):
  del argv
  paths = tools()
  print(f"C={FLAGS.chunk_size} Dk={FLAGS.head_dim} {FLAGS.matmul_precision} cg_init={FLAGS.cg_init} "
        f"cg_tol={FLAGS.cg_tol:g}")
  for name in _KERNELS.value.split(","):
    for text in kernel_modules(name):
      with tempfile.TemporaryDirectory() as folder:
        loop = "chunk loop" if name in SCANS else "CG loop"
        print(f"{name}: {shared_memory_bytes(text)} B shared memory\n  {compile_module(text, paths, folder, loop)}",
              flush=True)


if __name__ == "__main__":
  app.run(main)
