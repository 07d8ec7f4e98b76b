"""Device: the Hopper CG solves (Pallas Mosaic GPU) next to the Triton-path solve kernel, on the inputs' own states.

One process, identical f32 inputs (q as right-hand sides, unit keys, the chunk start states of the keys). Kernels:
`rows` (solve_hopper: one warpgroup per 64 tokens, systems as rows, wgmma left operands in registers), `rows_smem`
(the same with the left operands staged in shared memory) and `triton` (solve.chunked_cg_solve). Per precision
("default" first, at every chunk size) and chunk size: ms (median), tensor-core TFLOP/s of the matvecs (per step and
chunk 2·C·Dk² + 4·C²·Dk, times the fp16 passes: 3 for "highest", 1 for "default"), and max |x − x_ref| / max |x_ref|
against an f32 "highest" XLA CG of the same steps written here (einsums, `inputs.solve_from_diagonal`); at the first
precision and chunk size, then each `rows` kernel with a tolerance (steps taken, mean and max). A kernel that fails to
compile or run is reported in one line here and in full in --error_log, and the rest goes on. With
MOSAIC_GPU_DUMP_PTXAS=1 in the environment ptxas reports each Mosaic kernel's registers and spills as it compiles
(after the kernel's "---" line). --cg_preconditioner=jacobi runs the kernels and the reference preconditioned by
diag(A). --step_sweep=4,8,16,30 then times each kernel at the first precision and chunk size at those fixed step
counts and fits ms = fixed + per-step · steps (what a step costs, what adaptive CG can save).

  python benchmarks/solve_bench.py --batch=8 --length=2048 --heads=16 --head_dim=128 --chunks=64,32 --cg_steps=30
  python benchmarks/solve_bench.py --batch=8 --length=2048 --heads=16 --head_dim=128 --chunks=64 --kernels=rows \
      --precisions=default --hopper_tol=0 --step_sweep=2,4,8,16,30 --cg_preconditioner=jacobi
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
from mesanet_jax.ops.inputs import CGOptions, solve_from_diagonal
from pallas_kernels.mesa_cg import chunked_cg_solve
from pallas_kernels.mesa_cg.solve_hopper import hopper_cg_solve

flags.DEFINE_string("chunks", "64,32", "chunk sizes, in this order")
flags.DEFINE_string("kernels", "rows,rows_smem,triton", "solve kernels to time, in this order")
flags.DEFINE_string("precisions", "default,highest", "matmul precisions, in this order")
flags.DEFINE_float("hopper_tol", 1e-4, "tolerance of one more run of the rows kernels at the first chunk size (0: none)")
flags.DEFINE_list("step_sweep", [], "fixed CG step counts timed per kernel at the first precision and chunk size")
flags.DEFINE_string("error_log", "", "file for the full tracebacks of kernels that failed (default: stderr)")
FLAGS = flags.FLAGS
PASSES = {"highest": 3, "high": 3, "default": 1}
KERNELS = {"rows": functools.partial(hopper_cg_solve, lhs_in_registers=True),
           "rows_x_registers": functools.partial(hopper_cg_solve, lhs_in_registers=True, x_in_shared_memory=False),
           "rows_smem": functools.partial(hopper_cg_solve, lhs_in_registers=False),
           "triton": chunked_cg_solve}
HIGHEST = jax.lax.Precision.HIGHEST


def chunk_major(q, k, g, beta, chunk_size):
  """[B, T, H, ...] f32 -> [B, H, N, C, ...]; g as the within-chunk cumulative log decay."""
  batch, length, heads = q.shape[:3]
  chunks = lambda x: jnp.moveaxis(x.astype(jnp.float32), 2, 1).reshape(batch, heads, length // chunk_size,
                                                                       chunk_size, *x.shape[3:])
  return chunks(q), chunks(k), jnp.cumsum(chunks(g), axis=-1), chunks(beta)


@jax.jit
def chunk_states(k, log_decay, beta):
  """S_n = Σ_{s before chunk n} (decay from s to chunk n's start) β_s k_s k_sᵀ, [B, H, N, Dk, Dk], from zero."""
  end = log_decay[..., -1:]
  within = jnp.einsum("bhnsi,bhnsj->bhnij", k * (jnp.exp(end - log_decay) * beta)[..., None], k, precision=HIGHEST)

  def step(state, inputs):
    within_n, end_n = inputs
    return jnp.exp(end_n)[..., None, None] * state + within_n, state

  inputs = (jnp.moveaxis(within, 2, 0), jnp.moveaxis(end[..., 0], 2, 0))
  _, states = jax.lax.scan(step, jnp.zeros_like(within[:, :, 0]), inputs)
  return jnp.moveaxis(states, 0, 2)


@functools.partial(jax.jit, static_argnames=("steps", "cg_init", "cg_preconditioner"))
def reference_solve(q, k, log_decay, beta, lam, states, *, steps, cg_init, cg_preconditioner):
  """f32 "highest" XLA CG of the chunked matvec, A_t = e^{G_t} S + Σ_{s ≤ t} e^{G_t − G_s} β_s k_s k_sᵀ + Λ."""
  size = q.shape[-2]
  causal = jnp.tril(jnp.ones((size, size), bool))
  weights = jnp.where(causal, jnp.exp(jnp.where(causal, log_decay[..., :, None] - log_decay[..., None, :], 0.0)),
                      0.0) * beta[..., None, :]
  lam_rows = lam[None, :, None, None, :]
  to_start = jnp.exp(log_decay)[..., None]

  def matvec(p):
    scores = jnp.einsum("bhnti,bhnsi->bhnts", p, k, precision=HIGHEST) * weights
    return (to_start * jnp.einsum("bhnij,bhntj->bhnti", states, p, precision=HIGHEST)
            + jnp.einsum("bhnts,bhnsi->bhnti", scores, k, precision=HIGHEST) + lam_rows * p)

  diagonal = (to_start * jnp.diagonal(states, axis1=-2, axis2=-1)[..., None, :]
              + jnp.einsum("bhnts,bhnsi->bhnti", weights, k * k, precision=HIGHEST) + lam_rows)
  return solve_from_diagonal(matvec, q, diagonal, CGOptions(steps, cg_init, None, cg_preconditioner))[0]


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
  """(x, steps or None) of a solve that returns x or (x, steps)."""
  return tuple(out) if isinstance(out, (tuple, list)) else (out, None)


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def run(name, solve, operands, reference, rows, flop=None):
  """Compiles, times and checks one solve; appends (name, ms, TFLOP/s, error, steps) to rows."""
  print(f"--- {name}", flush=True)
  try:
    start = time.perf_counter()
    x, steps = solution(solve(*operands))
    x = np.asarray(x)
    first = time.perf_counter() - start  # compile and first run
    ms = time_ms(solve, *operands)
  except Exception as error:  # a kernel that does not compile or run: report it, go on with the rest
    log_failure(name, error)
    return None
  tflops = flop / ms / 1e9 if flop else float("nan")
  steps = "" if steps is None else f"steps mean {float(np.mean(steps)):.1f} max {int(np.max(steps))}"
  rows.append((name, ms, tflops, rel(x, reference), steps))
  print(f"{name:<28} {ms:9.3f} ms {tflops:8.1f} TFLOP/s  err {rows[-1][3]:.1e}  {steps}  (compile+run {first:.0f} s)",
        flush=True)
  return x


def problem(inputs, chunk_size):
  """Kernel operands at this chunk size, the reference x and the matvec flops per fp16 pass."""
  q, k, _, g, beta, lam = inputs
  q, k, log_decay, beta = chunk_major(q, k, g, beta, chunk_size)
  states = chunk_states(k, log_decay, beta)
  reference = np.asarray(reference_solve(q, k, log_decay, beta, lam, states, steps=FLAGS.cg_steps,
                                         cg_init=FLAGS.cg_init, cg_preconditioner=FLAGS.cg_preconditioner))
  batch, heads, num_chunks, _, dim = q.shape
  flop_per_pass = batch * heads * num_chunks * FLAGS.cg_steps * (2 * chunk_size * dim ** 2 + 4 * chunk_size ** 2 * dim)
  return (q, k, log_decay, beta, lam, jnp.matrix_transpose(states)), reference, flop_per_pass


def kernel_solve(kernel, precision, steps, tol=None):
  """The jitted solve `kernel` at this precision, steps and tolerance, with the flags' start and preconditioner."""
  return jax.jit(functools.partial(KERNELS[kernel], cg_steps=steps, cg_init=FLAGS.cg_init, cg_tol=tol,
                                   cg_preconditioner=FLAGS.cg_preconditioner, precision=jax.lax.Precision(precision)))


def bench(operands, reference, flop_per_pass, name, precision, rows, with_tol):
  """Every kernel on one problem at one precision; with_tol: then the rows kernels with a tolerance."""
  solutions = {}
  for kernel in FLAGS.kernels.split(","):
    solve = kernel_solve(kernel, precision, FLAGS.cg_steps)
    x = run(f"{kernel} {name} {precision}", solve, operands, reference, rows, flop_per_pass * PASSES[precision])
    if x is not None:
      solutions[kernel] = x
  if "triton" in solutions:
    print("vs triton: " + ", ".join(f"{kernel} {rel(x, solutions['triton']):.1e}" for kernel, x in solutions.items()
                                    if kernel != "triton"), flush=True)
  for kernel in FLAGS.kernels.split(",") if with_tol else ():
    if kernel.startswith("rows"):
      solve = kernel_solve(kernel, precision, FLAGS.cg_steps, FLAGS.hopper_tol)
      run(f"{kernel} {name} {precision} tol={FLAGS.hopper_tol:g}", solve, operands, reference, rows)


def step_sweep(operands, name, precision):
  """Each kernel at the --step_sweep fixed step counts, and the least-squares line ms = fixed + per-step · steps."""
  counts = [int(n) for n in FLAGS.step_sweep]
  for kernel in FLAGS.kernels.split(","):
    times = []
    for steps in counts:
      try:
        times.append(time_ms(kernel_solve(kernel, precision, steps), *operands))
      except Exception as error:  # reported like the main runs' failures; the sweep of this kernel stops
        log_failure(f"{kernel} {name} {precision} steps={steps}", error)
        break
      print(f"{kernel} {name} {precision} steps={steps:<3} {times[-1]:9.3f} ms", flush=True)
    if len(times) >= 2:
      per_step, fixed = np.polyfit(counts[:len(times)], times, 1)
      print(f"{kernel} {name} {precision} preconditioner={FLAGS.cg_preconditioner}: ms ≈ {fixed:.3f} fixed + "
            f"{per_step:.4f} per step", flush=True)


def main(argv):
  del argv
  batch, length, heads, dim = FLAGS.batch, FLAGS.length, FLAGS.heads, FLAGS.head_dim
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; B={batch} T={length} H={heads} Dk={dim} "
        f"cg_steps={FLAGS.cg_steps} cg_init={FLAGS.cg_init} cg_preconditioner={FLAGS.cg_preconditioner}, f32 inputs, "
        f"median of {FLAGS.repeats}", flush=True)
  inputs = make_inputs(batch, length, heads, dim, jnp.float32)
  problems, rows = {}, []
  # Precision outermost: the first one at every chunk size before the next one (a run cut short keeps those).
  for i, precision in enumerate(FLAGS.precisions.split(",")):
    for j, chunk_size in enumerate(int(c) for c in FLAGS.chunks.split(",")):
      try:
        if chunk_size not in problems:
          problems[chunk_size] = problem(inputs, chunk_size)
        bench(*problems[chunk_size], f"C={chunk_size}", precision, rows, with_tol=i == j == 0 and FLAGS.hopper_tol > 0)
        if i == j == 0 and FLAGS.step_sweep:
          step_sweep(problems[chunk_size][0], f"C={chunk_size}", precision)
      except Exception as error:  # e.g. the reference itself: go on with the next chunk size
        log_failure(f"C={chunk_size}", error)
  print("\n| kernel | ms | tensor TFLOP/s | max err / max |x_ref| | CG steps |\n|---|---|---|---|---|")
  for name, ms, tflops, error, steps in rows:
    print(f"| {name} | {ms:.3f} | {tflops:.1f} | {error:.1e} | {steps} |")


if __name__ == "__main__":
  app.run(main)
