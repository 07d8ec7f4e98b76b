"""The paper's MAD training (App. F.1 / Table 6), the jobs of the grid, and mad-lab's loss and accuracy.

Training: 200 epochs of batch 32 over the variant's fixed training set (reshuffled every epoch), AdamW β = (0.9,
0.98), lr warmed up linearly from 1e-7 over 750 steps then cosine to 1e-5; lr ∈ {3e-3, 1e-3, 5e-4, 1e-4} × weight
decay ∈ {0.01, 0.1}; no gradient clipping (mad-lab sets none). Weight decay on matrices only (the paper's backbone,
`mesanet_jax/train/optimizer.py: decay_mask`), the embedding too with `Protocol.decay_embedding` (mad-lab's).
Training stops early once the test accuracy exceeds 99.9 % (mad-lab `train.py:165-172`, Lightning's EarlyStopping with
stopping_threshold 0.999, checked after every epoch, as here: `grid`). The accuracy reported is that of the epoch of
least test perplexity (mad-lab's best checkpoint).

Loss: cross-entropy over the scored positions (targets ≠ IGNORE). Accuracy as mad-lab reports it: torchmetrics'
`MulticlassAccuracy` (`mad/metrics.py`) with its default average="macro" — per class tp / (tp + fn), averaged over
the classes that occur as target or prediction — computed per test batch of 32 and averaged over the batches
(Lightning's epoch mean of the logged batch values, `mad/model/pl_model_wrapper.py: phase_step`). We also report the
plain ("micro") share of scored tokens predicted right.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from mesanet_jax.mad import tasks
from mesanet_jax.mad.variants import Variant

LRS = (3e-3, 1e-3, 5e-4, 1e-4)
WEIGHT_DECAYS = (0.01, 0.1)


@dataclasses.dataclass(frozen=True)
class Protocol:
  epochs: int = 200
  batch_size: int = 32
  b1: float = 0.9
  b2: float = 0.98
  eps: float = 1e-8
  init_lr: float = 1e-7
  warmup_steps: int = 750
  min_lr: float = 1e-5
  # Training stops once an epoch's test accuracy exceeds this (Lightning's EarlyStopping(stopping_threshold=0.999,
  # mode="max") compares with torch.gt).
  stop_accuracy: float = 0.999
  # Weight decay on the embedding table too: mad-lab's AdamW decays every parameter but biases and norms
  # (`pl_model_wrapper.py: configure_optimizers`); False: the paper's LM mask (`train/optimizer.py: decay_mask`).
  decay_embedding: bool = False


@dataclasses.dataclass(frozen=True)
class Job:
  """One training run of the grid: an architecture on a variant at one (lr, weight decay)."""
  architecture: str
  variant: Variant
  lr: float
  weight_decay: float

  @property
  def key(self) -> tuple:
    return (self.architecture, self.variant.task, self.variant.name, self.lr, self.weight_decay)

  def steps_per_epoch(self, protocol: Protocol) -> int:
    return math.ceil(self.variant.num_train_examples / protocol.batch_size)

  def steps(self, protocol: Protocol) -> int:
    return protocol.epochs * self.steps_per_epoch(protocol)


def jobs(architectures, variants, lrs=LRS, weight_decays=WEIGHT_DECAYS) -> list[Job]:
  return [Job(a, v, lr, wd) for a in architectures for v in variants for lr in lrs for wd in weight_decays]


def learning_rate(step: jax.Array, peak: jax.Array, total: jax.Array, protocol: Protocol) -> jax.Array:
  """Linear warmup from init_lr to peak over warmup_steps (fewer if the run is shorter), cosine to min_lr at total."""
  warmup = jnp.minimum(protocol.warmup_steps, total - 1).astype(jnp.float32)
  step = step.astype(jnp.float32)
  warm = protocol.init_lr + (peak - protocol.init_lr) * step / jnp.maximum(warmup, 1.0)
  progress = jnp.clip((step - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
  cosine = protocol.min_lr + 0.5 * (peak - protocol.min_lr) * (1.0 + jnp.cos(jnp.pi * progress))
  return jnp.where(step < warmup, warm, cosine)


def optimizer(protocol: Protocol, decay_mask) -> optax.GradientTransformation:
  """AdamW whose learning_rate and weight_decay are state (`optax.inject_hyperparams`), set per member and step."""
  return optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, b1=protocol.b1, b2=protocol.b2, eps=protocol.eps,
                                               weight_decay=0.0, mask=decay_mask)


def with_hyperparams(opt_state, lr: jax.Array, weight_decay: jax.Array):
  return opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": lr, "weight_decay": weight_decay})


def masked_logits(logits: jax.Array, vocab_size: jax.Array) -> jax.Array:
  """Logits [..., V_max] of a model whose vocabulary is padded to V_max: ids ≥ vocab_size can never be predicted,
  so the model equals one of vocabulary vocab_size (padded embedding rows get no gradient)."""
  return jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -1e9)


def loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean cross-entropy over scored positions. logits [B, L, V] f32, targets [B, L] (IGNORE where unscored)."""
  scored = targets != tasks.IGNORE
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(scored, targets, 0))
  return jnp.sum(ce * scored) / jnp.maximum(jnp.sum(scored), 1)


def batch_accuracy(predictions: jax.Array, targets: jax.Array, num_classes: int) -> tuple[jax.Array, jax.Array]:
  """(macro accuracy as torchmetrics computes it, number of correct scored tokens) of one batch [B, L]."""
  scored = (targets != tasks.IGNORE).reshape(-1)
  predictions, targets = predictions.reshape(-1), jnp.where(scored, targets.reshape(-1), 0)
  correct = scored & (predictions == targets)
  count = lambda ids, weights: jnp.zeros(num_classes, jnp.float32).at[ids].add(weights.astype(jnp.float32))
  true_positives, support, predicted = count(targets, correct), count(targets, scored), count(predictions, scored)
  present = (support + predicted) > 0  # tp + fp + fn > 0
  recall = jnp.where(support > 0, true_positives / jnp.maximum(support, 1.0), 0.0)
  macro = jnp.sum(jnp.where(present, recall, 0.0)) / jnp.maximum(jnp.sum(present), 1)
  return macro, jnp.sum(correct)
