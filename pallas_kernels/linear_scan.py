"""The linear recurrence h_t = a_t ⊙ h_{t−1} + x_t (Hawk's RG-LRU) token by token, one Pallas kernel per direction.

One program per (batch row, block of channels) walks the sequence with its block of h in registers: each token
loads a row of a and x and stores a row of h, so the forward reads and writes every array once, where
`jax.lax.associative_scan` makes ~2 log₂ T passes over them (~3.5 ms of the Hawk MAD step's 20 on an H100,
benchmarks/RESULTS.md "MAD step profile").

Backward, with h (the forward's output) as the residual and g_t the loss's gradient w.r.t. h_t through every later
use, walked from the last token to the first:

    g_t = dh_t + a_{t+1} g_{t+1}      dx_t = g_t      da_t = g_t h_{t−1}      dh0 = a_0 g_0

(the returned last state is h's last row, so its gradient arrives in dh). Products and sums in the inputs' dtype
(f32 for the RG-LRU; f64 in f64), exactly the sequential recurrence.
"""
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from mesanet_jax.ops.operator import register
from pallas_kernels.mesa_cg.params import target, use_interpret

MAX_BLOCK = 128  # channels per program at most: a power of two dividing the width


def channel_block(width: int) -> int:
  """Channels per program: the largest power of two ≤ MAX_BLOCK dividing `width` (Triton blocks are powers of two)."""
  return min(MAX_BLOCK, width & -width)


def unsupported_reason(width: int) -> str | None:
  """Why the kernels cannot take this width on this backend, or None."""
  if target() not in ("gpu", "cpu"):
    return f"the linear scan kernels are built for GPU (Triton) and CPU (interpreted), not {target()}"
  if channel_block(width) < 8:
    return (f"width {width} has no power-of-two factor ≥ 8 to block its channels by (Triton blocks are powers of "
            f"two); use impl='xla'")
  return None


def _forward_kernel(a_ref, x_ref, h0_ref, h_ref):
  """One (row, channel block): a, x, h [T, BW]; h0 [BW]."""
  def token(t, h):
    h = a_ref[t] * h + x_ref[t]
    h_ref[t] = h
    return h

  lax.fori_loop(0, a_ref.shape[0], token, h0_ref[...])


def _backward_kernel(a_ref, h_ref, dh_ref, h0_ref, da_ref, dx_ref, dh0_ref):
  """One (row, channel block): a, h, dh [T, BW]; h0 [BW]. Writes da, dx [T, BW] and dh0 [BW]."""
  length = a_ref.shape[0]

  def token(i, carried):  # carried: a_{t+1} g_{t+1}, none after the last token
    t = length - 1 - i
    g = dh_ref[t] + carried
    dx_ref[t] = g
    da_ref[t] = g * jnp.where(t > 0, h_ref[jnp.maximum(t - 1, 0)], h0_ref[...])
    return a_ref[t] * g

  dh0_ref[...] = lax.fori_loop(0, length, token, jnp.zeros_like(h0_ref[...]))


def _call(kernel, name: str, sequences: list, states: list, out_sequences: int, out_states: int):
  """pallas_call of `kernel` with one program per (row, channel block): `sequences` [N, T, W] and `states` [N, W] in,
  `out_sequences` arrays [N, T, W] and `out_states` [N, W] out, all in the first sequence's dtype."""
  rows, length, width = sequences[0].shape
  block = channel_block(width)
  sequence_spec = pl.BlockSpec((None, length, block), lambda n, c: (n, 0, c))
  state_spec = pl.BlockSpec((None, block), lambda n, c: (n, c))
  dtype = sequences[0].dtype
  return pl.pallas_call(
      kernel,
      out_shape=([jax.ShapeDtypeStruct((rows, length, width), dtype)] * out_sequences
                 + [jax.ShapeDtypeStruct((rows, width), dtype)] * out_states),
      grid=(rows, width // block),
      in_specs=[sequence_spec] * len(sequences) + [state_spec] * len(states),
      out_specs=[sequence_spec] * out_sequences + [state_spec] * out_states,
      compiler_params=pltriton.CompilerParams(num_warps=1, num_stages=1) if target() == "gpu" else None,
      interpret=use_interpret(),
      name=name,
  )(*sequences, *states)


@jax.custom_vjp
def _linear_scan(a, x, h0):
  (h,) = _call(_forward_kernel, "linear_scan_forward", [a, x], [h0], 1, 0)
  return h


def _linear_scan_fwd(a, x, h0):
  h = _linear_scan(a, x, h0)
  return h, (a, h, h0)


def _linear_scan_bwd(residuals, dh):
  a, h, h0 = residuals
  da, dx, dh0 = _call(_backward_kernel, "linear_scan_backward", [a, h, dh], [h0], 2, 1)
  return da, dx, dh0


_linear_scan.defvjp(_linear_scan_fwd, _linear_scan_bwd)


@register("pallas", "linear_recurrence")
def linear_scan(a: jax.Array, x: jax.Array, h0: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """`mesanet_jax.layers.hawk.linear_recurrence` as Pallas kernels: h_t = a_t ⊙ h_{t−1} + x_t over axis 1.

  a, x: [B, T, W] of one float dtype; h0: [B, W] or None (zeros). Returns h [B, T, W] and h_{T−1} [B, W] in that
  dtype, differentiable in a, x and h0.
  """
  if a.ndim != 3 or x.shape != a.shape or x.dtype != a.dtype:
    raise ValueError(f"expected a, x of one shape [B, T, W] and dtype; got a {a.shape} {a.dtype}, x {x.shape} "
                     f"{x.dtype}")
  batch, length, width = a.shape
  if length == 0:
    raise ValueError(f"expected at least one token, got a of shape {a.shape}")
  if reason := unsupported_reason(width):
    raise ValueError(f"impl='pallas' cannot run this linear recurrence: {reason}")
  if h0 is None:
    h0 = jnp.zeros((batch, width), a.dtype)
  elif h0.shape != (batch, width):
    raise ValueError(f"h0 must have shape [B, W] = {(batch, width)}, got {h0.shape}")
  h = _linear_scan(a, x, h0.astype(a.dtype))
  return h, h[:, -1]
