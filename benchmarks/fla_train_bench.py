"""The PyTorch comparison for the trainer: one full train step (forward, loss, backward, clip, fused AdamW) of
flash-linear-attention's `MesaNetForCausalLM` on random tokens, f32 params under bf16 autocast.

  python benchmarks/fla_train_bench.py --hidden=768 --layers=12 --heads=6 --vocab=32000 --batch=8 --length=2048

Needs torch with CUDA and flash-linear-attention 0.6.0 (`fla`; on the device carried as wheels, see WORKSPACE.md).
Prints parameters, median ms/step, tokens/s and peak GPU memory.
"""
import statistics
import time

import torch
from absl import app, flags
from fla.models import MesaNetConfig, MesaNetForCausalLM

_HIDDEN = flags.DEFINE_integer("hidden", 768, "hidden size")
_LAYERS = flags.DEFINE_integer("layers", 12, "blocks")
_HEADS = flags.DEFINE_integer("heads", 6, "Mesa heads (head dim 128)")
_VOCAB = flags.DEFINE_integer("vocab", 32000, "vocabulary")
_BATCH = flags.DEFINE_integer("batch", 8, "sequences per step")
_LENGTH = flags.DEFINE_integer("length", 2048, "tokens per sequence")
_CG_STEPS = flags.DEFINE_integer("cg_steps", 30, "CG steps in training")
_REPEATS = flags.DEFINE_integer("repeats", 10, "timed steps; the median is reported")


def main(argv):
  del argv
  config = MesaNetConfig(hidden_size=_HIDDEN.value, num_hidden_layers=_LAYERS.value, num_heads=_HEADS.value,
                         head_dim=128, vocab_size=_VOCAB.value, max_cg_step_training=_CG_STEPS.value)
  model = MesaNetForCausalLM(config).cuda()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1,
                                fused=True)
  tokens = torch.randint(0, _VOCAB.value, (_BATCH.value, _LENGTH.value), device="cuda")

  def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
      loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  start = time.perf_counter()
  for _ in range(3):  # Triton autotuning and allocator warm-up
    step()
  torch.cuda.synchronize()
  print(f"warm-up (autotuning) {time.perf_counter() - start:.0f} s", flush=True)
  torch.cuda.reset_peak_memory_stats()
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    loss = step()
    torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
  ms = statistics.median(times) * 1e3
  params = sum(p.numel() for p in model.parameters())
  print(f"fla MesaNetForCausalLM: {params:,} params, batch {_BATCH.value} x {_LENGTH.value}: {ms:.1f} ms/step, "
        f"{_BATCH.value * _LENGTH.value / ms * 1e3:,.0f} tokens/s, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} "
        f"GiB, loss {loss.item():.3f}")


if __name__ == "__main__":
  app.run(main)
