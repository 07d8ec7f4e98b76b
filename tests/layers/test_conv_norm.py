"""Short causal convolution (pieces with carried state ≡ whole sequence; matches a direct sum; several side by side
≡ each alone) and RMSNorm."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mesanet_jax.layers.conv import ShortConv, side_by_side
from mesanet_jax.layers.norm import RMSNorm


def test_conv_matches_direct_sum_and_streams():
  conv = ShortConv(5, 4, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 11, 5))
  y, _ = conv(x)
  w, xn = np.asarray(conv.kernel[...]), np.asarray(x)
  padded = np.concatenate([np.zeros((2, 3, 5)), xn], axis=1)
  direct = np.stack([sum(w[i] * padded[:, t + i] for i in range(4)) for t in range(11)], axis=1)
  np.testing.assert_allclose(y, direct, rtol=1e-6, atol=1e-6)
  y1, state = conv(x[:, :6])
  y2, state = conv(x[:, 6:7], state)  # one decode token
  y3, _ = conv(x[:, 7:], state)
  np.testing.assert_allclose(jnp.concatenate([y1, y2, y3], axis=1), y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("use_bias", [False, True])
def test_convs_side_by_side_equal_each_conv_alone(use_bias):
  """Decoding's q and k convs as one: the same outputs and states as each on its own channels, from a state."""
  rngs = nnx.Rngs(1)
  convs = [ShortConv(c, 4, rngs=rngs, use_bias=use_bias) for c in (5, 3)]
  if use_bias:
    for conv in convs:  # non-zero biases (initialised to zeros)
      conv.bias[...] = jax.random.normal(rngs(), conv.bias.shape)
  x, state = jax.random.normal(rngs(), (2, 6, 8)), jax.random.normal(rngs(), (2, 3, 8))
  y, new_state = side_by_side(convs, x, state)
  for conv, channels in zip(convs, (slice(0, 5), slice(5, 8))):
    y_alone, state_alone = conv(x[..., channels], state[..., channels])
    np.testing.assert_array_equal(y[..., channels], y_alone)
    np.testing.assert_array_equal(new_state[..., channels], state_alone)
  with pytest.raises(ValueError, match="one kernel size, dtype and bias setting"):
    side_by_side([convs[0], ShortConv(3, 2, rngs=rngs, use_bias=use_bias)], x, state)


def test_rmsnorm_gated_and_dtype():
  norm = RMSNorm(8, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(0), (3, 8)) * 5
  gate = jax.random.normal(jax.random.key(1), (3, 8))
  y = norm(x, gate)
  expected = x / np.sqrt(np.mean(np.square(x), -1, keepdims=True) + 1e-6) * jax.nn.silu(gate)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), expected, rtol=1e-2, atol=1e-2)  # bf16 output: 8-bit mantissa
