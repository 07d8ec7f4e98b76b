"""The input and output pipeline shared by the recurrent mixers (Mesa, Gated DeltaNet), paper App. E / G.2.

    q, k = L2norm(silu(conv4(W_q x))), L2norm(silu(conv4(W_k x)))      v = W_v x   (no conv, no activation on v)
    β = σ(W_β x + b_β)      g = log γ = log σ(W_γ x + b_γ) [+ log(1 − (1 − b_γ) β²) with the paper's γ cap]
    y = W_o RMSNorm_head(o) [⊙ silu(W_g x) with the output gate]

A subclass supplies the sequence mixing (`mix`, `mix_token`, `zero_state`); this class owns parameters, gates, the
short-convolution states (q's and k's side by side in the cache) and the cache. Decoding runs the projections of x as
two matmuls over concatenated kernels (q, k, v and the output gate in `dtype`; the two gates in f32), the q and k
convs as one, and the output projection from its decode layout, `FusedProjections`; training and prefill run them one
by one.
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mesanet_jax.layers.conv import ShortConv, side_by_side
from mesanet_jax.layers.fused_linear import FusedProjections
from mesanet_jax.layers.norm import RMSNorm
from mesanet_jax.layers.params import linear


class RecurrentCache(NamedTuple):
  """Decoding state of one recurrent mixer: the q and k conv states side by side, [B, K−1, 2·H·Dk] (q's channels
  first: one state update per token for both), and the mixer's own state."""
  conv: jax.Array
  state: Any


