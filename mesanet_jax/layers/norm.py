"""RMSNorm over the last axis (the block norms and the per-head output norm), optionally SiLU-gated."""
import jax
import jax.numpy as jnp
from flax import nnx

from mesanet_jax.layers.params import param


class RMSNorm(nnx.Module):
  """x / rms(x) · w, computed in f32 and returned in `dtype`; w [features] starts at 1.

  With a `gate` argument it returns RMSNorm(x) · silu(gate) (the gated output norm of MesaNet / Gated DeltaNet).
  """

  def __init__(self, features: int, *, rngs: nnx.Rngs, eps: float = 1e-6, axis_name: str | None = "embed",
               dtype=jnp.float32, param_dtype=jnp.float32):
    self.eps, self.dtype = eps, dtype
    self.scale = param(rngs, nnx.initializers.ones, (features,), param_dtype, (axis_name,))

  def __call__(self, x: jax.Array, gate: jax.Array | None = None) -> jax.Array:
    x = x.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * self.scale[...].astype(jnp.float32)
    if gate is not None:
      y = y * jax.nn.silu(gate.astype(jnp.float32))
    return y.astype(self.dtype)
