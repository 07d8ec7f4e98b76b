"""The jitted train and eval steps (pure functions of the TrainState / params and a global batch).

With CG steps probes (`state.cg_steps_logged`), the train step also returns the mean and max CG steps of the forward
and adjoint solves per Mesa layer (`metrics.cg_steps_metrics`: gradients w.r.t. zero probes, one per micro-batch,
combined by `ops.cg_steps.combine_calls`), and the eval step the forward's, from a forward pass alone.
"""
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mesanet_jax.layers.mesa import cg_steps_by_layer, cg_steps_layer_indices
from mesanet_jax.ops.cg_steps import combine_calls
from mesanet_jax.train import optimizer
from mesanet_jax.train.loss import loss_sums, output_sums, task_type
from mesanet_jax.train.metrics import cg_steps_metrics
from mesanet_jax.train.state import TrainState


def _zeros(probes: nnx.State) -> nnx.State:
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), probes)


def make_train_step(config, graphdef, tx, probes: nnx.State):
  """train_step(state, batch) -> (state, metrics): gradients summed over `grad_accum` micro-batches (a scan),
  normalised by the total mask count, so accumulation changes nothing but memory; `tx` skips (and counts) an update
  whose gradients are not all finite (a non-finite loss makes them so). probes: `state.setup`'s abstract probes."""
  accum, kind, z = config.train.grad_accum, task_type(config), config.optim.z_loss
  lr_at = optimizer.schedule(config.optim, config.train.num_steps)
  chunk = config.train.loss_chunk_size
  grad_fn = jax.value_and_grad(lambda p, probes, b: loss_sums(graphdef, p, probes, b, kind, z, chunk),
                               argnums=(0, 1), has_aux=True)
  layers = cg_steps_layer_indices(probes)

  def micro(batch):
    # [B, ...] -> [accum, B/accum, ...] taking strided rows, so each device's rows stay on that device.
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1), batch)

  def train_step(state: TrainState, batch):
    def body(carry, mb):
      (_, aux), (grads, probe_grads) = grad_fn(state.params, _zeros(probes), mb)
      return jax.tree.map(jnp.add, carry, (grads, aux)), cg_steps_by_layer(probe_grads) if layers else None
    zero = (jax.tree.map(jnp.zeros_like, state.params), {"loss": 0.0, "count": 0.0, "correct": 0.0})
    zero = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32) if not hasattr(x, "dtype") else x, zero)
    (grads, aux), cg_steps = jax.lax.scan(body, zero, micro(batch))
    count = jnp.maximum(aux["count"], 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    loss = aux["loss"] / count
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr_at(state.step),
               "skipped": optimizer.skipped(opt_state), "tokens": aux["count"]}
    if kind == "lm":
      metrics["accuracy"] = aux["correct"] / count
    if layers:  # [accum, L, 4] -> [L, 4]
      metrics.update(cg_steps_metrics(layers, combine_calls(cg_steps)))
    return new_state, metrics
  return train_step


def make_eval_step(config, graphdef, probes: nnx.State):
  """eval_step(params, batch) -> (sums {"loss", "count", "correct"}, forward CG steps per Mesa layer [L, 2] or None
  without probes); the caller adds the sums over batches and combines the steps (`ops.cg_steps.combine_calls`)."""
  kind = task_type(config)

  def eval_step(params, batch):
    if not probes:
      return loss_sums(graphdef, params, probes, batch, kind, 0.0, config.train.loss_chunk_size)[1], None
    outputs, cg_steps = nnx.merge(graphdef, params, _zeros(probes)).forward_with_cg_steps(batch["inputs"])
    return output_sums(outputs, batch, kind, 0.0)[1], cg_steps
  return eval_step
