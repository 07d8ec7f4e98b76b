"""Multi-query associative recall (Zoology) on a 2-layer tiny MesaNet: query accuracy rises from chance (1/32)."""
from mesanet_jax.train.config import base_config


def get_config():
  c = base_config()
  c.model.size = "tiny"
  c.model.num_layers = 2
  c.model.cg_steps = 10
  c.data.source = "synthetic"
  c.data.task = "mqar"
  c.data.seq_len = 64
  c.data.vocab_size = 64
  c.data.num_pairs = 8
  c.train.num_steps = 1000
  c.train.batch_size = 32
  c.train.log_every = 20
  c.train.eval_every = 200
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.1
  c.checkpoint.every_steps = 500
  return c
