"""Decoding speed at flash-linear-attention's ~125M shape (d 768, 12 Mesa blocks, 6 × 128 heads, vocab 32,000, tied,
SwiGLU 2,304; random init, bf16 weights (--param_dtype) and activations, greedy): ours and fla's
`MesaNetForCausalLM.generate` side by side in one device process, same prompts (random tokens).

  python benchmarks/decode_bench.py --out=$OUT          # the default sweep, in priority order for --budget_s
  python benchmarks/decode_bench.py --batches=1,32 --prompts=512 --extra_variants= --fla=False --long_tokens=0

Ours is what `models/generate.py` runs: a jitted prefill (last position's logits only), then a `lax.scan` of decode
steps, each `LanguageModel.decode_step` + greedy `sample`. It is compiled as two executables (prefill per batch and
prompt, decode per batch and length) so that one compile serves every prompt length: decode time per token = the
decode scan of n tokens / n, which is time(1 + n new) − time(1 new) of `generate` (both pay the prefill). fla:
(time(generate 1 + n new) − time(generate 1 new)) / n, HF generate with fla's cache (its fused decode step, 30 fixed
CG steps). Variants of ours: `impl[:tol][:warm]`, e.g. "pallas:1e-4:warm" = the fused Pallas decode kernel with
decode_tol 1e-4 and CG warm-started from the previous token (impl="xla": `mesa_decode_step`, a few hundred small
kernels per token).

Reported per (system, batch, prompt, new tokens): prefill ms (prompt → first token), decode ms/token, tokens/s, mean
CG steps per token (Mesa layers × heads), memory: ours, what XLA reserves for the prefill and the decode executables
(arguments + outputs + temporaries; peak = the larger; the decode one is the same for every prompt, and 256 vs 4,096
new shows what grows with the length: the generated tokens only); fla, torch's peak allocation of the whole
generate. And per variant, the kernels one decode step launches (from the compiled HLO). First, one layer's Mesa
decode step alone (XLA op; fused kernel at several num_warps; 30 steps and tol 1e-4), checked against the XLA op.
Then runs in priority order (B = 1 and 32 at the first prompt, then the long generations, then the rest) and starts
no run after --budget_s; every result is appended to <out>/decode_bench.jsonl at once and the table is written to
<out>/decode_bench.md. Compiles are shared where they can be: one decode executable per (variant, batch, length)
serves every prompt, one prefill per (impl, batch, prompt) every variant of that impl.

fla needs torch with CUDA and flash-linear-attention 0.6.0 (on the device carried as wheels, see WORKSPACE.md).
"""
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU in this process

import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from benchmarks.gpu_profile import kernel_times
from benchmarks.hlo_sources import launches_per_step
from benchmarks.timing import median_ms
from mesanet_jax.layers.mesa import MesaConfig
from mesanet_jax.models.config import LMConfig
from mesanet_jax.models.decoding import for_decoding
from mesanet_jax.models.generate import sample
from mesanet_jax.models.lm import LanguageModel
from mesanet_jax.ops import MesaState, mesa_decode_step
from pallas_kernels.mesa_cg.decode import mesa_decode_fused

_VARIANTS = flags.DEFINE_list("variants", ["pallas"], "ours at every batch and prompt: impl[:decode_tol][:warm]")
_EXTRA = flags.DEFINE_list("extra_variants", ["xla", "pallas:1e-4:warm"],
                           "ours at B = 1 and 32 with the first prompt only")
_BATCHES = flags.DEFINE_list("batches", ["1", "8", "32", "128"], "batch sizes")
_PROMPTS = flags.DEFINE_list("prompts", ["512", "8192"], "prompt lengths")
_NEW = flags.DEFINE_integer("new_tokens", 256, "generated tokens timed per run")
_LONG = flags.DEFINE_integer("long_tokens", 4096, "a longer generation for the flatness check (0: none)")
_LONG_BATCHES = flags.DEFINE_list("long_batches", ["1", "32"], "batches of the longer generation (shortest prompt)")
_LONG_VARIANTS = flags.DEFINE_list("long_variants", ["pallas"], "variants of the longer one")
_FLA = flags.DEFINE_bool("fla", True, "also time flash-linear-attention's generate")
_STEP_ALONE = flags.DEFINE_list("step_alone_batches", ["1", "32", "128"], "first, time one layer's Mesa decode step "
                                "alone at these batches: the XLA op, the kernel per --step_alone_warps")
