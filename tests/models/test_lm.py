"""LanguageModel: prefill + decode ≡ full forward for every mixer, generation, init determinism, dtype policy."""
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mesanet_jax.models.config import preset
from mesanet_jax.models.generate import generate, stream
from mesanet_jax.models.config import embedding_init_and_scale, from_dict, to_dict
from mesanet_jax.models.lm import LanguageModel, embed_tokens, train_blocks
from mesanet_jax.models.regression import RegressionModel
from mesanet_jax.ops import MesaState


def _tokens(shape=(2, 18), seed=1):
  return jax.random.randint(jax.random.key(seed), shape, 0, 256)


def small(architecture: str, **overrides):
  """The tiny preset cut to 2 blocks and 10 CG steps (compile time): two blocks of a mixer check what four do."""
  config = preset("tiny", architecture, **overrides)
  return dataclasses.replace(config, mixers=config.mixers[:2],
                             mesa=dataclasses.replace(config.mesa, cg_steps_train=10))


def _prefill_then_decode(model, tokens, prompt_len):
  """Logits of prefill(tokens[:, :P]) then teacher-forced decode of the rest, and of the full forward."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, tokens):
    model = nnx.merge(graphdef, state)
    logits, cache = model.prefill(tokens[:, :prompt_len], max_len=tokens.shape[1])

    def step(cache, token):
      step_logits, cache, _ = model.decode_step(token, cache)
      return cache, step_logits

    _, decoded = jax.lax.scan(step, cache, tokens[:, prompt_len:].T)
    return jnp.concatenate([logits, jnp.moveaxis(decoded, 0, 1)], axis=1), model(tokens)

  return run(state, tokens)


def _forward(model, tokens):
  """model(tokens) as one jitted program (an eager forward compiles every primitive on its own: slower)."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))(state, tokens)


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["mesanet", "transformer", "swa", "gdn", "hybrid"])
def test_prefill_then_decode_matches_full_forward(architecture):
  # 12-token prompt: a partial chunk (chunk 16) and more tokens than the sliding window (8), so the ring buffer wraps.
  # The hybrid keeps its four blocks (four different mixers).
  config = preset("tiny", architecture) if architecture == "hybrid" else small(architecture)
  model = LanguageModel(config, rngs=nnx.Rngs(0))
  stepped, full = _prefill_then_decode(model, _tokens(), 12)
  # Measured max |Δlogit| ≤ 6e-6 with logits up to ~7 (f32 rounding; Mesa: converged CG on both paths).
  assert float(jnp.max(jnp.abs(stepped - full))) < 1e-4


@pytest.mark.slow  # a whole model's decoding loop, compiled
def test_generate_greedy_with_cg_tolerance_reports_steps():
  config = preset("tiny", "hybrid")
  config = dataclasses.replace(config, mesa=dataclasses.replace(config.mesa, decode_tol=1e-4))
  model = LanguageModel(config, rngs=nnx.Rngs(0))
  prompt = _tokens((2, 10))
  out = generate(model, prompt, 6)
  assert out.tokens.shape == (2, 6) and out.cg_steps.shape == (2, 5)
  assert np.all(out.cg_steps >= 1) and np.all(out.cg_steps <= config.mesa.cg_steps_decode)
  assert float(jnp.mean(out.cg_steps)) < config.mesa.cg_steps_decode  # early stopping did stop early
  # Greedy: every token is the argmax of the full forward on what precedes it (where the top-2 gap exceeds the
  # ~1e-3 logit error of tol = 1e-4 CG).
  logits = _forward(model, jnp.concatenate([prompt, out.tokens[:, :-1]], axis=1))[:, 9:]
  top2 = jnp.sort(logits, axis=-1)[..., -2:]
  clear = (top2[..., 1] - top2[..., 0]) > 1e-2
  assert bool(jnp.all(jnp.where(clear, jnp.argmax(logits, -1) == out.tokens, True))) and bool(jnp.any(clear))


