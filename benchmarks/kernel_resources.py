"""Registers, spills and shared memory of the Pallas-Triton kernels on sm_90 (H100/H200), read on a CPU host.

Lowers `mesa_chunked(impl="pallas")` forward and backward for GPU, keeps each kernel's Triton IR, compiles it with
the `triton` pip package for sm_90 and prints what ptxas reports (registers and stack per thread, shared memory) and
what the SASS holds (tensor-core instructions, local-memory loads/stores, inside the kernel's main loop if it has
one). No GPU needed, so a kernel change can be checked for spills before it costs device time. The pip triton is not
the Triton that jaxlib bundles, so the numbers guide; the device's timings decide.

  python -m pip install triton==3.6.0          # any venv; pass it with --triton_python
  python benchmarks/kernel_resources.py --chunk_size=64 --num_warps=8 [--matmul_precision=default]
  python benchmarks/kernel_resources.py --decode --num_warps=8       # the fused decode kernel (tolerance, warm start)
  python benchmarks/kernel_resources.py --gated_delta --head_dim=16 --num_warps=1   # GDN's recurrent kernels

The Triton IR is taken from jax 0.11's Pallas-Triton lowering (`params.triton_irs`, through a private hook).
"""
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
from absl import app, flags

from mesanet_jax.ops import MesaState, mesa_chunked
from pallas_kernels.gated_delta import gated_delta_fused
from pallas_kernels.mesa_cg.decode import mesa_decode_fused
from pallas_kernels.mesa_cg.params import triton_irs

_CHUNK = flags.DEFINE_integer("chunk_size", 64, "C")
_DIM = flags.DEFINE_integer("head_dim", 128, "Dk = Dv")
_WARPS = flags.DEFINE_integer("num_warps", 8, "Triton warps the IR is compiled with")
_PRECISION = flags.DEFINE_enum("matmul_precision", "highest", ["highest", "high", "default"], "of mesa_chunked")
_TRITON_PYTHON = flags.DEFINE_string("triton_python", sys.executable, "a Python that can import triton")
_DECODE = flags.DEFINE_bool("decode", False, "the fused decode kernel (30 steps, tol 1e-4, warm start) instead")
_GATED_DELTA = flags.DEFINE_bool("gated_delta", False, "Gated DeltaNet's recurrent kernels (forward, backward; "
                                 "--chunk_size is their interval) instead")

# Runs under --triton_python: compiles one TTIR file for sm_90, writes the cubin, prints the shared memory.
_COMPILE = """
import sys, triton
from triton.backends.compiler import GPUTarget
kernel = triton.compile(sys.argv[1], target=GPUTarget("cuda", 90, 32), options={"num_warps": int(sys.argv[2])})
open(sys.argv[3], "wb").write(kernel.asm["cubin"])
print(kernel.metadata.shared)
"""


def kernel_irs(chunk_size, dim, precision, decode: bool, gated_delta: bool) -> dict[str, str]:
  """Kernel name -> Triton IR text of every pallas_call in mesa_chunked's forward and backward for GPU, of the
  fused decode kernel (B = 1, H = 6) or of the gated delta rule's forward and backward (B = 1, H = 6, T = 128)."""
  shape = lambda *dims: jax.ShapeDtypeStruct(dims, jnp.float32)
  length = 4 * chunk_size
  args = (shape(1, length, 1, dim), shape(1, length, 1, dim), shape(1, length, 1, dim), shape(1, length, 1),
          shape(1, length, 1), shape(1, dim))
  loss = lambda *a: jnp.sum(mesa_chunked(*a, chunk_size=chunk_size, impl="pallas", matmul_precision=precision)[0])
  fn = jax.grad(loss, argnums=range(6))
  if decode:
    token = (shape(1, 6, dim), shape(1, 6, dim), shape(1, 6, dim), shape(1, 6), shape(1, 6), shape(6, dim))
    args = (*token, MesaState(shape(1, 6, dim, dim), shape(1, 6, dim, dim)), shape(1, 6, dim))
    fn = lambda *a: mesa_decode_fused(*a[:-1], cg_steps=30, tol=1e-4, previous=a[-1], num_warps=_WARPS.value)
  if gated_delta:
    args = (shape(1, 128, 6, dim), shape(1, 128, 6, dim), shape(1, 128, 6, dim), shape(1, 128, 6), shape(1, 128, 6))
    loss = lambda *a: jnp.sum(gated_delta_fused(*a, interval=chunk_size, num_warps=_WARPS.value)[0])
    fn = jax.grad(loss, argnums=range(5))
  return triton_irs(fn, *args)


def sass_counts(sass: str) -> str:
  """Tensor-core and local-memory instruction counts, in the main loop (the widest backward branch) if any."""
  instructions = [(int(a, 16), text) for a, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
  loops = [(int(target, 16), address) for address, text in instructions
           for target in re.findall(r"BRA\s.*?0x([0-9a-f]+)", text) if int(target, 16) < address]
  if loops:
    start, end = max(loops, key=lambda loop: loop[1] - loop[0])
    instructions = [(a, text) for a, text in instructions if start <= a <= end]
  count = lambda pattern: sum(1 for _, text in instructions if re.search(pattern, text))
  where = "main loop" if loops else "kernel"
  return (f"{where}: {len(instructions)} instructions, HGMMA {count(r'HGMMA')} HMMA {count(r'HMMA')} "
          f"LDL {count(r'\bLDL')} STL {count(r'\bSTL')}")


def main(argv):
  del argv
  irs = kernel_irs(_CHUNK.value, _DIM.value, _PRECISION.value, _DECODE.value, _GATED_DELTA.value)
  find_triton = "import triton, os; print(os.path.dirname(triton.__file__))"
  triton_dir = subprocess.run([_TRITON_PYTHON.value, "-c", find_triton], capture_output=True, text=True,
                              check=True).stdout.strip()
  cuobjdump = os.path.join(triton_dir, "backends", "nvidia", "bin", "cuobjdump")
  shape = "decode" if _DECODE.value else f"interval={_CHUNK.value}" if _GATED_DELTA.value else f"C={_CHUNK.value}"
  print(f"{shape} D={_DIM.value} num_warps={_WARPS.value} precision={_PRECISION.value}, sm_90")
  with tempfile.TemporaryDirectory() as tmp:
    for name, ir in sorted(irs.items()):
      source, cubin = os.path.join(tmp, f"{name}.ttir"), os.path.join(tmp, f"{name}.cubin")
      with open(source, "w") as f:
        f.write(ir)
      shared = subprocess.run([_TRITON_PYTHON.value, "-c", _COMPILE, source, str(_WARPS.value), cubin],
                              capture_output=True, text=True, check=True).stdout.strip()
      usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
      registers = re.search(r"REG:(\d+) STACK:(\d+)", usage)
      sass = subprocess.run([cuobjdump, "--dump-sass", cubin], capture_output=True, text=True).stdout
      print(f"{name:<28} registers {registers.group(1):>3}  stack {registers.group(2):>5} B  "
            f"shared {int(shared) // 1024:>3} KiB  {sass_counts(sass)}")


if __name__ == "__main__":
  app.run(main)