_WARPS = flags.DEFINE_list("step_alone_warps", ["4", "8", "16"], "num_warps of the fused kernel timed alone")
_PROFILE = flags.DEFINE_list("profile", [], "variant@batch entries (e.g. pallas:1e-4:warm@1): before the runs, the "
                              "kernels of --new_tokens decode steps at the first prompt, from a profiler trace")
_DUMP_HLO = flags.DEFINE_bool("dump_hlo", False, "write each compiled decode loop's optimised HLO to --out "
                               "(decode_<variant>_B<batch>.hlo.txt): which fusion is which kernel of a profile")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed runs of ours (median); fla runs once after a warm-up")
_LAYERS = flags.DEFINE_integer("layers", 12, "Mesa blocks")
_D_MODEL = flags.DEFINE_integer("d_model", 768, "hidden size")
_HEADS = flags.DEFINE_integer("heads", 6, "Mesa heads (head dim 128)")
_VOCAB = flags.DEFINE_integer("vocab", 32_000, "vocabulary")
_CG_STEPS = flags.DEFINE_integer("cg_steps", 30, "CG steps per token (the cap with a tolerance)")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "bfloat16", ["bfloat16", "float32"],
                                 "stored weights (a trained checkpoint: float32; decoding casts them once to bf16)")
_PRECISION = flags.DEFINE_enum("matmul_precision", "highest", ["highest", "default"], "prefill's chunked matmuls")
_BUDGET = flags.DEFINE_float("budget_s", 360, "no new run starts after this many seconds")
_OUT = flags.DEFINE_string("out", os.environ.get("OUT", "."), "directory for decode_bench.jsonl / .md")


def lm_config(variant: str) -> LMConfig:
  """impl[:tol][:warm] -> our model's config (chunk 32 for the Pallas prefill, its faster size on an H200; 64 XLA).
  SwiGLU width 3·d (fla: intermediate_size, set to the same)."""
  impl, *rest = variant.split(":")
  mesa = MesaConfig(num_heads=_HEADS.value, head_dim=128, impl=impl, chunk_size=32 if impl == "pallas" else 64,
                    matmul_precision=_PRECISION.value, cg_steps_train=_CG_STEPS.value, cg_steps_decode=_CG_STEPS.value,
                    decode_tol=next((float(r) for r in rest if r != "warm"), None), decode_warm_start="warm" in rest)
  return LMConfig(vocab_size=_VOCAB.value, d_model=_D_MODEL.value, mixers=("mesa",) * _LAYERS.value, mlp_ratio=3,
                  tie_embeddings=True, dtype=jnp.bfloat16, param_dtype=jnp.dtype(_PARAM_DTYPE.value).type, mesa=mesa)


def footprint(compiled) -> int:
  """Bytes XLA reserves for an executable: arguments + outputs + temporaries − what outputs alias."""
  m = compiled.memory_analysis()
  return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def step_inputs(batch: int):
  """One token's Mesa inputs at fla's head shape and a state of 256 earlier random tokens."""
  rng = np.random.default_rng(0)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  heads, dim = _HEADS.value, 128
  q, k = (jnp.asarray(unit(rng.normal(size=(batch, heads, dim))), jnp.float32) for _ in range(2))
  v = jnp.asarray(rng.normal(size=(batch, heads, dim)), jnp.float32)
  g, beta = jnp.full((batch, heads), np.log(0.99), jnp.float32), jnp.full((batch, heads), 0.5, jnp.float32)
  past = unit(rng.normal(size=(batch, heads, 256, dim)))
  state = MesaState(jnp.asarray(np.einsum("bhrk,bhrl->bhkl", past, past) / 4, jnp.float32),
                    jnp.asarray(np.einsum("bhrk,bhrv->bhkv", past, rng.normal(size=past.shape)) / 4, jnp.float32))
  return q, k, v, g, beta, jnp.ones((heads, dim), jnp.float32), state


