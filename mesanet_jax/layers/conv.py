"""Causal depthwise short convolution (kernel 4 in MesaNet) with a carried state for prefill and decoding."""
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mesanet_jax.layers.params import param


class ShortConv(nnx.Module):
  """y_t = Σ_{i<K} w_i ⊙ x_{t−K+1+i} (+ b) per channel, no activation (the caller applies one if any).

  The state is the last K−1 inputs, [B, K−1, C]; zeros before the first token. Feeding a sequence in pieces with the
  returned state gives the same output as feeding it whole, so decoding is the T = 1 case of the same call.
  init_scale scales the kernel's fan-in variance (Griffin's recurrent block: 0.01, with a bias).
  """

  def __init__(self, channels: int, kernel_size: int, *, rngs: nnx.Rngs, axis_name: str | None = "heads",
               init_scale: float = 1.0, use_bias: bool = False, dtype=jnp.float32, param_dtype=jnp.float32):
    if kernel_size < 1:
      raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
    self.kernel_size, self.dtype = kernel_size, dtype
    init = jax.nn.initializers.variance_scaling(init_scale, "fan_in", "normal")  # fan-in = K
    self.kernel = param(rngs, init, (kernel_size, channels), param_dtype, ("conv", axis_name))
    self.bias = param(rngs, nnx.initializers.zeros, (channels,), param_dtype, (axis_name,)) if use_bias else None

  def zero_state(self, batch: int) -> jax.Array:
    return jnp.zeros((batch, self.kernel_size - 1, self.kernel.shape[1]), self.dtype)

  def __call__(self, x: jax.Array, state: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """x: [B, T, C]; state: [B, K−1, C] or None (zeros). Returns y [B, T, C] in `dtype` and the new state."""
    return side_by_side([self], x, state)


def side_by_side(convs: Sequence[ShortConv], x: jax.Array, state: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """Several ShortConvs of one kernel size and dtype over the concatenation of their channels, as one conv.

  x: [B, T, ΣC] (each conv's channels in order); state: [B, K−1, ΣC] or None (zeros). Returns y [B, T, ΣC] and the
  new state: the same numbers as each conv on its own channels, with one state update for all (decoding: one small
  kernel and one loop-carry copy per token instead of one per conv).
  """
  first = convs[0]
  layout = lambda c: (c.kernel_size, c.dtype, c.bias is not None)
  if any(layout(c) != layout(first) for c in convs):
    raise ValueError("convs side by side need one kernel size, dtype and bias setting, got "
                     f"{[layout(c) for c in convs]}")
  dtype, size = first.dtype, first.kernel_size
  x = x.astype(dtype)
  if state is None:
    state = jnp.zeros((x.shape[0], size - 1, x.shape[2]), dtype)
  padded = jnp.concatenate([state.astype(dtype), x], axis=1)
  kernel = jnp.concatenate([c.kernel[...].astype(dtype) for c in convs], axis=1)
  length = x.shape[1]
  y = sum(kernel[i] * padded[:, i:i + length] for i in range(size))
  if first.bias is not None:
    y = y + jnp.concatenate([c.bias[...].astype(dtype) for c in convs])
  return y, padded[:, length:]
