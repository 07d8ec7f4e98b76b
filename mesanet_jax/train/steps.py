"""The jitted train and eval steps (pure functions of the TrainState / params and a global batch)."""
import jax
import jax.numpy as jnp
import optax

from mesanet_jax.train import optimizer
from mesanet_jax.train.loss import loss_sums, task_type
from mesanet_jax.train.state import TrainState


def make_train_step(config, graphdef, tx):
  """train_step(state, batch) -> (state, metrics): gradients summed over `grad_accum` micro-batches (a scan),
  normalised by the total mask count, so accumulation changes nothing but memory; `tx` skips (and counts) an update
  whose gradients are not all finite (a non-finite loss makes them so)."""
  accum, kind, z = config.train.grad_accum, task_type(config), config.optim.z_loss
  lr_at = optimizer.schedule(config.optim, config.train.num_steps)
  chunk = config.train.loss_chunk_size
  grad_fn = jax.value_and_grad(lambda p, b: loss_sums(graphdef, p, b, kind, z, chunk), has_aux=True)

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
    new_state = TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr_at(state.step),
               "skipped": optimizer.skipped(opt_state), "tokens": aux["count"]}
    if kind == "lm":
      metrics["accuracy"] = aux["correct"] / count
    return new_state, metrics
  return train_step


def make_eval_step(config, graphdef):
  """eval_step(params, batch) -> sums {"loss", "count", "correct"} (summed over batches by the caller)."""
  kind = task_type(config)

  def eval_step(params, batch):
    return loss_sums(graphdef, params, batch, kind, 0.0, config.train.loss_chunk_size)[1]
  return eval_step
