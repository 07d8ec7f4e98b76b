"""Per-token next-token losses of a language model over fixed batches, and what evaluation reports from them:
perplexity and accuracy over the masked tokens, mean NLL at each token position (the paper's long-context view,
§4.1: position k predicts token k + 1 from k tokens of context), and that view bucketed by powers of two.
"""
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mesanet_jax import sharding
from mesanet_jax.data import pipeline
from mesanet_jax.models.lm import LanguageModel
from mesanet_jax.ops.cg_steps import combine_calls


class TokenLosses(NamedTuple):
  nll: np.ndarray  # [N, T] f32, −log p(target)
  correct: np.ndarray  # [N, T] bool, argmax == target
  mask: np.ndarray  # [N, T] f32, 1 where the target counts
  # [L, 2] f32: the forward CG steps of each Mesa layer (mean, max over every batch's tokens and heads); None
  # without Mesa layers
  cg_steps: np.ndarray | None


def token_losses(model: LanguageModel, batches: list[dict], mesh: jax.sharding.Mesh) -> TokenLosses:
  """Runs the full forward (the training path, `forward_with_cg_steps`) on each batch {"inputs", "targets",
  "mask"} [B, T] of equal size; one process."""
  graphdef, params = nnx.split(model)

  @jax.jit
  def losses(params, inputs, targets):
    logits, cg_steps = nnx.merge(graphdef, params).forward_with_cg_steps(inputs)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return nll, jnp.argmax(logits, -1) == targets, cg_steps

  out = []
  with jax.set_mesh(mesh):  # Pallas layers run per shard under the mesh
    for batch in batches:
      placed = pipeline.to_global(batch, sharding.batch_shardings(batch, mesh))
      out.append(jax.device_get(losses(params, placed["inputs"], placed["targets"])))
  cg_steps = None if out[0][2] is None else np.asarray(combine_calls(np.stack([o[2] for o in out])))
  return TokenLosses(np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out]),
                     np.concatenate([b["mask"] for b in batches]).astype(np.float32), cg_steps)


def masked_mean(values: np.ndarray, mask: np.ndarray) -> float:
  return float((values * mask).sum() / max(float(mask.sum()), 1.0))


def perplexity(loss: float) -> float:
  return math.exp(min(loss, 50.0))


def summary(losses: TokenLosses) -> dict:
  """Mean loss, perplexity and accuracy over the masked tokens, and their count."""
  loss = masked_mean(losses.nll, losses.mask)
  return {"loss": loss, "ppl": perplexity(loss), "accuracy": masked_mean(losses.correct, losses.mask),
          "tokens": int(losses.mask.sum())}


def by_position(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Masked mean over examples of values [N, T] at each position: [T], NaN where no target counts."""
  counts = mask.sum(0)
  return np.where(counts > 0, (values * mask).sum(0) / np.maximum(counts, 1), np.nan)


def position_buckets(length: int) -> list[tuple[int, int]]:
  """Positions 1..length (context sizes) in powers of two: [1, 1], [2, 3], [4, 7], … (inclusive bounds)."""
  buckets, start = [], 1
  while start <= length:
    buckets.append((start, min(2 * start - 1, length)))
    start *= 2
  return buckets


def bucketed(values: np.ndarray, mask: np.ndarray) -> list[float | None]:
  """Masked mean of values [N, T] in each of `position_buckets(T)`; None for a bucket with no counted target."""
  out = []
  for first, last in position_buckets(values.shape[1]):
    m = mask[:, first - 1:last]
    out.append(float((values[:, first - 1:last] * m).sum() / m.sum()) if m.sum() else None)
  return out
