"""The MAD models: the paper's sizes for every architecture and mad-lab's compression autoencoder."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mesanet_jax.mad import models
from mesanet_jax.models.lm import count_params


def test_sincos_is_mad_labs_position_embedding():
  # posemb_sincos_1d (mad-lab mad/model/layers/featurization/posemb.py): half = 2 frequencies 10000^(-i/(half-1)).
  np.testing.assert_allclose(models.sincos(3, 4)[2], [np.sin(2), np.sin(2e-4), np.cos(2), np.cos(2e-4)], rtol=1e-6)


@pytest.mark.parametrize("architecture", models.ARCHITECTURES)
def test_paper_mad_sizes(architecture):
  config = models.mad_config(architecture, 16)
  assert (config.n_layers, config.d_model) == (2, 128)
  assert (config.mesa.num_heads, config.mesa.head_dim, config.attention.num_heads, config.gdn.head_dim) == (8, 16, 8, 16)
  assert config.lru.width == 160 and config.lru.num_heads == 8
  assert 4.2e5 < count_params(config) < 4.8e5  # ≈ 0.43M: SwiGLU 3·128·384 + a mixer of ≈ 4·128² per block


def test_mesa_computation_defaults_per_backend_and_is_overridden():
  mesa = models.mad_config("mesanet", 16).mesa
  assert (mesa.impl, mesa.chunk_size, mesa.matmul_precision) == models.FAST_MESA.get(jax.default_backend(),
                                                                                       models.OTHER_MESA)
  config = models.mad_config("hawk_mesa", 16, impl="pallas", chunk_size=16, cg_steps=8, matmul_precision="default")
  assert (config.mesa.impl, config.mesa.chunk_size, config.mesa.cg_steps_train, config.mesa.matmul_precision) == (
      "pallas", 16, 8, "default")
  assert config.gdn.chunk_size == 16 and models.mad_config("gdn", 16).gdn.chunk_size == 64


def test_mad_lab_backbone_switches():
  tied, untied = models.mad_config("mesanet", 64), models.mad_config("mesanet", 64, tie_embeddings=False)
  assert tied.tie_embeddings and not untied.tie_embeddings
  assert count_params(untied) - count_params(tied) == 64 * 128  # a [d, V] read-out beside the [V, d] embedding
  assert models.mad_config("mesanet", 64, embed_std=0.02).embed_std == 0.02 and tied.embed_std is None


@pytest.mark.slow
def test_autoencoder_decodes_every_position_from_the_last_state():
  model = models.AutoEncoder(models.mad_config("transformer", 16), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 16)
  graphdef, state = nnx.split(model)
  logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
  assert logits.shape == (2, 8, 16) and logits.dtype == jnp.float32
  # Position 0's output depends on the whole input through the last state: every embedding row used gets gradient.
  grads = jax.jit(jax.grad(lambda s, t: jnp.sum(nnx.merge(graphdef, s)(t)[:, 0])))(state, tokens)
  used = np.unique(np.asarray(tokens))
  assert np.all(np.abs(np.asarray(grads["embed"][...]))[used].sum(-1) > 0)
  # Changing only the first token changes the decoded last position (nothing but the last state is read).
  other = tokens.at[:, 0].set((tokens[:, 0] + 1) % 16)
  changed = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, other)
  assert float(jnp.max(jnp.abs(changed[:, -1] - logits[:, -1]))) > 0
