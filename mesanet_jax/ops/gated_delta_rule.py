"""The gated delta rule (Gated DeltaNet's operator): a token-by-token reference and a chunkwise (WY) form.

Per batch element and head, with state S [Dk, Dv], log forget gate g_t ≤ 0 and input gate β_t:

    S_t = e^{g_t} (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ          o_t = S_tᵀ q_t / √Dk

Chunkwise, with local cumulative log decay G and start state S_0, the corrections u_s = β_s (v_s − (e^{g_s} S_{s−1})ᵀ k_s)
solve a unit lower-triangular system (I + L) U = βV − (β e^G K) S_0 with L_sr = β_s e^{G_s−G_r} k_s·k_r (r < s), so

    U = T βV − T (β e^G K) S_0,  T = (I + L)⁻¹      O = (Q e^G) S_0 + (Q Kᵀ ⊙ D) U
    S_C = e^{G_C} S_0 + (K ⊙ e^{G_C−G})ᵀ U

with D_ts = e^{G_t−G_s} [s ≤ t]. Everything but the S-dependent products runs for all chunks in parallel; a `lax.scan`
carries S. The triangular system is solved one of two ways (`triangular=`): "solve" (`solve_triangular`: cuBLAS's
batched trsm on GPU, XLA's blocked expansion elsewhere) or "inverse" (T formed by `unit_lower_inverse`, matmuls only,
as flash-linear-attention forms it; then U takes two matmuls). All math is f32 (f64 under x64 for f64 inputs);
outputs are returned in q's dtype. Plain XLA, differentiated by autodiff.
"""
import jax
import jax.numpy as jnp
from jax import lax

from mesanet_jax.ops.inputs import compute_dtype

_HIGHEST = lax.Precision.HIGHEST
TRIANGULAR = ("solve", "inverse")


def gated_delta_step(q, k, v, g, beta, state):
  """One token. q, k: [B, H, Dk]; v: [B, H, Dv]; g, beta: [B, H]; state: [B, H, Dk, Dv] f32.

  Returns o [B, H, Dv] in q's dtype and the new state (compute dtype, f32 for f32/bf16 inputs).
  """
  dtype = compute_dtype(q, k, v, g, beta, state)
  q32, k32, v32, g, beta = (x.astype(dtype) for x in (q, k, v, g, beta))
  decayed = jnp.exp(g)[..., None, None] * state.astype(dtype)
  error = v32 - jnp.einsum("bhkv,bhk->bhv", decayed, k32, precision=_HIGHEST)
  state = decayed + beta[..., None, None] * k32[..., :, None] * error[..., None, :]
  o = jnp.einsum("bhkv,bhk->bhv", state, q32, precision=_HIGHEST) / jnp.sqrt(q.shape[-1]).astype(dtype)
  return o.astype(q.dtype), state


def _zero_state(q, v):
  return jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), compute_dtype(q, v))


def gated_delta_recurrent(q, k, v, g, beta, state=None):
  """Reference: `gated_delta_step` scanned over T. q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; g, beta: [B, T, H]."""
  state = _zero_state(q, v) if state is None else state

  def step(s, token):
    o, s = gated_delta_step(*token, s)
    return s, o

  state, o = lax.scan(step, state, tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta)))
  return jnp.moveaxis(o, 0, 1), state


def unit_lower_inverse(lower: jax.Array) -> jax.Array:
  """(I + L)⁻¹ for strictly lower-triangular L [..., C, C], by recursive 2 × 2 block inversion with matmuls only:

      [[A, 0], [B, D]]⁻¹ = [[A⁻¹, 0], [−D⁻¹ B A⁻¹, D⁻¹]]

  starting from the unit diagonal (1 × 1 blocks) and doubling the block size log₂ C times (C padded to a power of two
  with zeros, which leave the leading block's inverse unchanged). ~2C³/3 multiply-adds per matrix, each level one
  batched matmul pair over the block pairs; as accurate as substitution here (tested against the f64 solve).
  """
  size = lower.shape[-1]
  padded = 1 << (size - 1).bit_length()
  batch = lower.shape[:-2]
  lower = jnp.pad(lower, [(0, 0)] * len(batch) + [(0, padded - size)] * 2)
  inverse = jnp.ones(batch + (padded, 1, 1), lower.dtype)  # [..., blocks, b, b]: the diagonal blocks' inverses
  block = 1
  while block < padded:
    pairs = padded // (2 * block)
    tiles = lower.reshape(batch + (pairs, 2, block, pairs, 2, block))
    below = jnp.moveaxis(jnp.diagonal(tiles[..., :, 1, :, :, 0, :], axis1=-4, axis2=-2), -1, -3)  # B: [..., P, b, b]
    first, second = jnp.moveaxis(inverse.reshape(batch + (pairs, 2, block, block)), -3, 0)  # A⁻¹, D⁻¹
    coupling = -jnp.matmul(second, jnp.matmul(below, first, precision=_HIGHEST), precision=_HIGHEST)
    top = jnp.concatenate([first, jnp.zeros_like(first)], axis=-1)
    inverse = jnp.concatenate([top, jnp.concatenate([coupling, second], axis=-1)], axis=-2)
    block *= 2
  return inverse.reshape(batch + (padded, padded))[..., :size, :size]