@pytest.mark.slow  # a whole model's decoding loop, compiled
def test_generate_sampling_top_k():
  model = LanguageModel(small("transformer"), rngs=nnx.Rngs(0))
  prompt = _tokens((2, 10))
  greedy = generate(model, prompt, 5)
  assert greedy.cg_steps is None
  top1 = generate(model, prompt, 5, temperature=0.7, top_k=1, key=jax.random.key(3))
  np.testing.assert_array_equal(top1.tokens, greedy.tokens)
  sampled = generate(model, prompt, 5, temperature=2.0, top_k=4, key=jax.random.key(3)).tokens
  logits = _forward(model, jnp.concatenate([prompt, sampled[:, :-1]], axis=1))[:, 9:]
  top4 = jax.lax.top_k(logits, 4)[1]
  assert bool(jnp.all(jnp.any(top4 == sampled[..., None], axis=-1)))
  with pytest.raises(ValueError, match="top_k"):
    generate(model, prompt, 5, temperature=1.0, top_k=0)


@pytest.mark.slow
def test_stream_draws_what_generate_draws_and_memory_does_not_grow_with_steps():
  model = LanguageModel(small("mesanet"), rngs=nnx.Rngs(0))
  prompt, key = _tokens((2, 6)), jax.random.key(5)
  generated = generate(model, prompt, 4, temperature=1.0, key=key).tokens
  # A billion tokens asked for: token i's key is derived when token i is drawn (nothing is allocated per token up
  # front, which took 8 GB of keys before the first token), so the first four are those of a 4-token request.
  streamed = [token for token, _ in itertools.islice(stream(model, prompt, 10**9, temperature=1.0, key=key), 4)]
  np.testing.assert_array_equal(np.stack(streamed, axis=1), generated)


@pytest.mark.parametrize("embed_std", [None, 0.02])
def test_embedding_init_and_input_scale(embed_std):
  config = preset("tiny", "mesanet", vocab_size=4096, embed_std=embed_std)
  model = LanguageModel(config, rngs=nnx.Rngs(0))
  d = config.d_model
  std, scale = (d ** -0.5, d ** 0.5) if embed_std is None else (0.02, 1.0)  # the paper's (G.2) or mad-lab's
  table = np.asarray(model.embed[...])
  assert abs(table.std() / std - 1) < 0.05  # 4096·d draws: the sample std is within ~1 % of the true one
  tokens = jnp.array([[3, 7, 4095]])
  np.testing.assert_allclose(model._embed(tokens)[0], table[[3, 7, 4095]] * scale, rtol=1e-6)
  with pytest.raises(ValueError, match="embed_std must be a positive number or None"):
    preset("tiny", embed_std=0.0)


def test_bf16_embedding_gathers_in_f32_so_its_gradient_scatters_in_f32():
  """bf16 activations: the rows are those of the f32 table rounded once, and the table's gradient is a scatter-add in
  f32 (a bf16 scatter-add compiles to compare-and-swap loops on a GPU: 3.3 of a 12.9 ms MAD step on an H100)."""
  config = preset("tiny", "mesanet", dtype=jnp.bfloat16)
  table = jax.random.normal(jax.random.key(0), (config.vocab_size, config.d_model))
  tokens = jnp.array([[3, 7, 3, 255]])
  rows = embed_tokens(config, nnx.Param(table), tokens)
  _, scale = embedding_init_and_scale(config)
  assert rows.dtype == jnp.bfloat16
  np.testing.assert_array_equal(rows, (table[tokens[0]] * scale).astype(jnp.bfloat16)[None])
  grad = jax.grad(lambda t, ids: jnp.sum(embed_tokens(config, nnx.Param(t), ids).astype(jnp.float32)))
  hlo = jax.jit(grad).lower(table, tokens).compile().as_text()  # one instruction a line, its shape on it
  scatters = [line for line in hlo.splitlines() if " scatter(" in line]
  assert scatters and all("bf16" not in line for line in scatters), scatters
  np.testing.assert_allclose(grad(table, tokens)[3], 2 * np.float32(np.asarray(scale, jnp.bfloat16)), rtol=1e-6)


def _without_sublayer_outputs(model: LanguageModel) -> LanguageModel:
  """`model` with every mixer's and MLP's output projection zeroed: each block adds exact zeros to its stream."""
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if path[-2:] in (("o_proj", "kernel"), ("down", "kernel")):
      variable.set_value(jnp.zeros_like(variable.get_value()))
  return model


