"""Quality vs compute of inference CG (paper §5, Fig. 5/7): the model decodes each sequence token by token (the
constant-memory recurrence with one CG solve per token, layer and head) under a given CG budget, either a fixed
number of steps or a relative-residual tolerance ‖r‖ ≤ tol·‖r₀‖ (optionally warm-started from the previous token's
solution, then ‖r‖ ≤ tol·‖q‖), and we record the NLL of every target and the CG steps every token actually used (mean
over Mesa layers and heads).

Against a reference budget (the fixed steps generation uses by default), every budget also gets the paired ΔNLL:
the mean over targets of NLL(budget) − NLL(reference) with its standard error, the largest |ΔNLL| of a target, and
how often both pick the same most likely token. A budget changes the model's outputs beyond noise when its mean
ΔNLL is outside about two standard errors, or beyond the ΔNLL of a budget that only removes rounding (e.g. twice the
reference's steps, once CG has converged).
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
from mesanet_jax.models.decoding import for_decoding


@dataclasses.dataclass(frozen=True)
class Budget:
  """`steps` CG steps at most; with `tol`, each head stops early once its residual is below tol·‖r₀‖ (with
  `warm_start`, CG starts from the previous token's solution and stops below tol·‖q‖)."""
  steps: int
  tol: float | None = None
  warm_start: bool = False

  @property
  def label(self) -> str:
    label = f"tol={self.tol:g}" if self.tol is not None else f"steps={self.steps}"
    return label + "+warm" if self.warm_start else label


def decode_losses(model, batches: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Teacher-forced decoding of each batch's "inputs" [B, T] (one program for batches of one shape): NLL, CG steps
  per token and the most likely token of its "targets", each [N, T] over the batches."""
  graphdef, params = nnx.split(model)

  @jax.jit
  def run(params, inputs, targets):
    model = for_decoding(nnx.merge(graphdef, params))  # as `generate`: cast and fused once, before the loop

    def step(cache, token_and_target):
      token, target = token_and_target
      logits, cache, cg_steps = model.decode_step(token, cache)
      nll = optax.softmax_cross_entropy_with_integer_labels(logits, target)
      return cache, (nll, cg_steps, jnp.argmax(logits, axis=-1))

    cache = model.init_cache(inputs.shape[0], inputs.shape[1])
    _, outputs = jax.lax.scan(step, cache, (inputs.T, targets.T))
    return tuple(x.T for x in outputs)

  outputs = [jax.device_get(run(params, jnp.asarray(b["inputs"]), jnp.asarray(b["targets"]))) for b in batches]
  return tuple(np.concatenate(x) for x in zip(*outputs))


def _paired(nll, top, reference_nll, reference_top, mask) -> dict:
  """ΔNLL against the reference budget on the same targets: mean, standard error, largest |Δ|, top-1 agreement."""
  kept = mask > 0
  delta = (nll - reference_nll)[kept].astype(np.float64)
  return {"delta_loss": float(delta.mean()), "delta_loss_se": float(delta.std(ddof=1) / np.sqrt(delta.size)),
          "max_abs_delta": float(np.abs(delta).max()), "argmax_agreement": float((top == reference_top)[kept].mean())}


def sweep(lm: LMConfig, params, batches: list[dict], budgets: list[Budget],
          reference: Budget | None = None) -> list[dict]:
  """One row per budget: mean NLL / perplexity over the masked targets, mean CG steps per token (over all
  tokens) and both by position bucket (`losses.position_buckets`); with a `reference` budget (evaluated first, its
  row included), each row's paired ΔNLL against it (`_paired`)."""
  if "mesa" not in lm.mixers:
    raise ValueError("the CG sweep needs a model with Mesa layers")
  mask = np.concatenate([b["mask"] for b in batches]).astype(np.float32)
  rows, reference_outputs = [], None
  for budget in ([reference] if reference is not None else []) + [b for b in budgets if b != reference]:
    mesa = dataclasses.replace(lm.mesa, cg_steps_decode=budget.steps, decode_tol=budget.tol,
                               decode_warm_start=budget.warm_start)
    model = model_from(dataclasses.replace(lm, mesa=mesa), params)
    nll, cg_steps, top = decode_losses(model, batches)
    loss = losses_lib.masked_mean(nll, mask)
    row = {"budget": budget.label, "max_steps": budget.steps, "tol": budget.tol, "warm_start": budget.warm_start,
           "loss": loss, "ppl": losses_lib.perplexity(loss), "mean_cg_steps": float(cg_steps.mean()),
           "loss_by_bucket": losses_lib.bucketed(nll, mask),
           "cg_steps_by_bucket": losses_lib.bucketed(cg_steps, np.ones_like(mask))}
    if reference is not None:
      reference_outputs = reference_outputs or (nll, top)
      row.update(reference=reference.label, **_paired(nll, top, *reference_outputs, mask))
    rows.append(row)
  return rows
