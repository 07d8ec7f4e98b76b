"""Parameter helpers shared by every layer: fan-in normal init, logical axis names, the no-weight-decay marker.

Every parameter is created with `out_sharding` (logical axes such as "embed", "heads", "mlp", "vocab") and
`eager_sharding=False`: modules build the same way with or without a mesh, and `mesanet_jax.sharding` maps the names
to mesh axes through its one rules table when the state is materialised.
"""
import jax
import jax.numpy as jnp
from flax import nnx


class NoDecayParam(nnx.Param):
  """A parameter the optimiser must not weight-decay (Mesa's λ). Select with `nnx.All(nnx.Param,
  nnx.Not(NoDecayParam))` for the decayed set; it is still an `nnx.Param`, so it is trained like any other."""


def fan_in_normal(scale: float = 1.0):
  """Normal init with variance scale / fan_in, fan_in = every dimension but the last."""
  def init(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    fan_in = 1
    for size in shape[:-1]:
      fan_in *= size
    return jax.random.normal(key, shape, dtype) * jnp.sqrt(scale / fan_in).astype(dtype)
  return init


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...], dtype, axes: tuple[str | None, ...], kind=nnx.Param):
  """A parameter of `kind` initialised by `init(key, shape, dtype)`, carrying logical axis names `axes`."""
  if len(axes) != len(shape):
    raise ValueError(f"axes must name every dimension of shape {shape}, got {axes}")
  return kind(init(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)


class Linear(nnx.Module):
  """y = x W (+ b) with W [in, out] ~ N(0, init_scale / in); computes in `dtype`, stores `param_dtype`."""

  def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None], rngs: nnx.Rngs,
               use_bias: bool = False, init_scale: float = 1.0, dtype=jnp.float32, param_dtype=jnp.float32):
    self.dtype = dtype
    self.kernel = param(rngs, fan_in_normal(init_scale), (in_features, out_features), param_dtype, axes)
    self.bias = param(rngs, nnx.initializers.zeros, (out_features,), param_dtype, axes[1:]) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    return y if self.bias is None else y + self.bias[...].astype(self.dtype)
