"""`for_decoding`: weights stored in their compute dtype (decoding bit-identical to the model's) and projections
fused (`FusedLinear`: the layers' products up to summation order; greedy decoding unchanged)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mesanet_jax.layers.fused_linear import FusedLinear, FusedProjections
from mesanet_jax.models.config import preset
from mesanet_jax.models.decoding import for_decoding
from mesanet_jax.models.lm import LanguageModel
from tests.models.test_lm import _tokens


def _bf16_model(architecture: str, **overrides) -> LanguageModel:
  """Two tiny blocks computing in bf16 with f32 params (the training setup), 8 CG steps."""
  config = preset("tiny", architecture, dtype=jnp.bfloat16, param_dtype=jnp.float32, **overrides)
  config = dataclasses.replace(config, mixers=config.mixers[:2],
                               mesa=dataclasses.replace(config.mesa, cg_steps_train=8, cg_steps_decode=8))
  return LanguageModel(config, rngs=nnx.Rngs(0))


def _dtypes(model: nnx.Module) -> dict:
  return {".".join(map(str, path)): v.get_value().dtype for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_weights_take_their_modules_compute_dtype_and_the_model_is_left_alone():
  model = _bf16_model("gdn")
  before = _dtypes(model)
  prepared = _dtypes(for_decoding(model))
  assert _dtypes(model) == before and set(before.values()) == {jnp.dtype(jnp.float32)}
  assert prepared.keys() == before.keys()  # the fused kernels are DecodeWeights, not params: checkpoints unchanged
  f32 = {path for path, dtype in prepared.items() if dtype == jnp.float32}
  # Computed in f32 whatever the dtype: the norms' scales and the gate projections (f32 Linears); the rest is bf16.
  assert f32 == {p for p in prepared if p.endswith("norm.scale") or ".a_proj." in p or ".b_proj." in p}
  assert {"embed", "blocks.0.mixer.q_proj.kernel", "blocks.0.mixer.q_conv.kernel", "blocks.1.mlp.down.kernel"} <= (
      prepared.keys() - f32)


def test_bf16_params_with_f32_compute_are_not_widened():
  model = LanguageModel(preset("tiny", dtype=jnp.float32, param_dtype=jnp.bfloat16), rngs=nnx.Rngs(0))
  assert set(_dtypes(for_decoding(model)).values()) == {jnp.dtype(jnp.bfloat16)}


def test_an_f32_residual_stream_keeps_its_embedding_in_f32():
  """bf16 compute on an f32 stream: the embedding rows enter the stream unrounded, so decoding keeps the table f32
  (the tied read-out casts it to bf16 as it is used); the rest narrows as without."""
  prepared = _dtypes(for_decoding(_bf16_model("mesanet", residual_dtype=jnp.float32)))
  assert prepared["embed"] == jnp.float32 and prepared["blocks.0.mixer.q_proj.kernel"] == jnp.bfloat16


def _fused_as_stored(model: LanguageModel) -> LanguageModel:
  """A copy of `model` with its projection groups fused (decode layout) but every weight in its stored dtype: what
  `for_decoding` makes, without the cast."""
  model = nnx.clone(model)
  for _, node in nnx.iter_graph(model):
    if isinstance(node, FusedProjections):
      node.fuse()
  return model


def _greedy(model: LanguageModel, prompt: jax.Array, steps: int):
  """Prefill, then `steps` greedy decode steps each fed its own token: (tokens [B, steps], logits [B, steps, V])."""
  graphdef, state = nnx.split(model)

  @jax.jit  # a new function per call: nothing compiled for another model or patch is reused
  def run(state, prompt):
    model = nnx.merge(graphdef, state)
    _, cache = model.prefill(prompt[:, :-1], max_len=prompt.shape[1] + steps)

    def step(carry, _):
      token, cache = carry
      logits, cache, _ = model.decode_step(token, cache)
      token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      return (token, cache), (token, logits)

    _, (tokens, logits) = jax.lax.scan(step, (prompt[:, -1], cache), None, length=steps)
    return tokens.T, jnp.moveaxis(logits, 0, 1)

  return run(state, prompt)


def _each_on_its_own(module, group, x):
  """`FusedProjections.fused` as the layers compute it one by one (the decode before the fusion)."""
  return tuple(layer(x) for name in module.FUSED[group] if (layer := getattr(module, name)) is not None)


@pytest.mark.slow  # compiles three decoding programs (~8 s on one core)
@pytest.mark.parametrize("architecture, scan_layers", [("mesanet", False), ("mesanet", True), ("transformer", False),
                                                       ("transformer", True), ("gdn", False), ("hawk_mesa", False)])
def test_cast_weights_decode_bit_identically_and_fused_projections_as_the_layers(architecture, scan_layers,
                                                                                  monkeypatch):
  model = _bf16_model(architecture, scan_layers=scan_layers)
  prepared = for_decoding(model)
  prompt = _tokens((2, 6)).astype(jnp.int32)
  tokens, logits = _greedy(prepared, prompt, 32)
  # The cast is the one each module does on every call, so logits and tokens are equal, not merely close (against the
  # same projections in the same layout, stored in f32).
  stored_tokens, stored_logits = _greedy(_fused_as_stored(model), prompt, 32)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(stored_logits))
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(stored_tokens))
  # The decode layout itself (projections fused) against the layers one by one.
  monkeypatch.setattr(FusedProjections, "fused", _each_on_its_own)
  expected_tokens, expected_logits = _greedy(prepared, prompt, 32)
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(expected_tokens))
  # A fused product may be summed in another order (measured on CPU: equal in the loop, Δ 7e-3 on logits up to 6
  # under scan_layers); rounded to bf16 that is at most one bf16 ulp of a projection, which stays about one ulp
  # (2⁻⁷ relative) of the logits' scale through two blocks.
  scale = float(jnp.max(jnp.abs(expected_logits)))
  assert float(jnp.max(jnp.abs(logits - expected_logits))) <= 2 ** -7 * scale


@pytest.mark.slow  # compiles over ~8 s on one core
def test_fused_linear_matches_the_layers_and_rejects_mixed_layers():
  rngs = nnx.Rngs(0)
  layers = [nnx.Linear(48, n, use_bias=True, dtype=jnp.bfloat16, bias_init=nnx.initializers.normal(1.0), rngs=rngs)
            for n in (16, 32, 8)]
  x = jax.random.normal(jax.random.key(1), (3, 2, 48))
  fused = FusedLinear(layers)(x)
  for layer, y in zip(layers, fused):
    expected = layer(x)
    assert y.shape == expected.shape and y.dtype == jnp.bfloat16
    # Same products summed in f32 perhaps in another order, then rounded to bf16: at most one bf16 ulp apart.
    ulp = 2.0 ** (jnp.floor(jnp.log2(jnp.abs(expected.astype(jnp.float32)))) - 7)
    assert bool(jnp.all(jnp.abs(y.astype(jnp.float32) - expected.astype(jnp.float32)) <= ulp))
  with pytest.raises(ValueError, match="must share in_features, dtype"):
    FusedLinear([layers[0], nnx.Linear(48, 4, use_bias=True, rngs=rngs)])  # f32 with bf16
