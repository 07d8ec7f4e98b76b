"""Autoregressive generation under one `jax.jit`: prefill the prompt, then `lax.scan` over decode steps."""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

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
  model = nnx.merge(graphdef, state)
  logits, cache = model.prefill(prompt, max_len=prompt.shape[1] + steps)
  keys = jax.random.split(key, steps)
  first = sample(logits[:, -1], keys[0], temperature, top_k)

  def step(carry, key):
    token, cache = carry
    logits, cache, cg_steps = model.decode_step(token, cache)
    token = sample(logits, key, temperature, top_k)
    return (token, cache), (token, cg_steps)

  _, (rest, cg_steps) = jax.lax.scan(step, (first, cache), keys[1:])
  tokens = jnp.concatenate([first[:, None], rest.T], axis=1)
  return Generation(tokens, None if cg_steps is None else cg_steps.T)


def generate(model: LanguageModel, prompt: jax.Array, steps: int, *, temperature: float = 0.0,
             top_k: int | None = None, key: jax.Array | None = None) -> Generation:
  """Continues prompt [B, T] by `steps` tokens. Mesa layers decode in constant memory with the model's
  `mesa.cg_steps_decode` / `mesa.decode_tol`; with a tolerance, `cg_steps` shows how many CG steps each token used."""
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if top_k is not None and not 1 <= top_k <= model.config.vocab_size:
    raise ValueError(f"top_k must be in [1, vocab_size] or None, got {top_k}")
  graphdef, state = nnx.split(model)
  key = jax.random.key(0) if key is None else key
  return _generate(graphdef, state, jnp.asarray(prompt, jnp.int32), key, steps=steps, temperature=float(temperature),
                   top_k=top_k)
