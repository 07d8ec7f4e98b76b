"""Hawk's sequence mixer: Griffin's recurrent block around the RG-LRU (De et al. 2024, arXiv 2402.19427, §2.4;
the reference is google-deepmind/recurrentgemma, `jax/modules.py: RecurrentBlock`, `jax/layers.py: RGLRU`).

    y = gelu(W_y x + b_y)                           gate branch, width W
    u = conv4(W_x x + b_x)                          short causal conv with bias
    r = σ(BD_a u + b_a)   i = σ(BD_x u + b_x)       gates, block-diagonal over `num_heads` blocks
    log a_t = −8 r_t ⊙ softplus(Λ)                  a_t ∈ (0, 1), per channel
    h_t = a_t ⊙ h_{t−1} + √(1 − a_t²) ⊙ (i_t ⊙ u_t)
    out = W_o (h ⊙ y) + b_o

The recurrence runs in f32 as `jax.lax.associative_scan` over time (impl="xla": log-depth on GPU and TPU;
recurrentgemma uses a sequential scan on GPU and a Pallas kernel on TPU) or, impl="pallas", token by token in a
Pallas kernel per direction (`pallas_kernels/linear_scan.py`: GPU, and CPU interpreted). Λ starts at
softplus⁻¹(−log ρ) with ρ² uniform in [0.9², 0.999²] (recurrentgemma's `rnn_real_param_init`), so a = ρ^(8r).
The √(1 − a²) derivative is bounded at 1000, as in recurrentgemma, to keep bf16 training finite. Unlike
recurrentgemma we never reset the state at a document start (the first token is normalised like every other): the
LM here does not reset at document boundaries for any mixer.
The paper (MesaNet App. G) uses W = 1.25 · d_model for Hawk and Hawk-MesaNet.
"""
import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mesanet_jax import sharding
from mesanet_jax.layers.conv import ShortConv
from mesanet_jax.layers.fused_linear import FusedProjections
from mesanet_jax.layers.params import linear, param
from mesanet_jax.ops.operator import implementation

MAX_SQRT_GRADIENT = 1000.0
IMPLS = ("xla", "pallas")


@dataclasses.dataclass(frozen=True)
class HawkConfig:
  width: int = 960  # W: the recurrence's width (1.25 · d_model in the paper)
  num_heads: int = 6  # blocks of the block-diagonal gate projections
  conv_size: int = 4
  min_rad: float = 0.9
  max_rad: float = 0.999
  impl: str = "xla"  # how the recurrence runs over a sequence: one of IMPLS (module docstring)

  def __post_init__(self):
    if self.impl not in IMPLS:
      raise ValueError(f"lru.impl must be one of {IMPLS}, got {self.impl!r}")


class HawkCache(NamedTuple):
  """Decoding state: the conv's last K−1 inputs [B, K−1, W] and the recurrence h [B, W] (f32, or f64 in f64)."""
  conv: jax.Array
  state: jax.Array


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def sqrt_bounded_derivative(x: jax.Array, max_gradient: float) -> jax.Array:
  """√x whose derivative is capped at max_gradient (evaluated at max(x, 1/(4·max_gradient²)))."""
  return jnp.sqrt(x)


def _sqrt_fwd(x, max_gradient):
  return jnp.sqrt(x), x


def _sqrt_bwd(max_gradient, x, g):
  return (g * 0.5 * jax.lax.rsqrt(jnp.maximum(x, 1.0 / (4.0 * max_gradient ** 2))),)


sqrt_bounded_derivative.defvjp(_sqrt_fwd, _sqrt_bwd)


def linear_recurrence(a: jax.Array, x: jax.Array, h0: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """h_t = a_t ⊙ h_{t−1} + x_t over axis 1 by an associative scan. a, x: [B, T, W]; h0: [B, W] or None (zeros).
  Returns h [B, T, W] and h_{T−1} [B, W], in the inputs' (f32) dtype."""
  if h0 is not None:
    x = x.at[:, 0].add(a[:, 0] * h0)
  combine = lambda left, right: (left[0] * right[0], right[0] * left[1] + right[1])
  _, h = jax.lax.associative_scan(combine, (a, x), axis=1)
  return h, h[:, -1]


def _ring_init(min_rad: float, max_rad: float):
  """Λ such that softplus(Λ) = −log(radius), radius² uniform in [min², max²]."""
  def init(key, shape, dtype):
    radius_sq = jax.random.uniform(key, shape) * (max_rad ** 2 - min_rad ** 2) + min_rad ** 2
    neg_log_radius = -0.5 * jnp.log(radius_sq + 1e-8)
    return jnp.log(jnp.expm1(neg_log_radius)).astype(dtype)
  return init


class BlockDiagonal(nnx.Module):
  """y = x W + b with W block-diagonal: H blocks [W/H, W/H] (fan-in normal per block)."""

  def __init__(self, width: int, num_blocks: int, *, rngs: nnx.Rngs, param_dtype):
    block = width // num_blocks
    self.num_blocks = num_blocks
    # Fan-in per block (the block's input width), as recurrentgemma's BlockDiagonalLinear.
    init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=-2, out_axis=-1, batch_axis=(0,))
    self.kernel = param(rngs, init, (num_blocks, block, block), param_dtype, ("heads", None, None))
    self.bias = param(rngs, nnx.initializers.zeros, (num_blocks, block), param_dtype, ("heads", None))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., W] -> [..., W] in x's dtype."""
    blocks = x.reshape(*x.shape[:-1], self.num_blocks, -1)
    y = jnp.einsum("...hi,hij->...hj", blocks, self.kernel[...].astype(x.dtype)) + self.bias[...].astype(x.dtype)
    return y.reshape(x.shape)


