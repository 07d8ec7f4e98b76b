"""The train state, born sharded on the mesh: its abstract shapes and shardings, and the jitted fresh init.

TrainState holds only arrays (params as an nnx.State of f32 master weights, the optax state with its count of
skipped updates, and the step); the model's graphdef and the optimiser are static and closed over by the steps.
With adaptive CG (`cg_steps_logged`) the model also carries `mesa.CGStepsProbe`s: not trained, not in the state;
the steps differentiate w.r.t. zeros in their place to read the CG steps per Mesa layer.
"""
import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from mesanet_jax import sharding
from mesanet_jax.layers.mesa import CGStepsProbe, add_cg_steps_probes
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


def cg_steps_logged(lm: LMConfig) -> bool:
  """Whether the steps report CG steps per Mesa layer: with adaptive CG (`model.cg_tol` > 0); with fixed steps
  every count is cg_steps, and the model runs without probes."""
  return "mesa" in lm.mixers and lm.mesa.cg_tol is not None


def model_factory(config, lm: LMConfig):
  """A zero-argument constructor of the model `lm` for the task (LM for tokens, RegressionModel for vectors), with
  CG steps probes when `cg_steps_logged`."""
  if task_type(config) == "regression":
    make = lambda: RegressionModel(lm, config.data.dim + 1, rngs=nnx.Rngs(config.seed))
  else:
    make = lambda: LanguageModel(lm, rngs=nnx.Rngs(config.seed))
  return (lambda: add_cg_steps_probes(make())) if cg_steps_logged(lm) else make


def _fresh(params: nnx.State, tx) -> TrainState:
  return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


def setup(config, lm: LMConfig, mesh):
  """(graphdef, tx, abstract TrainState, TrainState shardings, abstract CG steps probes: an nnx.State, empty unless
  `cg_steps_logged`) for the model `lm`; the graphdef merges params and probes. Nothing is allocated."""
  graphdef, abstract_params, probes, rest = nnx.split(nnx.eval_shape(model_factory(config, lm)), nnx.Param,
                                                      CGStepsProbe, ...)
  if jax.tree.leaves(rest):
    raise ValueError("the model has non-parameter state, which the trainer does not carry")
  tx = optimizer.make_optimizer(config.optim, config.train.num_steps, abstract_params)
  abstract = jax.eval_shape(lambda p: _fresh(p, tx), abstract_params)
  replicated = sharding.replicated(mesh)
  param_sh = sharding.shardings(abstract_params, mesh)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, param_sh,
                                 transform_non_params=lambda _: replicated,
                                 is_leaf=lambda x: isinstance(x, NamedSharding))
  return graphdef, tx, abstract, TrainState(replicated, param_sh, opt_sh), probes


def init_state(config, lm: LMConfig, tx, shardings) -> TrainState:
  """A fresh TrainState of the model `lm`, every array created directly in its sharding by one jitted init."""
  make_model = model_factory(config, lm)
  return jax.jit(lambda: _fresh(nnx.state(make_model(), nnx.Param), tx), out_shardings=shardings)()
