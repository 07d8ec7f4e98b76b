"""Side-by-side timing of the Mesa op: XLA chunked path, Pallas kernels, and flash-linear-attention's Triton kernel.

One run, identical inputs (bf16 q/k/v, f32 gates and λ), forward and forward+backward, with achieved matmul TFLOP/s
and the max |difference| of outputs and gradients against the XLA path (relative to the XLA path's max |entry|); then
every stage of the operator jitted alone (chunk states, solve, reads, backward scans and accumulation), XLA next to
the Pallas kernel that replaces it, and a roofline line per Pallas stage (achieved TFLOP/s and GB/s, flops per
byte). flash-linear-attention (torch) is optional: carry `flash-linear-attention==0.6.0` and `fla-core==0.6.0` as
wheels on the device.

  python benchmarks/kernel_bench.py --batch=8 --length=2048 --heads=16 --head_dim=128   # and --batch=2 --length=8192
  ... --variants=xla:64:highest,pallas:64:highest,pallas:32:default      # several chunk sizes / precisions, one run
  ... --variants=pallas:32:highest,pallas:32:highest:1e-4               # fixed --cg_steps, and adaptive CG (tol)
  ... --compare_exact --exact_slice=16   # errors of o and every gradient vs the exact solve, 16 (b, h) pairs at a time

Every variant also reports the CG steps its solves took (forward and adjoint, mean and max over tokens and heads).
fla is timed twice, before and after our variants, and the ratios use its faster timing.
"""
import functools
import os
from typing import NamedTuple

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory for torch in the same process

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.ops_bench import (cg_steps_used, cg_tol, exact_forward_and_backward, forward_and_backward, report,
                                  setup_from_flags, time_ms)
from benchmarks.timing import sample_calls, warm_up
from mesanet_jax.ops import mesa_chunked
from mesanet_jax.ops.chunked import row_dtype
from mesanet_jax.ops.flops import BACKWARD_STAGES, FORWARD_STAGES, mesa_stage_flops
from mesanet_jax.ops.operator import chunk_major, operator_class, token_major
from mesanet_jax.ops.inputs import CGOptions, zero_state
from pallas_kernels.mesa_cg import chunk_states, chunked_cg_solve
from pallas_kernels.mesa_cg.chunk import SplitDot
from pallas_kernels.mesa_cg.states_hopper import hopper_chunk_states

flags.DEFINE_string("variants", "", "impl:chunk_size:matmul_precision[/solve_precision][:cg_tol][:save][:pcg] "
                    "entries timed side by side, e.g. xla:64:highest,pallas:64:highest,pallas:32:default:1e-4:save, "
                    "pallas:64:highest/default:1e-3 (empty: xla and pallas at the flags' setting; /solve_precision: "
                    "the solves at it, refined once, mesa_chunked(solve_precision=); no tol: --cg_tol; save: the "
                    "backward reuses the forward's chunk states; pcg: CG preconditioned by diag(A), else "
                    "--cg_preconditioner); agreement is reported against the first")
flags.DEFINE_bool("fla", True, "also time flash-linear-attention's chunk_mesa_net if it imports")
flags.DEFINE_bool("stages", True, "also time every stage of the operator alone, XLA next to Pallas")
flags.DEFINE_string("sweep_chunks", "", "chunk sizes for a sweep of the solve kernel alone (empty: no sweep)")
flags.DEFINE_string("sweep_warps", "4,8", "Triton num_warps values of the sweep")
flags.DEFINE_string("sweep_states", "", "rows:block:warps:stages entries of the Triton scan (0: its default; "
                    "0:0:0:0: chunk_states' own pick, on sm_90 at C = 64 the Hopper kernel), hopper:block:stages "
                    "(the Hopper kernel, one per scan) or shared:block:stages (0: the default stages; one Hopper "
                    "kernel for both scans of a direction, as the operator runs them), for a sweep of the forward and "
                    "backward chunk-state scans alone at --chunk_size (empty: no sweep); a trailing :f32 gives the "
                    "forward's scans k and v in f32 (made before the timing) instead of as `mesa_chunked` passes them")
flags.DEFINE_string("sweep_precisions", "tf32x3,tf32,ieee",
                    "dot algorithms of the sweep: tf32x3, tf32, bf16x3, bf16, ieee, f16x3, f16x1 (f16: scaled split)")
