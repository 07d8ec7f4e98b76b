"""Times the Mesa operator forward and forward+backward on whatever device JAX sees, and checks it against the exact
dense solve.

With no flags this is a CPU-sized demo. The reference shape for the device:
  python benchmarks/ops_bench.py --batch=8 --length=2048 --heads=16 --head_dim=128 --cg_steps=30 --dtype=bfloat16
"""
import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.timing import median_ms
from mesanet_jax.ops import mesa_chunked, mesa_exact
from mesanet_jax.ops import cg_steps
from mesanet_jax.ops.flops import mesa_chunked_flops

_BATCH = flags.DEFINE_integer("batch", 2, "B")
_LENGTH = flags.DEFINE_integer("length", 512, "T")
_HEADS = flags.DEFINE_integer("heads", 4, "H")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Dk (= Dv)")
_CHUNK = flags.DEFINE_integer("chunk_size", 64, "C")
_CG_STEPS = flags.DEFINE_integer("cg_steps", 30, "CG steps, forward and adjoint")
_CG_TOL = flags.DEFINE_float("cg_tol", 0.0, "stop each forward and adjoint system once ‖r‖ ≤ tol·‖r₀‖, at most "
                             "--cg_steps steps (0: fixed --cg_steps)")
_CG_INIT = flags.DEFINE_enum("cg_init", "jacobi", ["jacobi", "zero"], "CG initial guess")
_CG_PRECONDITIONER = flags.DEFINE_enum("cg_preconditioner", "none", ["none", "jacobi"],
                                       "plain CG, or CG preconditioned by diag(A_t)")
_PRECISION = flags.DEFINE_enum("matmul_precision", "highest", ["highest", "high", "default"],
                                "precision of the chunked op's matmuls (default = TF32 on GPU)")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "dtype of q, k, v")
_REPEATS = flags.DEFINE_integer("repeats", 10, "timed runs; the median is reported")
_INPUTS = flags.DEFINE_string("inputs", "", "an npz of recorded Mesa inputs (benchmarks/record_inputs.py) instead of "
                              "random ones; its shape replaces --batch/--length/--heads/--head_dim")
_COMPARE_EXACT = flags.DEFINE_bool("compare_exact", True, "also time mesa_exact and report errors against it")
_EXACT_SLICE = flags.DEFINE_integer("exact_slice", 16, "(batch, head) pairs the exact reference solves at a time "
                                    "(0: all at once); its backward keeps a few T·Dk² floats per pair, ~0.5 GB at "
                                    "T=2048 Dk=128 (twice that with --exact_f64)")
_EXACT_F64 = flags.DEFINE_bool("exact_f64", True, "solve the exact reference in f64 (an f32 solve errs by up to "
                               "~cond · 6e-8: ~1e-4 on a trained model's heads with γ ≈ 1); f32 'highest' otherwise")


def make_inputs(batch, length, heads, head_dim, dtype, seed=0):
  """Unit-norm q, k; normal v; γ = σ(N(3, 1)); β = σ(N(0, 1)); λ = 0.25 + softplus(N(0, 1)); no initial state."""
  keys = jax.random.split(jax.random.key(seed), 6)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  shape = (batch, length, heads, head_dim)
  q = unit(jax.random.normal(keys[0], shape)).astype(dtype)
  k = unit(jax.random.normal(keys[1], shape)).astype(dtype)
  v = jax.random.normal(keys[2], shape).astype(dtype)
  g = jax.nn.log_sigmoid(jax.random.normal(keys[3], shape[:3]) + 3.0)
  beta = jax.nn.sigmoid(jax.random.normal(keys[4], shape[:3]))
  lam = 0.25 + jax.nn.softplus(jax.random.normal(keys[5], (heads, head_dim)))
  return q, k, v, g, beta, lam


def load_inputs(path: str, dtype):
  """(q, k, v in `dtype`, g, beta, lam in f32) from an npz written by benchmarks/record_inputs.py."""
  try:
    data = np.load(path)
    arrays = [jnp.asarray(data[name]) for name in ("q", "k", "v", "g", "beta", "lam")]
  except (OSError, KeyError, ValueError) as error:
    raise SystemExit(f"--inputs={path}: not an npz of q, k, v, g, beta, lam ({error})") from None
  return (*(a.astype(dtype) for a in arrays[:3]), *arrays[3:])


