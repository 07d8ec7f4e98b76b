"""Chunkwise-parallel Mesa: CG over all T systems at once, differentiated implicitly (one adjoint CG solve).

Split T into N chunks of C tokens. Within chunk n, with start state S_n (the decayed sum before the chunk), local
cumulative log-decay G_t (sum of g over the chunk up to t) and W_ts = e^{G_t − G_s} [s ≤ t], every row t of a block X
is multiplied by its own system matrix A_t = H_kk[t] + Λ as

    A X = (X ⊙ e^G) S_n + ((X Kᵀ) ⊙ W ⊙ β_s) K + X ⊙ λ                 ("causal read", `_read`)

so one CG step over all T systems costs two matmuls with the states and two C×C products per chunk. The chunk start
states come from one `lax.scan` over chunks. The backward pass solves the adjoint systems A_t y_t = H_kv[t] do_t with the
same operator, scans the state gradients backwards over chunks, and turns them into input gradients with the
time-reversed counterpart of the read (`_write`). No CG iterate is stored: the residuals are the inputs and x.
DESIGN.md §1 derives the formulas; docs in each helper give the shapes.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from mesanet_jax.ops.cg import conjugate_gradient, rowdot
from mesanet_jax.ops.inputs import MesaState, check_cg_options, check_inputs, compute_dtype, initial_guess, zero_state

IMPLS = ("xla", "pallas")
PRECISIONS = ("highest", "high", "default")


def _decay_mask(log_decay: jax.Array) -> jax.Array:
  """W_ts = e^{G_t − G_s} for s ≤ t, else 0.  [B, H, N, C] -> [B, H, N, C, C]; every entry is in [0, 1]."""
  causal = jnp.tril(jnp.ones((log_decay.shape[-1],) * 2, bool))
  diff = log_decay[..., :, None] - log_decay[..., None, :]
  return jnp.where(causal, jnp.exp(jnp.where(causal, diff, 0)), 0)


def _scan_chunks(increments: jax.Array, chunk_decay: jax.Array, initial: jax.Array, *, reverse: bool):
  """Runs carry ← chunk_decay·carry + increment over the chunk axis (backwards in time if `reverse`).

  increments: [B, H, N, D, E]; chunk_decay: [B, H, N]; initial: [B, H, D, E].
  Returns the carry as it stands before each chunk is added, [B, H, N, D, E], and the last carry, [B, H, D, E].
  """
  def step(carry, chunk):
    increment, decay = chunk
    return decay[..., None, None] * carry + increment, carry

  xs = (jnp.moveaxis(increments, 2, 0), jnp.moveaxis(chunk_decay, 2, 0))
  last, before = lax.scan(step, initial, xs, reverse=reverse)
  return jnp.moveaxis(before, 0, 2), last


def _chunk_states(keys, values, log_decay, beta, initial, precision):
  """Start state of every chunk of Σ decay·β k valueᵀ, and the final state.

  keys: [B, H, N, C, D]; values: [B, H, N, C, E]; log_decay, beta: [B, H, N, C]; initial: [B, H, D, E].
  """
  to_end = jnp.exp(log_decay[..., -1:] - log_decay) * beta
  increments = jnp.einsum("bhncd,bhnce->bhnde", keys * to_end[..., None], values, precision=precision)
  return _scan_chunks(increments, jnp.exp(log_decay[..., -1]), initial, reverse=False)


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Operator:
  """A_t = H_kk[t] + Λ for every token of the chunked sequence, with the chunk states it needs (XLA).

  The stages of the forward and backward pass are its methods; `pallas_kernels.mesa_cg.PallasOperator` has the same
  methods, each one Pallas kernel. A pytree, so a stage can be jitted alone (benchmarks/kernel_bench.py does).
  """
  k: jax.Array  # [B, H, N, C, Dk]
  v: jax.Array  # [B, H, N, C, Dv]
  log_decay: jax.Array  # [B, H, N, C]
  beta: jax.Array  # [B, H, N, C]
  lam: jax.Array  # [H, Dk]
  decay_mask: jax.Array  # W, [B, H, N, C, C]
  mask: jax.Array  # W ⊙ β_s, [B, H, N, C, C]
  states_kk: jax.Array  # chunk start states, [B, H, N, Dk, Dk]
  states_kv: jax.Array  # [B, H, N, Dk, Dv]
  final: MesaState
  precision: lax.Precision = dataclasses.field(metadata=dict(static=True))

  @classmethod
  def build(cls, k, v, log_decay, beta, lam, state: MesaState, precision: lax.Precision):
    decay_mask = _decay_mask(log_decay)
    states_kk, final_kk = _chunk_states(k, k, log_decay, beta, state.h_kk, precision)
    states_kv, final_kv = _chunk_states(k, v, log_decay, beta, state.h_kv, precision)
    return cls(k, v, log_decay, beta, lam, decay_mask, decay_mask * beta[..., None, :], states_kk, states_kv,
               MesaState(final_kk, final_kv), precision)

  def read_kk(self, x):
    """H_kk[t] x_t for every row.  [B, H, N, C, Dk] -> same.

    A row-form read computes x_tᵀ H; reading the transposed states gives H x_t exactly, also for a non-symmetric
    initial state passed by the caller, so the backward's D_t = −y_t x_tᵀ is the gradient of what was computed.
    """
    return self.read(x, self.k, self.k, jnp.matrix_transpose(self.states_kk))

  def read(self, x, keys, values, states):
    """Causal read with this operator's decays and mask (see `_read`)."""
    return _read(x, keys, values, states, self.log_decay, self.mask, self.precision)

  def write(self, z, keys, values, next_states):
    """Time-reversed read with this operator's decays (see `_write`)."""
    return _write(z, keys, values, next_states, self.log_decay, self.decay_mask, self.precision)

  def matvec(self, x):
    return self.read_kk(x) + self.lam[:, None, None, :] * x

  def solve(self, rhs, cg_steps: int, cg_init: str):
    """x_t = A_t⁻¹ rhs_t for all rows by CG, starting from the Jacobi guess or zero."""
    diag_states = jnp.diagonal(self.states_kk, axis1=-2, axis2=-1)[..., None, :]
    in_chunk = jnp.einsum("bhnts,bhnsd->bhntd", self.mask, self.k * self.k, precision=self.precision)
    diagonal = jnp.exp(self.log_decay)[..., None] * diag_states + in_chunk + self.lam[:, None, None, :]
    x, _ = conjugate_gradient(self.matvec, rhs, initial_guess(rhs, diagonal, cg_init), steps=cg_steps)
    return x

  def output(self, x):
    """o_t = H_kv[t]ᵀ x_t.  [B, H, N, C, Dk] -> [B, H, N, C, Dv]."""
    return self.read(x, self.k, self.v, self.states_kv)

  def adjoint_rhs(self, do):
    """u_t = H_kv[t] do_t, the right-hand side of the adjoint solve.  [B, H, N, C, Dv] -> [B, H, N, C, Dk]."""
    return self.read(do, self.v, self.k, jnp.matrix_transpose(self.states_kv))

  def state_gradients(self, x, y, do, d_final: MesaState):
    """Gradients w.r.t. the state after each chunk (D_t = −y_t x_tᵀ on H_kk[t], x_t do_tᵀ on H_kv[t]), scanned
    backwards: ((d_next_kk [B, H, N, Dk, Dk], d_next_kv [B, H, N, Dk, Dv]), MesaState of the initial state's)."""
    weighted = jnp.exp(self.log_decay)[..., None]
    chunk_decay = jnp.exp(self.log_decay[..., -1])
    outer = functools.partial(jnp.einsum, "bhncd,bhnce->bhnde", precision=self.precision)
    d_next_kk, d_initial_kk = _scan_chunks(-outer(y * weighted, x), chunk_decay, d_final.h_kk, reverse=True)
    d_next_kv, d_initial_kv = _scan_chunks(outer(x * weighted, do), chunk_decay, d_final.h_kv, reverse=True)
    return (d_next_kk, d_next_kv), MesaState(d_initial_kk, d_initial_kv)

  def token_gradients(self, x, y, do, u, d_states):
    """dk, dv, d log_decay, dβ from the solutions x, y, do, u = H_kv do and `state_gradients`' per-chunk part."""
    d_next_kk, d_next_kv = d_states
    k, beta = self.k, self.beta
    # Row s of each: the total state gradient at token s applied to k_s or v_s.
    hkk_k = self.write(k, x, -y, jnp.matrix_transpose(d_next_kk))
    hkk_t_k = self.write(k, -y, x, d_next_kk)
    hkv_v = self.write(self.v, do, x, jnp.matrix_transpose(d_next_kv))
    hkv_t_k = self.write(k, x, do, d_next_kv)

    dk = beta[..., None] * (hkk_k + hkk_t_k + hkv_v)
    dv = beta[..., None] * hkv_t_k
    dbeta = rowdot(k, hkk_k) + rowdot(k, hkv_v)
    # ∂L/∂G_t: scaling of everything decayed up to t, minus what token t itself added (β_t dβ_t) ...
    d_log_decay = -rowdot(y, self.read_kk(x)) + rowdot(x, u) - beta * dbeta
    # ... and at the chunk's last row, the scaling of the state handed to the next chunk.
    next_kk = jnp.concatenate([self.states_kk[:, :, 1:], self.final.h_kk[:, :, None]], axis=2)
    next_kv = jnp.concatenate([self.states_kv[:, :, 1:], self.final.h_kv[:, :, None]], axis=2)
    handed_on = jnp.sum(d_next_kk * next_kk, axis=(-2, -1)) + jnp.sum(d_next_kv * next_kv, axis=(-2, -1))
    return dk, dv, d_log_decay.at[..., -1].add(handed_on), dbeta


