"""Autoregressive generation: `generate` under one `jax.jit` (prefill the prompt, then `lax.scan` over decode
steps), and `stream`, the same one token at a time for printing as tokens are produced.

Token i is sampled with `jax.random.fold_in(key, i)`, derived when it is needed, so memory does not grow with the
number of tokens asked for (beyond `generate`'s output) and both functions draw the same tokens for the same key.
Both run the model as `decoding.for_decoding` prepares it once per call (weights in their compute dtype)."""
import functools
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mesanet_jax.models.decoding import for_decoding
from mesanet_jax.models.lm import LanguageModel


class Generation(NamedTuple):
  tokens: jax.Array  # [B, steps] int32, the generated continuation
  cg_steps: jax.Array | None  # [B, steps − 1] mean CG steps (Mesa layers × heads) per decoded token; None without Mesa


def sample(logits: jax.Array, key: jax.Array, temperature: float, top_k: int | None) -> jax.Array:
  """logits [B, V] -> tokens [B] int32: greedy when temperature == 0, else softmax(logits / T) over the top-k."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if top_k is not None:
    threshold = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "temperature", "top_k"))
def _generate(graphdef, state, prompt, key, *, steps, temperature, top_k):
  model = for_decoding(nnx.merge(graphdef, state))  # once, before the prefill and the decode loop
  logits, cache = model.prefill(prompt, max_len=prompt.shape[1] + steps, last_only=True)
  first = sample(logits, jax.random.fold_in(key, 0), temperature, top_k)

  def step(carry, index):
    token, cache = carry
    logits, cache, cg_steps = model.decode_step(token, cache)
    token = sample(logits, jax.random.fold_in(key, index), temperature, top_k)
    return (token, cache), (token, cg_steps)

  _, (rest, cg_steps) = jax.lax.scan(step, (first, cache), jnp.arange(1, steps))
  tokens = jnp.concatenate([first[:, None], rest.T], axis=1)
  return Generation(tokens, None if cg_steps is None else cg_steps.T)


def _check_options(model: LanguageModel, steps: int, temperature: float, top_k: int | None) -> None:
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if top_k is not None and not 1 <= top_k <= model.config.vocab_size:
    raise ValueError(f"top_k must be in [1, vocab_size] or None, got {top_k}")


def generate(model: LanguageModel, prompt: jax.Array, steps: int, *, temperature: float = 0.0,
             top_k: int | None = None, key: jax.Array | None = None) -> Generation:
  """Continues prompt [B, T] by `steps` tokens. Mesa layers decode in constant memory with the model's
  `mesa.cg_steps_decode` / `mesa.decode_tol`; with a tolerance, `cg_steps` shows how many CG steps each token used."""
  _check_options(model, steps, temperature, top_k)
  graphdef, state = nnx.split(model)
  key = jax.random.key(0) if key is None else key
  return _generate(graphdef, state, jnp.asarray(prompt, jnp.int32), key, steps=steps, temperature=float(temperature),
                   top_k=top_k)


def stream(model: LanguageModel, prompt: jax.Array, steps: int, *, temperature: float = 0.0,
           top_k: int | None = None, key: jax.Array | None = None) -> Iterator[tuple[jax.Array, jax.Array | None]]:
  """`generate` one token at a time: yields (tokens [B] int32, CG steps [B] of the decode step that produced them,
  None for the first token, which comes from the prefill). The prefill and the decode step are each jitted once."""
  _check_options(model, steps, temperature, top_k)
  graphdef, state = nnx.split(for_decoding(model))  # once per call, outside the per-token jit
  prompt = jnp.asarray(prompt, jnp.int32)
  key = jax.random.key(0) if key is None else key
  pick = functools.partial(sample, temperature=float(temperature), top_k=top_k)

  @jax.jit
  def prefill(state, prompt, key):
    logits, cache = nnx.merge(graphdef, state).prefill(prompt, max_len=prompt.shape[1] + steps, last_only=True)
    return pick(logits, jax.random.fold_in(key, 0)), cache

  @functools.partial(jax.jit, donate_argnums=1)
  def decode(state, cache, token, key, index):
    logits, cache, cg_steps = nnx.merge(graphdef, state).decode_step(token, cache)
    return pick(logits, jax.random.fold_in(key, index)), cache, cg_steps

  def tokens():
    token, cache = prefill(state, prompt, key)
    yield token, None
    for index in range(1, steps):
      token, cache, cg_steps = decode(state, cache, token, key, index)
      yield token, cg_steps
  return tokens()  # a generator inside, so bad options raise here, at the call