class HawkLayer(FusedProjections, nnx.Module):
  """Griffin's recurrent block (module docstring); same call contract as the other mixers: __call__(x, cache) ->
  (y, cache), decode(x, cache) -> (y, cache, None), init_cache(batch). Decoding runs W_y and W_x as one matmul over
  their concatenated kernels and W_out from its decode layout (`FusedProjections`)."""
  FUSED = {"branches": ("linear_y", "linear_x"), "output": ("linear_out",)}

  def __init__(self, d_model: int, config: HawkConfig, *, rngs: nnx.Rngs, out_scale: float = 1.0, dtype=jnp.float32,
               param_dtype=jnp.float32):
    if config.width % config.num_heads:
      raise ValueError(f"lru.width ({config.width}) must be divisible by lru.num_heads ({config.num_heads})")
    if not 0 < config.min_rad < config.max_rad < 1:
      raise ValueError(f"lru radii must satisfy 0 < min_rad < max_rad < 1, got {config.min_rad}, {config.max_rad}")
    self.config, self.dtype = config, dtype
    width = config.width
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=True)
    self.linear_y = linear(d_model, width, axes=("embed", "lru"), **kw)
    self.linear_x = linear(d_model, width, axes=("embed", "lru"), **kw)
    self.conv = ShortConv(width, config.conv_size, axis_name="lru", init_scale=0.01, use_bias=True, rngs=rngs,
                          dtype=dtype, param_dtype=param_dtype)
    self.input_gate = BlockDiagonal(width, config.num_heads, rngs=rngs, param_dtype=param_dtype)
    self.a_gate = BlockDiagonal(width, config.num_heads, rngs=rngs, param_dtype=param_dtype)
    self.a_param = param(rngs, _ring_init(config.min_rad, config.max_rad), (width,), param_dtype, ("lru",))
    self.linear_out = linear(width, d_model, axes=("lru", "embed"), init_scale=out_scale, **kw)
    if config.impl == "pallas":  # imported now, not in the first trace (see MesaLayer.__init__)
      implementation(config.impl, "linear_recurrence")

  def init_cache(self, batch: int) -> HawkCache:
    state = jnp.zeros((batch, self.config.width), jnp.promote_types(self.dtype, jnp.float32))
    return HawkCache(self.conv.zero_state(batch), state)

  def __call__(self, x: jax.Array, cache: HawkCache | None = None, *,
               fused: bool = False) -> tuple[jax.Array, HawkCache]:
    """x: [B, T, d]; cache: the state before the first token (None: empty). Returns y [B, T, d], the cache after.
    `fused` (decoding): W_y and W_x as one matmul, kernels in the decode layout."""
    y, u = self.project("branches", x, fused)
    gate = jax.nn.gelu(y)
    u, conv = self.conv(u, None if cache is None else cache.conv)
    u = u.astype(jnp.promote_types(self.dtype, jnp.float32))  # gates and recurrence in f32 (or wider)
    log_a = -8.0 * jax.nn.sigmoid(self.a_gate(u)) * jax.nn.softplus(self.a_param[...].astype(u.dtype))
    scale = sqrt_bounded_derivative(-jnp.expm1(2.0 * log_a), MAX_SQRT_GRADIENT)  # √(1 − a²), accurate for a → 1
    h, last = self._recurrence(x.shape[1])(jnp.exp(log_a), scale * jax.nn.sigmoid(self.input_gate(u)) * u,
                                           None if cache is None else cache.state)
    (out,) = self.project("output", h.astype(self.dtype) * gate, fused)
    return out, HawkCache(conv, last)

  def _recurrence(self, length: int):
    """linear_recurrence's contract for `length` tokens: impl="pallas"'s kernels per (batch, lru) shard of the mesh
    (XLA cannot partition a pallas_call); one token (decoding) is one multiply-add, which XLA fuses."""
    if self.config.impl == "xla" or length == 1:
      return linear_recurrence
    per_token, per_state = ("batch", None, "lru"), ("batch", "lru")
    scan = sharding.per_shard(implementation(self.config.impl, "linear_recurrence"),
                              (per_token, per_token, per_state), (per_token, per_state))
    return lambda a, x, h0: scan(a, x, jnp.zeros_like(a[:, 0]) if h0 is None else h0)

  def decode(self, x: jax.Array, cache: HawkCache) -> tuple[jax.Array, HawkCache, None]:
    """One token x: [B, d] -> y [B, d], the new cache, and no solver step count."""
    y, cache = self(x[:, None], cache, fused=True)
    return y[:, 0], cache, None


def lru_width(d_model: int, multiplier: float = 1.25) -> int:
  """The paper's Hawk width: 1.25 · d_model (App. G), rounded down."""
  return int(math.floor(multiplier * d_model))
