"""The first layout of the Hopper CG solve (systems as columns), kept to be timed beside `solve_hopper` (its
successor, systems as rows) in benchmarks/solve_bench.py until the device has compared them; then it goes, with
`column_cg.py`.

Same contract as `solve.chunked_cg_solve`: x_t = (H_kk[t] + Λ)⁻¹ rhs_t for every token of a chunk, with the chunked
matvec of DESIGN.md §1. One CTA per (batch·head, chunk) stages the chunk's state S and keys K in shared memory once, as
fp16 parts of operands scaled to max |·| = 1 (`chunk.SplitDot`: 3 passes f32-accurate, 1 pass TF32-class), and runs
every CG step on chip. Its C rows are split over C/32 warpgroups, each an independent CG over 32 systems.

A warpgroup holds its CG vectors transposed, [Dk, 32] (column t = system t): the wgmma accumulator puts its M
dimension across the warps, and only M = Dk keeps every product at M ≥ 64 for 32 systems. One step is

    Y = [S; K] Pᵀ                      (M = Dk + 64, N = 32, K = Dk; P = the scaled search directions)
    (A P)ᵀ = e^{G_t} (S Pᵀ) + Kᵀ (Mᵀ ⊙ K Pᵀ) + λ ⊙ Pᵀ,  Mᵀ_st = e^{G_t − G_s} β_s [s ≤ t]

with both 16-bit operands of every product in shared memory (the state as its transpose Sᵀ, read transposed). Scales:
Sᵀ per column (rows of S) and K whole, once per CTA; P per column (system) every step; Mᵀ ⊙ K Pᵀ by its bound
Dk·max_s Mᵀ_st, so that the step needs three cross-warp reductions (max |P|, pᵀAp, rᵀr) and no more. Shared memory
(C=64, 3 passes): Sᵀ 64 KiB, K 32 KiB, and per warpgroup P 16, Mᵀ ⊙ K Pᵀ 8, rhs/x 16 KiB, ~190 KiB in all.
`mesanet_jax.ops.cg.conjugate_gradient` cannot be traced here: it reduces over the last axis of [systems, Dk]
vectors, Mosaic GPU has no register transpose, and [64, Dk] f32 vectors (the least wgmma allows with systems as
rows) need 64 registers each per thread, 192 for x, r, p. `column_cg.column_cg` is its transcription over axis 0,
checked against it iterate for iterate (tests/pallas/test_solve_hopper_columns.py).
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from mesanet_jax.ops.inputs import initial_guess
from pallas_kernels.mesa_cg.chunk import SMALLEST_SCALE, SplitDot
from pallas_kernels.mesa_cg.column_cg import column_cg
from pallas_kernels.mesa_cg.params import target, use_interpret

SYSTEMS = 32  # CG systems (tokens) per warpgroup: the N of every product
_KEY_ROWS = 64  # keys staged per chunk, C padded to one wgmma M group
_WGMMA = plgpu.Layout.WGMMA
_ROWS, _COLS = _WGMMA.reduce(1), _WGMMA.reduce(0)  # a value per row (feature) / per column (system)
_SWIZZLE = 64  # bytes: a row of 32 fp16 systems; every wgmma operand uses it (A and B must agree)
_F16_TILES = (plgpu.TilingTransform((8, _SWIZZLE // 2)), plgpu.SwizzleTransform(_SWIZZLE))
_F32_TILES = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))  # TMA-staged f32, read transposed
# A cross-warp reduction of a [Dk, 32] f32 array to its 32 column values (4 registers per thread) stages 4 × 128 × 8
# bytes: with that much scratch it takes one round of two warpgroup barriers instead of two rounds.
# The kernel orders its own shared memory accesses (commit_smem before every wgmma or TMA that reads what threads
# wrote, an mbarrier where another warpgroup reads it, and wgmma waits before it is rewritten), so Pallas' automatic
# barriers around every shared-memory load and store (4 per step and operand here) are turned off.
_COMPILER_PARAMS = plgpu.CompilerParams(reduction_scratch_bytes=4 * 128 * 8, unsafe_no_auto_barriers=True)


def split_passes(precision) -> int:
  """fp16 passes per product: 3 ("highest"/"high", f32-accurate) or 1 ("default", TF32-class)."""
  if isinstance(precision, SplitDot) and precision.dtype == jnp.float16:
    return precision.passes
  if precision in (lax.Precision.HIGHEST, lax.Precision.HIGH):
    return 3
  if precision == lax.Precision.DEFAULT:
    return 1
  raise ValueError(f"precision must be a lax.Precision or SplitDot(jnp.float16, 1 | 3) for the Hopper solve, "
                   f"got {precision!r}")


def unsupported_reason(chunk_size: int, key_dim: int, dtype) -> str | None:
  """Why the Hopper solve cannot take these sizes, or None."""
  if chunk_size not in (32, 64):
    return f"chunk_size={chunk_size}: the Hopper solve takes 32 or 64 (32 systems per warpgroup)"
  if key_dim not in (64, 128):
    return f"key_dim={key_dim}: the Hopper solve takes 64 or 128 (wgmma M groups of 64 features)"
  if jnp.dtype(dtype) != jnp.float32:
    return f"dtype={jnp.dtype(dtype)}: the Hopper solve takes f32 inputs"
  return None


def is_hopper(device=None) -> bool:
  """Whether `device` (default: the abstract mesh's device when exporting, else JAX's first) is sm_90 (H100, H200):
  wgmma is sm_90a only. An abstract device has no compute capability: its kind decides."""
  device = device or jax.sharding.get_abstract_mesh().abstract_device or jax.devices()[0]
  capability = getattr(device, "compute_capability", None)
  if capability is not None:
    return capability == "9.0"
  return device.device_kind.startswith(("NVIDIA H100", "NVIDIA H200", "NVIDIA H800", "NVIDIA GH200"))


def use_hopper_solve(chunk_size: int, key_dim: int, dtype) -> bool:
  """Whether the kernels' target takes this solve (else `solve.chunked_cg_solve`): GPU kernels built for sm_90,
  sizes and dtype as `unsupported_reason` allows."""
  return target() == "gpu" and is_hopper() and unsupported_reason(chunk_size, key_dim, dtype) is None


def _store_parts(ref, x, passes: int):
  """ref[0] = fp16(x) and, for 3 passes, ref[1] = fp16(x − fp16(x)), for x already scaled into fp16's range."""
  hi = x.astype(jnp.float16)
  ref[0] = hi
  if passes == 3:
    ref[1] = (x - hi.astype(jnp.float32)).astype(jnp.float16)


