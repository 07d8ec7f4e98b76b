"""The embedded default: a tiny byte-level MesaNet on the Lee corpus of English news (shipped with gensim), on CPU.

`mesanet-train` with no flags runs this; train loss falls from ~5.5 (uniform over bytes) to ~2.3 in a few minutes.
"""
from mesanet_jax.data.text import DEFAULT_CORPUS
from mesanet_jax.train.config import base_config


def get_config():
  c = base_config()
  c.model.size = "tiny"  # 4 Mesa blocks, d_model 64, 2 heads × 32, chunk 16
  c.model.cg_steps = 10
  c.data.source = "text"
  c.data.path = DEFAULT_CORPUS
  c.data.seq_len = 128
  c.train.num_steps = 400
  c.train.batch_size = 16
  c.train.log_every = 10
  c.train.eval_every = 100
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 40
  c.checkpoint.every_steps = 100
  return c
