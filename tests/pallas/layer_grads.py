"""What the kernel tests compare a mixer layer's impl="pallas" with its XLA form on."""
import jax.numpy as jnp
from flax import nnx


@nnx.jit
def squared_output_and_grads(layer, x):
  """Σ y² of a mixer layer's output y on x [B, T, d], and its gradient w.r.t. every parameter of the layer."""
  return nnx.value_and_grad(lambda layer: jnp.sum(layer(x)[0] ** 2))(layer)