def step_alone(batch: int, step, reference=None, calls: int = 100) -> str:
  """µs per call of `step` (one layer's Mesa decode step) in a jitted chain of `calls`, each on the state the previous
  one wrote: its own time plus its launch, without the rest of the model; the CG steps of one call (they vary with a
  tolerance); with a `reference` (the XLA op, same options), the largest deviation of o and the state from it,
  relative to their scale, and whether the CG steps agree: the kernel checked on the device."""
  *token, state = step_inputs(batch)
  chain = jax.jit(lambda state: jax.lax.fori_loop(0, calls, lambda _, s: step(*token, s)[1], state))
  o, new_state, iters, _ = jax.jit(step)(*token, state)
  text = f"{median_ms(chain, state, repeats=_REPEATS.value) / calls * 1e3:.1f} ({float(jnp.mean(iters)):.1f})"
  if reference is None:
    return text
  expected = reference(*token, state)
  error = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
              for a, b in zip(jax.tree.leaves((o, new_state)), jax.tree.leaves(expected[:2])))
  return text + f" Δ {error:.0e}{'' if bool(jnp.all(iters == expected[2])) else ' steps differ'}"


def step_alone_table(batches) -> str:
  fixed, tol = dict(cg_steps=_CG_STEPS.value), dict(cg_steps=_CG_STEPS.value, tol=1e-4)
  xla = {"": jax.jit(functools.partial(mesa_decode_step, **fixed)), "tol": jax.jit(functools.partial(mesa_decode_step,
                                                                                                     **tol))}
  steps = {"xla": (xla[""], None)}
  steps.update({f"pallas warps={w}": (functools.partial(mesa_decode_fused, num_warps=int(w), **fixed), xla[""])
                for w in _WARPS.value})
  steps["pallas warps=8 tol=1e-4"] = (functools.partial(mesa_decode_fused, num_warps=8, **tol), xla["tol"])
  lines = ["| Mesa decode step of one layer | " + " | ".join(f"B={b}: µs (CG steps) Δ vs XLA" for b in batches) + " |",
           "|---" * (len(batches) + 1) + "|"]
  for name, (step, reference) in steps.items():
    lines.append(f"| {name} | " + " | ".join(step_alone(b, step, reference) for b in batches) + " |")
    print(lines[-1], flush=True)
  return "\n".join(lines)


