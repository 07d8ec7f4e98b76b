"""Test helper: the same weights in the `scan_layers` layout."""
import dataclasses

import jax.numpy as jnp
from flax import nnx

from mesanet_jax.models.lm import LanguageModel


def stacked(params: nnx.State, n_layers: int) -> dict:
  """Loop-layout params (or grads) -> {stacked path: array}: blocks.i.<name> stacked into blocks.<name> [L, ...]."""
  flat = {path: v[...] for path, v in nnx.to_flat_state(params)}
  out = {path: value for path, value in flat.items() if path[0] != "blocks"}
  for path in flat:
    if path[0] == "blocks" and path[1] == 0:
      out[("blocks", *path[2:])] = jnp.stack([flat[("blocks", i, *path[2:])] for i in range(n_layers)])
  return out


def same_weights(model: LanguageModel, **overrides) -> LanguageModel:
  """A LanguageModel of `model`'s config with `overrides` (e.g. scan_layers=True, remat=True) holding its weights."""
  config = model.config
  copy = LanguageModel(dataclasses.replace(config, **overrides), rngs=nnx.Rngs(0))
  if not copy.config.scan_layers:
    nnx.update(copy, nnx.state(model, nnx.Param))
    return copy
  values = stacked(nnx.state(model, nnx.Param), config.n_layers)
  state = nnx.state(copy, nnx.Param)
  nnx.update(copy, nnx.from_flat_state([(path, v.replace(values[path])) for path, v in nnx.to_flat_state(state)]))
  return copy
