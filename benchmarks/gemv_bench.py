"""The decode projections (one token's x [M, K] times a kernel, M = batch) in the layouts decoding could store:
XLA's product against W [K, N] (as `nnx.Linear` stores it) and against W [N, K] (`layers/fused_linear.py`'s decode
layout), and a Pallas (Triton) kernel over column blocks of W [K, N] (tensor-core dots of M padded to 16, or for M=1
multiply-and-reduce on the vector units) at several block sizes. Device time per product from the profiler
(`gpu_profile.kernel_times`, every kernel a variant launches, padding included); errors against an f32 product.

  python -m benchmarks.gemv_bench                       # fla's ~125M decode shapes, M = 1 and 32 (GPU)

On a CPU host the Pallas kernels run in interpret mode and no device time is recorded: `--check_only` prints the
errors alone (the test).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from benchmarks.gpu_profile import kernel_times
from pallas_kernels.mesa_cg.params import use_interpret

_SHAPES = flags.DEFINE_list("shapes", ["768x3072", "768x4608", "2304x768", "768x768", "768x32000"],
                            "kernels KxN: the Mesa inputs group, the MLP branches, MLP down, output projection, read-out")
_ROWS = flags.DEFINE_list("rows", ["1", "32"], "M: tokens per step (the batch)")
_BLOCKS = flags.DEFINE_list("blocks", ["32", "64", "128"], "Pallas column blocks")
_WARPS = flags.DEFINE_list("warps", ["4", "8"], "Pallas num_warps")
_CALLS = flags.DEFINE_integer("calls", 50, "products per profile")
_CHECK_ONLY = flags.DEFINE_bool("check_only", False, "errors only (CPU)")


def _compiler_params(warps: int):
  return None if use_interpret() else pltriton.CompilerParams(num_warps=warps, num_stages=3)


def pallas_dot(x, w, *, block: int, warps: int):
  """x [M, K] @ w [K, N] by column blocks, the rows padded to a multiple of 16 (Triton's smallest dot)."""
  (m, k), n = x.shape, w.shape[1]
  rows, step = -(-m // 16) * 16, 128 if k % 128 == 0 else 64
  padded = jnp.zeros((rows, k), x.dtype).at[:m].set(x)

  def kernel(x_ref, w_ref, o_ref):
    def body(i, acc):
      part = pl.ds(i * step, step)
      return acc + jnp.dot(x_ref[:, part], w_ref[part, :], preferred_element_type=jnp.float32)
    o_ref[...] = lax.fori_loop(0, k // step, body, jnp.zeros((rows, block), jnp.float32)).astype(o_ref.dtype)
  return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((rows, n), x.dtype), grid=(n // block,),
                        in_specs=[pl.BlockSpec((rows, k), lambda j: (0, 0)), pl.BlockSpec((k, block), lambda j: (0, j))],
                        out_specs=pl.BlockSpec((rows, block), lambda j: (0, j)), interpret=use_interpret(),
                        compiler_params=_compiler_params(warps))(padded, w)[:m]


def pallas_vector(x, w, *, block: int, warps: int):
  """x [1, K] @ w [K, N] by column blocks as f32 multiply-and-reduce (x passed as a column: no in-kernel transpose)."""
  k, n = w.shape
  step = 128 if k % 128 == 0 else 64

  def kernel(x_ref, w_ref, o_ref):
    def body(i, acc):
      part = pl.ds(i * step, step)
      products = x_ref[part, :].astype(jnp.float32) * w_ref[part, :].astype(jnp.float32)
      return acc + jnp.sum(products, axis=0, keepdims=True)
    o_ref[...] = lax.fori_loop(0, k // step, body, jnp.zeros((1, block), jnp.float32)).astype(o_ref.dtype)
  return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((1, n), x.dtype), grid=(n // block,),
                        in_specs=[pl.BlockSpec((k, 1), lambda j: (0, 0)), pl.BlockSpec((k, block), lambda j: (0, j))],
                        out_specs=pl.BlockSpec((1, block), lambda j: (0, j)), interpret=use_interpret(),
                        compiler_params=_compiler_params(warps))(x.reshape(k, 1), w)


def variants(rows: int, n: int):
  """name -> (product of x and the kernel in its layout, whether it takes W [N, K])."""
  found = {"xla W[K,N]": (jnp.dot, False),
           "xla W[N,K]": (lambda x, wt: lax.dot_general(x, wt, (((1,), (1,)), ((), ()))), True)}
  for block in map(int, _BLOCKS.value):
    for warps in map(int, _WARPS.value):
      if n % block == 0:
        found[f"pallas dot block={block} warps={warps}"] = (functools.partial(pallas_dot, block=block, warps=warps),
                                                             False)
        if rows == 1:
          found[f"pallas vector block={block} warps={warps}"] = (
              functools.partial(pallas_vector, block=block, warps=warps), False)
  return found


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  for shape in _SHAPES.value:
    k, n = map(int, shape.split("x"))
    w = jnp.asarray(rng.normal(size=(k, n)) / np.sqrt(k), jnp.bfloat16)
    layouts = {False: w, True: jnp.asarray(np.asarray(w).T)}
    megabytes = k * n * 2 / 1e6
    for rows in map(int, _ROWS.value):
      x = jnp.asarray(rng.normal(size=(rows, k)), jnp.bfloat16)
      reference = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision="highest")
      lines = []
      for name, (product, transposed) in variants(rows, n).items():
        fn, kernel = jax.jit(product), layouts[transposed]
        y = fn(x, kernel).astype(jnp.float32)
        error = float(jnp.max(jnp.abs(y - reference)) / jnp.max(jnp.abs(reference)))
        if _CHECK_ONLY.value:
          lines.append((0.0, f"  error {error:.1e}  {name}"))
          continue
        times = kernel_times(lambda: [fn(x, kernel) for _ in range(_CALLS.value)])
        us = times.device_s / _CALLS.value * 1e6
        lines.append((us, f"  {us:7.2f} µs {megabytes / us:5.2f} TB/s  error {error:.1e}  "
                          f"{times.launches / _CALLS.value:.0f} kernels  {name}"))
      print(f"K={k} N={n} M={rows} ({megabytes:.1f} MB)")
      print("\n".join(line for _, line in sorted(lines)), flush=True)


if __name__ == "__main__":
  app.run(main)
