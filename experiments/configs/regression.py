"""In-context linear regression: y = wᵀx with a fresh w per sequence; the masked MSE at the x positions falls from
~1 (predicting 0) as the model learns to regress in context."""
from mesanet_jax.train.config import base_config


def get_config():
  c = base_config()
  c.model.size = "tiny"
  c.model.num_layers = 2
  c.model.cg_steps = 10
  c.data.source = "synthetic"
  c.data.task = "regression"
  c.data.dim = 8
  c.data.seq_len = 64
  c.train.num_steps = 1000
  c.train.batch_size = 32
  c.train.log_every = 20
  c.train.eval_every = 200
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.checkpoint.every_steps = 500
  return c
