"""The train state, born sharded on the mesh: its abstract shapes and shardings, and the jitted fresh init.

TrainState holds only arrays (params as an nnx.State of f32 master weights, the optax state with its count of
skipped updates, and the step); the model's graphdef and the optimiser are static and closed over by the steps.
"""
import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from mesanet_jax import sharding
from mesanet_jax.models.config import LMConfig
from mesanet_jax.models.lm import LanguageModel
from mesanet_jax.models.regression import RegressionModel
from mesanet_jax.train import optimizer
from mesanet_jax.train.loss import task_type


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState


def model_factory(config, lm: LMConfig):
  """A zero-argument constructor of the model `lm` for the task (LM for tokens, RegressionModel for vectors)."""
  if task_type(config) == "regression":
    return lambda: RegressionModel(lm, config.data.dim + 1, rngs=nnx.Rngs(config.seed))
  return lambda: LanguageModel(lm, rngs=nnx.Rngs(config.seed))


def _fresh(params: nnx.State, tx) -> TrainState:
  return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


def setup(config, lm: LMConfig, mesh):
  """(graphdef, tx, abstract TrainState, TrainState shardings) for the model `lm`. Nothing is allocated."""
  graphdef, abstract_params, rest = nnx.split(nnx.eval_shape(model_factory(config, lm)), nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError("the model has non-parameter state, which the trainer does not carry")
  tx = optimizer.make_optimizer(config.optim, config.train.num_steps, abstract_params)
  abstract = jax.eval_shape(lambda p: _fresh(p, tx), abstract_params)
  replicated = sharding.replicated(mesh)
  param_sh = sharding.shardings(abstract_params, mesh)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, param_sh,
                                 transform_non_params=lambda _: replicated,
                                 is_leaf=lambda x: isinstance(x, NamedSharding))
  return graphdef, tx, abstract, TrainState(replicated, param_sh, opt_sh)


def init_state(config, lm: LMConfig, tx, shardings) -> TrainState:
  """A fresh TrainState of the model `lm`, every array created directly in its sharding by one jitted init."""
  make_model = model_factory(config, lm)
  return jax.jit(lambda: _fresh(nnx.state(make_model(), nnx.Param), tx), out_shardings=shardings)()
