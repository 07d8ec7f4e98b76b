"""The full training step (loss, gradients, AdamW update) of our models and of flash-linear-attention's
`MesaNetForCausalLM`, each variant in its own subprocess (so peak memory is per variant), in one command.

  python benchmarks/train_step_bench.py --out=$OUT/train_step_bench.json          # the device run, ~8 min
  python benchmarks/train_step_bench.py --tiny --variants=ours,ours@full,gdn,fla  # CPU smoke run

Variants (`--variants`, run in this order until `--budget_s` is spent; `name@remat` sets model.remat, a `+states` /
`-states` suffix sets model.save_mesa_states to True / False (else the fast path's), e.g. `ours@none-states`):
- ours: fla's ~125M shape (d 768, 12 Mesa blocks, 6 × 128 heads, SwiGLU 2,304, vocab 32,000, tied) through the
  trainer's own pieces (`train/config.py` defaults: no Mesa flags, so impl="auto"; `train/state.py`, `train/steps.py`:
  fused chunked cross-entropy, AdamW with clipping), bf16 activations, f32 params, donated state.
- small, medium: our presets (14 × 768 and 28 × 1024, vocab 50,257); transformer, gdn: the small preset's
  Transformer (cuDNN attention on GPU) and Gated DeltaNet.
- fla: `MesaNetForCausalLM` of flash-linear-attention 0.6.0 at ours' shape (tied, intermediate_size 2,304, 30 CG
  steps), fused cross-entropy, autocast bf16, f32 params, fused AdamW with clipping; fla_linear_ce: the same with
  fla's fused linear cross-entropy (never forms the logits).
Each at --batch × --length (8 × 2048; --tiny: the tiny preset's sizes at 2 × 64 on CPU, fla only with CUDA).

Per variant: compile (or warm-up) seconds, median ms/step over --repeats synchronised steps, tokens/s, MFU (analytic
train flops of `train/metrics.py` at the CG cap; fla's counted as ours' at its chunk 64 and 30 steps, over the dense
bf16 peak of the device kind), peak GiB (jax: the device's peak_bytes_in_use; torch: max_memory_allocated), the Mesa
path (impl, chunk, precision, tol) and the last loss. Results go to --out (JSON, a list of rows) as they come, and a
table is printed at the end. A variant that fails or runs out of time is recorded with its error.
fla needs torch with CUDA and flash-linear-attention 0.6.0 (on the device carried as wheels, see WORKSPACE.md).
"""
import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

_VARIANTS = flags.DEFINE_list("variants", ["ours", "fla", "ours-states", "ours@none", "ours@full", "ours@mixer",
                                           "small", "medium", "transformer", "gdn", "fla_linear_ce"],
                              "variants in priority order, name[@remat][+states|-states]: ours, small, medium, "
                              "transformer, gdn, fla, fla_linear_ce")
_BATCH = flags.DEFINE_integer("batch", 8, "sequences per step")
_LENGTH = flags.DEFINE_integer("length", 2048, "tokens per sequence")
_REPEATS = flags.DEFINE_integer("repeats", 10, "timed steps per variant (median)")
_TINY = flags.DEFINE_bool("tiny", False, "CPU smoke run: the tiny preset's sizes for every variant of ours, 2 × 64")
_BUDGET = flags.DEFINE_float("budget_s", 540, "no variant starts after this many seconds; each gets what is left")
_OUT = flags.DEFINE_string("out", os.path.join(os.environ.get("OUT", "."), "train_step_bench.json"), "JSON output")
_WORKER = flags.DEFINE_string("worker", "", "internal: run this one variant and write its row to --out")

# name: (model size, architecture, overrides of config.model); "ours" is fla's shape.
OURS = {
    "ours": ("small", "mesanet", dict(num_layers=12, vocab_size=32_000)),
    "small": ("small", "mesanet", {}),
    "medium": ("medium", "mesanet", {}),
    "transformer": ("small", "transformer", {}),
    "gdn": ("small", "gdn", {}),
}
FLA = {"fla": False, "fla_linear_ce": True}  # name: fuse_linear_cross_entropy


STATES_SUFFIXES = {"+states": True, "-states": False}  # model.save_mesa_states


