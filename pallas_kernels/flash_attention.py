"""Causal softmax attention without the [T, T] scores in memory: jax's Pallas (Triton) flash-attention kernels,
forward and backward (`jax.experimental.pallas.ops.gpu.attention.mha`), for f32 where cuDNN's fused attention takes
only bf16 / fp16. XLA's attention materialises the scores and each of its softmax passes over them: at the MAD
Transformer's population shapes (64 slots × 32 × 8 heads × 128²) every such tensor is 1 GiB, and its fusions were the
busiest kernels of the step (benchmarks/RESULTS.md "Refined solves on the GPU, ..., MAD's mixers").

jax marks that module deprecated in favour of the `tokamax` package, which would bring pydantic, qwix and xprof with
it; with jax pinned, the module is the same code on every machine we run. Interpreted off the GPU (tests).
"""
import warnings

import jax
import jax.numpy as jnp

from pallas_kernels.mesa_cg.params import target, tile_size_reason, use_interpret

with warnings.catch_warnings():
  warnings.simplefilter("ignore", DeprecationWarning)
  from jax.experimental.pallas.ops.gpu import attention as _pallas_attention

_BLOCK = 128  # the kernels' forward query / key blocks (their backward blocks, 32, divide it)
_ROW_MULTIPLE = 32


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """q, k, v [B, T, H, D] -> softmax(q kᵀ / √D, causal) v [B, T, H, D] in q's dtype. T is padded at the end to the
  kernels' block multiple (the padded keys follow every real query, so causality masks them); D must be a power of
  two ≥ 16 (Triton's smallest dot). GPU, or interpreted on CPU; not TPU."""
  if target() not in ("gpu", "cpu"):
    raise ValueError(f"attention.kernel='pallas' runs jax's GPU (Triton) flash attention, built for GPU and CPU "
                     f"(interpreted), not {target()}: use 'auto' or 'xla' there")
  head_dim = q.shape[-1]
  reason = tile_size_reason("head_dim", head_dim)
  if reason:
    raise ValueError(f"attention.kernel='pallas': {reason}")
  length = q.shape[1]
  multiple = _BLOCK if length > _BLOCK else _ROW_MULTIPLE
  padded = -(-length // multiple) * multiple
  pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - length), (0, 0), (0, 0)))
  o = _pallas_attention.mha(pad(q), pad(k), pad(v), None, sm_scale=head_dim ** -0.5, causal=True,
                            interpret=use_interpret())
  return o[:, :length]
