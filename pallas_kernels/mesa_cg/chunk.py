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


def dots(precision, dtype) -> Dots:
  general = lambda dims: functools.partial(lax.dot_general, dimension_numbers=(dims, ((), ())),
                                           precision=precision, preferred_element_type=dtype)
  return Dots(general(((1,), (0,))), general(((1,), (1,))), general(((0,), (0,))))


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