def _parse(variant: str) -> tuple[str, str | None, bool | None]:
  """"name[@remat][+states|-states]" -> (name, remat or None, save_mesa_states or None)."""
  base, save_states = variant, None
  for suffix, value in STATES_SUFFIXES.items():
    if variant.endswith(suffix):
      base, save_states = variant.removesuffix(suffix), value
  if "+" in base or "-" in base:
    raise ValueError(f"--variants: {variant!r}: the only suffixes are +states and -states")
  name, _, remat = base.partition("@")
  if name not in OURS and name not in FLA:
    raise ValueError(f"--variants: unknown variant {name!r}; known: {sorted(OURS) + sorted(FLA)}")
  if (remat or save_states is not None) and name in FLA:
    raise ValueError(f"--variants: {variant!r}: @remat and ±states apply to our models only")
  return name, remat or None, save_states


def _ours_config(name: str, remat: str | None, save_states: bool | None, batch: int, length: int, tiny: bool):
  from mesanet_jax.train import config as train_config
  size, architecture, overrides = OURS[name]
  config = train_config.base_config()
  config.model.update(size="tiny" if tiny else size, architecture=architecture, dtype="bfloat16",
                      **({} if tiny else overrides))
  if remat:
    config.model.remat = remat
  if save_states is not None:
    config.model.save_mesa_states = save_states
  config.train.batch_size = batch
  config.data.seq_len = length
  train_config.validate(config)
  return config


def _timed(step, repeats: int, before_timing=lambda: None) -> tuple[float, float]:
  """(seconds of the first call: compile or autotuning, median seconds of `repeats` more after one warm-up call);
  step() syncs."""
  start = time.perf_counter()
  step()
  first = time.perf_counter() - start
  step()  # allocator warm-up
  before_timing()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def run_ours(name: str, remat: str | None, save_states: bool | None, batch: int, length: int, repeats: int,
             tiny: bool) -> dict:
  import jax
  import numpy as np
  jax.config.update("jax_threefry_gpu_kernel_lowering", True)  # as the trainer: fast parameter init on GPU
  from mesanet_jax import sharding
  from mesanet_jax.models import fast_path
  from mesanet_jax.train import config as train_config, metrics, steps
  from mesanet_jax.train.state import init_state, setup

  config = _ours_config(name, remat, save_states, batch, length, tiny)
  lm = train_config.lm_config(config.model)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  graphdef, tx, abstract, state_sh, probes = setup(config, lm, mesh)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
  state = init_state(config, lm, tx, state_sh)
  tokens = np.random.default_rng(0).integers(0, lm.vocab_size, (batch, length + 1), dtype=np.int32)
  host = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": np.ones((batch, length), np.float32)}
  batch_sh = sharding.batch_shardings(host, mesh)
  data = jax.device_put(host, batch_sh)
  train_step = jax.jit(steps.make_train_step(config, graphdef, tx, probes), in_shardings=(state_sh, batch_sh),
                       out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
  out = {}

  def step():
    nonlocal state
    with jax.set_mesh(mesh):
      state, out["metrics"] = train_step(state, data)
    jax.block_until_ready(out["metrics"])

  first, seconds = _timed(step, repeats)
  stats = jax.devices()[0].memory_stats() or {}
  flops = metrics.train_flops(lm, num_params, batch, length)
  peak = metrics.peak_flops(jax.devices()[0].device_kind)
  return {"params": num_params, "compile_s": first, "ms_per_step": seconds * 1e3, "flops_per_step": flops,
          "mfu": flops / seconds / peak if peak else None,
          "peak_gib": stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None,
          "loss": float(out["metrics"]["loss"]), "remat": lm.remat, "save_mesa_states": lm.mesa.save_states,
          **fast_path.describe(lm)}


def run_fla(name: str, batch: int, length: int, repeats: int, tiny: bool) -> dict:
  import dataclasses

  import torch
  if not torch.cuda.is_available():
    raise RuntimeError("fla needs a CUDA device")
  from fla.models import MesaNetConfig, MesaNetForCausalLM

  from mesanet_jax.models.config import preset
  from mesanet_jax.train import metrics

  size, architecture, overrides = OURS["ours"]
  ours = preset("tiny" if tiny else size, architecture)
  vocab = ours.vocab_size if tiny else overrides["vocab_size"]
  layers = ours.n_layers if tiny else overrides["num_layers"]
  config = MesaNetConfig(hidden_size=ours.d_model, num_hidden_layers=layers, num_heads=ours.mesa.num_heads,
                         head_dim=ours.mesa.head_dim, intermediate_size=ours.mlp_ratio * ours.d_model,
                         vocab_size=vocab, tie_word_embeddings=True, max_cg_step_training=30,
                         fuse_cross_entropy=True, fuse_linear_cross_entropy=FLA[name])
  model = MesaNetForCausalLM(config).cuda()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1,
                                fused=True)
  tokens = torch.randint(0, vocab, (batch, length), device="cuda")
  losses = []

  def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
      loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    losses.append(loss.item())

  first, seconds = _timed(step, repeats, torch.cuda.reset_peak_memory_stats)
  params = sum(p.numel() for p in model.parameters())
  lm = dataclasses.replace(ours, vocab_size=vocab, mixers=ours.mixers[:layers],
                           mesa=dataclasses.replace(ours.mesa, chunk_size=64, cg_steps_train=30))
  flops = metrics.train_flops(lm, params, batch, length)
  peak = metrics.peak_flops(torch.cuda.get_device_name())
  return {"params": params, "compile_s": first, "ms_per_step": seconds * 1e3, "flops_per_step": flops,
          "mfu": flops / seconds / peak if peak else None, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
          "loss": losses[-1], "device_kind": torch.cuda.get_device_name(), "mesa_impl": "fla", "mesa_chunk_size": 64,
          "mesa_cg_steps": 30}


