"""Times MAD populations and estimates the whole grid's GPU-hours from them: ms per member-step of each architecture
at the paper's MAD shapes (2 blocks, d 128, 8 × 16 heads, batch 32) per sequence length × population size, Mesa
setting and dtype, on random tokens, read out by the LM or (--autoencoder) by compression's autoencoder; one JSON line
per case, then a table and the estimate.

    python -m benchmarks.mad_bench --archs=mesanet,hawk_mesa@pallas:32 --shapes=128x64,128x256,1024x64 \
        --mesa=pallas:32,xla:32,pallas:16:default --out=$OUT/mad_bench.jsonl
    python -m benchmarks.mad_bench --archs=mesanet,gdn --shapes=32x5,32x20,64x10 --autoencoder   # compression's
    python -m benchmarks.mad_bench --report --out=mad_bench.jsonl       # the table and estimate of measured rows

A case: one `Population.train` call that compiles (compile_s: the compile and that call), one warm-up call
(warmup_ms_per_step: excluded from the timing), then calls until --seconds have passed (at least --calls), blocking
on the result; a member-step is one optimiser step of one slot. Each call runs min(--steps, --call_tokens / tokens
per step) steps. `compiles` counts the backend compilations during the warm-up and timed calls: anything but 0 means
the step was retraced, and the timing is not the step's. With --trace_dir, one more call is profiled and the row
gets the device time per step of its busiest kernels (`kernels`: Triton kernels by their Pallas names, XLA fusions
by theirs) and what each computes (`kernel_sources`: its HLO instruction and the source lines of its ops, from the
compiled program, `hlo_sources.py`); the trace stays in the directory for Perfetto / TensorBoard. Each line is
written as soon as it is measured, so a run cut short keeps what it timed; the table and estimate cover every row in
--out.
"""
import argparse
import collections
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import gpu_profile, hlo_sources
from mesanet_jax.mad import grid, models, training, variants
from mesanet_jax.mad.population import Population
from mesanet_jax.ops.gated_delta_rule import TRIANGULAR

_COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **_: _COMPILES.append(seconds) if event == "/jax/core/compile/backend_compile_duration"
    else None)


