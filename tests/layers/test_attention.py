"""Attention: matches a direct numpy softmax with the (sliding) causal mask; RoPE depends on relative position only."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mesanet_jax.layers.attention import Attention, AttentionConfig, rope
from pallas_kernels.flash_attention import causal_attention
from pallas_kernels.mesa_cg import params

CONFIG = AttentionConfig(num_heads=2, head_dim=8, window=3)


@pytest.mark.parametrize("window", [None, 3])
def test_matches_direct_softmax(window):
  layer = Attention(16, CONFIG, window=window, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (1, 7, 16))
  with jax.default_matmul_precision("highest"):  # a GPU's default f32 dots are TF32 (~1e-3), the bound is f32's
    y, _ = layer(x)
    q, k, v = (np.asarray(a[0], np.float64) for a in layer._project(x, jnp.arange(7)))
  o = np.zeros_like(v)
  for t in range(7):
    start = 0 if window is None else max(0, t - window + 1)
    scores = np.einsum("hd,shd->hs", q[t], k[start:t + 1]) / np.sqrt(8)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    o[t] = np.einsum("hs,shd->hd", weights / weights.sum(-1, keepdims=True), v[start:t + 1])
  with jax.default_matmul_precision("highest"):
    y_ref = np.asarray(layer.o_proj(jnp.asarray(o.reshape(1, 7, 16), jnp.float32)))
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_on_offset_only():
  q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 8))
  score = lambda i, j: float(jnp.sum(rope(q, jnp.array([i]), 1e4) * rope(k, jnp.array([j]), 1e4)))
  assert abs(score(5, 2) - score(13, 10)) < 1e-5 and abs(score(5, 2) - score(5, 3)) > 1e-3


@pytest.mark.parametrize("dtype, tolerance", [
    (jnp.float32, 1e-6),  # the same f32 math in another order
    (jnp.bfloat16, 2e-2),  # both round the softmax weights to bf16 (2^-8 relative) before the value product
])
@pytest.mark.parametrize("window", [None, 5])
def test_sequence_path_equals_the_masked_softmax(dtype, tolerance, window):
  """Training/prefill (`jax.nn.dot_product_attention`, here its XLA implementation) against the explicit masked
  softmax the decoding path uses, on the same projections."""
  layer = Attention(32, AttentionConfig(num_heads=2, head_dim=16), window=window, rngs=nnx.Rngs(0), dtype=dtype)
  x = jax.random.normal(jax.random.key(2), (2, 19, 32)).astype(dtype)
  positions = jnp.arange(19)
  y, _ = layer(x)
  q, k, v = layer._project(x, positions)
  y_ref = layer._attend(q, k, v, layer._in_window(positions[:, None], positions[None, :]))
  scale = float(jnp.max(jnp.abs(y_ref.astype(jnp.float32))))
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), atol=tolerance * scale)


@pytest.mark.parametrize("length", [19, 200])  # padded to 32 (one block) and to 256 (two blocks of 128)
def test_pallas_flash_attention_matches_xla_values_and_gradients(length):
  """kernel="pallas" (jax's Pallas flash attention, interpreted here) against kernel="xla" on the same params, f32:
  the output and the gradients of every parameter and of the input, under a population's vmap as in MAD."""
  config = AttentionConfig(num_heads=2, head_dim=16)
  xla = Attention(32, dataclasses.replace(config, kernel="xla"), window=None, rngs=nnx.Rngs(0))
  flash = Attention(32, dataclasses.replace(config, kernel="pallas"), window=None, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(3), (2, 1, length, 32))  # [members, B, T, d]

  def loss_and_grads(layer):
    graphdef, weights = nnx.split(layer)
    loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x)[0] ** 2)
    with jax.default_matmul_precision("highest"):
      return jax.vmap(jax.value_and_grad(loss, argnums=(0, 1)), in_axes=(None, 0))(weights, x)

  (loss_ref, grads_ref), (loss, grads) = loss_and_grads(xla), loss_and_grads(flash)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  for ref, got in zip(jax.tree.leaves(grads_ref), jax.tree.leaves(grads)):  # f32 sums in another order: ~1e-6
    np.testing.assert_allclose(got, ref, atol=1e-5 * float(jnp.max(jnp.abs(ref))))


def test_attention_kernel_is_checked():
  with pytest.raises(ValueError, match="attention.kernel must be one of"):
    AttentionConfig(kernel="cudnn")
  with pytest.raises(ValueError, match="no sliding window"):
    Attention(16, AttentionConfig(num_heads=2, head_dim=16, kernel="pallas"), window=4, rngs=nnx.Rngs(0))
  layer = Attention(16, AttentionConfig(num_heads=2, head_dim=8, kernel="pallas"), window=None, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="head_dim=8: the Pallas kernels need powers of two >= 16"):
    layer(jnp.zeros((1, 4, 16)))
  with params.lowering_for("tpu"), pytest.raises(ValueError, match="GPU"):
    causal_attention(*jnp.zeros((3, 1, 4, 2, 16)))
