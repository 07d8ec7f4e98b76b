"""Chunk-state scan: the decayed running sum of weighted outer products at every chunk boundary.

    carry ← d_n · carry + Σ_{s in chunk n} w_s a_s b_sᵀ          (over n = 0..N−1, or N−1..0 if reversed)

One program per (batch·head, block of the key dim, block of the value dim) walks the chunks in a loop with its
carry tile on-chip (f32, or f64 for f64 inputs) and writes it at every boundary: the rows and columns of the carry
are independent, so tiling both only adds programs to a scan that is sequential over chunks. The forward states
(w = e^{G_last − G} β, a = k, b = k or v) and the backward's state gradients (w = ∓e^G, reversed) are this one scan,
as `chunked._scan_chunks` is for XLA.
A program's blocks hold its whole sequence (a, b: T×block; the N+1 states: N·block×block), which bounds T on TPU by
VMEM.
"""
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.mesa_cg.chunk import dots, flat
from pallas_kernels.mesa_cg.params import compiler_params, dot_precision, state_scan_tiling, use_interpret
from pallas_kernels.mesa_cg.states_hopper import hopper_chunk_states, use_hopper_states


def _states_kernel(a_ref, b_ref, weight_ref, decay_ref, initial_ref, bounds_ref, *, reverse: bool,
                   precision: lax.Precision):
  """One batch·head, key block and value block: a [N, C, D']; b [N, C, E']; weight [N, C, 1]; decay [N, 1, 1];
  initial [D', E']. Writes bounds [N+1, D', E']."""
  num_chunks = a_ref.shape[0]
  mm = dots(precision, bounds_ref.dtype)

  def step(i, carry):
    n = num_chunks - 1 - i if reverse else i
    bounds_ref[n + int(reverse)] = carry
    return decay_ref[n] * carry + mm.tn(a_ref[n] * weight_ref[n], b_ref[n])

  last = lax.fori_loop(0, num_chunks, step, initial_ref[...])
  bounds_ref[0 if reverse else num_chunks] = last


def chunk_states(a, b, weights, chunk_decay, initial, *, reverse: bool = False,
                 precision: lax.Precision | lax.DotAlgorithmPreset, row_block: int | None = None,
                 block: int | None = None, num_warps: int | None = None, num_stages: int | None = None):
  """The carry of carry ← chunk_decay·carry + Σ_s weights_s a_s b_sᵀ at every chunk boundary.

  Args: a: [B, H, N, C, D]; b: [B, H, N, C, E] (either may be a 16-bit float: scanned in the carry's dtype);
  weights: [B, H, N, C]; chunk_decay: [B, H, N]; initial: [B, H, D, E]; reverse: scan from the last chunk to the
  first; row_block, block: key-dim and value-dim block per program;
  num_warps, num_stages: Triton's (every setting None takes `state_scan_tiling`'s, or the Hopper scan,
  `states_hopper.hopper_chunk_states`, on sm_90 where it takes the sizes: C = 64, dims multiples of 64, f32 carries).
  Returns [B, H, N+1, D, E]: entry n is the carry at the boundary before chunk n, i.e. initial plus chunks < n
  (entry 0 = initial, entry N = final), or, reversed, initial plus chunks ≥ n (entry N = initial, entry 0 = final).
  """
  batch, heads, num_chunks, size, dim = a.shape
  width = b.shape[-1]
  tiling_given = any(x is not None for x in (row_block, block, num_warps, num_stages))
  if not tiling_given and use_hopper_states(size, dim, (width,), initial.dtype, precision):
    return hopper_chunk_states(a, (b,), (weights,), chunk_decay, (initial,), reverse=reverse, precision=precision)[0]
  a, b = a.astype(initial.dtype), b.astype(initial.dtype)  # 16-bit rows scanned in the carry's dtype
  tiling = zip((row_block, block, num_warps, num_stages), state_scan_tiling(dim, width))
  row_block, block, num_warps, num_stages = (given or default for given, default in tiling)
  per_head = lambda *shape: pl.BlockSpec((None, *shape), lambda i, r, j: (i, *(0,) * len(shape)))
  by_rows = lambda *shape: pl.BlockSpec((None, *shape), lambda i, r, j: (i, *(0,) * (len(shape) - 1), r))
  by_columns = lambda *shape: pl.BlockSpec((None, *shape), lambda i, r, j: (i, *(0,) * (len(shape) - 1), j))
  by_tile = lambda *shape: pl.BlockSpec((None, *shape), lambda i, r, j: (i, *(0,) * (len(shape) - 2), r, j))
  kernel = functools.partial(_states_kernel, reverse=reverse, precision=dot_precision(precision, initial.dtype))
  bounds = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((batch * heads, num_chunks + 1, dim, width), initial.dtype),
      grid=(batch * heads, dim // row_block, width // block),
      in_specs=[by_rows(num_chunks, size, row_block), by_columns(num_chunks, size, block),
                per_head(num_chunks, size, 1), per_head(num_chunks, 1, 1), by_tile(row_block, block)],
      out_specs=by_tile(num_chunks + 1, row_block, block),
      compiler_params=compiler_params(size, max(row_block, block), num_warps, num_stages, grid_rank=3),
      interpret=use_interpret(),
      name="mesa_chunk_states_reverse" if reverse else "mesa_chunk_states",
  )(flat(a), flat(b), flat(weights[..., None]), flat(chunk_decay[..., None, None]), flat(initial))
  return bounds.reshape(batch, heads, num_chunks + 1, dim, width)


def chunk_states_sharing_a(a, bs, weights, chunk_decay, initials, *, reverse: bool = False,
                           precision: lax.Precision | lax.DotAlgorithmPreset) -> tuple:
  """`chunk_states(a, b, w, chunk_decay, initial)` for each (b, w, initial) of bs, weights, initials: the scans of
  the forward (H_kkᵀ and H_kv, a = k) and of the backward (the two state gradients, a = x). On sm_90 where the sizes
  allow, one Hopper kernel loads and stages each chunk of a once (`states_hopper`); else one scan each."""
  if use_hopper_states(a.shape[3], a.shape[4], tuple(b.shape[-1] for b in bs), initials[0].dtype, precision):
    return hopper_chunk_states(a, tuple(bs), tuple(weights), chunk_decay, tuple(initials), reverse=reverse,
                               precision=precision)
  return tuple(chunk_states(a, b, w, chunk_decay, initial, reverse=reverse, precision=precision)
               for b, w, initial in zip(bs, weights, initials))