def worker(variant: str) -> None:
  name, remat, save_states = _parse(variant)
  batch, length = (2, 64) if _TINY.value else (_BATCH.value, _LENGTH.value)
  if name in FLA:
    row = run_fla(name, batch, length, _REPEATS.value, _TINY.value)
  else:
    row = run_ours(name, remat, save_states, batch, length, _REPEATS.value, _TINY.value)
  row.update(variant=variant, batch=batch, length=length, tokens_per_s=batch * length / row["ms_per_step"] * 1e3)
  with open(_OUT.value, "w") as f:
    json.dump(row, f)


def _table(rows: list[dict]) -> str:
  lines = ["| variant | params | ms/step | k tokens/s | MFU | peak GiB | Mesa path | compile s |", "|---" * 8 + "|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['variant']} | {r['error'][:80]} | | | | | | |")
      continue
    path = f"{r.get('mesa_impl')} C={r.get('mesa_chunk_size')} {r.get('mesa_matmul_precision', '')} " \
           f"tol={r.get('mesa_cg_tol')} remat={r.get('remat', '-')}"
    path += " states saved" if r.get("save_mesa_states") else ""
    mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
    peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
    lines.append(f"| {r['variant']} | {r['params'] / 1e6:.1f}M | {r['ms_per_step']:.1f} | "
                 f"{r['tokens_per_s'] / 1e3:.1f} | {mfu} | {peak} | {path} | {r['compile_s']:.0f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  if _WORKER.value:
    return worker(_WORKER.value)
  for variant in _VARIANTS.value:
    _parse(variant)  # every name checked before anything runs
  start, rows = time.perf_counter(), []
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  for variant in _VARIANTS.value:
    left = _BUDGET.value - (time.perf_counter() - start)
    if left < 10:
      rows.append({"variant": variant, "error": "not started: --budget_s spent"})
      continue
    result = f"{_OUT.value}.{variant.replace('@', '_').replace('+', '_')}.part"
    command = [sys.executable, os.path.abspath(__file__), f"--worker={variant}", f"--out={result}",
               f"--batch={_BATCH.value}", f"--length={_LENGTH.value}", f"--repeats={_REPEATS.value}",
               f"--tiny={_TINY.value}"]
    try:
      done = subprocess.run(command, timeout=left, capture_output=True, text=True)
      if done.returncode:
        rows.append({"variant": variant, "error": (done.stderr.strip().splitlines() or ["failed"])[-1]})
      else:
        with open(result) as f:
          rows.append(json.load(f))
        os.remove(result)
    except subprocess.TimeoutExpired:
      rows.append({"variant": variant, "error": f"timed out after {left:.0f} s"})
    print(_table(rows[-1:]).splitlines()[-1], flush=True)
    with open(_OUT.value, "w") as f:
      json.dump(rows, f, indent=1)
  print(_table(rows))
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
