"""Device: the Hopper CG solve (Pallas Mosaic GPU) next to the Triton-path solve kernel, on the inputs' own states.

One process, identical f32 inputs (q as right-hand sides, unit keys, the chunk start states of the XLA path). Per
chunk size and precision: ms (median), tensor-core TFLOP/s of the matvecs (per step and chunk 2·C·Dk² + 4·C²·Dk,
times the fp16 passes: 3 for "highest", 1 for "default"), and max |x − x_xla| / max |x_xla| against the f32
"highest" XLA CG of the same steps; then, at the first chunk size, the Hopper solve with a tolerance (steps taken,
mean and max). A kernel that fails to compile or run is reported in one line here and in full in --error_log, and the
rest goes on. With MOSAIC_GPU_DUMP_PTXAS=1 in the environment ptxas reports each Mosaic kernel's registers and spills.

  python benchmarks/solve_bench.py --batch=8 --length=2048 --heads=16 --head_dim=128 --chunks=64,32 --cg_steps=30
"""
import functools
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.ops_bench import make_inputs, time_ms
from mesanet_jax.ops.chunked import operator_class
from mesanet_jax.ops.inputs import zero_state
from pallas_kernels.mesa_cg import chunked_cg_solve
from pallas_kernels.mesa_cg.solve_hopper import hopper_cg_solve

flags.DEFINE_string("chunks", "64,32", "chunk sizes, in this order")
flags.DEFINE_string("kernels", "hopper,triton", "solve kernels to time, in this order")
flags.DEFINE_string("precisions", "highest,default", "matmul precisions")
flags.DEFINE_float("hopper_tol", 1e-4, "tolerance of one more Hopper run at the first chunk size and precision (0: none)")
flags.DEFINE_string("error_log", "", "file for the full tracebacks of kernels that failed (default: stderr)")
FLAGS = flags.FLAGS
PASSES = {"highest": 3, "high": 3, "default": 1}


def chunk_major(q, k, g, beta, chunk_size):
  """[B, T, H, ...] f32 -> [B, H, N, C, ...]; g as the within-chunk cumulative log decay."""
  batch, length, heads = q.shape[:3]
  chunks = lambda x: jnp.moveaxis(x.astype(jnp.float32), 2, 1).reshape(batch, heads, length // chunk_size,
                                                                       chunk_size, *x.shape[3:])
  return chunks(q), chunks(k), jnp.cumsum(chunks(g), axis=-1), chunks(beta)


def log_failure(name, error):
  print(f"{name}: FAILED {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}",
        flush=True)
  text = f"===== {name}\n{''.join(traceback.format_exception(error))}\n"
  if FLAGS.error_log:
    with open(FLAGS.error_log, "a") as f:
      f.write(text)
  else:
    sys.stderr.write(text)


def solution(out):
  """x of a solve that returns x or (x, steps)."""
  return out[0] if isinstance(out, (tuple, list)) else out


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def bench_chunk_size(inputs, chunk_size, rows, with_tol):
  q, k, v, g, beta, lam = inputs
  q, k, log_decay, beta = chunk_major(q, k, g, beta, chunk_size)
  batch, heads, num_chunks, _, dim = q.shape
  highest = jax.lax.Precision.HIGHEST
  op = jax.jit(lambda *a: operator_class("xla").build(*a, highest))(
      k, k, log_decay, beta, lam, zero_state(batch, heads, dim, dim))
  reference = np.asarray(jax.jit(lambda op, q: op.solve(q, FLAGS.cg_steps, FLAGS.cg_init, None)[0])(op, q))
  operands = (q, k, log_decay, beta, lam, op.states.kk_t)
  del op
  flop_per_pass = batch * heads * num_chunks * FLAGS.cg_steps * (2 * chunk_size * dim ** 2 + 4 * chunk_size ** 2 * dim)
  kernels = {"hopper": hopper_cg_solve, "triton": chunked_cg_solve}
  solutions = {}
  for precision in FLAGS.precisions.split(","):
    for kernel in FLAGS.kernels.split(","):
      name = f"{kernel} C={chunk_size} {precision}"
      solve = jax.jit(functools.partial(kernels[kernel], cg_steps=FLAGS.cg_steps, cg_init=FLAGS.cg_init,
                                        precision=jax.lax.Precision(precision)))
      try:
        start = time.perf_counter()
        x = np.asarray(solution(solve(*operands)))
        first = time.perf_counter() - start  # compile and first run
        ms = time_ms(solve, *operands)
      except Exception as error:  # a kernel that does not compile or run: report it, go on with the rest
        log_failure(name, error)
        continue
      solutions[kernel, precision] = x
      tflops = flop_per_pass * PASSES[precision] / ms / 1e9
      row = (name, ms, tflops, rel(x, reference))
      rows.append(row)
      print(f"{row[0]:<24} {ms:9.3f} ms {tflops:8.1f} TFLOP/s  err vs XLA {row[3]:.1e}  (compile+run {first:.0f} s)",
            flush=True)
    if ("hopper", precision) in solutions and ("triton", precision) in solutions:
      print(f"hopper vs triton C={chunk_size} {precision}: "
            f"{rel(solutions['hopper', precision], solutions['triton', precision]):.1e}", flush=True)
  if with_tol:
    precision = FLAGS.precisions.split(",")[0]
    name = f"hopper C={chunk_size} {precision} tol={FLAGS.hopper_tol:g}"
    solve = jax.jit(functools.partial(hopper_cg_solve, cg_steps=FLAGS.cg_steps, cg_init=FLAGS.cg_init,
                                      cg_tol=FLAGS.hopper_tol, precision=jax.lax.Precision(precision)))
    try:
      x, steps = solve(*operands)
      ms = time_ms(solve, *operands)
      steps = np.asarray(steps)
      rows.append((name, ms, float("nan"), rel(x, reference)))
      print(f"{name:<24} {ms:9.3f} ms  steps mean {steps.mean():.1f} max {steps.max()}  err vs XLA "
            f"{rows[-1][3]:.1e}", flush=True)
    except Exception as error:
      log_failure(name, error)


def main(argv):
  del argv
  batch, length, heads, dim = FLAGS.batch, FLAGS.length, FLAGS.heads, FLAGS.head_dim
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; B={batch} T={length} H={heads} Dk={dim} "
        f"cg_steps={FLAGS.cg_steps} cg_init={FLAGS.cg_init}, f32 inputs, median of {FLAGS.repeats}", flush=True)
  inputs = make_inputs(batch, length, heads, dim, jnp.float32)
  rows = []
  for i, chunk_size in enumerate(int(c) for c in FLAGS.chunks.split(",")):
    try:
      bench_chunk_size(inputs, chunk_size, rows, with_tol=i == 0 and FLAGS.hopper_tol > 0)
    except Exception as error:  # e.g. the XLA reference itself: go on with the next chunk size
      log_failure(f"C={chunk_size}", error)
  print(f"\n| kernel | ms | tensor TFLOP/s | max err / max |x_xla| |\n|---|---|---|---|")
  for name, ms, tflops, error in rows:
    print(f"| {name} | {ms:.3f} | {tflops:.1f} | {error:.1e} |")


if __name__ == "__main__":
  app.run(main)
