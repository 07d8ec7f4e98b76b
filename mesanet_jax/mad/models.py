"""The MAD models: the paper's 2-block backbone (width 128, 8 heads × 16; `preset("mad", architecture)`) read out as a
language model, or for compression as mad-lab's autoencoder (`mad/model/auto_encoder.py`, `benchmark.py:213`).

AutoEncoder: the blocks encode the sequence; only the last position's hidden state is kept; the decoder adds the
sin-cos embedding of each output position to it and maps it through mad-lab's "non-expanding MLP decoder"
(RMSNorm, Linear, GELU, RMSNorm, Linear, GELU) and an RMSNorm + Linear read-out to logits for every position.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mesanet_jax.layers.norm import RMSNorm
from mesanet_jax.layers.params import linear, normal_linear_init, scale_linear_init
from mesanet_jax.models.config import LMConfig, preset
from mesanet_jax.models.lm import LanguageModel, embed_tokens, embedding_table, make_blocks, train_blocks

ARCHITECTURES = ("mesanet", "transformer", "gdn", "hawk", "hawk_mesa")
# How the MAD models compute Mesa when nothing else is asked for (mad_config, the grid, mad_bench): per JAX backend,
# (impl, chunk_size, matmul_precision), the cheapest population step measured for these shapes (Dk = 16; mad_bench,
# benchmarks/RESULTS.md "MAD population step"): on the GPU C = 16 with Triton's three bf16 passes ("high"), 7 % faster
# than C = 32 "highest" at L 128 and 1024 on an H100, within 1.4e-5 of the exact solve (pallas_check). Elsewhere (CPU:
# tests) the XLA op: Pallas only interprets there.
FAST_MESA = {"gpu": ("pallas", 16, "high")}
OTHER_MESA = ("xla", 64, "highest")
# How Gated DeltaNet computes when nothing else is asked for, per backend (`GatedDeltaNetConfig.impl`): on the GPU the
# recurrent Pallas kernels, half the chunked XLA form's population step at L 128 and 1024 (H100, RESULTS.md "MAD
# population step"); elsewhere the chunked XLA form.
FAST_GDN = {"gpu": "pallas"}
# How the Transformer attends when nothing else is asked for, per backend (`AttentionConfig.kernel`): on the GPU jax's
# Pallas flash attention, 0.26 against 0.38 ms a member-step at L 128 × 64 slots and 3.9 against 12.0 at L 1024 × 8
# for "auto" (XLA in f32, which forms the [T, T] scores; H100, RESULTS.md "MAD population step"); elsewhere "auto".
FAST_ATTENTION = {"gpu": "pallas"}
# How Hawk's recurrence runs when nothing else is asked for, per backend (`HawkConfig.impl`): on the GPU the Pallas
# linear scan (`pallas_kernels/linear_scan.py`), 14.12 against 16.91 ms a step for the associative scan at L 128 ×
# 64 slots, bf16 (H100, RESULTS.md "MAD step: the bf16 embedding scatter and Hawk's scan"); elsewhere the scan.
FAST_HAWK = {"gpu": "pallas"}


# The MAD models' embedding: mad-lab's (initial std 0.02, no √d input scale), which the paper's MAD runs follow
# (Table 6: "we follow Poli et al. precisely"). On memorize V 2048-8192 it gives MesaNet 92.3 / 41.5 / 27.1 and the
# Transformer 96.9 / 49.3 / 21.0 against 73.5 / 15.9 / 6.1 and 94.7 / 30.4 / 6.3 with the paper's LM embedding
# (1/√d, scaled by √d on input), which puts both within reach of Table 9 (benchmarks/RESULTS.md "MAD memorize").
EMBED_STD = 0.02
# The MAD models' linear layers: the variance of PyTorch's nn.Linear default init (U(±1/√fan_in): 1/(3 fan_in)), which
# mad-lab's models have, instead of our N(0, 1/fan_in). The Transformer's memorize V 4096 (lr 3e-3, wd 0.1, CPU):
# 85.8 % against 49.4 % (benchmarks/RESULTS.md "MAD memorize: the linear layers' init").
LINEAR_INIT_VARIANCE = 1 / 3
# mad-lab's AutoEncoder (compression) re-initialises every nn.Linear weight it holds, the encoder's mixers and MLPs
# included, as N(0, 0.02²) with zero biases (`auto_encoder.py: _init_weights`, applied after construction), where its
# LanguageModel keeps PyTorch's default (`LINEAR_INIT_VARIANCE`). `AutoEncoder(linear_std=...)` reproduces it.
MADLAB_AUTOENCODER_LINEAR_STD = 0.02


def exact_cg_steps(mesa) -> int:
  """The preset's CG steps (the paper's 30), or the head size where that is fewer: CG solves a Dk-dimensional system
  exactly in Dk steps, and at the MAD heads' Dk = 16 the f32 output and gradients after 16 steps are those after 30
  to 2e-8 of their scale, i.e. f32 rounding (`tests/mad/test_models.py`; 12 steps: 4e-7, 8 steps: 5e-5), at ~22 %
  less MesaNet step time (benchmarks/RESULTS.md "MAD population step")."""
  return min(mesa.cg_steps_train, mesa.head_dim)


def mad_config(architecture: str, vocab_size: int, *, dtype=jnp.float32, residual_dtype=None, chunk_size: int = 0,
               impl: str = "", cg_steps: int = 0, cg_tol: float | None = None, matmul_precision: str = "",
               gdn_triangular: str = "", gdn_impl: str = "", attention_kernel: str = "", hawk_impl: str = "",
               tie_embeddings: bool = True, embed_std: float | None = EMBED_STD,
               linear_init_variance: float = LINEAR_INIT_VARIANCE) -> LMConfig:
  """The paper's MAD model for `architecture` (2 blocks, d 128, 8 × 16 heads; Hawk width 160), computing in `dtype`
  with its residual stream in `residual_dtype` (None: dtype; `LMConfig.residual_dtype`). impl, chunk_size (of Mesa
  and GDN), cg_steps and matmul_precision change how Mesa computes, not the model; 0 / "" take `FAST_MESA`'s for the
  backend (GDN keeps the preset's chunk) and `exact_cg_steps`; cg_tol None runs every solve for cg_steps (the paper's
  fixed steps), else each system stops at ‖r‖ ≤ cg_tol·‖r₀‖ (`MesaConfig.cg_tol`); gdn_triangular ("" the preset's) how
  GDN solves its chunks' triangular systems (`GatedDeltaNetConfig.triangular`), gdn_impl ("" `FAST_GDN`'s for the
  backend, else "xla") how GDN's operator runs (`GatedDeltaNetConfig.impl`); attention_kernel ("" `FAST_ATTENTION`'s for
  the backend, else "auto") how the Transformer attends (`AttentionConfig.kernel`); hawk_impl ("" `FAST_HAWK`'s for the
  backend, else "xla") how Hawk's recurrence runs (`HawkConfig.impl`). tie_embeddings=False gives the language model its
  own read-out matrix; embed_std is the embedding's initial std with no √d input scale (`EMBED_STD`, mad-lab's), None
  the paper's LM embedding (1/√d, scaled by √d on input; `LMConfig.embed_std`); linear_init_variance multiplies the
  linear layers' initial variance (`LINEAR_INIT_VARIANCE`, mad-lab's; 1: ours)."""
  if architecture not in ARCHITECTURES:
    raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
  config = preset("mad", architecture, vocab_size=vocab_size, dtype=dtype, residual_dtype=residual_dtype,
                  tie_embeddings=tie_embeddings, embed_std=embed_std, linear_init_variance=linear_init_variance)
  fast_impl, fast_chunk, fast_precision = FAST_MESA.get(jax.default_backend(), OTHER_MESA)
  mesa = dataclasses.replace(config.mesa, chunk_size=chunk_size or fast_chunk, impl=impl or fast_impl,
                             cg_steps_train=cg_steps or exact_cg_steps(config.mesa), cg_tol=cg_tol,
                             matmul_precision=matmul_precision or fast_precision)
  gdn = dataclasses.replace(config.gdn, chunk_size=chunk_size or config.gdn.chunk_size,
                            triangular=gdn_triangular or config.gdn.triangular,
                            impl=gdn_impl or FAST_GDN.get(jax.default_backend(), "xla"))
  attention = dataclasses.replace(config.attention,
                                  kernel=attention_kernel or FAST_ATTENTION.get(jax.default_backend(), "auto"))
  lru = dataclasses.replace(config.lru, impl=hawk_impl or FAST_HAWK.get(jax.default_backend(), "xla"))
  return dataclasses.replace(config, mesa=mesa, gdn=gdn, attention=attention, lru=lru)


def sincos(length: int, dim: int) -> np.ndarray:
  """[length, dim] sin | cos position embedding, frequencies 10000^(−i/(dim/2 − 1)) (mad-lab `posemb_sincos_1d`)."""
  half = dim // 2
  frequencies = np.exp(-math.log(10000) / (half - 1) * np.arange(half))
  angles = np.arange(length)[:, None] * frequencies[None]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


class AutoEncoder(nnx.Module):
  """tokens [B, T] -> logits [B, T, V] f32, every position decoded from the last position's hidden state. Its linear
  kernels start as the language model's (`config.linear_init_variance`), or, with `linear_std`, every one of them as
  N(0, linear_std²) (mad-lab's autoencoder: `MADLAB_AUTOENCODER_LINEAR_STD`)."""

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs, linear_std: float | None = None):
    self.config = config
    d, kw = config.d_model, dict(rngs=rngs, dtype=config.dtype, param_dtype=config.param_dtype)
    self.embed = embedding_table(config, rngs)
    self.blocks = make_blocks(config, rngs)
    self.norms = nnx.List([RMSNorm(d, eps=config.norm_eps, **kw) for _ in range(3)])
    self.hidden = nnx.List([linear(d, d, axes=("embed", "mlp"), use_bias=True, **kw) for _ in range(2)])
    self.readout = linear(d, config.vocab_size, axes=("embed", "vocab"), use_bias=True, **kw)
    if linear_std is None:
      scale_linear_init(self, config.linear_init_variance)
    else:
      normal_linear_init(self, linear_std, rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    config = self.config
    x = embed_tokens(config, self.embed, tokens)
    x = train_blocks(config, self.blocks, x)
    x = x[:, -1:] + jnp.asarray(sincos(tokens.shape[1], config.d_model), config.dtype)  # [B, T, d]
    for norm, layer in zip(self.norms, self.hidden):
      x = jax.nn.gelu(layer(norm(x)), approximate=False)
    return self.readout(self.norms[2](x)).astype(jnp.float32)


def make_model(config: LMConfig, autoencoder: bool, rngs: nnx.Rngs,
               autoencoder_linear_std: float | None = None) -> nnx.Module:
  """The MAD model: the autoencoder (its linear kernels as `AutoEncoder`'s linear_std says) or the language model."""
  if autoencoder:
    return AutoEncoder(config, rngs=rngs, linear_std=autoencoder_linear_std)
  return LanguageModel(config, rngs=rngs)
