"""A sequence model over continuous tokens for in-context regression: linear read-in, the LM's pre-norm blocks, a
scalar linear read-out. inputs [B, T, D_in] -> predictions [B, T] f32."""
import jax
import jax.numpy as jnp
from flax import nnx

from mesanet_jax.layers.norm import RMSNorm
from mesanet_jax.layers.params import linear
from mesanet_jax.models.config import LMConfig
from mesanet_jax.models.lm import blocks_with_cg_steps, make_blocks, train_blocks


class RegressionModel(nnx.Module):
  """The LM backbone (`LMConfig`; vocab_size unused) with `linear(in_features, d_model)` in place of the embedding."""

  def __init__(self, config: LMConfig, in_features: int, *, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, dtype=config.dtype, param_dtype=config.param_dtype)
    self.config = config
    self.read_in = linear(in_features, config.d_model, axes=(None, "embed"), use_bias=True, **kw)
    self.blocks = make_blocks(config, rngs)
    self.final_norm = RMSNorm(config.d_model, eps=config.norm_eps, **kw)
    self.read_out = linear(config.d_model, 1, axes=("embed", None), use_bias=True, **kw)

  def __call__(self, inputs: jax.Array) -> jax.Array:
    x = train_blocks(self.config, self.blocks, self._read_in(inputs))
    return self._predictions(x)

  def forward_with_cg_steps(self, inputs: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """`__call__`'s predictions and the forward CG steps of every Mesa layer, f32 [L, 2] (as the LM's)."""
    x, steps = blocks_with_cg_steps(self.config, self.blocks, self._read_in(inputs))
    return self._predictions(x), steps

  def _read_in(self, inputs: jax.Array) -> jax.Array:
    """inputs [B, T, D_in] -> the residual stream [B, T, d] in its dtype (`LMConfig.stream_dtype`)."""
    return self.read_in(inputs).astype(self.config.stream_dtype)

  def _predictions(self, x: jax.Array) -> jax.Array:
    return self.read_out(self.final_norm(x))[..., 0].astype(jnp.float32)
