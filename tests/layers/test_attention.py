"""Attention: matches a direct numpy softmax with the (sliding) causal mask; RoPE depends on relative position only."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mesanet_jax.layers.attention import Attention, AttentionConfig, rope

CONFIG = AttentionConfig(num_heads=2, head_dim=8, window=3)


@pytest.mark.parametrize("window", [None, 3])
def test_matches_direct_softmax(window):
  layer = Attention(16, CONFIG, window=window, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (1, 7, 16))
  y, _ = layer(x)
  q, k, v = (np.asarray(a[0], np.float64) for a in layer._project(x, jnp.arange(7)))
  o = np.zeros_like(v)
  for t in range(7):
    start = 0 if window is None else max(0, t - window + 1)
    scores = np.einsum("hd,shd->hs", q[t], k[start:t + 1]) / np.sqrt(8)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    o[t] = np.einsum("hs,shd->hd", weights / weights.sum(-1, keepdims=True), v[start:t + 1])
  y_ref = np.asarray(layer.o_proj(jnp.asarray(o.reshape(1, 7, 16), jnp.float32)))
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_on_offset_only():
  q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 8))
  score = lambda i, j: float(jnp.sum(rope(q, jnp.array([i]), 1e4) * rope(k, jnp.array([j]), 1e4)))
  assert abs(score(5, 2) - score(13, 10)) < 1e-5 and abs(score(5, 2) - score(5, 3)) > 1e-3