def _load_transposed(ref):
  """ref [32, Dk] (f32, tiled) as a [Dk, 32] array in the wgmma accumulator layout."""
  return plgpu.layout_cast(plgpu.load(ref.T, layout=plgpu.Layout.WGMMA_TRANSPOSED), _WGMMA)


def _store_transposed(ref, x):
  """ref [32, Dk] = xᵀ for x [Dk, 32]."""
  ref.T[...] = plgpu.layout_cast(x, plgpu.Layout.WGMMA_TRANSPOSED)


def _products(passes: int, *pairs):
  """Σ over fp16 passes of a_part @ b_part for each (acc shape, a(part), b(part)); f32 results, one per pair."""
  parts = [(0, 0)] if passes == 1 else [(0, 0), (1, 0), (0, 1)]

  def body(*accs):
    for acc, (_, a, b) in zip(accs, pairs):
      for pa, pb in parts:
        plgpu.wgmma(acc, a(pa), b(pb))
    return [acc[...] for acc in accs]

  return pl.run_scoped(body, *(plgpu.ACC(shape, jnp.float32) for shape, _, _ in pairs))


def _stage_chunk(states_t_gmem, kf32, k_loaded, st_parts, k_parts, k2_parts, vectors, *, chunk_size: int,
                 passes: int, jacobi: bool):
  """Warpgroup 0: the chunk's Sᵀ and K as scaled fp16 parts in shared memory, and the per-feature vectors.

  st_parts [p, Dk, Dk] = split(Sᵀ / σ_S) with σ_S[i] = max_j |S_ij| (row scales of S); k_parts [p, 64, Dk] =
  split(K / σ_K), σ_K = max |K|, rows ≥ C zero; k2_parts = split((K / σ_K)²) for the Jacobi diagonal.
  vectors [3, Dk] f32: σ_S, diag(S), σ_K (repeated).
  """
  key_dim = st_parts.shape[-1]
  scale_max, diagonal = [], []
  blocks = []
  for h in range(key_dim // 64):
    block = plgpu.load(states_t_gmem.at[pl.ds(64 * h, 64)], layout=_WGMMA, optimized=False)  # rows j of Sᵀ
    blocks.append(block)
    scale_max.append(jnp.max(jnp.abs(block), axis=0))
    rows = plgpu.broadcasted_iota(jnp.int32, block.shape, 0, layout=_WGMMA) + 64 * h
    cols = plgpu.broadcasted_iota(jnp.int32, block.shape, 1, layout=_WGMMA)
    diagonal.append(jnp.sum(jnp.where(rows == cols, block, 0.0), axis=1))
    vectors[1, pl.ds(64 * h, 64)] = diagonal[-1]
  sigma_s = jnp.maximum(functools.reduce(jnp.maximum, scale_max), SMALLEST_SCALE)
  vectors[0] = sigma_s
  for h, block in enumerate(blocks):
    _store_parts(st_parts.at[:, pl.ds(64 * h, 64)], block * (1.0 / sigma_s)[None, :], passes)

  plgpu.barrier_wait(k_loaded)
  keys = kf32[...]
  rows = plgpu.broadcasted_iota(jnp.int32, keys.shape, 0, layout=_WGMMA)
  keys = jnp.where(rows < chunk_size, keys, 0.0)
  sigma_k = jnp.maximum(jnp.max(jnp.max(jnp.abs(keys), axis=0)), SMALLEST_SCALE)
  keys = keys * (1.0 / sigma_k)
  vectors[2] = plgpu.layout_cast(jnp.full((key_dim,), sigma_k, jnp.float32), _ROWS)
  _store_parts(k_parts, keys, passes)
  if jacobi:
    plgpu.commit_smem()  # every thread has read kf32, which k2_parts overwrites
    _store_parts(k2_parts, keys * keys, passes)
  plgpu.commit_smem()


def _solve_warpgroup(w: int, rhs_gmem, k_gmem, gates_gmem, lam_gmem, states_gmem, x_gmem, steps_gmem, st_parts,
                     k_parts, z_parts, io, vectors, steps_smem, kf32, k2_parts, p_parts, loaded, staged, diagonal_done,
                     *, chunk_size: int, heads: int, cg_steps: int, cg_init: str, cg_tol: float | None, passes: int):
  """Warpgroup w of the CTA of (batch·head, chunk): x for systems [32w, 32w + 32) of the chunk."""
  bh, n = lax.axis_index("bh"), lax.axis_index("chunk")
  first, key_dim = w * SYSTEMS, st_parts.shape[-1]
  jacobi = cg_init == "jacobi"
  plgpu.copy_gmem_to_smem(rhs_gmem.at[bh, n, pl.ds(first, SYSTEMS)], io.at[w], loaded.at[1 + w])
  if w == 0:
    plgpu.copy_gmem_to_smem(k_gmem.at[bh, n], kf32.at[pl.ds(0, chunk_size)], loaded.at[0])
    _stage_chunk(states_gmem.at[bh, n], kf32, loaded.at[0], st_parts, k_parts, k2_parts, vectors,
                 chunk_size=chunk_size, passes=passes, jacobi=jacobi)
    plgpu.barrier_arrive(staged)
  plgpu.barrier_wait(staged)

  # Per feature i (rows): σ_S, diag(S), σ_K, λ; per key s (rows of Mᵀ): G_s, β_s; per system t (columns): G_t.
  sigma_s, state_diagonal, sigma_k = (plgpu.load(vectors.at[j], layout=_ROWS) for j in range(3))
  lam = plgpu.load(lam_gmem.at[lax.rem(bh, heads)], layout=_ROWS, optimized=False)
  log_decay_s, beta_s = (plgpu.load(gates_gmem.at[bh, n, j], layout=_ROWS, optimized=False) for j in range(2))
  log_decay_t = plgpu.load(gates_gmem.at[bh, n, 0, pl.ds(first, SYSTEMS)], layout=_COLS, optimized=False)
  shape = (_KEY_ROWS, SYSTEMS)
  keep = (plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=_WGMMA)
          <= plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=_WGMMA) + first)
  diff = log_decay_t[None, :] - log_decay_s[:, None]
  mask = jnp.where(keep, jnp.exp(jnp.where(keep, diff, 0.0)), 0.0) * beta_s[:, None]  # Mᵀ [64, 32]
  mask_max = jnp.maximum(jnp.max(mask, axis=0), SMALLEST_SCALE)
  # Mᵀ ⊙ (K̃ P̃ᵀ) is at most Dk·max_s Mᵀ_st per column: scaled by 2^15 / (Dk·max) it fills fp16's range.
  z_scale = (2.0 ** 15 / key_dim) / mask_max
  to_chunk_start = jnp.exp(log_decay_t)
  key_factor = sigma_k * sigma_k

  def read(a_parts, transpose_a, b_parts, rows):
    a = (lambda pa: a_parts.at[pa].T) if transpose_a else (lambda pa: a_parts.at[pa])
    return ((rows, SYSTEMS), a, lambda pb: b_parts.at[w, pb])

  def matvec(p):
    sigma_p = jnp.maximum(jnp.max(jnp.abs(p), axis=0), SMALLEST_SCALE)
    _store_parts(p_parts.at[w], p * (1.0 / sigma_p)[None, :], passes)
    plgpu.commit_smem()
    inter, scores = _products(passes, read(st_parts, True, p_parts, key_dim), read(k_parts, False, p_parts, _KEY_ROWS))
    _store_parts(z_parts.at[w], mask * scores * z_scale[None, :], passes)
    plgpu.commit_smem()
    (intra,) = _products(passes, read(k_parts, True, z_parts, key_dim))
    intra_factor = key_factor[:, None] * (1.0 / z_scale)[None, :]
    return (sigma_p[None, :] * (sigma_s[:, None] * to_chunk_start[None, :] * inter + intra_factor * intra)
            + lam[:, None] * p)

  plgpu.barrier_wait(loaded.at[1 + w])
  rhs = _load_transposed(io.at[w])  # [Dk, 32]
  diagonal = None
  if jacobi:
    _store_parts(z_parts.at[w], mask * (1.0 / mask_max)[None, :], passes)
    plgpu.commit_smem()
    (intra,) = _products(passes, read(k2_parts, True, z_parts, key_dim))
    diagonal = (to_chunk_start[None, :] * state_diagonal[:, None] + key_factor[:, None] * mask_max[None, :] * intra
                + lam[:, None])
    plgpu.barrier_arrive(diagonal_done)  # k2_parts shares memory with p_parts: all warpgroups are done reading it
    plgpu.barrier_wait(diagonal_done)
  x, steps = column_cg(matvec, rhs, initial_guess(rhs, diagonal, cg_init), steps=cg_steps, tol=cg_tol)

  _store_transposed(io.at[w], x)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(io.at[w], x_gmem.at[bh, n, pl.ds(first, SYSTEMS)])
  if steps_gmem is not None:
    steps_smem[w] = steps
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(steps_smem.at[w], steps_gmem.at[bh, n, pl.ds(first, SYSTEMS)])
  plgpu.wait_smem_to_gmem(0)


