"""The backbone MLP: SwiGLU with expansion 3 (two branches of width 3·d, SiLU on one, multiply, down-project).
Decoding runs the two branches as one matmul over their concatenated kernels, and every kernel in the decode layout
(`FusedProjections`)."""
import jax
import jax.numpy as jnp
from flax import nnx

from mesanet_jax.layers.fused_linear import FusedProjections
from mesanet_jax.layers.params import linear


class SwiGLU(FusedProjections, nnx.Module):
  """down(silu(gate(x)) ⊙ up(x)); `out_scale` scales the down-projection's init variance (2/N in the paper)."""
  FUSED = {"branches": ("gate", "up"), "down": ("down",)}

  def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs, out_scale: float = 1.0, dtype=jnp.float32,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.gate = linear(d_model, hidden, axes=("embed", "mlp"), **kw)
    self.up = linear(d_model, hidden, axes=("embed", "mlp"), **kw)
    self.down = linear(hidden, d_model, axes=("mlp", "embed"), init_scale=out_scale, **kw)

  def __call__(self, x: jax.Array, *, fused: bool = False) -> jax.Array:
    """x: [..., d] -> [..., d]; `fused` (decoding): both branches as one matmul, kernels in the decode layout."""
    gate, up = self.project("branches", x, fused)
    (y,) = self.project("down", jax.nn.silu(gate) * up, fused)
    return y
