"""The chunked Mesa operator in plain XLA: every stage of `mesa_chunked` as einsums over chunks (`impl="xla"`).

Within chunk n, with start state S_n (the decayed sum before the chunk), local cumulative log-decay G_t (sum of g over
the chunk up to t) and W_ts = e^{G_t − G_s} [s ≤ t], every row t of a block X is multiplied by its own system matrix
A_t = H_kk[t] + Λ as

    A X = (X ⊙ e^G) S_n + ((X Kᵀ) ⊙ W ⊙ β_s) K + X ⊙ λ                 ("causal read", `_read`)

so one CG step over all T systems costs two matmuls with the states and two C×C products per chunk. The boundary
states (`operator.BoundaryStates`) come from one `lax.scan` over chunks. The backward pass solves the adjoint systems
A_t y_t = H_kv[t] do_t with the same operator, scans the state gradients backwards over chunks, and turns them into
input gradients with the time-reversed counterpart of the read (`_write`). DESIGN.md §1 derives the formulas.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from mesanet_jax.ops.cg import rowdot
from mesanet_jax.ops.inputs import CGOptions, MesaState, solve_from_diagonal
from mesanet_jax.ops.operator import BoundaryStates, ChunkedSequence, register


def _decay_mask(log_decay: jax.Array) -> jax.Array:
  """W_ts = e^{G_t − G_s} for s ≤ t, else 0.  [B, H, N, C] -> [B, H, N, C, C]; every entry is in [0, 1]."""
  causal = jnp.tril(jnp.ones((log_decay.shape[-1],) * 2, bool))
  diff = log_decay[..., :, None] - log_decay[..., None, :]
  return jnp.where(causal, jnp.exp(jnp.where(causal, diff, 0)), 0)


def scan_chunks(increments: jax.Array, chunk_decay: jax.Array, initial: jax.Array, *, reverse: bool) -> jax.Array:
  """The carry of carry ← chunk_decay·carry + increment at every chunk boundary, [B, H, N+1, D, E].

  increments: [B, H, N, D, E]; chunk_decay: [B, H, N]; initial: [B, H, D, E]. Entry n is initial plus the chunks
  before n, or, with `reverse`, plus the chunks from n on (entry N = initial), as `pallas_kernels`' `chunk_states`.
  """
  def step(carry, chunk):
    increment, decay = chunk
    carry = decay[..., None, None] * carry + increment
    return carry, carry

  xs = (jnp.moveaxis(increments, 2, 0), jnp.moveaxis(chunk_decay, 2, 0))
  _, after = lax.scan(step, initial, xs, reverse=reverse)
  bounds = [after, initial[None]] if reverse else [initial[None], after]
  return jnp.moveaxis(jnp.concatenate(bounds), 0, 2)


def _read(x, keys, values, states, log_decay, mask, precision):
  """Row t: e^{G_t} x_t S + Σ_{s≤t} mask_ts (x_t·keys_s) values_s, i.e. x_t times the state at t.

  x, keys: [B, H, N, C, D]; values: [B, H, N, C, E]; states: [B, H, N, D, E]; mask: [B, H, N, C, C].
  Returns [B, H, N, C, E].
  """
  inter = jnp.einsum("bhncd,bhnde->bhnce", x * jnp.exp(log_decay)[..., None], states, precision=precision)
  scores = jnp.einsum("bhntd,bhnsd->bhnts", x, keys, precision=precision) * mask
  return inter + jnp.einsum("bhnts,bhnse->bhnte", scores, values, precision=precision)


def _write(z, keys, values, next_states, log_decay, decay_mask, precision):
  """Row s: Σ_{t≥s} W_ts (keys_t·z_s) values_t + e^{G_last − G_s} z_s S_next: gradients flowing back to token s.

  z, keys: [B, H, N, C, D]; values: [B, H, N, C, E]; next_states: [B, H, N, D, E] (gradient w.r.t. the state after
  the chunk); decay_mask: W, [B, H, N, C, C]. Returns [B, H, N, C, E].
  """
  to_end = jnp.exp(log_decay[..., -1:] - log_decay)[..., None]
  inter = jnp.einsum("bhnsd,bhnde->bhnse", z * to_end, next_states, precision=precision)
  scores = jnp.einsum("bhntd,bhnsd->bhnts", keys, z, precision=precision) * decay_mask
  return inter + jnp.einsum("bhnts,bhnte->bhnse", scores, values, precision=precision)


def _starts(bounds: jax.Array) -> jax.Array:
  """The start state of every chunk: entries 0..N−1 of a boundary array."""
  return bounds[:, :, :-1]


def _ends(bounds: jax.Array) -> jax.Array:
  """The end state of every chunk: entries 1..N of a boundary array."""
  return bounds[:, :, 1:]


@register("xla", "operator")
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class XlaOperator(ChunkedSequence):
  """`operator.ChunkedOperator` in XLA. A pytree, so a stage can be jitted alone (benchmarks/kernel_bench.py)."""
  decay_mask: jax.Array  # W, [B, H, N, C, C]
  mask: jax.Array  # W ⊙ β_s, [B, H, N, C, C]

  @classmethod
  def build(cls, k, v, log_decay, beta, lam, state: MesaState, precision: lax.Precision):
    k, v = k.astype(log_decay.dtype), v.astype(log_decay.dtype)  # 16-bit rows (`chunked.row_dtype`) computed wide
    decay_mask = _decay_mask(log_decay)
    to_end = jnp.exp(log_decay[..., -1:] - log_decay) * beta
    chunk_decay = jnp.exp(log_decay[..., -1])
    increments = lambda values: jnp.einsum("bhncd,bhnce->bhnde", k * to_end[..., None], values, precision=precision)
    states = BoundaryStates(
        scan_chunks(increments(k), chunk_decay, jnp.matrix_transpose(state.h_kk), reverse=False),
        scan_chunks(increments(v), chunk_decay, state.h_kv, reverse=False))
    return cls(k, v, log_decay, beta, lam, states, precision, decay_mask=decay_mask,
               mask=decay_mask * beta[..., None, :])

  @staticmethod
  def unsupported_reason(chunk_size: int, key_dim: int, value_dim: int) -> None:
    """Any sizes."""
    del chunk_size, key_dim, value_dim

  @staticmethod
  def fastest_chunk_size(backend: str, device_kind: str, key_dim: int, value_dim: int, precision: str) -> None:
    """No preference: on an H200 C = 64 and 128 were within 1 % of each other (benchmarks/RESULTS.md), and the
    fast path runs this implementation only where nothing else runs, with the preset's chunk size."""
    del backend, device_kind, key_dim, value_dim, precision

  def read_kk(self, x):
    """H_kk[t] x_t for every row.  [B, H, N, C, Dk] -> same.

    A row-form read computes x_tᵀ S; reading the transposed states gives H x_t exactly, also for a non-symmetric
    initial state passed by the caller, so the backward's D_t = −y_t x_tᵀ is the gradient of what was computed.
    """
    return self.read(x, self.k, self.k, _starts(self.states.kk_t))

  def read(self, x, keys, values, states):
    """Causal read with this operator's decays and mask (see `_read`); states: the chunks' start states."""
    return _read(x, keys, values, states, self.log_decay, self.mask, self.precision)

  def write(self, z, keys, values, next_states):
    """Time-reversed read with this operator's decays (see `_write`)."""
    return _write(z, keys, values, next_states, self.log_decay, self.decay_mask, self.precision)

  def solve(self, rhs, cg: CGOptions):
    """x_t = A_t⁻¹ rhs_t for all rows by one CG (one loop over every row; it runs until the slowest row stops),
    starting from the Jacobi guess or zero, preconditioned by diag(A_t) or not. Returns x and the steps each row
    took."""
    rhs = rhs.astype(self.log_decay.dtype)
    diag_states = jnp.diagonal(_starts(self.states.kk_t), axis1=-2, axis2=-1)[..., None, :]
    in_chunk = jnp.einsum("bhnts,bhnsd->bhntd", self.mask, self.k * self.k, precision=self.precision)
    diagonal = jnp.exp(self.log_decay)[..., None] * diag_states + in_chunk + self.lam[:, None, None, :]
    return solve_from_diagonal(self.matvec, rhs, diagonal, cg)

  def output(self, x):
    return self.read(x, self.k, self.v, _starts(self.states.kv))

  def adjoint_rhs(self, do):
    return self.read(do, self.v, self.k, jnp.matrix_transpose(_starts(self.states.kv)))

  def state_gradients(self, x, y, do, d_final: MesaState) -> BoundaryStates:
    weighted = jnp.exp(self.log_decay)[..., None]
    chunk_decay = jnp.exp(self.log_decay[..., -1])
    outer = functools.partial(jnp.einsum, "bhncd,bhnce->bhnde", precision=self.precision)
    # Gradient w.r.t. H_kkᵀ: the transpose of D_t = −y_t x_tᵀ, i.e. −x_t y_tᵀ.
    return BoundaryStates(
        scan_chunks(-outer(x * weighted, y), chunk_decay, jnp.matrix_transpose(d_final.h_kk), reverse=True),
        scan_chunks(outer(x * weighted, do), chunk_decay, d_final.h_kv, reverse=True))

  def token_gradients(self, x, y, do, d_states: BoundaryStates):
    d_next_kk_t, d_next_kv = _ends(d_states.kk_t), _ends(d_states.kv)
    k, beta = self.k, self.beta
    # Row s of each: the total state gradient at token s applied to k_s or v_s.
    hkk_k = self.write(k, x, -y, d_next_kk_t)
    hkk_t_k = self.write(k, -y, x, jnp.matrix_transpose(d_next_kk_t))
    hkv_v = self.write(self.v, do, x, jnp.matrix_transpose(d_next_kv))
    hkv_t_k = self.write(k, x, do, d_next_kv)

    dk = beta[..., None] * (hkk_k + hkk_t_k + hkv_v)
    dv = beta[..., None] * hkv_t_k
    dbeta = rowdot(k, hkk_k) + rowdot(k, hkv_v)
    return dk, dv, dbeta, self.states.handed_on(d_states)
