"""The paper's language models (App. G.3/G.4): `--config=experiments/configs/lm.py:<architecture>,<size>,<budget>`
with architecture mesanet | gdn | transformer | swa | hawk | hawk_mesa | hybrid, size small (140M) | medium (440M) | large (940M),
budget 15b | 50b. Peak learning rates are the paper's Table 8 (PAPER_NOTES §5.3); SWA uses 1e-3 (G.3), and our
hybrid (Mesa + SWA, not in the paper) takes Mesa's.

Settings: AdamW β = (0.9, 0.98), ε = 1e-8, wd 0.1, 2000 warmup steps from 1e-6, cosine to 10 % of peak, clip 1.0,
batch 256 × 2048 (524,288 tokens/step; 15B tokens ≈ 28,610 steps, 50B ≈ 95,367), f32 params with bf16 activations.
Data: data.path = a directory written by mesanet-prepare (the paper: GPT-2's BPE, 50,257 ids); the tokenizer and
model.vocab_size are the manifest's (README, "Training on your corpus").
"""
from mesanet_jax.train.config import base_config

# Table 8: (size, budget) -> peak LR for each architecture.
PEAK_LR = {
    ("small", "15b"): {"transformer": 0.0025, "gdn": 0.001, "mesanet": 0.003, "hawk": 0.002, "hawk_mesa": 0.0025},
    ("small", "50b"): {"transformer": 0.003, "gdn": 0.001, "mesanet": 0.00095, "hawk": 0.001, "hawk_mesa": 0.001},
    ("medium", "15b"): {"transformer": 0.0015, "gdn": 0.0025, "mesanet": 0.0025, "hawk": 0.0025, "hawk_mesa": 0.002},
    ("medium", "50b"): {"transformer": 0.001, "gdn": 0.00095, "mesanet": 0.001, "hawk": 0.0009, "hawk_mesa": 0.0009},
    ("large", "15b"): {"transformer": 0.002, "gdn": 0.002, "mesanet": 0.002, "hawk": 0.002, "hawk_mesa": 0.002},
    ("large", "50b"): {"transformer": 0.0008, "gdn": 0.0009, "mesanet": 0.00085, "hawk": 0.0009,
                       "hawk_mesa": 0.00085},
}
TOKENS = {"15b": 15e9, "50b": 50e9}


def get_config(arg="mesanet,small,15b"):
  parts = arg.split(",")
  architecture, size = parts[0], parts[1] if len(parts) > 1 else "small"
  budget = parts[2] if len(parts) > 2 else "15b"
  if (size, budget) not in PEAK_LR:
    raise ValueError(f"lm.py: size must be small|medium|large and budget 15b|50b, got {arg!r}")
  lrs = PEAK_LR[(size, budget)]
  lr = {"swa": 0.001, "hybrid": lrs["mesanet"]}.get(architecture, lrs.get(architecture))
  if lr is None:
    raise ValueError(f"lm.py: architecture must be mesanet|gdn|transformer|swa|hawk|hawk_mesa|hybrid, got "
                     f"{architecture!r}")
  c = base_config()
  c.model.size = size
  c.model.architecture = architecture
  c.model.dtype = "bfloat16"
  c.data.source = "arrayrecord"
  c.data.tokenizer = ""  # the manifest's
  c.data.seq_len = 2048
  c.train.batch_size = 256
  c.train.num_steps = int(round(TOKENS[budget] / (256 * 2048)))
  c.train.log_every = 50
  c.train.eval_every = 2000
  c.train.eval_batches = 8
  c.optim.lr = lr
  c.optim.warmup_steps = 2000
  c.checkpoint.every_steps = 1000
  return c
