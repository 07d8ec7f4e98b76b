"""A MAD task (paper App. F, PAPER_NOTES §6.7): `--config=experiments/configs/mad.py:<task>` with task one of
in_context_recall, noisy_recall, fuzzy_recall, memorize, selective_copy, compress.

The paper's protocol: 2 layers, embedding 128, 8 heads of key size 16, batch 32, AdamW β = (0.9, 0.98), cosine
schedule with warmup from 1e-7 over 750 steps to a minimum of 1e-5; the reported number is the best mean accuracy
over lr ∈ {3e-3, 1e-3, 5e-4, 1e-4} × wd ∈ {0.01, 0.1} (sweep by overriding --config.optim.lr / weight_decay).
"""
from mesanet_jax.train.config import base_config

TASKS = ("in_context_recall", "noisy_recall", "fuzzy_recall", "memorize", "selective_copy", "compress")


def get_config(task="in_context_recall"):
  if task not in TASKS:
    raise ValueError(f"mad.py: task must be one of {TASKS}, got {task!r}")
  c = base_config()
  c.model.size = "tiny"
  c.model.num_layers = 2
  c.data.source = "synthetic"
  c.data.task = task
  c.data.seq_len = 128
  c.data.vocab_size = 64
  c.data.num_pairs = 16
  c.train.num_steps = 6000
  c.train.batch_size = 32
  c.train.log_every = 50
  c.train.eval_every = 500
  c.optim.lr = 1e-3
  c.optim.init_lr = 1e-7
  c.optim.warmup_steps = 750
  c.optim.final_lr_frac = 1e-2  # 1e-5 / 1e-3
  c.optim.weight_decay = 0.1
  c.checkpoint.every_steps = 1000
  return c
