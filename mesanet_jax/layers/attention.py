"""Causal softmax attention with RoPE, optionally sliding-window, and its KV cache for decoding.

The cache is a ring buffer of S slots (S = window for sliding-window layers, else the maximum length) that records
the absolute position held in each slot, so decoding masks by position and sliding-window layers decode in constant
memory. A full-attention cache that is run past S tokens keeps only the last S (it acts as a window of S).
Training and prefill (`AttentionConfig.kernel`, "auto") run `jax.nn.dot_product_attention` (causal, the window as
`local_window_size`): cuDNN's fused flash attention on GPU for bf16/fp16 inputs with head_dim ≤ 128 and a multiple of
8, XLA otherwise (which forms the [T, T] scores; no Pallas TPU kernel yet); "xla" always the latter; "pallas" jax's
Pallas (Triton) flash attention in any float dtype (`pallas_kernels/flash_attention.py`; full causal layers only).
Decoding attends to the cache with an explicit position mask and runs the q, k, v projections as one matmul over
their concatenated kernels (`FusedProjections`).
"""
import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mesanet_jax.layers.fused_linear import FusedProjections
from mesanet_jax.layers.params import linear


KERNELS = ("auto", "xla", "pallas")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Multi-head attention options; `window` is the sliding window (in tokens, self included) of "swa" layers;
  `kernel` (one of KERNELS) how training and prefill attend (module docstring)."""
  num_heads: int = 6
  head_dim: int = 128
  rope_theta: float = 10_000.0
  window: int = 1024
  kernel: str = "auto"

  def __post_init__(self):
    if self.kernel not in KERNELS:
      raise ValueError(f"attention.kernel must be one of {KERNELS}, got {self.kernel!r}")


class KVCache(NamedTuple):
  k: jax.Array  # [B, S, H, D], RoPE already applied
  v: jax.Array  # [B, S, H, D]
  positions: jax.Array  # [S] int32, absolute position stored in each slot, −1 when empty
  length: jax.Array  # [] int32, tokens seen so far


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding (rotate-half form). x: [B, T, H, D] with D even; positions: [T]. Returns x's dtype."""
  half = x.shape[-1] // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions.astype(jnp.float32)[:, None] * freq  # [T, D/2]
  cos, sin = jnp.cos(angle)[:, None], jnp.sin(angle)[:, None]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(FusedProjections, nnx.Module):
  """Softmax attention over positions s with t − window < s ≤ t (all s ≤ t when window is None)."""
  FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"), "output": ("o_proj",)}

  def __init__(self, d_model: int, config: AttentionConfig, *, window: int | None, rngs: nnx.Rngs,
               out_scale: float = 1.0, dtype=jnp.float32, param_dtype=jnp.float32):
    if config.head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {config.head_dim}")
    if window is not None and window < 1:
      raise ValueError(f"window must be a positive int or None, got {window}")
    self.flash = None
    if config.kernel == "pallas":
      if window is not None:
        raise ValueError(f"attention.kernel='pallas' (flash attention) has no sliding window; this layer's is {window}")
      from pallas_kernels.flash_attention import causal_attention  # when built, not first inside a trace
      self.flash = causal_attention
    self.config, self.window, self.dtype = config, window, dtype
    width = config.num_heads * config.head_dim
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.q_proj = linear(d_model, width, axes=("embed", "heads"), **kw)
    self.k_proj = linear(d_model, width, axes=("embed", "heads"), **kw)
    self.v_proj = linear(d_model, width, axes=("embed", "heads"), **kw)
    self.o_proj = linear(width, d_model, axes=("heads", "embed"), init_scale=out_scale, **kw)

  def _project(self, x: jax.Array, positions: jax.Array, *, fused: bool = False):
    """x: [B, T, d] at `positions` [T] -> q, k (RoPE applied), v [B, T, H, D]; `fused` (decoding): one matmul."""
    shape = (*x.shape[:2], self.config.num_heads, self.config.head_dim)
    q, k, v = self.project("qkv", x, fused)
    q = rope(q.reshape(shape), positions, self.config.rope_theta)
    k = rope(k.reshape(shape), positions, self.config.rope_theta)
    return q, k, v.reshape(shape)

  def _attend_sequence(self, q, k, v):
    """Causal (windowed) attention of q, k, v [B, T, H, D] at positions 0..T−1, projected out: [B, T, d]."""
    if self.flash is not None:
      o = self.flash(q, k, v)
      return self.o_proj(o.reshape(*o.shape[:2], -1))
    head_dim = q.shape[-1]
    fused = (self.config.kernel == "auto" and jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
             and head_dim <= 128 and head_dim % 8 == 0)
    window = None if self.window is None else (self.window - 1, 0)  # keys t − (window − 1) .. t
    o = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window,
                                     implementation="cudnn" if fused else "xla")
    return self.o_proj(o.reshape(*o.shape[:2], -1))

  def _attend(self, q, k, v, mask):
    """Decoding's attention: q [B, T, H, D]; k, v: [B, S, H, D]; mask broadcastable to [B, H, T, S]. Softmax in f32;
    the output projection from its decode layout."""
    scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) / np.sqrt(q.shape[-1])
    weights = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
    o = jnp.einsum("bhts,bshd->bthd", weights.astype(self.dtype), v)
    (y,) = self.fused("output", o.reshape(*o.shape[:2], -1))
    return y

  def _in_window(self, query_pos, key_pos):
    visible = key_pos <= query_pos
    return visible if self.window is None else visible & (key_pos > query_pos - self.window)

  def init_cache(self, batch: int, max_len: int) -> KVCache:
    slots = max_len if self.window is None else min(self.window, max_len)
    shape = (batch, slots, self.config.num_heads, self.config.head_dim)
    return KVCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype), jnp.full((slots,), -1, jnp.int32),
                   jnp.zeros((), jnp.int32))

  def __call__(self, x: jax.Array, cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """x: [B, T, d] at positions 0..T−1; cache: an empty cache to fill (prefill) or None. Returns (y, cache)."""
    length = x.shape[1]
    positions = jnp.arange(length)
    q, k, v = self._project(x, positions)
    y = self._attend_sequence(q, k, v)
    if cache is None:
      return y, None
    slots = cache.positions.shape[0]
    kept = np.arange(max(0, length - slots), length)  # the last S positions, in distinct slots
    index = kept % slots
    cache = KVCache(cache.k.at[:, index].set(k[:, kept].astype(cache.k.dtype)),
                    cache.v.at[:, index].set(v[:, kept].astype(cache.v.dtype)),
                    cache.positions.at[index].set(kept), jnp.asarray(length, jnp.int32))
    return y, cache

  def decode(self, x: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache, None]:
    """One token x: [B, d] at position cache.length. Returns y [B, d], the new cache and None (no solver)."""
    position = cache.length
    q, k, v = self._project(x[:, None], position[None], fused=True)
    slot = position % cache.positions.shape[0]
    k_all = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), slot, axis=1)
    v_all = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), slot, axis=1)
    positions = cache.positions.at[slot].set(position)
    mask = (positions >= 0) & self._in_window(position, positions)
    y = self._attend(q, k_all, v_all, mask)
    return y[:, 0], KVCache(k_all, v_all, positions, position + 1), None