class Ours:
  """Our model at fla's shape with one set of random weights; every variant merges them into its own graph."""

  def __init__(self):
    jax.config.update("jax_threefry_gpu_kernel_lowering", True)  # as the trainer: fast init compile on GPU
    self.params = jax.jit(lambda: nnx.state(LanguageModel(lm_config("xla"), rngs=nnx.Rngs(0))))()
    self.prefills, self.decodes, self.launches = {}, {}, {}

  def model(self, variant):
    return nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: LanguageModel(lm_config(variant), rngs=nnx.Rngs(0)))),
                     self.params)

  def prefill(self, variant, prompt):
    """(first token [B], cache for `variant`), seconds, footprint bytes; compiled once per impl and prompt shape
    (a warm-start variant's cache is the same with a zero solution added: `MesaLayer.to_cache`)."""
    impl = variant.split(":")[0]
    if (impl, prompt.shape) not in self.prefills:
      graphdef = nnx.graphdef(self.model(impl))

      def run(params, prompt):
        logits, cache = nnx.merge(graphdef, params).prefill(prompt, max_len=prompt.shape[1] + 1, last_only=True)
        return sample(logits, None, 0.0, None), cache
      self.prefills[impl, prompt.shape] = jax.jit(run).lower(self.params, prompt).compile()
    compiled = self.prefills[impl, prompt.shape]
    seconds = median_ms(compiled, self.params, prompt, repeats=_REPEATS.value) / 1e3
    token, cache = compiled(self.params, prompt)
    blocks = self.model(variant).blocks
    cache = tuple(c._replace(state=block.mixer.to_cache(c.state)) for block, c in zip(blocks, cache))
    return (token, cache), seconds, footprint(compiled)

  def decode(self, variant, token, cache, steps: int):
    """(seconds for `steps` tokens, mean CG steps per token, decode footprint bytes); the first compile of a variant
    records its kernels per step in `launches`."""
    compiled = self.compiled_decode(variant, token, cache, steps)
    _, cg_steps = compiled(self.params, token, cache)
    seconds = median_ms(compiled, self.params, token, cache, repeats=_REPEATS.value) / 1e3
    return seconds, float(jnp.mean(cg_steps)), footprint(compiled)

  def compiled_decode(self, variant, token, cache, steps: int):
    """The decode scan of `steps` tokens for `variant` at this batch, compiled once."""
    key = (variant, token.shape[0], steps)
    if key not in self.decodes:
      graphdef = nnx.graphdef(self.model(variant))

      def run(params, token, cache):
        model = for_decoding(nnx.merge(graphdef, params))  # as `generate`: once, before the loop

        def step(carry, _):
          token, cache = carry
          logits, cache, cg_steps = model.decode_step(token, cache)
          token = sample(logits, None, 0.0, None)
          return (token, cache), (token, cg_steps)
        return jax.lax.scan(step, (token, cache), None, length=steps)[1]
      self.decodes[key] = jax.jit(run).lower(self.params, token, cache).compile()
      hlo = self.decodes[key].as_text()
      self.launches.setdefault(variant, launches_per_step(hlo))
      if _DUMP_HLO.value:
        with open(os.path.join(_OUT.value, f"decode_{variant.replace(':', '_')}_B{token.shape[0]}.hlo.txt"), "w") as f:
          f.write(hlo)
    return self.decodes[key]

  def profile(self, entry: str) -> str:
    """variant@batch -> where the time of --new_tokens decode steps goes, per token (`gpu_profile.kernel_times`)."""
    variant, batch = entry.rsplit("@", 1)
    prompt = np.random.default_rng(0).integers(0, _VOCAB.value, (int(batch), int(_PROMPTS.value[0])), dtype=np.int32)
    (token, cache), _, _ = self.prefill(variant, jnp.asarray(prompt))
    compiled = self.compiled_decode(variant, token, cache, _NEW.value)
    jax.block_until_ready(compiled(self.params, token, cache))
    times = kernel_times(compiled, self.params, token, cache)
    return f"profile ours {entry}, " + times.summary(per=_NEW.value, unit="token")


class Fla:
  """flash-linear-attention's MesaNetForCausalLM at the same shape, bf16, HF generate (greedy)."""

  def __init__(self):
    import torch
    from fla.models import MesaNetConfig, MesaNetForCausalLM
    self.torch = torch
    config = MesaNetConfig(hidden_size=_D_MODEL.value, num_hidden_layers=_LAYERS.value, num_heads=_HEADS.value,
                           head_dim=128, vocab_size=_VOCAB.value, intermediate_size=3 * _D_MODEL.value,
                           tie_word_embeddings=True, max_position_embeddings=16_384,
                           max_cg_step_training=_CG_STEPS.value, max_cg_step_decoding=_CG_STEPS.value)
    self.model = MesaNetForCausalLM(config).cuda().to(torch.bfloat16).eval()

  def generate(self, prompt, new: int) -> float:
    torch = self.torch
    with torch.inference_mode():
      torch.cuda.synchronize()
      start = time.perf_counter()
      self.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                          min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0)
      torch.cuda.synchronize()
      return time.perf_counter() - start

  def run(self, prompt_np, new: int) -> dict:
    torch = self.torch
    prompt = torch.from_numpy(prompt_np).cuda()
    self.generate(prompt, 2)  # Triton autotuning and allocator warm-up at this shape
    prefill = self.generate(prompt, 1)
    torch.cuda.reset_peak_memory_stats()
    total = self.generate(prompt, 1 + new)
    memory = torch.cuda.max_memory_allocated()
    torch.cuda.empty_cache()  # hand the cache back: JAX allocates in this process too
    return {"prefill_ms": prefill * 1e3, "decode_s": total - prefill, "mean_cg_steps": float(_CG_STEPS.value),
            "memory_bytes": memory}