def _kernel(*refs, warpgroups: int, counted: bool, **options):
  """All warpgroups of one CTA. With two, each traces its own copy of the solve so that warpgroup 1's cross-warp
  reductions use the shared-memory scratch behind a pad: Mosaic GPU places that scratch at one fixed offset for every
  warpgroup, and two warpgroups reducing at once would share it."""
  rhs_gmem, k_gmem, gates_gmem, lam_gmem, states_gmem, x_gmem, *refs = refs
  steps_gmem = refs.pop(0) if counted else None
  st_parts, k_parts, z_parts, io, vectors, steps_smem, union, loaded, staged, diagonal_done = refs
  union = list(union)  # K as loaded, then (Jacobi only) (K / σ_K)², then the search directions: one memory
  kf32, k2_parts, p_parts = union if len(union) == 3 else (union[0], None, union[1])
  solve = functools.partial(_solve_warpgroup, rhs_gmem=rhs_gmem, k_gmem=k_gmem, gates_gmem=gates_gmem,
                            lam_gmem=lam_gmem, states_gmem=states_gmem, x_gmem=x_gmem, steps_gmem=steps_gmem,
                            st_parts=st_parts, k_parts=k_parts, z_parts=z_parts, io=io, vectors=vectors,
                            steps_smem=steps_smem, kf32=kf32, k2_parts=k2_parts, p_parts=p_parts, loaded=loaded,
                            staged=staged, diagonal_done=diagonal_done, **options)
  if warpgroups == 1:
    solve(0)
    return
  wg = lax.axis_index("wg")
  pl.run_scoped(lambda _: pl.when(wg == 1)(lambda: solve(1)),
                plgpu.SMEM((_COMPILER_PARAMS.reduction_scratch_bytes,), jnp.int8), collective_axes="wg")
  pl.when(wg == 0)(lambda: solve(0))


