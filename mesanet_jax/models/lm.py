"""The language model: embedding, a stack of pre-norm blocks, tied read-out with a logit soft-cap; full forward,
prefill (returns the decoding cache) and one-token decoding, plus the parameter counter.

Init (paper G.2): fan-in normal everywhere; the mixer's output projection and the MLP's down-projection have their
variance scaled by 2/N (N blocks); the embedding has std 1/√d and is multiplied by √d on input (unit variance).
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mesanet_jax import sharding
from mesanet_jax.layers.attention import Attention
from mesanet_jax.layers.gated_deltanet import GatedDeltaNet
from mesanet_jax.layers.mesa import MesaLayer
from mesanet_jax.layers.mlp import SwiGLU
from mesanet_jax.layers.norm import RMSNorm
from mesanet_jax.layers.params import Linear, param
from mesanet_jax.models.config import LMConfig


def _make_mixer(config: LMConfig, name: str, rngs: nnx.Rngs):
  kw = dict(rngs=rngs, out_scale=2.0 / config.n_layers, dtype=config.dtype, param_dtype=config.param_dtype)
  if name == "mesa":
    return MesaLayer(config.d_model, config.mesa, **kw)
  if name == "gdn":
    return GatedDeltaNet(config.d_model, config.gdn, **kw)
  window = config.attention.window if name == "swa" else None
  return Attention(config.d_model, config.attention, window=window, **kw)


def _on_batch(x: jax.Array) -> jax.Array:
  """Residual stream [B, T, D] (or [B, D] when decoding): split over the batch shards, features whole."""
  return sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1))


class Block(nnx.Module):
  """x += mixer(RMSNorm(x)); x += SwiGLU(RMSNorm(x))."""

  def __init__(self, config: LMConfig, mixer: str, *, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, dtype=config.dtype, param_dtype=config.param_dtype)
    self.mixer_norm = RMSNorm(config.d_model, eps=config.norm_eps, **kw)
    self.mixer = _make_mixer(config, mixer, rngs)
    self.mlp_norm = RMSNorm(config.d_model, eps=config.norm_eps, **kw)
    self.mlp = SwiGLU(config.d_model, config.mlp_ratio * config.d_model, out_scale=2.0 / config.n_layers, **kw)

  def __call__(self, x, cache=None):
    h, cache = self.mixer(self.mixer_norm(x), cache)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), cache

  def decode(self, x, cache):
    h, cache, iters = self.mixer.decode(self.mixer_norm(x), cache)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), cache, iters

  def init_cache(self, batch: int, max_len: int):
    if isinstance(self.mixer, Attention):
      return self.mixer.init_cache(batch, max_len)
    return self.mixer.init_cache(batch)


class LanguageModel(nnx.Module):
  """tokens [B, T] int -> logits [B, T, V] f32. The cache is a tuple with one entry per block: RecurrentCache
  (conv states + MesaState or GDN state) for recurrent mixers, KVCache for attention."""

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    self.config = config
    d = config.d_model
    self.embed = param(rngs, nnx.initializers.normal(d ** -0.5), (config.vocab_size, d), config.param_dtype,
                       ("vocab", "embed"))
    self.blocks = nnx.List([Block(config, name, rngs=rngs) for name in config.mixers])
    self.final_norm = RMSNorm(d, eps=config.norm_eps, rngs=rngs, dtype=config.dtype, param_dtype=config.param_dtype)
    self.unembed = None if config.tie_embeddings else Linear(
        d, config.vocab_size, axes=("embed", "vocab"), rngs=rngs, dtype=config.dtype, param_dtype=config.param_dtype)

  def _embed(self, tokens: jax.Array) -> jax.Array:
    table = self.embed[...].astype(self.config.dtype)
    return _on_batch(jnp.take(table, tokens, axis=0) * np.sqrt(self.config.d_model).astype(self.config.dtype))

  def _logits(self, x: jax.Array) -> jax.Array:
    x = self.final_norm(x)
    if self.unembed is None:
      logits = jnp.einsum("...d,vd->...v", x, self.embed[...].astype(self.config.dtype),
                          preferred_element_type=jnp.float32)
    else:
      logits = self.unembed(x).astype(jnp.float32)
    logits = sharding.constrain(logits, ("batch",) + (None,) * (logits.ndim - 2) + ("vocab",))
    cap = self.config.logit_cap
    return logits if cap is None else jnp.tanh(logits / cap) * cap

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self._embed(tokens)
    for block in self.blocks:
      x, _ = block(x)
      x = _on_batch(x)
    return self._logits(x)

  def init_cache(self, batch: int, max_len: int) -> tuple:
    """An empty cache; attention layers keep at most max_len (or window) positions, recurrent ones O(1) memory."""
    return tuple(block.init_cache(batch, max_len) for block in self.blocks)

  def prefill(self, tokens: jax.Array, max_len: int) -> tuple[jax.Array, tuple]:
    """Runs the prompt [B, T] through the training path; returns logits [B, T, V] and the cache after it."""
    x = self._embed(tokens)
    caches = []
    for block, cache in zip(self.blocks, self.init_cache(tokens.shape[0], max_len)):
      x, cache = block(x, cache)
      caches.append(cache)
    return self._logits(x), tuple(caches)

  def decode_step(self, token: jax.Array, cache: tuple) -> tuple[jax.Array, tuple, jax.Array | None]:
    """token [B] int -> logits [B, V], the new cache, and the CG steps used per batch element (mean over Mesa layers
    and heads, [B] f32; None when the model has no Mesa layer)."""
    x = self._embed(token)
    caches, iters = [], []
    for block, block_cache in zip(self.blocks, cache):
      x, block_cache, block_iters = block.decode(x, block_cache)
      caches.append(block_cache)
      if block_iters is not None:
        iters.append(block_iters.astype(jnp.float32))
    cg_steps = jnp.mean(jnp.stack(iters, axis=1), axis=(1, 2)) if iters else None
    return self._logits(x), tuple(caches), cg_steps


def count_params(config: LMConfig, *, verbose: bool = False) -> int:
  """Parameter count from abstract shapes (nothing is allocated); prints a per-module table when verbose."""
  abstract = nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0)))
  counts: dict[str, int] = {}
  for path, leaf in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    group = ".".join(str(p) for p in path[:3] if not str(p).isdigit()) if path[0] == "blocks" else str(path[0])
    counts[group] = counts.get(group, 0) + int(np.prod(leaf.shape))
  total = sum(counts.values())
  if verbose:
    for group, n in counts.items():
      print(f"{group:32s} {n:>14,d}")
    print(f"{'total':32s} {total:>14,d}")
  return total