FLAGS = flags.FLAGS


def rel_diff(a, b) -> float:
  """max |a − b| / max |b|."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


SOLVE_PRECISIONS = {
    "tf32x3": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
    "tf32": jax.lax.DotAlgorithmPreset.TF32_TF32_F32,
    "bf16x3": jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3,
    "bf16": jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
    "ieee": jax.lax.DotAlgorithmPreset.F32_F32_F32,
    "f16x3": SplitDot(jnp.float16, 3),
    "f16x1": SplitDot(jnp.float16, 1),
}


def stage_inputs(args, chunk_size):
  """q, k, v, log_decay, beta, lam chunk-major, [B, H, N, C, ...], as the operator's stages take them (q as the
  solve's right-hand side; `solve_and_output` takes it token-major): q, k, v in `chunked.row_dtype` (bf16 ones stay
  bf16), the rest f32."""
  q, k, v, g, beta, lam = args
  chunks = lambda x, dtype=jnp.float32: chunk_major(x.astype(dtype), chunk_size)
  rows = [chunks(x, row_dtype(x.dtype, jnp.float32)) for x in (q, k, v)]
  return *rows, jnp.cumsum(chunks(g), axis=-1), chunks(beta), lam


def solve_kernel(args, chunk_size, num_warps, precision):
  """The fused CG solve alone on chunk-major inputs and the inputs' own chunk states: (jitted call, its operands)."""
  q, k, v, log_decay, beta, lam = stage_inputs(args, chunk_size)
  batch, heads, _, _, dim = q.shape
  states = operator_class("xla").build(k, v, log_decay, beta, lam, zero_state(batch, heads, dim, v.shape[-1]),
                                       jax.lax.Precision.HIGHEST).states
  solve = jax.jit(functools.partial(chunked_cg_solve, cg_steps=FLAGS.cg_steps, cg_init=FLAGS.cg_init,
                                    cg_tol=cg_tol(), precision=precision, num_warps=num_warps))
  return solve, (q, k, log_decay, beta, lam, states.kk_t)


def row_bytes(q) -> int:
  """Bytes a number of q, k and v as the kernels take them (`chunked.row_dtype`)."""
  return row_dtype(q.dtype, jnp.float32).itemsize


STAGES = ("chunk states", "solve", "output read", "adjoint rhs read", "state-gradient scans", "token gradients")


