"""Projections as decoding runs them: those that read the same input as one matmul over their concatenated kernels,
every kernel stored as [out, in].

At one token per step each projection is a GEMV that reads its kernel once: several of them on the same input are
several small kernels where one larger one does the same work. `FusedLinear` concatenates the kernels (and biases)
of `nnx.Linear` layers along the output axis and splits the product back; the layers' own params stay where they are,
so training, prefill and checkpoints are unchanged. The concatenation is stored transposed, [out, in], so that each
output reads its weights contiguously: XLA on an H200 runs a one-row product against a [in, out] kernel as an
elementwise multiply written out in full and then a column reduction (two kernels, 3× the bytes), against [out, in]
as one row reduction: 1.5–5× faster at 1 token (benchmarks/RESULTS.md, "Decoding"), the same at 32. So a group of one
layer (an output projection) is worth a `FusedLinear` too. A module names its groups in `FUSED`
(`FusedProjections`); `models.decoding.for_decoding` builds them once before the decode loop, and a module decoding
without it builds them on every call (the same numbers, concatenated each token).
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class DecodeWeight(nnx.Variable):
  """A weight derived from params for decoding (kernels concatenated and transposed): not an `nnx.Param`, so never
  trained, decayed or saved."""


class FusedLinear(nnx.Module):
  """y_i = x W_i (+ b_i) for the given `nnx.Linear` layers as one product x [W_1 … W_n], the concatenation stored as
  [..., out, in] (kernels may carry leading stacked-layer axes). The layers must agree on input size, dtype,
  precision, element type and bias use."""

  def __init__(self, layers: list[nnx.Linear]):
    options = {(l.in_features, l.dtype, l.precision, l.preferred_element_type, l.use_bias) for l in layers}
    if len(options) != 1:
      raise ValueError(f"fused layers must share in_features, dtype, precision, preferred_element_type and use_bias, "
                       f"got {sorted(map(str, options))}")
    _, self.dtype, self.precision, self.preferred_element_type, use_bias = options.pop()
    self.sizes = tuple(l.out_features for l in layers)
    self.kernel = DecodeWeight(jnp.swapaxes(jnp.concatenate([l.kernel[...] for l in layers], axis=-1), -1, -2))
    self.bias = DecodeWeight(jnp.concatenate([l.bias[...] for l in layers], axis=-1)) if use_bias else None

  def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
    """x: [..., in] -> one [..., out_i] per layer, each what `layers[i](x)` computes up to summation order."""
    bias = None if self.bias is None else self.bias[...]
    x, kernel, bias = nnx.nn.dtypes.promote_dtype((x, self.kernel[...], bias), dtype=self.dtype)
    kwargs = {} if self.preferred_element_type is None else dict(preferred_element_type=self.preferred_element_type)
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (1,)), ((), ())), precision=self.precision, **kwargs)
    if bias is not None:
      y += bias
    return tuple(jnp.split(y, np.cumsum(self.sizes)[:-1], axis=-1))


class FusedProjections:
  """Mixin for an nnx.Module whose `nnx.Linear` attributes in each `FUSED` group (group name -> attribute names; a
  None attribute is skipped) read the same input. `fused(group, x)` applies a group as one `FusedLinear`: the one
  `fuse()` stored, or one built now; `project(group, x, fused)` picks that or the layers one by one."""
  FUSED: dict[str, tuple[str, ...]] = {}
  fused_groups = None  # an nnx.Dict of FusedLinear per group once `fuse()` ran

  def _layers(self, group: str) -> list[nnx.Linear]:
    return [layer for name in self.FUSED[group] if (layer := getattr(self, name)) is not None]

  def _fused_linear(self, group: str) -> FusedLinear:
    return FusedLinear(self._layers(group))

  def fuse(self) -> None:
    """Concatenates every group's kernels now, for all later `fused` calls (before a decode loop)."""
    self.fused_groups = nnx.Dict({group: self._fused_linear(group) for group in self.FUSED})

  def fused(self, group: str, x: jax.Array) -> tuple[jax.Array, ...]:
    """The group's outputs for x [..., in], one per (non-None) layer, in `FUSED` order."""
    layer = self._fused_linear(group) if self.fused_groups is None else self.fused_groups[group]
    return layer(x)

  def project(self, group: str, x: jax.Array, fused: bool) -> tuple[jax.Array, ...]:
    """The group's outputs for x [..., in]: as one `FusedLinear` when `fused` (decoding), else layer by layer."""
    if fused:
      return self.fused(group, x)
    return tuple(layer(x) for layer in self._layers(group))
