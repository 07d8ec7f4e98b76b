"""The optimiser (paper G.3): AdamW, linear warmup from `init_lr` to the peak, cosine decay to `final_lr_frac`·peak,
global-norm clipping, and a weight-decay mask; an update whose gradients are not all finite is skipped (params and
optimiser state kept) and counted (`optax.apply_if_finite`, `skipped`).

Weight decay applies to matrices only: not to norm scales or biases (1-D), not to Mesa's λ (`NoDecayParam`), and not
to the tied embedding (the paper trains it "with no regularization", G.2).
"""
import jax
import numpy as np
import optax
from flax import nnx

from mesanet_jax.layers.params import NoDecayParam

NO_DECAY_NAMES = ("embed",)
NEVER = int(np.iinfo(np.int32).max)  # apply_if_finite's consecutive non-finite updates before it applies one anyway


def schedule(optim, num_steps: int) -> optax.Schedule:
  """Warmup from init_lr to lr over warmup_steps, then cosine to final_lr_frac·lr at num_steps."""
  warmup = min(optim.warmup_steps, max(num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=optim.init_lr, peak_value=optim.lr, warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1), end_value=optim.lr * optim.final_lr_frac)


def decay_mask(params: nnx.State, *, decay_embedding: bool = False):
  """True for every parameter that gets weight decay (see the module docstring); decay_embedding=True decays the
  embedding table too (mad-lab's AdamW groups: everything but biases and norms)."""
  exempt = () if decay_embedding else NO_DECAY_NAMES

  def decayed(path, variable):
    return (not isinstance(variable, NoDecayParam) and variable.ndim >= 2
            and not any(str(getattr(p, "key", p)) in exempt for p in path))
  flat = nnx.to_flat_state(params)
  return nnx.from_flat_state([(path, variable.replace(decayed(path, variable))) for path, variable in flat])


def make_optimizer(optim, num_steps: int, params: nnx.State) -> optax.GradientTransformation:
  if optim.name != "adamw":
    raise ValueError(f"optim.name must be 'adamw', got {optim.name!r}")
  tx = optax.adamw(schedule(optim, num_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                   weight_decay=optim.weight_decay, mask=decay_mask(params))
  if optim.clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(optim.clip_norm), tx)
  return optax.apply_if_finite(tx, max_consecutive_errors=NEVER)


def skipped(opt_state) -> jax.Array:
  """The number of updates skipped so far for non-finite gradients (int32 scalar)."""
  return opt_state.total_notfinite