def time_ms(fn, *args) -> float:
  """`timing.median_ms` of fn(*args) over --repeats calls."""
  return median_ms(fn, *args, repeats=_REPEATS.value)


def forward_and_backward(op):
  """jit of (o, grads of Σ o·w w.r.t. q, k, v, g, beta, lam)."""
  def loss(w, *args):
    o = op(*args)[0]
    return jnp.sum(o.astype(jnp.float32) * w), o
  return jax.jit(jax.grad(loss, argnums=range(1, 7), has_aux=True))


def _exact_rounded_to(output_dtype):
  """mesa_exact with o rounded to output_dtype, as the op under test returns it: a bf16 o also rounds the loss's
  cotangent to bf16 (~2e-3), and the reference must share that rounding for its gradients to measure the solve."""
  return lambda *args: (mesa_exact(*args)[0].astype(output_dtype),)


@functools.partial(jax.jit, static_argnames=("slice_size", "output_dtype"))
def _exact_by_pairs(w, q, k, v, g, beta, lam, slice_size: int, output_dtype):
  batch, length, heads, dim = q.shape
  # [B, T, H, ...] -> [B·H, 1, T, 1, ...]: one problem of batch 1 and one head per pair.
  pairs = lambda x: jnp.moveaxis(x, 2, 1).reshape(batch * heads, 1, length, 1, *x.shape[3:])
  unpair = lambda x: jnp.moveaxis(x.reshape(batch, heads, length, *x.shape[4:]), 1, 2)
  lam_pairs = jnp.broadcast_to(lam, (batch, heads, dim)).reshape(batch * heads, 1, dim)
  inputs = (*(pairs(x) for x in (w, q, k, v, g, beta)), lam_pairs)
  exact = forward_and_backward(_exact_rounded_to(output_dtype))
  grads, o = jax.lax.map(lambda x: exact(*x), inputs, batch_size=slice_size)
  d_lam = grads[5].reshape(batch, heads, dim).sum(0)
  return (*(unpair(d) for d in grads[:5]), d_lam), unpair(o)


def exact_forward_and_backward(w, q, k, v, g, beta, lam, slice_size: int = 0, float64: bool = False):
  """`forward_and_backward(mesa_exact)` (grads of Σ o·w, o in q's dtype), f32 "highest" matmuls: the ground truth.
  With slice_size > 0 the (batch, head) pairs, which are independent, are solved `slice_size` at a time
  (`jax.lax.map` with batch_size), so the reference fits on a device at any B·H; dλ [H, Dk] is the pairs' sum over
  the batch. float64: every input cast to f64 and solved so (x64 switched on for this call only), gradients f64, o
  rounded to q's dtype as before. An f32 solve errs by up to ~cond(H_kk + Λ) · 6e-8, which a trained model's heads
  with γ ≈ 1 bring near 1e-4."""
  output_dtype = jnp.dtype(q.dtype)
  wide = jax.enable_x64(True) if float64 else contextlib.nullcontext()
  with wide, jax.default_matmul_precision("highest"):  # no TF32 in the ground truth on GPU
    if float64:
      w, q, k, v, g, beta, lam = (jnp.asarray(x, jnp.float64) for x in (w, q, k, v, g, beta, lam))
    if not slice_size:
      return forward_and_backward(_exact_rounded_to(output_dtype))(w, q, k, v, g, beta, lam)
    return _exact_by_pairs(w, q, k, v, g, beta, lam, slice_size=slice_size, output_dtype=output_dtype)


def rel_error(a, b) -> float:
  a, b = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (a, b))
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def report(name, ms, tokens, flops=None):
  line = f"{name:<40} {ms:9.3f} ms  {tokens / ms * 1e3 / 1e6:8.3f} M tok/s"
  if flops:
    line += f"  {flops / ms / 1e9:7.2f} TFLOP/s"
  print(line, flush=True)


