"""The training objective: masked next-token cross-entropy (+ optional z-loss) for token tasks, masked squared error
for in-context regression; sums over a (micro-)batch, normalised by the caller.

The LM loss reads the logits out in sequence chunks of `chunk_size` positions (`chunked_ce.py`: the [B, T, V] f32
logits and their gradient are never whole); chunk_size 0 computes them whole (the model's `__call__`). Both give the
same loss and gradients up to f32 summation order."""
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mesanet_jax.train.chunked_ce import chunked_cross_entropy


def task_type(config) -> str:
  return "regression" if config.data.source == "synthetic" and config.data.task == "regression" else "lm"


def _token_losses(model, inputs, targets, chunk_size: int):
  """(ce, logsumexp, argmax), each [B, T]."""
  if chunk_size:
    return chunked_cross_entropy(model.hidden(inputs), model.readout_weights(), targets, model.config.logit_cap,
                                 chunk_size)
  logits = model(inputs)
  return (optax.softmax_cross_entropy_with_integer_labels(logits, targets), jax.nn.logsumexp(logits, axis=-1),
          jnp.argmax(logits, -1))


def loss_sums(graphdef, params, batch, task_type: str, z_loss: float, chunk_size: int = 0):
  """(Σ masked loss [+ z-loss], aux) for one (micro-)batch; aux holds the sums for metrics."""
  model = nnx.merge(graphdef, params)
  mask = batch["mask"]
  if task_type == "regression":
    error = (model(batch["inputs"]) - batch["targets"]) ** 2
    loss = jnp.sum(error * mask)
    return loss, {"loss": loss, "count": jnp.sum(mask), "correct": jnp.zeros(())}
  ce, lse, argmax = _token_losses(model, batch["inputs"], batch["targets"], chunk_size)
  loss = jnp.sum(ce * mask)
  total = loss
  if z_loss:
    total = total + z_loss * jnp.sum(lse ** 2 * mask)
  correct = jnp.sum((argmax == batch["targets"]) * mask)
  return total, {"loss": loss, "count": jnp.sum(mask), "correct": correct}
