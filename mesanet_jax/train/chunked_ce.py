"""Fused read-out + cross-entropy over sequence chunks: the [B, T, V] f32 logits and their gradient are never whole.

For hidden states x [B, T, D] (the final norm's output, compute dtype) and read-out weights w [V, D] (the tied
embedding or the untied kernel transposed, compute dtype), per token t with target y_t:

    l = x wᵀ (f32 accumulation),  c = cap·tanh(l / cap) (or l),  lse = logsumexp(c),  ce = lse − c[y]

`chunked_cross_entropy` returns ce, lse (so the caller adds the z-loss Σ lse² and the mask in plain JAX) and the
argmax, computing T / chunk_size chunks of [B, chunk_size, V] logits one after another (`lax.scan`). Its custom VJP
keeps x, w, y and lse and recomputes each chunk's logits: with cotangents (g_ce, g_lse) per token,

    dc = (g_ce + g_lse)·softmax(c) − g_ce·onehot(y),  dl = dc·(1 − tanh²(l / cap)),  dx = dl w,  dw = Σ_chunks dlᵀ x

in f32 (f64 for f64 inputs), dl cast to the compute dtype for the two products (as the unfused path's transposed einsum does). Memory:
one chunk's logits and the f32 dw [V, D] instead of [B, T, V] f32 logits, gradient and softmax.
"""
import functools

import jax
import jax.numpy as jnp

from mesanet_jax import sharding


def _chunks(a: jax.Array, chunk_size: int) -> jax.Array:
  """[B, T, ...] -> [N, B, chunk_size, ...], zero-padded along T."""
  batch, length = a.shape[:2]
  pad = -length % chunk_size
  a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
  return jnp.moveaxis(a.reshape(batch, -1, chunk_size, *a.shape[2:]), 1, 0)


def _unchunk(a: jax.Array, length: int) -> jax.Array:
  """[N, B, chunk_size, ...] -> [B, T, ...] (padding dropped)."""
  a = jnp.moveaxis(a, 0, 1)
  return a.reshape(a.shape[0], -1, *a.shape[3:])[:, :length]


def _accumulation(x: jax.Array):
  """f32, or f64 for f64 inputs."""
  return jnp.promote_types(jnp.float32, x.dtype)


def _logits(x: jax.Array, w: jax.Array, logit_cap: float | None) -> tuple[jax.Array, jax.Array | None]:
  """Capped f32 logits [B, C, V] of one chunk, and tanh(l / cap) (None without a cap) for the backward."""
  logits = jnp.einsum("bcd,vd->bcv", x, w, preferred_element_type=_accumulation(x))
  logits = sharding.constrain(logits, ("batch", None, "vocab"))
  if logit_cap is None:
    return logits, None
  squashed = jnp.tanh(logits / logit_cap)
  return squashed * logit_cap, squashed


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def chunked_cross_entropy(x: jax.Array, w: jax.Array, targets: jax.Array, logit_cap: float | None,
                          chunk_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """x [B, T, D], w [V, D], targets [B, T] int -> (ce, lse) f32 [B, T] and the argmax [B, T] int32 of the capped
  logits x wᵀ; differentiable in x and w (see the module docstring)."""
  return _forward(x, w, targets, logit_cap, chunk_size)[0]


def _forward(x, w, targets, logit_cap, chunk_size):
  if x.ndim != 3 or w.ndim != 2 or x.shape[-1] != w.shape[-1] or targets.shape != x.shape[:2]:
    raise ValueError(f"chunked_cross_entropy: x [B, T, D], w [V, D], targets [B, T] expected, got {x.shape}, "
                     f"{w.shape}, {targets.shape}")
  def chunk(_, inputs):
    x_c, y_c = inputs
    capped, _ = _logits(x_c, w, logit_cap)
    lse = jax.nn.logsumexp(capped, axis=-1)
    picked = jnp.take_along_axis(capped, y_c[..., None], axis=-1)[..., 0]
    return None, (lse - picked, lse, jnp.argmax(capped, axis=-1).astype(jnp.int32))
  _, outputs = jax.lax.scan(chunk, None, (_chunks(x, chunk_size), _chunks(targets, chunk_size)))
  ce, lse, argmax = (_unchunk(o, x.shape[1]) for o in outputs)
  return (ce, lse, argmax), (x, w, targets, lse)


def _backward(logit_cap, chunk_size, residuals, cotangents):
  x, w, targets, lse = residuals
  g_ce, g_lse, _ = cotangents  # the argmax's cotangent is symbolic zero (float0)

  acc = _accumulation(x)

  def chunk(dw, inputs):
    x_c, y_c, lse_c, g_ce_c, g_lse_c = inputs
    capped, squashed = _logits(x_c, w, logit_cap)
    probs = jnp.exp(capped - lse_c[..., None])
    d_capped = (g_ce_c + g_lse_c)[..., None] * probs - g_ce_c[..., None] * jax.nn.one_hot(y_c, w.shape[0], dtype=acc)
    d_logits = d_capped if squashed is None else d_capped * (1.0 - squashed ** 2)
    d_logits = d_logits.astype(x.dtype)
    dx_c = jnp.einsum("bcv,vd->bcd", d_logits, w, preferred_element_type=acc).astype(x.dtype)
    dw = dw + jnp.einsum("bcv,bcd->vd", d_logits, x_c, preferred_element_type=acc)
    return dw, dx_c

  inputs = (x, targets, lse, g_ce.astype(acc), g_lse.astype(acc))
  dw, dx = jax.lax.scan(chunk, jnp.zeros(w.shape, acc), tuple(_chunks(a, chunk_size) for a in inputs))
  return _unchunk(dx, x.shape[1]), dw.astype(w.dtype), None


chunked_cross_entropy.defvjp(_forward, _backward)
