"""Projections that read the same input, run as one matmul over their concatenated kernels (decoding).

At one token per step each projection is a GEMV that reads its kernel once: several of them on the same input are
several small kernels where one larger one does the same work. `FusedLinear` concatenates the kernels (and biases)
of `nnx.Linear` layers along the output axis and splits the product back; the layers' own params stay where they are,
so training, prefill and checkpoints are unchanged. A module names its groups in `FUSED`
(`FusedProjections`); `models.decoding.for_decoding` builds them once before the decode loop, and a module decoding
without it builds them on every call (the same numbers, concatenated each token).

Layers computing in f32 may join bf16 ones (a recurrent mixer's f32 gates beside q, k, v): the product runs on bf16
operands with f32 accumulation, and an f32 kernel enters as three bf16 pieces whose sum is exactly that kernel
(`exact_pieces`: 3 × 8 significant bits = f32's 24), so with a bf16 input each output is the layer's own product up
to summation order.
"""
import jax
import jax.numpy as jnp
from flax import nnx

_PIECES = 3  # bf16 pieces that sum to an f32 value exactly


def exact_pieces(kernel: jax.Array) -> list[jax.Array]:
  """An f32 array as three bf16 arrays whose f32 sum is it: each piece is what the previous ones leave, rounded."""
  pieces, rest = [], kernel.astype(jnp.float32)
  for _ in range(_PIECES):
    pieces.append(rest.astype(jnp.bfloat16))
    rest = rest - pieces[-1].astype(jnp.float32)
  return pieces


class DecodeWeight(nnx.Variable):
  """A weight derived from params for decoding (a concatenation of kernels): not an `nnx.Param`, so never trained,
  decayed or saved."""


class FusedLinear(nnx.Module):
  """y_i = x W_i (+ b_i) for the given `nnx.Linear` layers as one product x [W_1 … W_n]; kernels may carry leading
  (stacked-layer) axes. The layers must agree on input size, precision and element type; their dtypes must all be
  one, or bf16 and f32 (then the input must be bf16, as the activations of a bf16 model are)."""

  def __init__(self, layers: list[nnx.Linear]):
    options = {(l.in_features, l.precision, l.preferred_element_type) for l in layers}
    if len(options) != 1:
      raise ValueError(f"fused layers must share in_features, precision and preferred_element_type, got {options}")
    _, self.precision, self.preferred_element_type = options.pop()
    self.dtypes = tuple(jnp.dtype(l.dtype) for l in layers)
    self.dtype = min(self.dtypes, key=lambda d: d.itemsize)  # the operands' dtype
    self.mixed = len(set(self.dtypes)) > 1
    if self.mixed and (set(self.dtypes) != {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}
                       or self.preferred_element_type is not None):
      raise ValueError(f"fused layers of different dtypes must be bfloat16 and float32 without "
                       f"preferred_element_type, got {sorted(map(str, set(self.dtypes)))}")
    pieces = [exact_pieces(l.kernel[...]) if self.mixed and d != self.dtype and l.kernel[...].dtype != self.dtype
              else [l.kernel[...].astype(self.dtype)] for l, d in zip(layers, self.dtypes)]
    self.sizes = tuple(l.out_features for l in layers)
    self.pieces = tuple(map(len, pieces))
    self.has_bias = tuple(l.use_bias for l in layers)
    self.kernel = DecodeWeight(jnp.concatenate([p for layer_pieces in pieces for p in layer_pieces], axis=-1))
    biases = [l.bias[...].astype(jnp.float32) if l.use_bias else jnp.zeros(l.kernel[...].shape[:-2] + (l.out_features,))
              for l in layers]
    self.bias = DecodeWeight(jnp.concatenate(biases, axis=-1)) if any(self.has_bias) else None

  def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
    """x: [..., in] -> one [..., out_i] per layer, each what `layers[i](x)` computes up to summation order."""
    if self.mixed and jnp.dtype(x.dtype).itemsize > self.dtype.itemsize:
      raise ValueError(f"a fused bf16 and f32 projection needs a bf16 input, got {x.dtype}")
    element_type = jnp.float32 if self.mixed else self.preferred_element_type
    kwargs = {} if element_type is None else dict(preferred_element_type=element_type)
    y = jax.lax.dot_general(x.astype(self.dtype), self.kernel[...], (((x.ndim - 1,), (0,)), ((), ())),
                            precision=self.precision, **kwargs)
    outputs, column, bias_column = [], 0, 0
    for size, pieces, dtype, has_bias in zip(self.sizes, self.pieces, self.dtypes, self.has_bias):
      parts = [y[..., column + i * size:column + (i + 1) * size] for i in range(pieces)]
      out = parts[0]
      for part in parts[1:]:  # in f32: the pieces of an f32 kernel
        out = out + part
      out = out.astype(dtype)
      if has_bias:
        out = out + self.bias[...][..., bias_column:bias_column + size].astype(dtype)
      outputs.append(out)
      column, bias_column = column + pieces * size, bias_column + size
    return tuple(outputs)


class FusedProjections:
  """Mixin for an nnx.Module whose `nnx.Linear` attributes in each `FUSED` group (group name -> attribute names; a
  None attribute is skipped) read the same input. `fused(group, x)` applies a group as one `FusedLinear`: the one
  `fuse()` stored, or one built now."""
  FUSED: dict[str, tuple[str, ...]] = {}
  fused_groups = None  # an nnx.Dict of FusedLinear per group once `fuse()` ran

  def _fused_linear(self, group: str) -> FusedLinear:
    return FusedLinear([layer for name in self.FUSED[group] if (layer := getattr(self, name)) is not None])

  def fuse(self) -> None:
    """Concatenates every group's kernels now, for all later `fused` calls (before a decode loop)."""
    self.fused_groups = nnx.Dict({group: self._fused_linear(group) for group in self.FUSED})

  def fused(self, group: str, x: jax.Array) -> tuple[jax.Array, ...]:
    """The group's outputs for x [..., in], one per (non-None) layer, in `FUSED` order."""
    layer = self._fused_linear(group) if self.fused_groups is None else self.fused_groups[group]
    return layer(x)