def cg_tol() -> float | None:
  """--cg_tol as `mesa_chunked` takes it (None: fixed steps)."""
  return _CG_TOL.value or None


def cg_steps_used(op, w, args) -> np.ndarray:
  """`cg_steps.measure` for the loss Σ o·w: CG steps of op's forward and adjoint solves (mean, max of each)."""
  loss = lambda outputs: jnp.sum(outputs[0].astype(jnp.float32) * w)
  return np.asarray(jax.jit(lambda *a: cg_steps.measure(op, loss, *a))(*args))


def setup_from_flags():
  """For the shape the flags name: (inputs, loss weights w, token count, flop counter(chunk_size=--chunk_size,
  backward=False)); prints the setting."""
  if _INPUTS.value:
    args = load_inputs(_INPUTS.value, jnp.dtype(_DTYPE.value))
    batch, length, heads, dim = args[0].shape
  else:
    batch, length, heads, dim = _BATCH.value, _LENGTH.value, _HEADS.value, _HEAD_DIM.value
    args = make_inputs(batch, length, heads, dim, jnp.dtype(_DTYPE.value))
  w = jax.random.normal(jax.random.key(1), (batch, length, heads, dim))
  flops = lambda chunk_size=_CHUNK.value, **kwargs: mesa_chunked_flops(
      batch, length, heads, dim, dim, chunk_size=chunk_size, cg_steps=_CG_STEPS.value, **kwargs)
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}; inputs: "
        f"{_INPUTS.value or 'random'}")
  print(f"shape: B={batch} T={length} H={heads} Dk=Dv={dim} C={_CHUNK.value} cg_steps={_CG_STEPS.value} "
        f"cg_tol={cg_tol()} cg_init={_CG_INIT.value} cg_preconditioner={_CG_PRECONDITIONER.value} "
        f"matmul_precision={_PRECISION.value} dtype={_DTYPE.value}")
  return args, w, batch * length, flops


def main(argv):
  del argv
  args, w, tokens, flops = setup_from_flags()
  chunked = functools.partial(mesa_chunked, chunk_size=_CHUNK.value, cg_steps=_CG_STEPS.value, cg_tol=cg_tol(),
                              cg_init=_CG_INIT.value, cg_preconditioner=_CG_PRECONDITIONER.value,
                              matmul_precision=_PRECISION.value)
  chunked_fwd, chunked_fwd_bwd = jax.jit(chunked), forward_and_backward(chunked)
  adaptive = cg_tol() is not None  # flops count --cg_steps per solve: with a tolerance TFLOP/s would overstate
  report("chunked (xla) forward", time_ms(chunked_fwd, *args), tokens, None if adaptive else flops())
  report("chunked (xla) fwd+bwd", time_ms(chunked_fwd_bwd, w, *args), tokens, None if adaptive else flops(backward=True))
  print("CG steps, forward mean / max, adjoint mean / max: "
        + " / ".join(f"{x:.2f}" for x in cg_steps_used(chunked, w, args)))
  if not _COMPARE_EXACT.value:
    return
  exact_fwd_bwd = functools.partial(exact_forward_and_backward, slice_size=_EXACT_SLICE.value,
                                    float64=_EXACT_F64.value)
  with jax.default_matmul_precision("highest"):  # the ground truth must not use TF32 on GPU
    report("exact (dense solve) forward", time_ms(jax.jit(mesa_exact), *args), tokens)
  report("exact (dense solve) fwd+bwd", time_ms(exact_fwd_bwd, w, *args), tokens)
  grads_exact, o_exact = exact_fwd_bwd(w, *args)
  grads, o = chunked_fwd_bwd(w, *args)
  print(f"chunked vs exact, max |error| / max |exact|: output {rel_error(o, o_exact):.2e}")
  for name, grad, grad_exact in zip(("q", "k", "v", "g", "beta", "lam"), grads, grads_exact):
    print(f"  d{name:<5} {rel_error(grad, grad_exact):.2e}")


if __name__ == "__main__":
  app.run(main)