def _data(length: int, vocab: int, examples: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(vocab, size=(1, examples, length + 1)).astype(np.int32)
  return {"train_inputs": jnp.asarray(tokens[..., :-1]), "train_targets": jnp.asarray(tokens[..., 1:]),
          "test_inputs": jnp.asarray(tokens[:, :64, :-1]), "test_targets": jnp.asarray(tokens[:, :64, 1:]),
          "num_train": jnp.asarray([examples], jnp.int32)}


def _readout(args) -> dict:
  """A row's read-out where it is not the LM's (`readout` reads it back)."""
  return {"readout": "autoencoder"} if args.autoencoder else {}


def readout(row: dict) -> str:
  """How a row's model was read out: "lm", or "autoencoder" (compression's, --autoencoder)."""
  return row.get("readout", "lm")


def time_case(arch: str, length: int, slots: int, mesa: tuple, dtype: str, args) -> dict:
  impl, chunk, precision = mesa
  # gdn@inverse:64, gdn@pallas: GDN's triangular solve or implementation, not a Mesa impl
  gdn_impl = "pallas" if arch == "gdn" and impl == "pallas" else ""
  triangular = impl if impl in TRIANGULAR else ""
  # transformer@pallas, transformer@xla: the attention kernel (AttentionConfig.kernel); hawk@pallas, hawk@xla: how
  # the recurrence runs (HawkConfig.impl)
  attention_kernel = impl if arch == "transformer" else ""
  hawk_impl = impl if arch == "hawk" else ""
  # The residual stream as the grid keeps it (grid.Settings.residual_dtype); recorded where it differs from dtype.
  residual = args.residual_dtype if args.residual_dtype not in ("", dtype) else None
  config = models.mad_config(arch, args.vocab, dtype=jnp.dtype(dtype).type, chunk_size=chunk,
                             residual_dtype=jnp.dtype(residual).type if residual else None,
                             impl="" if arch in ("gdn", "transformer", "hawk") else impl, cg_steps=args.cg_steps,
                             cg_tol=args.cg_tol,
                             matmul_precision=precision, gdn_triangular=triangular, gdn_impl=gdn_impl,
                             attention_kernel=attention_kernel, hawk_impl=hawk_impl)
  population = Population(config, args.autoencoder, training.Protocol(), slots)
  steps = max(1, min(args.steps, args.call_tokens // (slots * 32 * length)))
  examples = 4096  # random training sequences on the device
  data = _data(length, args.vocab, examples)
  state = population.init(examples)
  state = population.assign(state, jnp.ones(slots, bool), total=jnp.full(slots, 10 ** 8),
                            per_epoch=jnp.full(slots, examples // 32), dataset=jnp.zeros(slots, jnp.int32),
                            vocab=jnp.full(slots, args.vocab), lr=jnp.full(slots, 1e-3),
                            weight_decay=jnp.full(slots, 0.1), keys=jax.random.split(jax.random.key(0), slots))
  jax.block_until_ready(state)

  def run(state):
    start = time.perf_counter()
    state, loss = population.train(state, data, num_steps=steps)
    loss.block_until_ready()
    return state, loss, time.perf_counter() - start

  state, _, compile_s = run(state)
  compiled = len(_COMPILES)
  state, _, warmup_s = run(state)
  calls, seconds = 0, 0.0
  while calls < max(args.calls, 1) or seconds < args.seconds:
    state, loss, elapsed = run(state)
    calls, seconds = calls + 1, seconds + elapsed
  per_step = seconds / (calls * steps)
  kernels = {}
  if args.trace_dir:
    profile = gpu_profile.kernel_times(run, state, trace_dir=args.trace_dir)
    busiest = profile.busiest(24)
    program = hlo_sources.instructions(population.compiled_train(data, examples).as_text())
    ms_per_step = lambda seconds: round(seconds * 1e3 / steps, 4)
    kernels = {"kernels": {name: ms_per_step(seconds) for name, _, seconds in busiest},
               "kernels_ms": ms_per_step(profile.device_s),
               "kernel_sources": {name: hlo_sources.describe(name, profile.hlo_ops[name], program)
                                  for name, _, _ in busiest}}
  c = config.mesa
  if "mesa" in config.mixers:
    mixer = {"impl": c.impl, "chunk": c.chunk_size, "precision": c.matmul_precision, "cg_steps": c.cg_steps_train,
             "cg_tol": c.cg_tol}
  elif "gdn" in config.mixers:
    mixer = {"gdn_impl": config.gdn.impl, "chunk": config.gdn.chunk_size, "triangular": config.gdn.triangular}
  elif "attention" in config.mixers:
    mixer = {"attention_kernel": config.attention.kernel}
  else:
    mixer = {}
  if "lru" in config.mixers:
    mixer["hawk_impl"] = config.lru.impl
  stream = {"residual_dtype": residual} if residual else {}
  return {"arch": arch, "length": length, "slots": slots, **_readout(args), **mixer, "dtype": dtype, **stream,
          "steps_per_call": steps, "calls": calls, "ms_per_step": 1e3 * per_step,
          "ms_per_member_step": 1e3 * per_step / slots, "tokens_per_s": slots * 32 * length / per_step,
          "compile_s": compile_s, "warmup_ms_per_step": 1e3 * warmup_s / steps, "compiles": len(_COMPILES) - compiled,
          "loss": float(jnp.mean(loss)), "device": jax.devices()[0].device_kind, **kernels}


def setting(row: dict) -> tuple:
  """What a row measured besides the shape: architecture, mixer settings (Mesa's impl:chunk:precision:CG steps,
  GDN's chunk and triangular solve, or its recurrent Pallas kernels; Hawk's Pallas scan), dtype (and the residual
  stream's where it differs)."""
  if "impl" in row:
    mixer = f"{row['impl']}:{row['chunk']}:{row['precision']}:{row['cg_steps']}"
    if row.get("cg_tol") is not None:
      mixer += f" tol {row['cg_tol']:g}"
  elif row.get("gdn_impl") == "pallas":
    mixer = "recurrent pallas"
  elif "attention_kernel" in row:
    mixer = f"attention {row['attention_kernel']}"
  else:
    mixer = f"chunk {row['chunk']} {row.get('triangular', 'solve')}" if "chunk" in row else "-"
  if row.get("hawk_impl") == "pallas":
    mixer = "lru pallas" if mixer == "-" else f"{mixer}, lru pallas"
  stream = f" ({row['residual_dtype']} stream)" if row.get("residual_dtype") else ""
  return row["arch"], mixer, row["dtype"] + stream


def nearest(measured: dict, length: int, slots: int) -> tuple[int, int]:
  """The measured (length, slots) closest to (length, slots): the length first, then the slots, in log scale."""
  log_gap = lambda a, b: abs(math.log(a / b))
  best_length = min({l for l, _ in measured}, key=lambda l: (log_gap(l, length), -l))
  return best_length, min((s for l, s in measured if l == best_length), key=lambda s: (log_gap(s, slots), -s))


ESTIMATE = ("GPU-h = Σ_groups steps_g · S_g · t(L_g, S_g) / 3.6e6. Groups: the grid's (architecture, read-out, "
            "length L_g) of all 66 variants × 8 (lr, wd); S_g = grid.population_size (≤ max_slots, ≤ max_tokens / "
            "(32 L_g)); steps_g = grid.population_steps: a freed slot takes the longest queued job, 200 epochs each, "
            "no early stop (mad-lab stops at 99.9 %: an upper bound); every slot computes each step (a population "
            "shrinks once its queue is empty, grid.compacted_size: the cost lies between this and 'perfectly "
            "packed'). t(L, S) = ms "
            "per member-step measured at the nearest (L', S') (length first, log scale) × L / L'. A job's steps include "
            "its evaluations, one per epoch of its test batches forward at a third of a step each (`job_cost`: "
            "+3 % at 12,800 examples, +53 % at 800, +160 % for memorize); compiles (~10 s per group) not included; "
            "the autoencoder groups (compression) are costed from the rows measured with --autoencoder where there "
            "are any, else as the LM.")
# A test batch's forward pass, in training steps (forward and backward): what an evaluation costs per batch.
FORWARD_SHARE = 1 / 3


def job_cost(job: training.Job, protocol: training.Protocol) -> float:
  """A job's training steps plus its evaluations (every epoch, the whole test set forward) in step equivalents."""
  test_batches = job.variant.num_test_examples // protocol.batch_size
  return job.steps(protocol) + protocol.epochs * test_batches * FORWARD_SHARE


def estimate(rows: list[dict], settings: grid.Settings) -> list[tuple]:
  """(setting, GPU-hours, member-step-hours) of the whole grid for every measured setting; member-step-hours is the
  same sum over the jobs' own steps (perfect packing, no idle slots)."""
  by_setting = collections.defaultdict(lambda: {False: {}, True: {}})  # read out by the autoencoder or not
  for row in rows:  # a shape measured twice counts at its faster reading
    measured = by_setting[setting(row)][readout(row) == "autoencoder"]
    shape = (row["length"], row["slots"])
    measured[shape] = min(measured.get(shape, math.inf), row["ms_per_member_step"])
  out = []
  for key, by_readout in by_setting.items():
    if not by_readout[False]:  # the LM's rows cost every group; an autoencoder's only its own
      continue
    groups = collections.defaultdict(list)
    for job in training.jobs([key[0]], variants.all_variants()):
      groups[grid.group_key(job)].append(job_cost(job, settings.protocol))
    total = packed = 0.0
    for (_, autoencoder, length), job_steps in groups.items():
      slots = grid.population_size(settings, len(job_steps), length)
      measured = by_readout[autoencoder] or by_readout[False]
      at_length, at_slots = nearest(measured, length, slots)
      ms = measured[(at_length, at_slots)] * length / at_length
      total += grid.population_steps(job_steps, slots) * slots * ms
      packed += sum(job_steps) * ms
    out.append((key, total / 3.6e6, packed / 3.6e6))
  return out


def report(rows: list[dict], settings: grid.Settings):
  rows = [r for r in rows if "error" not in r]
  print("\n| arch | mixer (Mesa impl:chunk:precision:CG steps; GDN chunk, triangular solve) | dtype | read-out | L | "
        "slots | ms/step | ms/member-step | compile s | warm-up ms/step | compiles timed |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|")
  for r in sorted(rows, key=lambda r: (setting(r), readout(r), r["length"], r["slots"])):
    arch, mesa, dtype = setting(r)
    print(f"| {arch} | {mesa} | {dtype} | {readout(r)} | {r['length']} | {r['slots']} | "
          f"{r['ms_per_step']:.4g} | {r['ms_per_member_step']:.4g} | {r['compile_s']:.3g} | "
          f"{r['warmup_ms_per_step']:.4g} | {r['compiles']} |")
  print(f"\nWhole-grid estimate: {ESTIMATE}\n\n| arch | mixer | dtype | GPU-hours | perfectly packed |\n"
        "|---|---|---|---|---|")
  for (arch, mesa, dtype), hours, packed in sorted(estimate(rows, settings), key=lambda e: (e[0][0], e[1])):
    print(f"| {arch} | {mesa} | {dtype} | {hours:.3g} | {packed:.3g} |")
  for r in rows:
    if r.get("kernels"):
      print(f"\nDevice ms per step, busiest kernels: {' '.join(map(str, setting(r)))} {readout(r)} "
            f"L{r['length']} S{r['slots']} "
            f"({r['ms_per_step']:.4g} ms per step timed, {r.get('kernels_ms', 0):.4g} ms in kernels)")
      sources = r.get("kernel_sources", {})
      for name, ms in r["kernels"].items():
        print(f"  {ms:9.4f}  {name[:100]}" + (f"\n             {sources[name][:300]}" if sources.get(name) else ""))


def _mesa_settings(text: str) -> list[tuple]:
  """"impl[:chunk[:precision]],..." -> [(impl, chunk, precision)] (chunk 0 where not given); "" -> [("", 0, "")]
  (FAST_MESA's)."""
  parts = [s.split(":") for s in text.split(",")] if text else [[""]]
  return [(p[0], int(p[1]) if len(p) > 1 and p[1] else 0, p[2] if len(p) > 2 else "") for p in parts]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--archs", default="mesanet,gdn,transformer,hawk,hawk_mesa",
                      help="architectures; arch@impl:chunk[:precision] gives one its own Mesa setting (GDN: its "
                      "triangular solve and chunk, e.g. gdn@:32,gdn@inverse:64, or its recurrent kernels, gdn@pallas; "
                      "the Transformer: its attention kernel, transformer@pallas; Hawk: its recurrence, hawk@pallas)")
  parser.add_argument("--shapes", default="128x64", help="length x slots cases, comma-separated")
  parser.add_argument("--mesa", default="", help="Mesa impl:chunk[:precision] settings, comma-separated (other "
                      "archs use the first's chunk); '': models.FAST_MESA's for the backend")
  parser.add_argument("--dtypes", default="float32")
  parser.add_argument("--residual_dtype", default=grid.Settings.residual_dtype,
                      help="the residual stream's dtype where --dtypes is another ('': the dtype's; default the "
                           "grid's, float32 around bf16 sublayers)")
  parser.add_argument("--cg_steps", type=int, default=0, help="0: models.exact_cg_steps (16)")
  parser.add_argument("--cg_tol", type=float, default=None, help="Mesa's CG tolerance (unset: --cg_steps fixed steps)")
  parser.add_argument("--steps", type=int, default=10, help="steps per call at most")
  parser.add_argument("--call_tokens", type=int, default=1 << 23, help="tokens per call at most (fewer steps)")
  parser.add_argument("--calls", type=int, default=2, help="timed calls at least")
  parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds at least")
  parser.add_argument("--vocab", type=int, default=64)
  parser.add_argument("--autoencoder", action="store_true",
                      help="read out by compression's autoencoder (every position from the last one's state), not "
                           "the LM; the estimate costs the autoencoder groups from these rows")
  parser.add_argument("--max_tokens", type=int, default=1 << 21, help="skip cases of more tokens per step")
  parser.add_argument("--trace_dir", default="", help="profile one more call per case there (kernel times)")
  parser.add_argument("--report", action="store_true", help="only the table and estimate of the rows in --out")
  parser.add_argument("--out", default="mad_bench.jsonl")
  parser.add_argument("--max_slots", type=int, default=grid.Settings.max_slots,
                      help="the estimate's populations hold at most this many slots (e.g. 10: the grid in pieces "
                           "whose saved slots travel between device calls, WORKSPACE 'Grid pieces')")
  args = parser.parse_args()
  settings = grid.Settings(results="", max_slots=args.max_slots)
  if not args.report:
    mesa = _mesa_settings(args.mesa)
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    for item in args.archs.split(","):
      arch, _, own = item.partition("@")
      for impl, chunk, precision in _mesa_settings(own) if own else (mesa if "mesa" in arch else mesa[:1]):
        for length, slots in shapes:
          for dtype in args.dtypes.split(","):
            if slots * 32 * length > args.max_tokens:
              continue
            try:
              row = time_case(arch, length, slots, (impl, chunk, precision), dtype, args)
            except Exception as e:  # an out-of-memory or lowering failure ends one case, not the run
              row = {"arch": arch, "length": length, "slots": slots, **_readout(args), "impl": impl,
                     "chunk": chunk, "precision": precision, "dtype": dtype,
                     "error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as f:
              f.write(json.dumps(row) + "\n")
  if os.path.exists(args.out):
    with open(args.out) as f:
      report([json.loads(line) for line in f if line.strip()], settings)


if __name__ == "__main__":
  main()