def gated_delta_chunked(q, k, v, g, beta, state=None, *, chunk_size: int = 64, triangular: str = "solve"):
  """Chunkwise gated delta rule; same signature and result as `gated_delta_recurrent` (T padded internally).
  triangular: how the chunk's unit lower-triangular system is solved, one of `TRIANGULAR` (module docstring)."""
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  if triangular not in TRIANGULAR:
    raise ValueError(f"triangular must be one of {TRIANGULAR}, got {triangular!r}")
  batch, length, heads, key_dim = q.shape
  if length == 0:
    raise ValueError(f"expected at least one token, got q of shape {q.shape}")
  dtype = compute_dtype(q, k, v, g, beta, state)
  state = _zero_state(q, v) if state is None else state.astype(dtype)
  pad = -length % chunk_size
  chunks = (length + pad) // chunk_size

  def to_chunks(x):
    """[B, T, H, ...] -> [N, B, H, C, ...]; padded tokens have k = 0, β = 0, g = 0 and change nothing."""
    x = jnp.pad(x.astype(dtype), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(batch, chunks, chunk_size, heads, *x.shape[3:])
    return jnp.moveaxis(jnp.moveaxis(x, 3, 2), 1, 0)

  q_c, k_c, v_c, g_c, beta_c = (to_chunks(x) for x in (q, k, v, g, beta))
  q_c = q_c / jnp.sqrt(key_dim).astype(dtype)
  log_decay = jnp.cumsum(g_c, axis=-1)  # G, [N, B, H, C]
  causal = jnp.tril(jnp.ones((chunk_size, chunk_size), bool))
  diff = log_decay[..., :, None] - log_decay[..., None, :]
  decay = jnp.where(causal, jnp.exp(jnp.where(causal, diff, 0.0)), 0.0)  # D, masked before exp
  k_beta = k_c * beta_c[..., None]
  strict = decay * ~jnp.eye(chunk_size, dtype=bool)
  lower = jnp.einsum("...sd,...rd->...sr", k_beta, k_c, precision=_HIGHEST) * strict  # L
  k_decayed, v_beta = k_beta * jnp.exp(log_decay)[..., None], v_c * beta_c[..., None]
  if triangular == "inverse":
    inverse = unit_lower_inverse(lower)  # T
    w, u0 = (jnp.matmul(inverse, x, precision=_HIGHEST) for x in (k_decayed, v_beta))
  else:  # T (β e^G K) and T βV as one triangular solve of both right-hand sides side by side (one batched solve)
    eye = jnp.eye(chunk_size, dtype=dtype)
    solved = jax.scipy.linalg.solve_triangular(eye + lower, jnp.concatenate([k_decayed, v_beta], axis=-1), lower=True,
                                               unit_diagonal=True)
    w, u0 = jnp.split(solved, [key_dim], axis=-1)
  scores = jnp.einsum("...td,...sd->...ts", q_c, k_c, precision=_HIGHEST) * decay
  q_decayed = q_c * jnp.exp(log_decay)[..., None]
  to_end = jnp.exp(log_decay[..., -1:] - log_decay)[..., None]
  k_to_end = k_c * to_end

  def step(s, chunk):
    w_n, u0_n, scores_n, q_n, k_n, total = chunk
    u = u0_n - jnp.einsum("...ck,...kv->...cv", w_n, s, precision=_HIGHEST)
    o = (jnp.einsum("...ck,...kv->...cv", q_n, s, precision=_HIGHEST)
         + jnp.einsum("...ts,...sv->...tv", scores_n, u, precision=_HIGHEST))
    s = total[..., None, None] * s + jnp.einsum("...ck,...cv->...kv", k_n, u, precision=_HIGHEST)
    return s, o

  state, o = lax.scan(step, state, (w, u0, scores, q_decayed, k_to_end, jnp.exp(log_decay[..., -1])))
  o = jnp.moveaxis(o, 0, 1)  # [B, N, H, C, Dv]
  o = jnp.moveaxis(o, 3, 2).reshape(batch, chunks * chunk_size, heads, -1)[:, :length]
  return o.astype(q.dtype), state
