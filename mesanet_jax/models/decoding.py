"""The model as decoding reads it: `for_decoding(model)` is a copy whose weights are stored in the dtype their
module computes in and whose projections that read the same input are concatenated, made once per `generate` /
`stream` call before the decode loop.

Params are kept in `param_dtype` (f32 for training) while most modules compute in `dtype` (bf16): without this, every
decoded token re-reads each f32 weight and converts it, twice the bytes of the projections that dominate a token.
The cast is the one the module does on every call, so the copy computes bit for bit what the model computes. Only
modules that cast their own weights to `dtype` are touched (`compute_dtype`); the rest keep their params as stored
because they compute in f32 whatever their dtype (RMSNorm's scale, Mesa's λ, Hawk's gate blocks and Λ), and a weight
is only ever narrowed (bf16 params with f32 compute stay bf16: upcasting would double the bytes read).

Then every `FusedProjections` module concatenates its groups' (cast) kernels (`layers/fused_linear.py`): q, k, v and
the output gate of a recurrent mixer, its two f32 gates, attention's q, k, v, the MLP's two branches, Hawk's two
input branches. Decoding computes the same products as one matmul per group; the params stay as they are.
"""
import jax.numpy as jnp
from flax import nnx

from mesanet_jax.layers.conv import ShortConv
from mesanet_jax.layers.fused_linear import FusedProjections
from mesanet_jax.models.lm import LanguageModel


def compute_dtype(module) -> jnp.dtype | None:
  """The dtype `module` casts its own params to before using them, or None where it uses them otherwise."""
  if isinstance(module, (nnx.Linear, ShortConv)) and module.dtype is not None:
    return jnp.dtype(module.dtype)
  if isinstance(module, LanguageModel):  # the embedding table: `_embed` casts it to the residual stream's dtype,
    config = module.config               # `readout_weights` to the compute dtype; it keeps the wider of the two
    return jnp.promote_types(config.dtype, config.stream_dtype)
  return None


def for_decoding(model: nnx.Module) -> nnx.Module:
  """A copy of `model` (any module; arrays shared where unchanged) with each param of a module that computes in a
  narrower dtype than it stores stored in that dtype, and the projection groups of every `FusedProjections` module
  concatenated. `model` itself is left as it is."""
  def prepare(_, node):  # children first: a module fuses its projections after they were cast
    dtype = compute_dtype(node)
    for name, variable in list(vars(node).items()) if dtype is not None else ():
      if isinstance(variable, nnx.Param) and dtype.itemsize < variable.get_value().dtype.itemsize:
        setattr(node, name, variable.replace(variable.get_value().astype(dtype)))
    if isinstance(node, FusedProjections):
      node.fuse()
    return node
  return nnx.recursive_map(prepare, model)
