"""How many CG steps `mesa_chunked`'s solves took: per-(batch, head) statistics, and the probe that carries them out
of the backward pass.

`mesa_chunked(..., cg_probe=p)` takes p, zeros f32 [B, H, 4], that the computation never reads; the gradient of any
loss w.r.t. p is, per batch element and head, (forward mean, forward max, adjoint mean, adjoint max) of the steps
the CG solves took (mean and max over the T tokens; padding excluded). The forward statistics are saved with the
residuals, the adjoint ones come from the backward's own solve. `spread_probe` turns one f32 [4] probe into the
[B, H, 4] one, and its gradient back into the statistics over the whole batch, so a layer can hold a single probe.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

STATS = ("forward_mean", "forward_max", "adjoint_mean", "adjoint_max")
_MEANS = np.array([True, False, True, False])  # numpy: nothing on a device at import time


def step_stats(steps: jax.Array, length: int) -> jax.Array:
  """(mean, max) over the first `length` tokens of per-row steps [B, H, N, C] (chunk-major, T padded to N·C).

  Returns f32 [B, H, 2].
  """
  batch, heads = steps.shape[:2]
  steps = steps.reshape(batch, heads, -1)[:, :, :length].astype(jnp.float32)
  return jnp.stack([jnp.mean(steps, axis=-1), jnp.max(steps, axis=-1)], axis=-1)


def combine(stats: jax.Array) -> jax.Array:
  """Statistics over every leading index: means averaged, maxima maximised. [..., 4] (or [..., 2]) -> [4] ([2]).

  Every (batch, head) has the same number of tokens, so the mean of the means is the mean over all tokens.
  """
  flat = stats.reshape(-1, stats.shape[-1])
  return jnp.where(_MEANS[:stats.shape[-1]], jnp.mean(flat, axis=0), jnp.max(flat, axis=0))


def combine_calls(stats: jax.Array) -> jax.Array:
  """Per-layer statistics of N calls on equal-sized batches (micro-batches, eval batches) combined: [N, L, 4] (or
  [N, L, 2]) -> [L, 4] ([L, 2]); numpy or jax input."""
  return jax.vmap(combine, in_axes=1)(jnp.asarray(stats))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def spread_probe(probe: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """probe f32 [4] broadcast to `shape` [..., 4] (e.g. [B, H, 4]); its gradient is `combine` of the broadcast
  value's gradient (a plain broadcast's would sum the statistics)."""
  return jnp.broadcast_to(probe, shape)


def _spread_forward(probe, shape):
  return spread_probe(probe, shape), None


def _spread_backward(shape, _, gradient):
  del shape
  return (combine(gradient),)


spread_probe.defvjp(_spread_forward, _spread_backward)


def measure(op, loss, *args) -> jax.Array:
  """(forward mean, forward max, adjoint mean, adjoint max) of the CG steps op's solves take when `loss` of its
  outputs is differentiated, over all tokens and heads, f32 [4]. op: `mesa_chunked` with its options bound, called
  as op(q, k, v, g, beta, lam[, state], cg_probe=...); loss: op's outputs -> scalar."""
  batch, _, heads, _ = args[0].shape
  probe_loss = lambda probe: loss(op(*args, cg_probe=spread_probe(probe, (batch, heads, len(STATS)))))
  return jax.grad(probe_loss)(jnp.zeros(len(STATS)))