def hopper_cg_solve(rhs, k, log_decay, beta, lam, states_kk_t, *, cg_steps: int, cg_init: str,
                    cg_tol: float | None = None, precision):
  """`chunked_cg_solve` on Hopper tensor cores.

  Args (chunk-major, as inside `mesa_chunked`): rhs, k: [B, H, N, C, Dk] f32; log_decay (within-chunk cumulative log
  decay G), beta: [B, H, N, C]; lam: [H, Dk]; states_kk_t: [B, H, N (or more), Dk, Dk] = Sᵀ (entry n for chunk n).
  cg_tol: None for exactly cg_steps steps; else each row stops once ‖r‖ ≤ cg_tol·‖r₀‖, and a warpgroup's loop ends
  when its 32 rows have. precision: lax.Precision (HIGHEST/HIGH: 3 fp16 passes, DEFAULT: 1) or SplitDot(fp16, n).
  Returns x: [B, H, N, C, Dk] and the steps each row took, int32 [B, H, N, C].
  """
  batch, heads, num_chunks, size, key_dim = rhs.shape
  if (reason := unsupported_reason(size, key_dim, rhs.dtype)) is not None:
    raise ValueError(reason)
  passes = split_passes(precision)
  warpgroups, counted, jacobi = size // SYSTEMS, cg_tol is not None, cg_init == "jacobi"
  flat = lambda x: x.reshape(batch * heads, *x.shape[2:])
  pad = [(0, 0)] * 4 + [(0, _KEY_ROWS - size)]
  gates = jnp.pad(jnp.stack([log_decay, beta], axis=3).astype(jnp.float32), pad)  # [B, H, N, 2, 64]
  parts = lambda rows, cols, lead=(): plgpu.SMEM((*lead, passes // 2 + 1, rows, cols), jnp.float16,
                                                 transforms=_F16_TILES)
  union = [plgpu.SMEM((_KEY_ROWS, key_dim), jnp.float32, transforms=_F32_TILES)]  # K as loaded
  if jacobi:
    union.append(parts(_KEY_ROWS, key_dim))  # (K / σ_K)² for the diagonal
  union.append(parts(key_dim, SYSTEMS, (warpgroups,)))  # the search directions, per warpgroup
  scratch = [
      parts(key_dim, key_dim),  # Sᵀ
      parts(_KEY_ROWS, key_dim),  # K
      parts(_KEY_ROWS, SYSTEMS, (warpgroups,)),  # Mᵀ ⊙ K Pᵀ, per warpgroup
      plgpu.SMEM((warpgroups, SYSTEMS, key_dim), jnp.float32, transforms=_F32_TILES),  # rhs in, x out
      plgpu.SMEM((3, key_dim), jnp.float32),  # σ_S, diag(S), σ_K
      plgpu.SMEM((warpgroups, SYSTEMS), jnp.int32),  # steps out
      plgpu.RefUnion(*union),
      plgpu.Barrier(num_barriers=1 + warpgroups),  # TMA: K, rhs per warpgroup
      plgpu.Barrier(),  # warpgroup 0 has staged the chunk
      plgpu.Barrier(num_arrivals=warpgroups),  # every warpgroup has its Jacobi diagonal
  ]
  out_type = [jax.ShapeDtypeStruct((batch * heads, num_chunks, size, key_dim), jnp.float32)]
  if counted:
    out_type.append(jax.ShapeDtypeStruct((batch * heads, num_chunks, size), jnp.int32))
  kernel = plgpu.kernel(
      functools.partial(_kernel, warpgroups=warpgroups, counted=counted, chunk_size=size, heads=heads,
                        cg_steps=cg_steps, cg_init=cg_init, cg_tol=cg_tol, passes=passes),
      out_type=out_type, scratch_types=scratch, grid=(batch * heads, num_chunks), grid_names=("bh", "chunk"),
      num_threads=warpgroups, thread_name="wg", compiler_params=_COMPILER_PARAMS,
      interpret=plgpu.InterpretGPUParams() if use_interpret() else None)
  f32 = lambda x: x.astype(jnp.float32)
  x, *steps = kernel(flat(rhs), flat(f32(k)), flat(gates), f32(lam), flat(f32(states_kk_t)))
  steps = steps[0].reshape(rhs.shape[:-1]) if counted else jnp.full(rhs.shape[:-1], cg_steps, jnp.int32)
  return x.reshape(rhs.shape), steps
