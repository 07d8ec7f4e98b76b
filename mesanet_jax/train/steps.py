"""Train state, born sharded on the mesh, and the jitted train / eval steps.

TrainState holds only arrays (params as an nnx.State of f32 master weights, the optax state, the step and the
count of skipped updates); the model's graphdef and the optimiser are static and closed over by the step functions.
"""
import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mesanet_jax import sharding
from mesanet_jax.models.config import LMConfig
from mesanet_jax.models.lm import LanguageModel
from mesanet_jax.models.regression import RegressionModel
from mesanet_jax.train import optimizer


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  skipped: jax.Array


def model_factory(config, lm: LMConfig):
  """A zero-argument constructor of the model `lm` for the task (LM for tokens, RegressionModel for vectors)."""
  if config.data.source == "synthetic" and config.data.task == "regression":
    return lambda: RegressionModel(lm, config.data.dim + 1, rngs=nnx.Rngs(config.seed))
  return lambda: LanguageModel(lm, rngs=nnx.Rngs(config.seed))


def setup(config, lm: LMConfig, mesh):
  """(graphdef, tx, abstract TrainState, TrainState shardings) for the model `lm`. Nothing is allocated."""
  make_model = model_factory(config, lm)
  graphdef, abstract_params, rest = nnx.split(nnx.eval_shape(make_model), nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError("the model has non-parameter state, which the trainer does not carry")
  tx = optimizer.make_optimizer(config.optim, config.train.num_steps, abstract_params)
  abstract = jax.eval_shape(
      lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p), jnp.zeros((), jnp.int32)), abstract_params)
  replicated = NamedSharding(mesh, P())
  param_sh = sharding.shardings(abstract_params, mesh)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, param_sh,
                                 transform_non_params=lambda _: replicated,
                                 is_leaf=lambda x: isinstance(x, NamedSharding))
  shardings = TrainState(replicated, param_sh, opt_sh, replicated)
  return graphdef, tx, abstract, shardings


def init_state(config, lm: LMConfig, tx, shardings) -> TrainState:
  """A fresh TrainState of the model `lm`, every array created directly in its sharding by one jitted init."""
  make_model = model_factory(config, lm)

  def init():
    params = nnx.state(make_model(), nnx.Param)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jnp.zeros((), jnp.int32))
  return jax.jit(init, out_shardings=shardings)()


def loss_sums(graphdef, params, batch, task_type: str, z_loss: float):
  """(Σ masked loss [+ z-loss], aux) for one (micro-)batch; aux holds the sums for metrics."""
  model = nnx.merge(graphdef, params)
  mask = batch["mask"]
  if task_type == "regression":
    error = (model(batch["inputs"]) - batch["targets"]) ** 2
    loss = jnp.sum(error * mask)
    return loss, {"loss": loss, "count": jnp.sum(mask), "correct": jnp.zeros(())}
  logits = model(batch["inputs"])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  loss = jnp.sum(ce * mask)
  total = loss
  if z_loss:
    total = total + z_loss * jnp.sum(jax.nn.logsumexp(logits, axis=-1) ** 2 * mask)
  correct = jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) * mask)
  return total, {"loss": loss, "count": jnp.sum(mask), "correct": correct}


def task_type(config) -> str:
  return "regression" if config.data.source == "synthetic" and config.data.task == "regression" else "lm"


def make_train_step(config, graphdef, tx):
  """train_step(state, batch) -> (state, metrics): gradients summed over `grad_accum` micro-batches (a scan),
  normalised by the total mask count, so accumulation changes nothing but memory; the update is skipped (and
  counted) when the loss or any gradient is not finite."""
  accum, kind, z = config.train.grad_accum, task_type(config), config.optim.z_loss
  lr_at = optimizer.schedule(config.optim, config.train.num_steps)
  grad_fn = jax.value_and_grad(lambda p, b: loss_sums(graphdef, p, b, kind, z), has_aux=True)

  def micro(batch):
    # [B, ...] -> [accum, B/accum, ...] taking strided rows, so each device's rows stay on that device.
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1), batch)

  def train_step(state: TrainState, batch):
    def body(carry, mb):
      (_, aux), grads = grad_fn(state.params, mb)
      return jax.tree.map(jnp.add, carry, (grads, aux)), None
    zero = (jax.tree.map(jnp.zeros_like, state.params), {"loss": 0.0, "count": 0.0, "correct": 0.0})
    zero = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32) if not hasattr(x, "dtype") else x, zero)
    (grads, aux), _ = jax.lax.scan(body, zero, micro(batch))
    count = jnp.maximum(aux["count"], 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    loss = aux["loss"] / count
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & optimizer.all_finite(grads)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(state.step + 1, keep(params, state.params), keep(opt_state, state.opt_state),
                           state.skipped + (~finite).astype(jnp.int32))
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr_at(state.step),
               "skipped": new_state.skipped, "tokens": aux["count"]}
    if kind == "lm":
      metrics["accuracy"] = aux["correct"] / count
    return new_state, metrics
  return train_step


def make_eval_step(config, graphdef):
  """eval_step(params, batch) -> sums {"loss", "count", "correct"} (summed over batches by the caller)."""
  kind = task_type(config)

  def eval_step(params, batch):
    return loss_sums(graphdef, params, batch, kind, 0.0)[1]
  return eval_step