@pytest.mark.parametrize("scan_layers", [False, True])
def test_an_f32_residual_stream_with_bf16_compute_keeps_f32_precision_between_sublayers(scan_layers):
  """residual_dtype f32 with dtype bf16 (PyTorch autocast's mixed precision): the embedding rows are the f32 table's,
  and blocks whose sublayers add zeros pass the f32 stream through bit for bit, where a bf16 stream rounds it to
  8 mantissa bits."""
  mixed = small("mesanet", dtype=jnp.bfloat16, residual_dtype=jnp.float32, scan_layers=scan_layers)
  bf16, f32 = dataclasses.replace(mixed, residual_dtype=None), dataclasses.replace(mixed, dtype=jnp.float32)
  assert (mixed.stream_dtype, bf16.stream_dtype, f32.stream_dtype) == (jnp.float32, jnp.bfloat16, jnp.float32)
  model = _without_sublayer_outputs(LanguageModel(mixed, rngs=nnx.Rngs(0)))
  tokens = _tokens()
  x = embed_tokens(mixed, model.embed, tokens)
  np.testing.assert_array_equal(x, embed_tokens(f32, model.embed, tokens))  # f32 rows, not bf16-rounded ones
  through = nnx.jit(train_blocks, static_argnums=0)
  out = through(mixed, model.blocks, x)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out, x)
  rounded = through(bf16, model.blocks, embed_tokens(bf16, model.embed, tokens))
  assert rounded.dtype == jnp.bfloat16
  np.testing.assert_array_equal(rounded, x.astype(jnp.bfloat16))
  assert not np.array_equal(np.asarray(rounded, np.float32), x)
  regression = RegressionModel(mixed, 3, rngs=nnx.Rngs(0))  # the in-context regression model reads in to it too
  inputs = jax.random.normal(jax.random.key(2), (2, 5, 3))
  assert regression._read_in(inputs).dtype == jnp.float32
  assert nnx.jit(lambda model, inputs: model(inputs))(regression, inputs).shape == (2, 5)
  assert from_dict(to_dict(mixed)) == mixed and from_dict(to_dict(bf16)) == bf16  # run configs keep the setting
  with pytest.raises(ValueError, match="residual_dtype must be a floating dtype or None"):
    preset("tiny", residual_dtype=jnp.int32)


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["hybrid", "hawk_mesa"])
def test_an_f32_residual_stream_decodes_what_the_full_forward_computes(architecture):
  """Prefill + decode with bf16 compute on an f32 stream: the decode path's sums stay f32 as the forward's do."""
  config = preset("tiny", architecture, dtype=jnp.bfloat16, residual_dtype=jnp.float32)
  stepped, full = _prefill_then_decode(LanguageModel(config, rngs=nnx.Rngs(0)), _tokens(), 12)
  # Measured max |Δlogit| 0.025 / 0.029 with logits up to ~6.6: one bf16 ulp there (the read-out computes in bf16).
  assert float(jnp.max(jnp.abs(stepped - full))) < 0.1


def test_init_is_deterministic_per_seed():
  config = preset("tiny", "hybrid")
  leaves = lambda seed: jax.tree.leaves(nnx.state(LanguageModel(config, rngs=nnx.Rngs(seed)), nnx.Param))
  same, other = leaves(0), leaves(1)
  assert all(np.array_equal(a, b) for a, b in zip(same, leaves(0)))
  assert not any(np.array_equal(a, b) for a, b in zip(same, other) if a.size > 64)  # random (not constant) leaves


@pytest.mark.slow  # a whole model's decoding loop, compiled
def test_bf16_compute_keeps_f32_params_and_state():
  model = LanguageModel(preset("tiny", "hybrid", dtype=jnp.bfloat16), rngs=nnx.Rngs(0))
  assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
  tokens = _tokens((2, 12))

  @nnx.jit  # one program, not an eager compile per primitive
  def embed_and_first_block(model, tokens):
    x = model._embed(tokens)
    return x, model.blocks[0](x)[0]
  x, hidden = embed_and_first_block(model, tokens)
  assert x.dtype == jnp.bfloat16 and hidden.dtype == jnp.bfloat16
  logits, cache = nnx.jit(lambda model, tokens: model.prefill(tokens, max_len=16))(model, tokens)
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
  mesa_state = cache[0].state
  assert isinstance(mesa_state, MesaState) and mesa_state.h_kk.dtype == jnp.float32
  assert cache[3].k.dtype == jnp.bfloat16  # layer 4 is sliding-window attention: its KV cache holds activations
  full = _forward(LanguageModel(preset("tiny", "hybrid"), rngs=nnx.Rngs(0)), tokens)
  # Same parameters in f32: bf16 activations (8-bit mantissa) through 4 blocks move logits by ~1e-1 at most.
  assert float(jnp.max(jnp.abs(logits - full))) < 0.5
