"""Parameter helpers shared by every layer: logical axis names, linear layers, the no-weight-decay marker.

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


def logical(axes: tuple[str | None, ...]) -> dict:
  """Variable metadata naming each axis logically (`sharding.RULES` maps the names to mesh axes)."""
  return {"out_sharding": axes, "eager_sharding": False}


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...], dtype, axes: tuple[str | None, ...], kind=nnx.Param):
  """A parameter of `kind` initialised by `init(key, shape, dtype)`, carrying logical axis names `axes`."""
  if len(axes) != len(shape):
    raise ValueError(f"axes must name every dimension of shape {shape}, got {axes}")
  return kind(init(rngs.params(), shape, dtype), **logical(axes))


def linear(in_features: int, out_features: int, *, axes: tuple[str | None, str | None], rngs: nnx.Rngs,
           use_bias: bool = False, init_scale: float = 1.0, dtype=jnp.float32, param_dtype=jnp.float32) -> nnx.Linear:
  """`nnx.Linear`: y = x W (+ b) with W [in, out] ~ N(0, init_scale / in) (fan-in variance scaling), b = 0;
  computes in `dtype`, stores `param_dtype`; W's axes are named `axes`, b's axes[1:]."""
  init = jax.nn.initializers.variance_scaling(init_scale, "fan_in", "normal")
  return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=init, kernel_metadata=logical(axes),
                    bias_metadata=logical(axes[1:]), rngs=rngs)


def _linear_layers(module: nnx.Module):
  """Every `nnx.Linear` inside `module`, in graph order."""
  return (node for _, node in nnx.iter_graph(module) if isinstance(node, nnx.Linear))


def scale_linear_init(module: nnx.Module, variance: float) -> None:
  """Multiplies the initial variance of every `nnx.Linear` kernel inside `module` by `variance` (in place; kernels
  only: biases start at 0, other parameters keep their own inits). Used on a freshly built model."""
  if variance == 1.0:
    return
  for layer in _linear_layers(module):
    layer.kernel[...] = layer.kernel[...] * jnp.asarray(variance ** 0.5, layer.kernel[...].dtype)


def normal_linear_init(module: nnx.Module, std: float, rngs: nnx.Rngs) -> None:
  """Redraws every `nnx.Linear` kernel inside `module` as N(0, std²) from `rngs.params()`, one key per kernel in
  graph order (in place; biases and other parameters untouched). Used on a freshly built model."""
  for layer in _linear_layers(module):
    kernel = layer.kernel[...]
    layer.kernel[...] = std * jax.random.normal(rngs.params(), kernel.shape, kernel.dtype)
