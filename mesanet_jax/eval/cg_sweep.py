"""Quality vs compute of inference CG (paper §5, Fig. 5/7): the model decodes each sequence token by token (the
constant-memory recurrence with one CG solve per token, layer and head) under a given CG budget, either a fixed
number of steps or a relative-residual tolerance ‖r‖ ≤ tol·‖r₀‖, and we record the NLL of every target and the CG
steps every token actually used (mean over Mesa layers and heads).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mesanet_jax.eval import losses as losses_lib
from mesanet_jax.eval.runs import model_from
from mesanet_jax.models.config import LMConfig


@dataclasses.dataclass(frozen=True)
class Budget:
  """`steps` CG steps at most; with `tol`, each head stops early once its residual is below tol·‖r₀‖."""
  steps: int
  tol: float | None = None

  @property
  def label(self) -> str:
    return f"tol={self.tol:g}" if self.tol is not None else f"steps={self.steps}"


def decode_losses(model, inputs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Teacher-forced decoding of inputs [B, T]: (NLL [B, T], CG steps per token [B, T]) as numpy."""
  graphdef, params = nnx.split(model)

  @jax.jit
  def run(params, inputs, targets):
    model = nnx.merge(graphdef, params)

    def step(cache, token_and_target):
      token, target = token_and_target
      logits, cache, cg_steps = model.decode_step(token, cache)
      return cache, (optax.softmax_cross_entropy_with_integer_labels(logits, target), cg_steps)

    cache = model.init_cache(inputs.shape[0], inputs.shape[1])
    _, (nll, cg_steps) = jax.lax.scan(step, cache, (inputs.T, targets.T))
    return nll.T, cg_steps.T

  return jax.device_get(run(params, jnp.asarray(inputs), jnp.asarray(targets)))


def sweep(lm: LMConfig, params, batches: list[dict], budgets: list[Budget]) -> list[dict]:
  """One row per budget: mean NLL / perplexity over the masked targets, mean CG steps per token (over all
  tokens) and both by position bucket (`losses.position_buckets`)."""
  if "mesa" not in lm.mixers:
    raise ValueError("the CG sweep needs a model with Mesa layers")
  rows = []
  for budget in budgets:
    mesa = dataclasses.replace(lm.mesa, cg_steps_decode=budget.steps, decode_tol=budget.tol)
    model = model_from(dataclasses.replace(lm, mesa=mesa), params)
    nll, cg_steps = zip(*(decode_losses(model, b["inputs"], b["targets"]) for b in batches))
    nll, cg_steps = np.concatenate(nll), np.concatenate(cg_steps)
    mask = np.concatenate([b["mask"] for b in batches]).astype(np.float32)
    loss = losses_lib.masked_mean(nll, mask)
    rows.append({"budget": budget.label, "max_steps": budget.steps, "tol": budget.tol, "loss": loss,
                 "ppl": losses_lib.perplexity(loss), "mean_cg_steps": float(cg_steps.mean()),
                 "loss_by_bucket": losses_lib.bucketed(nll, mask),
                 "cg_steps_by_bucket": losses_lib.bucketed(cg_steps, np.ones_like(mask))})
  return rows
