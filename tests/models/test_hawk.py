"""Hawk (Griffin's RG-LRU block): the associative scan equals the sequential recurrence, the layer equals a direct
transcription of the block's equations, decoding equals the forward pass, Hawk and Hawk-MesaNet in the LM (scanned
layers, sharding rules, the HF export's refusal)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh

from mesanet_jax import sharding
from mesanet_jax.eval import hf_export
from mesanet_jax.layers.hawk import HawkConfig, HawkLayer, linear_recurrence, sqrt_bounded_derivative
from mesanet_jax.models.config import preset
from mesanet_jax.models.lm import LanguageModel
from tests.models.test_lm import _prefill_then_decode, _tokens, small
from tests.models.test_scan_remat import assert_same_math


def test_associative_scan_equals_the_sequential_recurrence(x64):
  keys = jax.random.split(jax.random.key(0), 3)
  a = jax.random.uniform(keys[0], (2, 37, 5), jnp.float64)
  x = jax.random.normal(keys[1], (2, 37, 5), jnp.float64)
  h0 = jax.random.normal(keys[2], (2, 5), jnp.float64)
  h, last = jax.jit(linear_recurrence)(a, x, h0)
  state, expected = np.asarray(h0), []
  for t in range(37):
    state = np.asarray(a[:, t]) * state + np.asarray(x[:, t])
    expected.append(state)
  np.testing.assert_allclose(h, np.stack(expected, axis=1), rtol=1e-12, atol=1e-12)  # f64: rounding only
  np.testing.assert_allclose(last, expected[-1], rtol=1e-12, atol=1e-12)


def _reference(layer: HawkLayer, x: np.ndarray) -> np.ndarray:
  """Griffin's recurrent block written out step by step in numpy (f64) from the layer's weights."""
  p = {".".join(map(str, path)): np.asarray(v[...], np.float64) for path, v in nnx.to_flat_state(nnx.state(layer))}
  gelu = lambda z: 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))  # jax.nn.gelu (tanh)
  sigmoid = lambda z: 1 / (1 + np.exp(-z))
  heads = layer.config.num_heads
  def block_diagonal(name, u):
    blocks = u.reshape(*u.shape[:-1], heads, -1)
    return (np.einsum("...hi,hij->...hj", blocks, p[f"{name}.kernel"]) + p[f"{name}.bias"]).reshape(u.shape)
  gate = gelu(x @ p["linear_y.kernel"] + p["linear_y.bias"])
  z = x @ p["linear_x.kernel"] + p["linear_x.bias"]
  kernel, size = p["conv.kernel"], layer.config.conv_size
  padded = np.concatenate([np.zeros((x.shape[0], size - 1, z.shape[-1])), z], axis=1)
  u = sum(kernel[i] * padded[:, i:i + z.shape[1]] for i in range(size)) + p["conv.bias"]
  a = np.exp(-8 * sigmoid(block_diagonal("a_gate", u)) * np.log1p(np.exp(p["a_param"])))
  inputs = np.sqrt(1 - a ** 2) * sigmoid(block_diagonal("input_gate", u)) * u
  h, out = np.zeros((x.shape[0], z.shape[-1])), []
  for t in range(x.shape[1]):
    h = a[:, t] * h + inputs[:, t]
    out.append(h)
  return (np.stack(out, axis=1) * gate) @ p["linear_out.kernel"] + p["linear_out.bias"]


def test_layer_matches_the_written_out_block_and_decodes_piecewise(x64):
  layer = HawkLayer(16, HawkConfig(width=20, num_heads=4), rngs=nnx.Rngs(1), dtype=jnp.float64,
                    param_dtype=jnp.float64)
  x = jax.random.normal(jax.random.key(2), (2, 11, 16), jnp.float64)
  graphdef, state = nnx.split(layer)
  forward = jax.jit(lambda x, cache: nnx.merge(graphdef, state)(x, cache))
  decode = jax.jit(lambda x, cache: nnx.merge(graphdef, state).decode(x, cache))
  y, _ = forward(x, None)
  np.testing.assert_allclose(y, _reference(layer, np.asarray(x)), rtol=1e-9, atol=1e-10)
  out, cache = forward(x[:, :6], None)
  pieces = [out]
  for t in range(6, 11):  # the rest token by token, threading the cache
    y_t, cache, _ = decode(x[:, t], cache)
    pieces.append(y_t[:, None])
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), y, rtol=1e-9, atol=1e-10)


def test_init_radius_and_bounded_sqrt_gradient():
  layer = HawkLayer(64, HawkConfig(width=80, num_heads=2), rngs=nnx.Rngs(0))
  radius = np.exp(-jax.nn.softplus(layer.a_param[...]))
  assert radius.min() >= 0.9 - 1e-6 and radius.max() <= 0.999 + 1e-6
  assert float(jax.grad(sqrt_bounded_derivative)(0.0, 1000.0)) == pytest.approx(1000.0)  # not inf
  assert float(jax.grad(sqrt_bounded_derivative)(0.25, 1000.0)) == pytest.approx(1.0)  # exact away from 0
  graphdef, state = nnx.split(layer)
  x = jax.random.normal(jax.random.key(3), (1, 5, 64))
  grads = jax.jit(jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(x)[0])))(state)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  with pytest.raises(ValueError, match="lru.width"):
    HawkLayer(64, HawkConfig(width=81, num_heads=2), rngs=nnx.Rngs(0))


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["hawk", "hawk_mesa"])
def test_lm_prefill_then_decode_matches_full_forward(architecture):
  config = preset("tiny", architecture)
  assert config.lru.width == 80 and (architecture == "hawk" or config.mixers == ("lru", "mesa") * 2)
  stepped, full = _prefill_then_decode(LanguageModel(config, rngs=nnx.Rngs(0)), _tokens(), 12)
  assert float(jnp.max(jnp.abs(stepped - full))) < 1e-4  # f32 rounding (and converged CG for the Mesa blocks)


@pytest.mark.slow
def test_hawk_scan_layers_matches_the_loop():
  assert small("hawk").mixers == ("lru", "lru")
  assert_same_math("hawk", scan_layers=True)


def test_hawk_params_shard_by_the_rules_and_the_hf_export_refuses_hawk():
  abstract = nnx.eval_shape(lambda: LanguageModel(preset("tiny", "hawk_mesa"), rngs=nnx.Rngs(0)))
  mesh = AbstractMesh((1, 2, 2), sharding.MESH_AXES)
  for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    names = variable.get_metadata()["out_sharding"]
    sharding.logical_spec(names, variable.shape, mesh)  # every name has a rule (else ValueError)
  lru = abstract.blocks[0].mixer
  assert lru.linear_x.kernel.get_metadata()["out_sharding"] == ("embed", "lru")
  assert sharding.logical_spec(("embed", "lru"), (64, 80), mesh) == jax.sharding.PartitionSpec("fsdp", "tensor")
  for architecture in ("hawk", "hawk_mesa"):
    with pytest.raises(ValueError, match="mixers"):
      hf_export.check_expressible(preset("tiny", architecture))
  with pytest.raises(ValueError, match="scan_layers"):
    preset("tiny", "hawk_mesa", scan_layers=True)