def operator_class(impl: str):
  """The operator of `impl`: `_Operator` (XLA) or the Pallas kernels' `PallasOperator`, with the same methods."""
  if impl == "pallas":
    from pallas_kernels.mesa_cg import PallasOperator  # imported here: the kernels import this package
    return PallasOperator
  return _Operator


def _core_forward(q, k, v, log_decay, beta, lam, state, cg_steps, cg_init, precision, impl):
  op = operator_class(impl).build(k, v, log_decay, beta, lam, state, precision)
  x = op.solve(q, cg_steps, cg_init)
  return (op.output(x), op.final), (k, v, log_decay, beta, lam, state, x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _chunked_core(q, k, v, log_decay, beta, lam, state, cg_steps, cg_init, precision, impl):
  """Chunk-major core: q, k [B, H, N, C, Dk]; v [B, H, N, C, Dv]; log_decay, beta [B, H, N, C]; lam [H, Dk]."""
  return _core_forward(q, k, v, log_decay, beta, lam, state, cg_steps, cg_init, precision, impl)[0]


def _core_backward(cg_steps, cg_init, precision, impl, residuals, cotangents):
  k, v, log_decay, beta, lam, state, x = residuals
  do, d_final = cotangents
  op = operator_class(impl).build(k, v, log_decay, beta, lam, state, precision)
  u = op.adjoint_rhs(do)
  y = op.solve(u, cg_steps, cg_init)  # adjoint solve
  d_states, d_initial = op.state_gradients(x, y, do, d_final)
  dk, dv, d_log_decay, dbeta = op.token_gradients(x, y, do, u, d_states)
  dlam = -jnp.sum(y * x, axis=(0, 2, 3))
  return y, dk, dv, d_log_decay, dbeta, dlam, d_initial


_chunked_core.defvjp(_core_forward, _core_backward)


def mesa_chunked(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    lam: jax.Array,
    state: MesaState | None = None,
    *,
    chunk_size: int = 64,
    cg_steps: int = 30,
    impl: str = "xla",
    cg_init: str = "jacobi",
    matmul_precision: str = "highest",
) -> tuple[jax.Array, MesaState]:
  """Mesa layer over a whole sequence by chunkwise-parallel CG, with an implicit (adjoint CG) custom VJP.

  Args:
    q, k: [B, T, H, Dk] (L2-normalised by the layer); v: [B, T, H, Dv]; g (log forget gate ≤ 0), beta: [B, T, H];
    lam: [H, Dk] regulariser > 0; state: optional MesaState (h_kk [B, H, Dk, Dk], h_kv [B, H, Dk, Dv]) before token 0.
    chunk_size: C; T need not be a multiple (the sequence is padded with tokens that change nothing).
    cg_steps: fixed CG steps, forward and adjoint.
    impl: "xla", or "pallas": every stage (chunk states, CG solves, reads, gradient accumulation) runs as a Pallas
      kernel (Triton on GPU, Mosaic on TPU, interpret mode on CPU); needs C, Dk, Dv powers of two >= 16.
    cg_init: "jacobi" (x0 = q / diag(A_t), the paper's choice) or "zero" (flash-linear-attention's training kernels).
    matmul_precision: `lax.Precision` name of every matmul: "highest" keeps them f32 as the paper does; "default"
      lets XLA use TF32 on GPU and bf16 passes on TPU (faster, ~1e-3 relative error).

  Returns:
    o: [B, T, H, Dv] in q's dtype; the final MesaState in the compute dtype (f32 for f32/bf16 inputs).
    Gradients flow to q, k, v, g, beta, lam and the initial state; memory is O(B·H·(T·D + T/C·D²)).
  """
  batch, length, heads, key_dim, value_dim = check_inputs(q, k, v, g, beta, lam, state, per_token=True)
  check_cg_options(cg_steps, cg_init)
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if impl == "pallas":
    from pallas_kernels.mesa_cg import unsupported_reason  # imported here: the kernels import this package
    if reason := unsupported_reason(chunk_size, key_dim, value_dim):
      raise ValueError(f"impl='pallas' cannot run this input: {reason}; use impl='xla'")
  if matmul_precision not in PRECISIONS:
    raise ValueError(f"matmul_precision must be one of {PRECISIONS}, got {matmul_precision!r}")
  dtype = compute_dtype(q, k, v, g, beta, lam, *(state or ()))
  state = zero_state(batch, heads, key_dim, value_dim, dtype) if state is None else MesaState(
      state.h_kk.astype(dtype), state.h_kv.astype(dtype))
  pad = -length % chunk_size
  num_chunks = (length + pad) // chunk_size

  def to_chunks(x: jax.Array) -> jax.Array:
    """[B, T, H, ...] -> [B, H, N, C, ...], zero-padded (padded tokens have k = 0, β = 0, g = 0)."""
    x = jnp.pad(x.astype(dtype), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = jnp.moveaxis(x, 2, 1)
    return x.reshape(batch, heads, num_chunks, chunk_size, *x.shape[3:])

  log_decay = jnp.cumsum(to_chunks(g), axis=-1)
  o, final = _chunked_core(
      to_chunks(q), to_chunks(k), to_chunks(v), log_decay, to_chunks(beta), lam.astype(dtype), state, cg_steps, cg_init,
      lax.Precision(matmul_precision), impl)
  o = o.reshape(batch, heads, num_chunks * chunk_size, value_dim)[:, :, :length]
  return jnp.moveaxis(o, 1, 2).astype(q.dtype), final
