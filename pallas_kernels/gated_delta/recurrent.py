"""The gated delta rule token by token in one Pallas kernel per direction, for small heads (the MAD models' 16 × 16).

One program per (batch, head) holds the state S [Dk, Dv] in registers and walks the sequence:

    A_t = e^{g_t} S_{t−1}      e_t = v_t − A_tᵀ k_t      S_t = A_t + β_t k_t e_tᵀ      o_t = S_tᵀ q_t / √Dk

which is `ops.gated_delta_rule.gated_delta_recurrent` exactly (same products, f32). The chunkwise (WY) form spends
its time on [C, C] chunk matrices and triangular solves that dwarf a 16 × 16 state; here a token costs two
matvecs and a rank-one update on a tile of 256 numbers.

Backward: the forward keeps S at every `interval`-th token (the checkpoints). The backward kernel walks the intervals
last to first: it recomputes the interval's states from its checkpoint into a scratch buffer [interval, Dk, Dv]
(global memory, small enough to stay in L2), then walks the interval's tokens in reverse with dS, the gradient w.r.t.
S_t:

    dS += q_t do_tᵀ/√Dk    dq_t = S_t do_t/√Dk    de = β_t dSᵀ k_t    dv_t = de    dβ_t = k_tᵀ dS e_t
    dk_t = β_t dS e_t − A_t de    dA = dS − k_t deᵀ    dg_t = ⟨A_t, dA⟩    dS ← e^{g_t} dA

Vectors are laid out as the products need them, so nothing is transposed in the kernel: q and k as columns [Dk, 1],
v and o as rows [1, Dv] (free reshapes of the [B, T, H, D] inputs).
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from mesanet_jax.ops.inputs import compute_dtype
from mesanet_jax.ops.operator import register
from pallas_kernels.mesa_cg.params import target, tile_size_reason, use_interpret

MAX_STATE = 64 * 64  # Dk · Dv: the backward keeps four [Dk, Dv] tiles live in registers


def unsupported_reason(key_dim: int, value_dim: int) -> str | None:
  """Why the kernels cannot take these head sizes on this backend, or None."""
  if target() not in ("gpu", "cpu"):
    return f"the recurrent gated delta kernels are built for GPU (Triton) and CPU (interpreted), not {target()}"
  for reason in (tile_size_reason("key_dim", key_dim), tile_size_reason("value_dim", value_dim)):
    if reason:
      return reason
  if key_dim * value_dim > MAX_STATE:
    return (f"key_dim · value_dim = {key_dim * value_dim} > {MAX_STATE}: the recurrent kernels hold the state in "
            f"registers; use the chunked form for heads this large")
  return None


def _advance(state, k, v, decay, beta):
  """One token from S_{t−1} [Dk, Dv]: (A_t, e_t [1, Dv], S_t). k [Dk, 1], v [1, Dv], decay, beta [1, 1]."""
  decayed = decay * state
  error = v - jnp.sum(decayed * k, axis=0, keepdims=True)
  return decayed, error, decayed + (beta * k) * error


def _forward_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, state_ref, o_ref, final_ref, *checkpoint_ref, interval,
                    scale):
  """One (batch, head): q, k [T, Dk, 1]; v [T, 1, Dv]; g, beta [T, 1, 1]; state [Dk, Dv]. Writes o [T, 1, Dv], the
  final state and, when asked, the checkpoints [N, Dk, Dv] (entry n: S before token n · interval)."""
  length = q_ref.shape[0]
  dtype = state_ref.dtype

  def token(t, state):
    _, _, state = _advance(state, k_ref[t].astype(dtype), v_ref[t].astype(dtype), jnp.exp(g_ref[t].astype(dtype)),
                           beta_ref[t].astype(dtype))
    o_ref[t] = (scale * jnp.sum(state * q_ref[t].astype(dtype), axis=0, keepdims=True)).astype(o_ref.dtype)
    return state

  def span(n, state):
    if checkpoint_ref:
      checkpoint_ref[0][n] = state
    return lax.fori_loop(n * interval, jnp.minimum((n + 1) * interval, length), token, state)

  final_ref[...] = lax.fori_loop(0, pl.cdiv(length, interval), span, state_ref[...])


def _backward_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, checkpoint_ref, do_ref, dfinal_ref, dq_ref, dk_ref, dv_ref,
                     dg_ref, dbeta_ref, dstate_ref, scratch_ref, *, interval, scale):
  """One (batch, head): the forward's inputs, its checkpoints [N, Dk, Dv], do [T, 1, Dv] and dfinal [Dk, Dv]. Writes
  dq, dk [T, Dk, 1], dv [T, 1, Dv], dg, dbeta [T, 1, 1], the initial state's gradient [Dk, Dv]; scratch [interval,
  Dk, Dv] holds the states S_{t−1} of the interval being walked."""
  length = q_ref.shape[0]
  dtype = dstate_ref.dtype
  load = lambda ref, t: ref[t].astype(dtype)
  # Threads of a program read back scratch entries other threads wrote: a barrier between the phases on the GPU.
  barrier = (lambda: None) if use_interpret() else pltriton.debug_barrier

  def recompute(t, state, start):
    scratch_ref[t - start] = state
    return _advance(state, load(k_ref, t), load(v_ref, t), jnp.exp(load(g_ref, t)), load(beta_ref, t))[2]

  def reverse(t, dstate, start):
    k, g, beta = load(k_ref, t), load(g_ref, t), load(beta_ref, t)
    decayed, error, state = _advance(scratch_ref[t - start], k, load(v_ref, t), jnp.exp(g), beta)
    do = load(do_ref, t)
    dstate = dstate + (scale * load(q_ref, t)) * do
    dq_ref[t] = (scale * jnp.sum(state * do, axis=1, keepdims=True)).astype(dq_ref.dtype)
    k_dstate = jnp.sum(dstate * k, axis=0, keepdims=True)  # [1, Dv]
    derror = beta * k_dstate
    dstate_error = jnp.sum(dstate * error, axis=1, keepdims=True)  # [Dk, 1]
    dv_ref[t] = derror.astype(dv_ref.dtype)
    dbeta_ref[t] = jnp.sum(k * dstate_error, axis=0, keepdims=True).astype(dbeta_ref.dtype)
    dk_ref[t] = (beta * dstate_error - jnp.sum(decayed * derror, axis=1, keepdims=True)).astype(dk_ref.dtype)
    ddecayed = dstate - k * derror
    dg_ref[t] = jnp.sum(jnp.sum(decayed * ddecayed, axis=1, keepdims=True), axis=0,
                        keepdims=True).astype(dg_ref.dtype)
    return jnp.exp(g) * ddecayed

  def span(i, dstate):
    n = pl.cdiv(length, interval) - 1 - i
    start, end = n * interval, jnp.minimum((n + 1) * interval, length)
    barrier()  # the previous interval's reads are done
    lax.fori_loop(start, end, functools.partial(recompute, start=start), checkpoint_ref[n])
    barrier()
    return lax.fori_loop(0, end - start, lambda j, d: reverse(end - 1 - j, d, start), dstate)

  dstate_ref[...] = lax.fori_loop(0, pl.cdiv(length, interval), span, dfinal_ref[...])


def _per_head_call(kernel, name: str, operands: list, in_blocks: list, out_blocks: list, *, num_warps: int | None):
  """pallas_call of `kernel` with one program per (batch, head). Blocks are (kind, shape) as `_spec` takes them;
  out_blocks pairs each with its dtype. Triton warps on the GPU: one per 1,024 state entries (1 at 16 × 16)."""
  batch, _, heads, key_dim = operands[0].shape[:4]
  value_dim = operands[2].shape[-1]
  params = None
  if target() == "gpu":
    params = pltriton.CompilerParams(num_warps=num_warps or max(1, min(8, key_dim * value_dim // 1024)), num_stages=1)
  return pl.pallas_call(
      kernel,
      out_shape=[jax.ShapeDtypeStruct(_shape(kind, shape, batch, heads), dtype) for (kind, shape), dtype in out_blocks],
      grid=(batch, heads),
      in_specs=[_spec(*block) for block in in_blocks],
      out_specs=[_spec(*block) for block, _ in out_blocks],
      compiler_params=params,
      interpret=use_interpret(),
      name=name,
  )(*operands)


def _spec(kind: str, shape: tuple) -> pl.BlockSpec:
  """The block of program (b, h): of a "token" operand [B, T, H, ...] its [T, ...], of a "head" one [B, H, ...] its
  [...]."""
  if kind == "token":
    return pl.BlockSpec((None, shape[0], None, *shape[1:]), lambda b, h: (b, 0, h) + (0,) * (len(shape) - 1))
  return pl.BlockSpec((None, None, *shape), lambda b, h: (b, h) + (0,) * len(shape))


def _shape(kind: str, shape: tuple, batch: int, heads: int) -> tuple:
  """The whole operand's shape for `_spec(kind, shape)`."""
  if kind == "token":
    return (batch, shape[0], heads, *shape[1:])
  return (batch, heads, *shape)


