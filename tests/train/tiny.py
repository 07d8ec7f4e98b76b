"""A seconds-long trainer config for tests: `--config=tests/train/tiny.py:text` (the default corpus) or `:mqar`."""
import os

from mesanet_jax.data.text import DEFAULT_CORPUS
from mesanet_jax.train.config import base_config

TEXT_FLAG = f"--config={os.path.abspath(__file__)}:text"  # the command-line flag of get_config("text")


def get_config(source="text"):
  c = base_config()
  c.model.num_layers = 1
  c.model.cg_steps = 4
  c.data.seq_len = 32
  if source == "mqar":
    c.data.source, c.data.task, c.data.vocab_size, c.data.num_pairs = "synthetic", "mqar", 32, 4
  else:
    c.data.source, c.data.path = "text", DEFAULT_CORPUS
  c.train.num_steps = 6
  c.train.batch_size = 8
  c.train.log_every = 1
  c.train.eval_every = 1000
  c.train.eval_batches = 1
  c.train.progress_bar = False
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 2
  c.checkpoint.every_steps = 1000
  return c
