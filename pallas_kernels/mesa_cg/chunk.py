"""Building blocks shared by the Mesa kernels: in-kernel products on one chunk, and the chunk-major operand layout.

In-kernel helpers are backend-neutral jnp on values (no transposes: a transposed operand is a dot dimension number,
which Triton folds into the dot and Mosaic supports). Wrappers flatten [B, H, ...] to [B·H, ...] and give every
program (batch·head i, chunk n) its chunk's [C, D] tiles, the gates as column [C, 1] and row [1, C], and a state
[D, E] of a [B·H, N or N+1, D, E] array: block shapes are full in their last two dims, which TPU accepts.
"""
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


class Dots(NamedTuple):
  """2-D products at one in-kernel precision, accumulating in the operands' dtype."""
  nn: Callable  # a @ b
  nt: Callable  # a @ bᵀ
  tn: Callable  # aᵀ @ b


class SplitDot(NamedTuple):
  """An f32 product done as 16-bit products on the tensor cores, with f32 accumulation.

  Each operand is scaled to max |·| = 1 (a per output row, b as a whole; fp16's exponent range is narrow) and split
  into parts of `dtype`: x ≈ s·(hi + lo), lo = the rounding error of hi. Three passes (hi·hi + hi·lo + lo·hi) keep
  about twice the part's mantissa (fp16: 22 bits, f32-accurate; bf16: 16); one pass (hi·hi) about the part's own
  (fp16: 11 bits, as TF32, at twice TF32's tensor-core rate).
  """
  dtype: object  # jnp.float16 or jnp.bfloat16
  passes: int  # 1 or 3


# Scales never go below 2^-100, so 1/scale stays finite: a row whose largest entry is smaller (an f32 subnormal, say,
# from a long run of strong decay) is scaled by 2^100 and underflows to zero in the parts instead of giving inf·0 =
# NaN (seen on an H200 in a 146M-parameter model's loss before this floor).
SMALLEST_SCALE = 2.0 ** -100


def _max_abs(x, *, whole: bool):
  """max |x| per row [M, 1], or over the whole 2-D block as [1, 1], floored at SMALLEST_SCALE."""
  m = jnp.max(jnp.abs(x), axis=1, keepdims=True)
  if whole:
    m = jnp.max(m, axis=0, keepdims=True)
  return jnp.maximum(m, SMALLEST_SCALE)


def _parts(x, split: SplitDot):
  """(hi, lo) of x, or (hi, None) for one pass."""
  hi = x.astype(split.dtype)
  lo = (x - hi.astype(x.dtype)).astype(split.dtype) if split.passes == 3 else None
  return hi, lo


def _split_general(a, b, *, dims, split: SplitDot):
  """dot_general(a, b, dims) with `split` (a: [M, K] or [K, M] for tn; b: 2-D), f32 result."""
  (a_contract,), _ = dims
  scale_a = _max_abs(a, whole=a_contract == 0)  # [M, 1] scales rows of the result; a tn operand is scaled whole
  scale_b = _max_abs(b, whole=True)
  (a_hi, a_lo), (b_hi, b_lo) = _parts(a * (1.0 / scale_a), split), _parts(b * (1.0 / scale_b), split)
  dot = functools.partial(lax.dot_general, dimension_numbers=(dims, ((), ())), preferred_element_type=jnp.float32)
  out = dot(a_hi, b_hi)
  if split.passes == 3:
    out = dot(a_lo, b_hi) + dot(a_hi, b_lo) + out
  return out * (scale_a * scale_b)


_NN, _NT, _TN = ((1,), (0,)), ((1,), (1,)), ((0,), (0,))


def dots(precision, dtype) -> Dots:
  """The three products at `precision`: a lax.Precision or DotAlgorithmPreset (passed to dot_general), or a
  SplitDot (f32 operands only)."""
  if isinstance(precision, SplitDot):
    general = lambda dims: functools.partial(_split_general, dims=dims, split=precision)
  else:
    general = lambda dims: functools.partial(lax.dot_general, dimension_numbers=(dims, ((), ())),
                                             precision=precision, preferred_element_type=dtype)
  return Dots(general(_NN), general(_NT), general(_TN))


def decay_mask(decay_col, decay_row, *, transpose: bool = False):
  """W [C, C], W_ts = e^{G_t − G_s} for s ≤ t else 0 (rows t), or Wᵀ (rows s) if `transpose`.

  G as a column [C, 1] and as a row [1, C], so neither is transposed in the kernel.
  """
  size = decay_col.shape[0]
  rows = lax.broadcasted_iota(jnp.int32, (size, size), 0)
  cols = lax.broadcasted_iota(jnp.int32, (size, size), 1)
  keep = rows <= cols if transpose else rows >= cols
  diff = decay_row - decay_col if transpose else decay_col - decay_row
  return jnp.where(keep, jnp.exp(jnp.where(keep, diff, 0.0)), 0.0)


def causal_product(x, keys, values, states, row_scale, mask, mm: Dots, *, transpose_states: bool = False):
  """(x ⊙ row_scale) S + ((x keysᵀ) ⊙ mask) values, with S = states, or statesᵀ if `transpose_states`.

  x, keys: [C, D]; values: [C, E]; states: [D, E] ([E, D] transposed); row_scale: [C, 1]; mask: [C, C]. Returns
  [C, E]. With row_scale e^G and mask W ⊙ β_s it is the causal read (x_t times the state at t, `chunked._read`);
  with row_scale e^{G_last − G} and mask Wᵀ its time-reversed counterpart (`chunked._write`).
  """
  inter = (mm.nt if transpose_states else mm.nn)(x * row_scale, states)
  return inter + mm.nn(mm.nt(x, keys) * mask, values)


def rowdot(a, b):
  """Row-wise dot as a column: [C, D], [C, D] -> [C, 1]."""
  return jnp.sum(a * b, axis=1, keepdims=True)


def flat(x: jax.Array) -> jax.Array:
  """[B, H, ...] -> [B·H, ...]."""
  return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def gate_operands(log_decay, beta):
  """G as column and row and β as row, [B·H, N, C, 1] / [B·H, N, 1, C], from log_decay, beta: [B, H, N, C]."""
  return flat(log_decay[..., :, None]), flat(log_decay[..., None, :]), flat(beta[..., None, :])


def chunk_spec(rows: int, cols: int, shift: int = 0) -> pl.BlockSpec:
  """Block [rows, cols] of chunk n + shift of a [B·H, N(+1), rows, cols] array, on the (batch·head, chunk) grid."""
  return pl.BlockSpec((None, None, rows, cols), lambda i, n: (i, n + shift, 0, 0))


def gate_specs(size: int) -> list[pl.BlockSpec]:
  """Specs of `gate_operands` for chunk size C."""
  return [chunk_spec(size, 1), chunk_spec(1, size), chunk_spec(1, size)]
