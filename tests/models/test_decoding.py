"""`for_decoding`: weights stored in their compute dtype, and decoding with them is bit-identical to the model's."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

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


def _decode(model: LanguageModel, tokens: jax.Array, prompt_len: int):
  """Prefill tokens[:, :P], then teacher-forced decode steps over the rest: (logits [B, T − P + 1, V], their
  greedy tokens)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, tokens):
    model = nnx.merge(graphdef, state)
    logits, cache = model.prefill(tokens[:, :prompt_len], max_len=tokens.shape[1], last_only=True)

    def step(cache, token):
      logits, cache, _ = model.decode_step(token, cache)
      return cache, logits

    _, decoded = jax.lax.scan(step, cache, tokens[:, prompt_len:].T)
    logits = jnp.concatenate([logits[:, None], jnp.moveaxis(decoded, 0, 1)], axis=1)
    return logits, jnp.argmax(logits, axis=-1)

  return run(state, tokens)


def _dtypes(model: nnx.Module) -> dict:
  return {".".join(map(str, path)): v.get_value().dtype for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_weights_take_their_modules_compute_dtype_and_the_model_is_left_alone():
  model = _bf16_model("gdn")
  before = _dtypes(model)
  prepared = _dtypes(for_decoding(model))
  assert _dtypes(model) == before and set(before.values()) == {jnp.dtype(jnp.float32)}
  f32 = {path for path, dtype in prepared.items() if dtype == jnp.float32}
  # Computed in f32 whatever the dtype: the norms' scales and the gate projections (f32 Linears); the rest is bf16.
  assert f32 == {p for p in prepared if p.endswith("norm.scale") or ".a_proj." in p or ".b_proj." in p}
  assert {"embed", "blocks.0.mixer.q_proj.kernel", "blocks.0.mixer.q_conv.kernel", "blocks.1.mlp.down.kernel"} <= (
      prepared.keys() - f32)


def test_bf16_params_with_f32_compute_are_not_widened():
  model = LanguageModel(preset("tiny", dtype=jnp.float32, param_dtype=jnp.bfloat16), rngs=nnx.Rngs(0))
  assert set(_dtypes(for_decoding(model)).values()) == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("architecture, scan_layers", [("mesanet", False), ("mesanet", True), ("transformer", False),
                                                       ("transformer", True), ("gdn", False), ("hawk_mesa", False)])
def test_decoding_with_cast_weights_is_bit_identical(architecture, scan_layers):
  # The cast is the one each module does on every call, so logits and tokens are equal, not merely close.
  model = _bf16_model(architecture, scan_layers=scan_layers)
  tokens = _tokens((2, 14))
  logits, greedy = _decode(model, tokens, 6)
  cast_logits, cast_greedy = _decode(for_decoding(model), tokens, 6)
  np.testing.assert_array_equal(np.asarray(cast_logits), np.asarray(logits))
  np.testing.assert_array_equal(np.asarray(cast_greedy), np.asarray(greedy))
