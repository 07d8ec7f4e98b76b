"""The training objective: masked next-token cross-entropy (+ optional z-loss) for token tasks, masked squared error
for in-context regression; sums over a (micro-)batch, normalised by the caller."""
import jax
import jax.numpy as jnp
import optax
from flax import nnx


def task_type(config) -> str:
  return "regression" if config.data.source == "synthetic" and config.data.task == "regression" else "lm"


def loss_sums(graphdef, params, probes, batch, task_type: str, z_loss: float):
  """(Σ masked loss [+ z-loss], aux) for one (micro-)batch; aux holds the sums for metrics. probes: the model's
  CG steps probes (`mesa.CGStepsProbe`, zeros; an empty nnx.State when the graphdef has none)."""
  return output_sums(nnx.merge(graphdef, params, probes)(batch["inputs"]), batch, task_type, z_loss)


def output_sums(outputs, batch, task_type: str, z_loss: float):
  """`loss_sums` from the model's outputs (predictions [B, T] or logits [B, T, V])."""
  mask = batch["mask"]
  if task_type == "regression":
    loss = jnp.sum((outputs - batch["targets"]) ** 2 * mask)
    return loss, {"loss": loss, "count": jnp.sum(mask), "correct": jnp.zeros(())}
  logits = outputs
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  loss = jnp.sum(ce * mask)
  total = loss
  if z_loss:
    total = total + z_loss * jnp.sum(jax.nn.logsumexp(logits, axis=-1) ** 2 * mask)
  correct = jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) * mask)
  return total, {"loss": loss, "count": jnp.sum(mask), "correct": correct}