def stage_bytes(batch, length, heads, key_dim, value_dim, chunk_size, row_bytes: int = 4) -> dict[str, int]:
  """Bytes of each stage's operands and results (each read or written once: the least memory traffic the stage can
  have). Per token a row of q, k, x, y or u is Dk numbers, of v, do or o Dv, G and β one each; the boundary states
  are N + 1 of Dk×Dk and Dk×Dv per (batch, head). q, k and v take row_bytes a number (2 for bf16 inputs, which reach
  the kernels as they are: `chunked.row_dtype`), everything else 4 (f32)."""
  rows, dk, dv = batch * heads * length, key_dim, value_dim
  boundaries = batch * heads * (-(-length // chunk_size) + 1)
  kk, kv = boundaries * dk * dk, boundaries * dk * dv
  counts = {  # (f32 numbers, row numbers)
      "chunk states": (rows * 2 + kk + kv, rows * (dk + dv)),  # k, v, G, β -> H_kk, H_kv
      "solve": (rows * 2 + kk + rows * dk, rows * 2 * dk),  # q, k, G, β, H_kk -> x
      "output read": (rows * (dk + dv + 2) + kv, rows * (dk + dv)),  # x, k, v, G, β, H_kv -> o (f32 here)
      "adjoint rhs read": (rows * (dv + 2) + kv + rows * dk, rows * (dk + dv)),  # do, k, v, G, β, H_kv -> u
      "state-gradient scans": (rows * (2 * dk + dv + 1) + kk + kv, 0),  # x, y, do, G -> dH_kk, dH_kv
      # x, y, do, G, β, k, v, both states and their gradients -> dk, dv (in k's and v's dtype), dβ, ⟨D, S⟩
      "token gradients": (rows * (2 * dk + dv + 3) + 2 * (kk + kv), rows * 2 * (dk + dv)),
  }
  return {stage: 4 * wide + row_bytes * narrow for stage, (wide, narrow) in counts.items()}


def failed(name, error):
  print(f"{name}: failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}", flush=True)


def stage_times(args, impl):
  """ms of every stage (STAGES, solve_and_output, adjoint_solve and matvec) of `impl`'s operator
  (`operator.operator_class`), each jitted alone, chunk-major.

  The solutions x, y and u = H_kv·do are random rows of the right shape: the stages' cost does not depend on them.
  "chunk states" times what `build` computes: the boundary states (XLA: also the C×C decay masks its other stages
  read), not the inputs the operator holds, which a jit returning the operator would copy out (~0.3 ms at B=8
  T=2048 H=16 D=128). A stage that fails (e.g. does not compile) is reported and left out.
  """
  q, k, v, log_decay, beta, lam = stage_inputs(args, FLAGS.chunk_size)
  batch, heads, _, _, dim = q.shape
  x, y, u, do = (jax.random.normal(key, a.shape) for key, a in zip(jax.random.split(jax.random.key(2), 4),
                                                                    (q, q, q, v)))
  state = zero_state(batch, heads, dim, v.shape[-1])
  precision = jax.lax.Precision(FLAGS.matmul_precision)
  cg = CGOptions(FLAGS.cg_steps, FLAGS.cg_init, cg_tol(), FLAGS.cg_preconditioner)
  build = jax.jit(lambda *a: operator_class(impl).build(*a, precision))

  @jax.jit
  def computed_by_build(*inputs):
    held = jax.tree.leaves(inputs)
    return [leaf for leaf in jax.tree.leaves(operator_class(impl).build(*inputs, precision))
            if not any(leaf is x for x in held)]
  state_gradients = jax.jit(lambda op, *a: op.state_gradients(*a))
  try:
    op = build(k, v, log_decay, beta, lam, state)
    d_states = state_gradients(op, x, y, do, state)
  except Exception as error:  # any kernel that fails to compile or run: report it, go on with the rest
    failed(f"{impl} stages", error)
    return {}
  stages = {
      "chunk states": (computed_by_build, k, v, log_decay, beta, lam, state),
      "solve": (jax.jit(lambda op, rhs: op.solve(rhs, cg)), op, q),
      "solve_and_output": (jax.jit(lambda op, q: op.solve_and_output(q, cg)), op, token_major(q)),
      "output read": (jax.jit(lambda op, x: op.output(x)), op, x),
      "matvec": (jax.jit(lambda op, x: op.matvec(x)), op, x),
      "adjoint rhs read": (jax.jit(lambda op, do: op.adjoint_rhs(do)), op, do),
      "adjoint_solve": (jax.jit(lambda op, do: op.adjoint_solve(do, cg)), op, do),
      "state-gradient scans": (state_gradients, op, x, y, do, state),
      "token gradients": (jax.jit(lambda op, *a: op.token_gradients(*a)), op, x, y, do, d_states),
  }
  times = {}
  for name, (fn, *operands) in stages.items():
    try:
      times[name] = time_ms(fn, *operands)
    except Exception as error:
      failed(f"{impl} {name}", error)
  return times


def print_stages(args):
  """One line per stage: XLA ms, Pallas ms, their ratio; then the sums that make up forward and backward; then the
  Pallas stages' roofline: achieved TFLOP/s (`mesa_stage_flops`) and GB/s (`stage_bytes`), and flops per byte."""
  times = {impl: stage_times(args, impl) for impl in ("xla", "pallas")}
  print(f"{'stage (jitted alone)':<24} {'xla ms':>9} {'pallas ms':>10} {'pallas/xla':>11}")
  # solve_and_output / adjoint_solve: the forward's solve and read, the backward's read and solve, as they run
  # (one kernel where the solve makes o or u itself); matvec: A x, the residual of a refined solve
  # (mesa_chunked(solve_precision=)), once per solve.
  for name, parts in [*((name, (name,)) for name in STAGES), ("sum: forward", FORWARD_STAGES),
                      ("sum: backward", BACKWARD_STAGES), ("solve_and_output", ("solve_and_output",)),
                      ("adjoint_solve", ("adjoint_solve",)), ("matvec", ("matvec",))]:
    xla, pallas = (sum(times[impl].get(part, float("nan")) for part in parts) for impl in ("xla", "pallas"))
    print(f"{name:<24} {xla:9.3f} {pallas:10.3f} {pallas / xla:11.2f}")
  batch, length, heads, dim = args[0].shape
  flops = mesa_stage_flops(batch, length, heads, dim, dim, chunk_size=FLAGS.chunk_size, cg_steps=FLAGS.cg_steps)
  moved = stage_bytes(batch, length, heads, dim, dim, FLAGS.chunk_size, row_bytes(args[0]))
  bound = " (with --cg_tol the solve's flops count every step: an upper bound)" if cg_tol() else ""
  print(f"roofline of the pallas stages: flops at --cg_steps={FLAGS.cg_steps}{bound}; bytes = operands and results "
        f"once (q, k, v in their dtype, the rest f32)\n{'stage':<24} {'pallas ms':>10} {'GFLOP':>9} {'MB':>9} "
        f"{'TFLOP/s':>8} {'GB/s':>8} {'flop/B':>7}")
  for name in STAGES:
    ms = times["pallas"].get(name, float("nan"))
    print(f"{name:<24} {ms:10.3f} {flops[name] / 1e9:9.2f} {moved[name] / 1e6:9.1f} {flops[name] / ms / 1e9:8.2f} "
          f"{moved[name] / ms / 1e6:8.0f} {flops[name] / moved[name]:7.1f}")


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
          failed(f"solve C={chunk_size} warps={num_warps} {name}", error)
          continue
        x = np.asarray(solve(*operands)[0])
        reference = x if reference is None else reference
        error = np.max(np.abs(x - reference)) / np.max(np.abs(reference))
        report(f"solve C={chunk_size} warps={num_warps} {name} (err {error:.1e})", ms, tokens)


def state_scan_entry(entry: str, precision):
  """A --sweep_states entry as scans(a, bs, weights, chunk_decay, initials, reverse) -> each scan's states."""
  kind, *fields = entry.split(":")
  if kind in ("hopper", "shared"):
    block, stages = map(int, fields)
    hopper = functools.partial(hopper_chunk_states, precision=precision, block=block, stages=stages or None)
    if kind == "shared":
      return lambda a, bs, weights, decay, initials, reverse: hopper(a, bs, weights, decay, initials, reverse=reverse)
    return lambda a, bs, weights, decay, initials, reverse: tuple(
        hopper(a, (b,), (w,), decay, (initial,), reverse=reverse)[0] for b, w, initial in zip(bs, weights, initials))
  rows, block, warps, stages = (int(field) or None for field in entry.split(":"))
  triton = functools.partial(chunk_states, precision=precision, row_block=rows, block=block, num_warps=warps,
                             num_stages=stages)
  return lambda a, bs, weights, decay, initials, reverse: tuple(
      triton(a, b, w, decay, initial, reverse=reverse) for b, w, initial in zip(bs, weights, initials))


def sweep_state_scans(args):
  """Times the forward's two chunk-state scans (H_kkᵀ and H_kv, as `PallasOperator.build` runs them) and the
  backward's two reversed ones (`PallasOperator.state_gradients`: x with y and with do; q and v stand in for them,
  the shapes and dtypes are the backward's) per kernel and tiling; every setting's states must equal the first
  entry's (the tiling changes no sum; another fp16 tiling rounds differently)."""
  q, k, v, log_decay, beta, _ = stage_inputs(args, FLAGS.chunk_size)
  to_end = jnp.exp(log_decay[..., -1:] - log_decay) * beta
  decay = jnp.exp(log_decay)
  chunk_decay = jnp.exp(log_decay[..., -1])
  batch, heads, _, _, dim = k.shape
  initials = tuple(jnp.zeros((batch, heads, dim, width), jnp.float32) for width in (dim, v.shape[-1]))
  precision = jax.lax.Precision(FLAGS.matmul_precision)
  moved = stage_bytes(*args[0].shape[:3], dim, v.shape[-1], FLAGS.chunk_size, row_bytes(args[0]))
  wide = lambda x: x.astype(jnp.float32)  # the backward's x, y and do are f32 whatever q, k and v are
  operands = {"forward": (k, (k, v), (to_end, to_end)), "reversed": (wide(q), (wide(k), wide(v)), (-decay, decay))}
  wide_operands = dict(operands, forward=(wide(k), (wide(k), wide(v)), (to_end, to_end)))
  stage = {"forward": "chunk states", "reversed": "state-gradient scans"}
  references = {}
  for entry in FLAGS.sweep_states.split(","):
    scans = state_scan_entry(entry.removesuffix(":f32"), precision)
    for direction, (a, bs, weights) in (wide_operands if entry.endswith(":f32") else operands).items():
      run = jax.jit(functools.partial(scans, reverse=direction == "reversed"))
      try:
        ms = time_ms(run, a, bs, weights, chunk_decay, initials)
      except (jax.errors.JaxRuntimeError, ValueError) as error:  # e.g. a Hopper tiling refused
        failed(f"{direction} state scans {entry}", error)
        continue
      states = run(a, bs, weights, chunk_decay, initials)
      reference = references.setdefault(direction, states)
      error = max(rel_diff(x, y) for x, y in zip(states, reference))
      print(f"{direction:>8} state scans {entry:<16} {ms:8.3f} ms "
            f"{moved[stage[direction]] / ms / 1e6:7.0f} GB/s (vs first: {error:.1e})", flush=True)


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

  def time_torch(fn):  # timing.median_ms's rule, between CUDA events
    calls = sample_calls(warm_up(lambda: (fn(), torch.cuda.synchronize())))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(FLAGS.repeats):
      start.record()
      for _ in range(calls):
        fn()
      end.record()
      torch.cuda.synchronize()
      times.append(start.elapsed_time(end) / calls)
    return float(np.median(times))

  with torch.no_grad():
    fwd_ms = time_torch(forward)
  o, grads = forward_backward()
  as_numpy = lambda t: t.detach().float().cpu().numpy()
  return fwd_ms, time_torch(forward_backward), as_numpy(o), [as_numpy(x) for x in grads]


class Variant(NamedTuple):
  """One timed setting of `mesa_chunked`."""
  impl: str
  chunk_size: int
  matmul_precision: str
  solve_precision: str | None  # None: the solves at matmul_precision; else refined (mesa_chunked's solve_precision)
  cg_tol: float | None
  save_states: bool
  cg_preconditioner: str

  @property
  def name(self) -> str:
    return (f"{self.impl} C={self.chunk_size} {self.matmul_precision}"
            + (f"/{self.solve_precision} refined" if self.solve_precision else "")
            + (f" tol={self.cg_tol:g}" if self.cg_tol else "") + (" saved" if self.save_states else "")
            + (" pcg" if self.cg_preconditioner == "jacobi" else ""))


def parse_variants(text) -> list[Variant]:
  """"impl:chunk:precision[/solve_precision][:tol][:save][:pcg],..." -> Variants (tol 0: fixed --cg_steps whatever
  --cg_tol says; "save": `mesa_chunked(save_states=True)`; "pcg": cg_preconditioner="jacobi", else
  --cg_preconditioner); empty: the flags' own setting, xla and pallas."""
  if not text:
    return [Variant(impl, FLAGS.chunk_size, FLAGS.matmul_precision, None, cg_tol(), False, FLAGS.cg_preconditioner)
            for impl in ("xla", "pallas")]
  variants = []
  for entry in text.split(","):
    impl, chunk, precisions, *rest = entry.split(":")
    precision, _, solve_precision = precisions.partition("/")
    tol = [field for field in rest if field not in ("save", "pcg")]
    variants.append(Variant(impl, int(chunk), precision, solve_precision or None,
                            (float(tol[0]) or None) if tol else cg_tol(), "save" in rest,
                            "jacobi" if "pcg" in rest else FLAGS.cg_preconditioner))
  return variants


def fla_or_none(args, w):
  """`time_fla`'s result, or None with --fla=false or where flash-linear-attention does not import."""
  if not FLAGS.fla:
    return None
  try:
    return time_fla(args, w)
  except ImportError as error:
    print(f"flash-linear-attention not available ({error}); skipped")
    return None


def main(argv):
  del argv
  args, w, tokens, flops = setup_from_flags()
  results = {}
  # fla is timed before and after our variants (its Triton autotuning runs in the first): a GPU whose clocks drift
  # through the process would otherwise favour whichever side runs first. Ratios are taken against the faster.
  fla_before = fla_or_none(args, w)
  for variant in parse_variants(FLAGS.variants):
    name, tol, chunk_size = variant.name, variant.cg_tol, variant.chunk_size
    op = functools.partial(mesa_chunked, chunk_size=chunk_size, cg_steps=FLAGS.cg_steps, cg_tol=tol,
                           impl=variant.impl, cg_init=FLAGS.cg_init, cg_preconditioner=variant.cg_preconditioner,
                           matmul_precision=variant.matmul_precision, solve_precision=variant.solve_precision,
                           save_states=variant.save_states)
    fwd, fwd_bwd = jax.jit(op), forward_and_backward(op)
    try:
      fwd_ms, fwd_bwd_ms = time_ms(fwd, *args), time_ms(fwd_bwd, w, *args)
      steps = cg_steps_used(op, w, args)
    except Exception as error:  # e.g. a kernel that does not compile here: report it, go on with the rest
      failed(name, error)
      continue
    # Flops count one solve of --cg_steps steps: with a tolerance or refined solves TFLOP/s would mislead: left out.
    counted = not (tol or variant.solve_precision)
    report(f"{name} forward", fwd_ms, tokens, flops(chunk_size=chunk_size) if counted else None)
    report(f"{name} fwd+bwd", fwd_bwd_ms, tokens, flops(chunk_size=chunk_size, backward=True) if counted else None)
    print(f"{name} CG steps: forward mean {steps[0]:.2f} max {steps[1]:.0f}, adjoint mean {steps[2]:.2f} "
          f"max {steps[3]:.0f}", flush=True)
    grads, o = fwd_bwd(w, *args)
    results[name] = (fwd_ms, fwd_bwd_ms, o, grads)
  if FLAGS.stages:
    print_stages(args)
  if FLAGS.sweep_chunks:
    sweep_solve_kernel(args, tokens)
  if FLAGS.sweep_states:
    sweep_state_scans(args)
  fla_after = fla_or_none(args, w) if fla_before else None
  if fla_after:
    for when, (fwd_ms, fwd_bwd_ms, *_) in (("before ours", fla_before), ("after ours", fla_after)):
      report(f"fla chunk_mesa_net forward ({when})", fwd_ms, tokens, flops())
      report(f"fla chunk_mesa_net fwd+bwd ({when})", fwd_bwd_ms, tokens, flops(backward=True))
    results["fla"] = (min(fla_before[0], fla_after[0]), min(fla_before[1], fla_after[1]), *fla_after[2:])
  base_name, (base_fwd, base_fwd_bwd, base_o, base_grads) = next(iter(results.items()))
  print(f"agreement with {base_name}: max |diff| / max |{base_name}|")
  for name, (fwd_ms, fwd_bwd_ms, o, grads) in results.items():
    diffs = " ".join(f"d{n}={rel_diff(a, b):.1e}" for n, a, b in zip(("q", "k", "v", "g", "beta", "lam"),
                                                                      grads, base_grads))
    print(f"{name:>32}: fwd {fwd_ms / base_fwd:5.2f}x, fwd+bwd {fwd_bwd_ms / base_fwd_bwd:5.2f}x; "
          f"o={rel_diff(o, base_o):.1e} {diffs}")
  if FLAGS.compare_exact:  # the dense solve per token (f64 unless --noexact_f64): the ground truth of every row above
    exact_grads, exact_o = exact_forward_and_backward(w, *args, slice_size=FLAGS.exact_slice,
                                                      float64=FLAGS.exact_f64)
    print(f"error against the exact solve ({'f64' if FLAGS.exact_f64 else 'f32'}): max |diff| / max |exact|")
    for name, (*_, o, grads) in results.items():
      diffs = " ".join(f"d{n}={rel_diff(a, b):.1e}" for n, a, b in zip(("q", "k", "v", "g", "beta", "lam"), grads,
                                                                        exact_grads))
      print(f"{name:>32}: o={rel_diff(o, exact_o):.1e} {diffs}")
  if "fla" in results:
    fla_fwd, fla_fwd_bwd = results["fla"][:2]
    print(f"against fla's faster timing of the two: fwd {fla_fwd:.3f} ms, fwd+bwd {fla_fwd_bwd:.3f} ms")
    for name, (fwd_ms, fwd_bwd_ms, *_) in results.items():
      print(f"{name:>32} / fla time: fwd {fwd_ms / fla_fwd:.2f}, fwd+bwd {fwd_bwd_ms / fla_fwd_bwd:.2f}")


if __name__ == "__main__":
  app.run(main)