def _inputs(q, k, v, g, beta):
  """The kernels' views of the inputs (free reshapes) and their blocks: q, k [B, T, H, Dk, 1]; v [B, T, H, 1, Dv];
  g, beta [B, T, H, 1, 1]."""
  length, key_dim, value_dim = q.shape[1], q.shape[3], v.shape[3]
  operands = [q[..., None], k[..., None], v[..., None, :], g[..., None, None], beta[..., None, None]]
  blocks = [("token", (length, key_dim, 1))] * 2 + [("token", (length, 1, value_dim))] + [("token", (length, 1, 1))] * 2
  return operands, blocks


def _forward(q, k, v, g, beta, state, interval, num_warps, save_checkpoints):
  length, key_dim, value_dim = q.shape[1], q.shape[3], v.shape[3]
  operands, blocks = _inputs(q, k, v, g, beta)
  state_block = ("head", (key_dim, value_dim))
  outputs = [(("token", (length, 1, value_dim)), q.dtype), (state_block, state.dtype)]
  if save_checkpoints:
    outputs.append((("head", (-(-length // interval), key_dim, value_dim)), state.dtype))
  kernel = functools.partial(_forward_kernel, interval=interval, scale=1.0 / math.sqrt(key_dim))
  results = _per_head_call(kernel, "gated_delta_forward", operands + [state], blocks + [state_block], outputs,
                           num_warps=num_warps)
  return results[0][..., 0, :], results[1], (results[2] if save_checkpoints else None)


def _backward(q, k, v, g, beta, checkpoints, do, dfinal, interval, num_warps):
  length, key_dim, value_dim = q.shape[1], q.shape[3], v.shape[3]
  operands, blocks = _inputs(q, k, v, g, beta)
  state_block, dtype = ("head", (key_dim, value_dim)), dfinal.dtype
  outputs = [(block, x.dtype) for block, x in zip(blocks, (q, k, v, g, beta))]
  outputs += [(state_block, dtype), (("head", (interval, key_dim, value_dim)), dtype)]
  kernel = functools.partial(_backward_kernel, interval=interval, scale=1.0 / math.sqrt(key_dim))
  dq, dk, dv, dg, dbeta, dstate, _ = _per_head_call(
      kernel, "gated_delta_backward", operands + [checkpoints, do[..., None, :], dfinal],
      blocks + [("head", checkpoints.shape[2:]), ("token", (length, 1, value_dim)), state_block], outputs,
      num_warps=num_warps)
  return (dq[..., 0], dk[..., 0], dv[..., 0, :], dg[..., 0, 0], dbeta[..., 0, 0], dstate)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _gated_delta(q, k, v, g, beta, state, interval, num_warps):
  o, final, _ = _forward(q, k, v, g, beta, state, interval, num_warps, save_checkpoints=False)
  return o, final


def _gated_delta_fwd(q, k, v, g, beta, state, interval, num_warps):
  o, final, checkpoints = _forward(q, k, v, g, beta, state, interval, num_warps, save_checkpoints=True)
  return (o, final), (q, k, v, g, beta, checkpoints)


def _gated_delta_bwd(interval, num_warps, residuals, cotangents):
  q, k, v, g, beta, checkpoints = residuals
  do, dfinal = cotangents
  return _backward(q, k, v, g, beta, checkpoints, do, dfinal.astype(checkpoints.dtype), interval, num_warps)


_gated_delta.defvjp(_gated_delta_fwd, _gated_delta_bwd)


@register("pallas", "gated_delta")
def gated_delta_fused(q, k, v, g, beta, state=None, *, interval: int = 16, num_warps: int | None = None):
  """`ops.gated_delta_rule.gated_delta_recurrent` as Pallas kernels (forward and backward): same arguments, same
  results, differentiable in every input.

  Args:
    q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; g (log forget gate ≤ 0), beta: [B, T, H]; state: [B, H, Dk, Dv] or None
      (zeros).
    interval: tokens between the forward's saved states: the backward recomputes one interval at a time.
    num_warps: GPU warps per program (default: one per 1,024 state entries).
  Returns o [B, T, H, Dv] in q's dtype and the final state [B, H, Dk, Dv] (f32; f64 for f64 inputs).
  """
  if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3] or g.shape != q.shape[:3] or beta.shape != g.shape:
    raise ValueError(f"expected q, k [B, T, H, Dk], v [B, T, H, Dv], g, beta [B, T, H]; got q {q.shape}, k {k.shape},"
                     f" v {v.shape}, g {g.shape}, beta {beta.shape}")
  batch, length, heads, key_dim = q.shape
  value_dim = v.shape[-1]
  if length == 0:
    raise ValueError(f"expected at least one token, got q of shape {q.shape}")
  if reason := unsupported_reason(key_dim, value_dim):
    raise ValueError(f"impl='pallas' cannot run this gated delta rule: {reason}")
  if not isinstance(interval, int) or interval < 1:
    raise ValueError(f"interval must be a positive int, got {interval!r}")
  dtype = compute_dtype(q, k, v, g, beta, state)
  if state is None:
    state = jnp.zeros((batch, heads, key_dim, value_dim), dtype)
  elif state.shape != (batch, heads, key_dim, value_dim):
    raise ValueError(f"state must have shape [B, H, Dk, Dv] = {(batch, heads, key_dim, value_dim)}, got {state.shape}")
  return _gated_delta(q, k, v, g, beta, state.astype(dtype), interval, num_warps)
