"""Trained models from disk for evaluation, export and generation, without optimiser state.

A trainer workdir: `<workdir>/config.json` (the run's config) → LMConfig → params of a checkpoint (latest or a given
step) restored onto any mesh. A params export: `<dir>/model_config.json` (the LMConfig) + `<dir>/params/` (orbax).
"""
import json
import os
from typing import NamedTuple

import jax
import ml_collections
from flax import nnx

from mesanet_jax import sharding
from mesanet_jax.models.config import LMConfig, from_dict, to_dict
from mesanet_jax.models.lm import LanguageModel
from mesanet_jax.train import checkpoint
from mesanet_jax.train.config import lm_config, load_run_config
from mesanet_jax.train.loss import task_type

MODEL_CONFIG = "model_config.json"
PARAMS = "params"


class Run(NamedTuple):
  config: ml_collections.ConfigDict  # the trainer config the run was trained with
  lm: LMConfig
  params: nnx.State
  step: int


def _abstract_params(lm: LMConfig):
  return nnx.state(nnx.eval_shape(lambda: LanguageModel(lm, rngs=nnx.Rngs(0))), nnx.Param)


def model_from(lm: LMConfig, params: nnx.State) -> LanguageModel:
  """The LanguageModel of `lm` holding `params`; `lm` may change inference options (CG steps, tolerance) of the
  config the params were trained with, not shapes."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: LanguageModel(lm, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, params)


def load_run(workdir: str, step: int | None = None, mesh: jax.sharding.Mesh | None = None) -> Run:
  """The run in `workdir` at `step` (None: the latest checkpoint), its params placed on `mesh` (default: all
  devices, fsdp). Language-model runs only."""
  workdir = os.path.abspath(workdir)
  config = load_run_config(workdir)
  if task_type(config) != "lm":
    raise ValueError(f"{workdir} is a regression run (data.task='regression'); only language-model runs can be "
                     f"evaluated, exported or generated from")
  lm = lm_config(config.model)  # config.json holds the run's vocabulary
  mesh = mesh or sharding.make_mesh()
  abstract = _abstract_params(lm)
  params, step = checkpoint.restore_params(workdir, step, abstract, sharding.shardings(abstract, mesh))
  return Run(config, lm, params, step)


def save_params_export(directory: str, lm: LMConfig, params: nnx.State) -> None:
  """Writes `<directory>/model_config.json` and the params-only orbax checkpoint `<directory>/params/`."""
  if os.path.exists(os.path.join(directory, PARAMS)):
    raise ValueError(f"{os.path.join(directory, PARAMS)} already exists; choose another output directory")
  os.makedirs(directory, exist_ok=True)
  checkpoint.save_params(os.path.join(directory, PARAMS), params)
  with open(os.path.join(directory, MODEL_CONFIG), "w") as f:
    json.dump(to_dict(lm), f, indent=2)


def load_params_export(directory: str, mesh: jax.sharding.Mesh | None = None) -> tuple[LMConfig, nnx.State]:
  """(LMConfig, params) written by `save_params_export`, the params placed on `mesh` (default: all devices)."""
  path = os.path.join(directory, MODEL_CONFIG)
  try:
    with open(path) as f:
      lm = from_dict(json.load(f))
  except OSError as e:
    raise ValueError(f"cannot read {path} ({e.strerror or e}): not a params export?") from None
  abstract = _abstract_params(lm)
  shardings = sharding.shardings(abstract, mesh or sharding.make_mesh())
  return lm, checkpoint.load_params(os.path.join(directory, PARAMS), abstract, shardings)