def work_list():
  """(system, variant, batch, prompt, new tokens) in priority order."""
  batches, prompts = [int(b) for b in _BATCHES.value], [int(p) for p in _PROMPTS.value]
  first = [(b, prompts[0]) for b in batches if b in (1, 32)]
  rest = [(b, p) for p in prompts for b in batches if (b, p) not in first]
  systems = [("ours", v) for v in _VARIANTS.value] + ([("fla", "fla")] if _FLA.value else [])
  extra = [("ours", v) for v in _EXTRA.value if v not in _VARIANTS.value]
  runs = [(s, v, b, p, _NEW.value) for b, p in first for s, v in systems + extra]
  runs += [("ours", v, int(b), prompts[0], _LONG.value) for v in _LONG_VARIANTS.value for b in _LONG_BATCHES.value
           if _LONG.value]
  return runs + [(s, v, b, p, _NEW.value) for b, p in rest for s, v in systems]


def table(rows) -> str:
  lines = ["| system | B | prompt | new | prefill ms | decode ms/token | tokens/s | CG steps/token | peak GiB | "
           "decode GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
  gib = lambda r, key: f"{r[key] / 2**30:.2f}" if key in r else "—"
  for r in rows:
    if "skipped" in r:
      lines.append(f"| {r['system']} | {r['batch']} | {r['prompt']} | {r['new']} | {r['skipped']} ||||||")
      continue
    ms = r["decode_s"] / r["new"] * 1e3
    lines.append(f"| {r['system']} | {r['batch']} | {r['prompt']} | {r['new']} | {r['prefill_ms']:.1f} | {ms:.3f} | "
                 f"{r['batch'] / ms * 1e3:,.0f} | {r['mean_cg_steps']:.1f} | {gib(r, 'memory_bytes')} | "
                 f"{gib(r, 'decode_memory_bytes')} |")
  return "\n".join(lines)


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  log = open(os.path.join(_OUT.value, "decode_bench.jsonl"), "a")
  start, rows = time.perf_counter(), []
  alone = step_alone_table([int(b) for b in _STEP_ALONE.value]) if _STEP_ALONE.value else ""
  ours, fla = Ours(), None
  print(f"{jax.devices()[0].device_kind}: {sum(x.size for x in jax.tree.leaves(ours.params)):,} params "
        f"({time.perf_counter() - start:.0f} s)", flush=True)
  profiles = []
  for entry in _PROFILE.value:
    profiles.append(ours.profile(entry))
    print(profiles[-1], flush=True)
  for system, variant, batch, length, new in work_list():
    row = {"system": "fla" if system == "fla" else f"ours {variant}", "batch": batch, "prompt": length, "new": new}
    prompt = np.random.default_rng(length).integers(0, _VOCAB.value, (batch, length), dtype=np.int32)
    if time.perf_counter() - start > _BUDGET.value:
      row["skipped"] = "budget"
    else:
      try:
        if system == "fla":
          fla = fla or Fla()
          row.update(fla.run(prompt.astype(np.int64), new))
        else:
          (token, cache), prefill_s, prefill_memory = ours.prefill(variant, jnp.asarray(prompt))
          decode_s, cg_steps, memory = ours.decode(variant, token, cache, new)
          row.update(prefill_ms=prefill_s * 1e3, decode_s=decode_s, mean_cg_steps=cg_steps,
                     memory_bytes=max(memory, prefill_memory), decode_memory_bytes=memory)
      except Exception as e:  # e.g. out of memory at the largest shape: record it, go on
        row["skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    row["elapsed_s"] = time.perf_counter() - start
    rows.append(row)
    log.write(json.dumps(row) + "\n")
    log.flush()
    print(table([row]).splitlines()[-1], f"({row['elapsed_s']:.0f} s)", flush=True)
  report = alone + "\n\n" + "\n\n".join(profiles) + "\n\n" + table(rows) + "\n\nkernels per decode step (compiled HLO):\n" + "\n".join(
      f"- ours {v}: {n}" for v, n in ours.launches.items())
  with open(os.path.join(_OUT.value, "decode_bench.md"), "w") as f:
    f.write(report + "\n")
  print("\n" + report)


if __name__ == "__main__":
  app.run(main)
