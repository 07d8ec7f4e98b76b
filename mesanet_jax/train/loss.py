"""The training objective: masked next-token cross-entropy (+ optional z-loss) for token tasks, masked squared error
for in-context regression; sums over a (micro-)batch, normalised by the caller.

With a `chunk_size`, the LM loss reads the logits out in sequence chunks of that many positions (`chunked_ce.py`: the
[B, T, V] f32 logits and their gradient are never whole); chunk_size 0 computes them whole (the model's `__call__`).
Both give the same loss and gradients up to f32 summation order."""
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mesanet_jax.train.chunked_ce import chunked_cross_entropy


def task_type(config) -> str:
  return "regression" if config.data.source == "synthetic" and config.data.task == "regression" else "lm"


def loss_sums(graphdef, params, probes, batch, task_type: str, z_loss: float, chunk_size: int = 0):
  """(Σ masked loss [+ z-loss], aux) for one (micro-)batch; aux holds the sums for metrics. probes: the model's
  CG steps probes (`mesa.CGStepsProbe`, zeros; an empty nnx.State when the graphdef has none)."""
  model = nnx.merge(graphdef, params, probes)
  if task_type == "lm" and chunk_size:
    losses = chunked_cross_entropy(model.hidden(batch["inputs"]), model.readout_weights(), batch["targets"],
                                   model.config.logit_cap, chunk_size)
    return _token_sums(*losses, batch, z_loss)
  return output_sums(model(batch["inputs"]), batch, task_type, z_loss)


def output_sums(outputs, batch, task_type: str, z_loss: float):
  """`loss_sums` from the model's outputs (predictions [B, T] or logits [B, T, V])."""
  mask = batch["mask"]
  if task_type == "regression":
    loss = jnp.sum((outputs - batch["targets"]) ** 2 * mask)
    return loss, {"loss": loss, "count": jnp.sum(mask), "correct": jnp.zeros(())}
  logits = outputs
  return _token_sums(optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]),
                     jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, -1), batch, z_loss)


def _token_sums(ce, logsumexp, argmax, batch, z_loss: float):
  """ce, logsumexp, argmax [B, T] -> (Σ masked ce [+ z-loss], aux)."""
  mask = batch["mask"]
  loss = jnp.sum(ce * mask)
  total = loss
  if z_loss:
    total = total + z_loss * jnp.sum(logsumexp ** 2 * mask)
  correct = jnp.sum((argmax == batch["targets"]) * mask)
  return total, {"loss": loss, "count": jnp.sum(mask), "correct": correct}
