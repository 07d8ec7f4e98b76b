"""Side-by-side timing of the Mesa op: XLA chunked path, Pallas kernels, and flash-linear-attention's Triton kernel.

One run, identical inputs (bf16 q/k/v, f32 gates and λ), forward and forward+backward, with achieved matmul TFLOP/s
and the max |difference| of outputs and gradients against the XLA path (relative to the XLA path's max |entry|). flash-linear-attention (torch) is optional:
carry `flash-linear-attention==0.6.0` and `fla-core==0.6.0` as wheels on the device.

  python benchmarks/kernel_bench.py --batch=8 --length=2048 --heads=16 --head_dim=128   # and --batch=2 --length=8192
"""
import functools
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory for torch in the same process

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.ops_bench import forward_and_backward, report, setup_from_flags, time_ms
from mesanet_jax.ops import mesa_chunked
from pallas_kernels.mesa_cg import chunked_cg_solve

flags.DEFINE_bool("fla", True, "also time flash-linear-attention's chunk_mesa_net if it imports")
flags.DEFINE_string("sweep_chunks", "", "chunk sizes for a sweep of the solve kernel alone (empty: no sweep)")
flags.DEFINE_string("sweep_warps", "4,8", "Triton num_warps values of the sweep")
flags.DEFINE_string("sweep_precisions", "tf32x3,tf32,ieee", "dot algorithms of the sweep: tf32x3, tf32, bf16x3, ieee")
FLAGS = flags.FLAGS


def rel_diff(a, b) -> float:
  """max |a − b| / max |b|."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


SOLVE_PRECISIONS = {
    "tf32x3": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
    "tf32": jax.lax.DotAlgorithmPreset.TF32_TF32_F32,
    "bf16x3": jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3,
    "ieee": jax.lax.DotAlgorithmPreset.F32_F32_F32,
}


def solve_kernel(args, chunk_size, num_warps, precision):
  """The fused CG solve alone on chunk-major inputs, with identity chunk states: (jitted call, its operands)."""
  q, k, _, g, beta, lam = args
  batch, length, heads, dim = q.shape
  chunks = lambda x: jnp.moveaxis(x.astype(jnp.float32), 2, 1).reshape(
      batch, heads, length // chunk_size, chunk_size, *x.shape[3:])
  log_decay = jnp.cumsum(chunks(g), axis=-1)
  states = jnp.broadcast_to(jnp.eye(dim), (batch, heads, length // chunk_size, dim, dim))
  solve = jax.jit(functools.partial(chunked_cg_solve, cg_steps=FLAGS.cg_steps, cg_init=FLAGS.cg_init,
                                    precision=precision, num_warps=num_warps))
  return solve, (chunks(q), chunks(k), log_decay, chunks(beta), lam, states)


def sweep_solve_kernel(args, tokens):
  """Times the solve kernel per (chunk size, num_warps, dot algorithm); error vs the f32 ("ieee") solve."""
  for chunk_size in [int(c) for c in FLAGS.sweep_chunks.split(",")]:
    reference = None
    for name in ["ieee"] + [p for p in FLAGS.sweep_precisions.split(",") if p != "ieee"]:
      for num_warps in [int(n) for n in FLAGS.sweep_warps.split(",")]:
        solve, operands = solve_kernel(args, chunk_size, num_warps, SOLVE_PRECISIONS[name])
        try:
          ms = time_ms(solve, *operands)
        except jax.errors.JaxRuntimeError as error:  # e.g. a tile that needs more shared memory than the GPU has
          print(f"solve C={chunk_size} warps={num_warps} {name}: failed: {str(error).splitlines()[0][:160]}")
          continue
        x = np.asarray(solve(*operands))
        reference = x if reference is None else reference
        error = np.max(np.abs(x - reference)) / np.max(np.abs(reference))
        report(f"solve C={chunk_size} warps={num_warps} {name} (err {error:.1e})", ms, tokens)


def time_fla(args, w):
  """chunk_mesa_net forward and forward+backward on the same inputs; returns (fwd ms, fwd+bwd ms, o, grads)."""
  import torch
  from fla.ops.mesa_net import chunk_mesa_net

  def to_torch(x):
    return torch.from_numpy(np.array(x.astype(jnp.float32))).cuda().to(
        torch.bfloat16 if x.dtype == jnp.bfloat16 else torch.float32)

  tensors = [to_torch(x).requires_grad_() for x in args]
  weight = to_torch(w)
  forward = lambda: chunk_mesa_net(*tensors, max_CG_iteration=FLAGS.cg_steps)[0]

  def forward_backward():
    o = forward()
    grads = torch.autograd.grad((o.float() * weight).sum(), tensors)
    return o, grads

  def time_torch(fn):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(FLAGS.repeats):
      start.record()
      fn()
      end.record()
      torch.cuda.synchronize()
      times.append(start.elapsed_time(end))
    return float(np.median(times))

  with torch.no_grad():
    fwd_ms = time_torch(forward)
  o, grads = forward_backward()
  as_numpy = lambda t: t.detach().float().cpu().numpy()
  return fwd_ms, time_torch(forward_backward), as_numpy(o), [as_numpy(x) for x in grads]


def main(argv):
  del argv
  args, w, tokens, flops = setup_from_flags()
  results = {}
  for impl in ("xla", "pallas"):
    op = functools.partial(mesa_chunked, chunk_size=FLAGS.chunk_size, cg_steps=FLAGS.cg_steps, impl=impl,
                           cg_init=FLAGS.cg_init, matmul_precision=FLAGS.matmul_precision)
    fwd, fwd_bwd = jax.jit(op), forward_and_backward(op)
    try:
      fwd_ms, fwd_bwd_ms = time_ms(fwd, *args), time_ms(fwd_bwd, w, *args)
    except jax.errors.JaxRuntimeError as error:
      print(f"{impl}: failed: {str(error).splitlines()[0][:160]}")
      continue
    report(f"{impl} forward", fwd_ms, tokens, flops())
    report(f"{impl} fwd+bwd", fwd_bwd_ms, tokens, flops(backward=True))
    grads, o = fwd_bwd(w, *args)
    results[impl] = (fwd_ms, fwd_bwd_ms, o, grads)
  if FLAGS.sweep_chunks:
    sweep_solve_kernel(args, tokens)
  if FLAGS.fla:
    try:
      results["fla"] = time_fla(args, w)
    except ImportError as error:
      print(f"flash-linear-attention not available ({error}); skipped")
    else:
      report("fla chunk_mesa_net forward", results["fla"][0], tokens, flops())
      report("fla chunk_mesa_net fwd+bwd", results["fla"][1], tokens, flops(backward=True))
  base_fwd, base_fwd_bwd, base_o, base_grads = results["xla"]
  for impl, (fwd_ms, fwd_bwd_ms, o, grads) in results.items():
    diffs = " ".join(f"d{n}={rel_diff(a, b):.1e}" for n, a, b in zip(("q", "k", "v", "g", "beta", "lam"),
                                                                      grads, base_grads))
    print(f"{impl:>6}: fwd {fwd_ms / base_fwd:5.2f}x xla, fwd+bwd {fwd_bwd_ms / base_fwd_bwd:5.2f}x xla; "
          f"max|diff|/max|xla|: o={rel_diff(o, base_o):.1e} {diffs}")
  if "fla" in results:
    for impl in ("xla", "pallas"):
      print(f"{impl} / fla time: fwd {results[impl][0] / results['fla'][0]:.2f}, "
            f"fwd+bwd {results[impl][1] / results['fla'][1]:.2f}")


if __name__ == "__main__":
  app.run(main)