def _l2_normalise(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class RecurrentMixer(FusedProjections, nnx.Module):
  """Projections, causal conv, gates and output norm of a gated recurrent mixer with H heads of size D (Dk = Dv).

  A subclass defines the mixing itself:
    mix(q, k, v, g, beta, state): q, k, v [B, T, H, D]; g, beta [B, T, H] -> (o [B, T, H, D], final state);
    mix_token(q, k, v, g, beta, state): one token, q, k, v [B, H, D]; g, beta [B, H] -> (o, state, iters [B, H] or
      None when the mixer has no solver);
    zero_state(batch): the empty state;
  and may keep more than the mixing state in the decode cache (Mesa's warm start keeps the last CG solution):
    to_cache(state): the state after a sequence as the cache holds it; from_cache(cached): the state `mix` takes.
  """
  FUSED = {"inputs": ("q_proj", "k_proj", "v_proj", "g_proj"), "gates": ("a_proj", "b_proj"), "output": ("o_proj",)}

  def __init__(self, d_model: int, num_heads: int, head_dim: int, *, conv_size: int, gamma_cap: float | None,
               use_output_gate: bool, norm_eps: float, out_scale: float, rngs: nnx.Rngs, dtype, param_dtype):
    if gamma_cap is not None and not 0 < gamma_cap <= 1:
      raise ValueError(f"gamma_cap must be in (0, 1] or None, got {gamma_cap}")
    self.num_heads, self.head_dim, self.gamma_cap, self.dtype = num_heads, head_dim, gamma_cap, dtype
    width = num_heads * head_dim
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.q_proj = linear(d_model, width, axes=("embed", "heads"), **kw)
    self.k_proj = linear(d_model, width, axes=("embed", "heads"), **kw)
    self.v_proj = linear(d_model, width, axes=("embed", "heads"), **kw)
    self.q_conv = ShortConv(width, conv_size, **kw)
    self.k_conv = ShortConv(width, conv_size, **kw)
    # Gate projections compute in f32: g = log γ feeds exp() over whole chunks.
    gate_kw = dict(rngs=rngs, dtype=jnp.float32, param_dtype=param_dtype, use_bias=True)
    self.a_proj = linear(d_model, num_heads, axes=("embed", "heads"), **gate_kw)
    self.b_proj = linear(d_model, num_heads, axes=("embed", "heads"), **gate_kw)
    self.g_proj = linear(d_model, width, axes=("embed", "heads"), **kw) if use_output_gate else None
    self.norm = RMSNorm(head_dim, eps=norm_eps, axis_name="kv", **kw)
    self.o_proj = linear(width, d_model, axes=("heads", "embed"), init_scale=out_scale, **kw)

  def gates(self, a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The gate projections' outputs a, b: [B, T, H] f32 -> g (log forget gate ≤ 0), β, computed in log space."""
    beta = jax.nn.sigmoid(b)
    g = jax.nn.log_sigmoid(a)
    if self.gamma_cap is not None:
      g = g + jnp.log1p(-(1.0 - self.gamma_cap) * beta * beta)
    return g, beta

  def _projections(self, x: jax.Array, fused: bool):
    """x: [B, T, d] -> q, k, v [B, T, H·D], the output gate's logits (None without) and the gates' a, b [B, T, H] f32;
    `fused` (decoding): as two matmuls over concatenated kernels."""
    q, k, v, *out_gate = self.project("inputs", x, fused)
    return q, k, v, (out_gate[0] if out_gate else None), *self.project("gates", x, fused)

  def _inputs(self, x: jax.Array, cache: RecurrentCache | None, *, fused: bool = False):
    """x: [B, T, d] -> the mixer's (q, k, v, g, β), the output gate's logits (or None) and the conv states after."""
    batch, length, _ = x.shape
    heads = (batch, length, self.num_heads, self.head_dim)
    q, k, v, out_gate, a, b = self._projections(x, fused)
    if fused:  # decoding: q and k through one conv over their channels side by side (one state update)
      qk, conv = side_by_side((self.q_conv, self.k_conv), jnp.concatenate([q, k], axis=-1), cache.conv)
      q, k = jnp.split(qk, 2, axis=-1)
    else:
      q_state, k_state = (None, None) if cache is None else jnp.split(cache.conv, 2, axis=-1)
      (q, q_state), (k, k_state) = self.q_conv(q, q_state), self.k_conv(k, k_state)
      conv = jnp.concatenate([q_state, k_state], axis=-1)
    q = _l2_normalise(jax.nn.silu(q).reshape(heads))
    k = _l2_normalise(jax.nn.silu(k).reshape(heads))
    return (q, k, v.reshape(heads), *self.gates(a, b)), out_gate, conv

  def _output(self, o: jax.Array, out_gate: jax.Array | None, *, fused: bool = False) -> jax.Array:
    """o: [B, T, H, D], the output gate's logits [B, T, H·D] or None -> [B, T, d]; `fused`: decode layout."""
    o = self.norm(o, None if out_gate is None else out_gate.reshape(o.shape))
    (y,) = self.project("output", o.reshape(*o.shape[:2], -1), fused)
    return y

  def to_cache(self, state):
    return state

  def from_cache(self, cached):
    return cached

  def init_cache(self, batch: int) -> RecurrentCache:
    conv = jnp.concatenate([self.q_conv.zero_state(batch), self.k_conv.zero_state(batch)], axis=-1)
    return RecurrentCache(conv, self.to_cache(self.zero_state(batch)))

  def __call__(self, x: jax.Array, cache: RecurrentCache | None = None) -> tuple[jax.Array, RecurrentCache]:
    """x: [B, T, d]; cache: state before the first token (None: empty). Returns y [B, T, d] and the cache after."""
    (q, k, v, g, beta), out_gate, conv = self._inputs(x, cache)
    o, state = self.mix(q, k, v, g, beta, None if cache is None else self.from_cache(cache.state))
    return self._output(o, out_gate), RecurrentCache(conv, self.to_cache(state))

  def decode(self, x: jax.Array, cache: RecurrentCache) -> tuple[jax.Array, RecurrentCache, jax.Array | None]:
    """One token x: [B, d]. Returns y [B, d], the new cache and the CG steps per head [B, H] (None if no solver)."""
    (q, k, v, g, beta), out_gate, conv = self._inputs(x[:, None], cache, fused=True)
    o, state, iters = self.mix_token(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], cache.state)
    return self._output(o[:, None], out_gate, fused=True)[:, 0], RecurrentCache(conv, state), iters
