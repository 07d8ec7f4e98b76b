"""The Mesa operator of `mesa_chunked(impl="pallas")`: `chunked._Operator`'s stages, each one Pallas kernel.

The states live at every chunk boundary ([B, H, N+1, ...], `states.chunk_states`), so the start and the end state of
chunk n are entries n and n+1 of one array. H_kk is kept transposed (Sᵀ), the layout the solve kernel reads: its
increments Σ w k kᵀ are symmetric, so scanning from the transposed initial state gives Sᵀ at no cost, also for a
non-symmetric initial state. Its gradient is kept transposed likewise.
"""
import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from mesanet_jax.ops.cg import rowdot
from mesanet_jax.ops.inputs import MesaState
from pallas_kernels.mesa_cg.gradients import chunk_gradients
from pallas_kernels.mesa_cg.read import causal_read
from pallas_kernels.mesa_cg.solve import chunked_cg_solve
from pallas_kernels.mesa_cg.states import chunk_states


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PallasOperator:
  """A_t = H_kk[t] + Λ for every token, with its boundary states; the methods of `chunked._Operator`."""
  k: jax.Array  # [B, H, N, C, Dk]
  v: jax.Array  # [B, H, N, C, Dv]
  log_decay: jax.Array  # [B, H, N, C]
  beta: jax.Array  # [B, H, N, C]
  lam: jax.Array  # [H, Dk]
  bounds_kk_t: jax.Array  # H_kkᵀ at every chunk boundary, [B, H, N+1, Dk, Dk]
  bounds_kv: jax.Array  # H_kv at every chunk boundary, [B, H, N+1, Dk, Dv]
  precision: lax.Precision = dataclasses.field(metadata=dict(static=True))

  @classmethod
  def build(cls, k, v, log_decay, beta, lam, state: MesaState, precision: lax.Precision):
    to_end = jnp.exp(log_decay[..., -1:] - log_decay) * beta
    chunk_decay = jnp.exp(log_decay[..., -1])
    bounds_kk_t = chunk_states(k, k, to_end, chunk_decay, jnp.matrix_transpose(state.h_kk), precision=precision)
    bounds_kv = chunk_states(k, v, to_end, chunk_decay, state.h_kv, precision=precision)
    return cls(k, v, log_decay, beta, lam, bounds_kk_t, bounds_kv, precision)

  @property
  def final(self) -> MesaState:
    return MesaState(jnp.matrix_transpose(self.bounds_kk_t[:, :, -1]), self.bounds_kv[:, :, -1])

  def solve(self, rhs, cg_steps: int, cg_init: str):
    return chunked_cg_solve(rhs, self.k, self.log_decay, self.beta, self.lam, self.bounds_kk_t, cg_steps=cg_steps,
                            cg_init=cg_init, precision=self.precision)

  def output(self, x):
    return causal_read(x, self.k, self.v, self.bounds_kv, self.log_decay, self.beta, precision=self.precision)

  def adjoint_rhs(self, do):
    return causal_read(do, self.v, self.k, self.bounds_kv, self.log_decay, self.beta, transpose_states=True,
                       precision=self.precision)

  def state_gradients(self, x, y, do, d_final: MesaState):
    """((the gradients w.r.t. H_kkᵀ and H_kv at every boundary), MesaState of the initial state's)."""
    weights = jnp.exp(self.log_decay)
    chunk_decay = jnp.exp(self.log_decay[..., -1])
    d_bounds_kk_t = chunk_states(x, y, -weights, chunk_decay, jnp.matrix_transpose(d_final.h_kk), reverse=True,
                                 precision=self.precision)
    d_bounds_kv = chunk_states(x, do, weights, chunk_decay, d_final.h_kv, reverse=True, precision=self.precision)
    return (d_bounds_kk_t, d_bounds_kv), MesaState(jnp.matrix_transpose(d_bounds_kk_t[:, :, 0]), d_bounds_kv[:, :, 0])

  def token_gradients(self, x, y, do, u, d_states):
    """dk, dv (kernel), dβ (kernel) and d log-decay: the scaling of everything decayed up to t (through the causal
    read H_kk[t] x_t) minus what token t added itself, plus, at a chunk's last row, the scaling of the state handed
    on, ⟨D_next, S_next⟩ (`chunked._Operator.token_gradients` derives the same)."""
    d_bounds_kk_t, d_bounds_kv = d_states
    dk, dv, dbeta = chunk_gradients(self.k, self.v, x, y, do, self.log_decay, self.beta, *d_states,
                                    precision=self.precision)
    read_kk = causal_read(x, self.k, self.k, self.bounds_kk_t, self.log_decay, self.beta, precision=self.precision)
    d_log_decay = -rowdot(y, read_kk) + rowdot(x, u) - self.beta * dbeta
    handed_on = (jnp.sum(d_bounds_kk_t[:, :, 1:] * self.bounds_kk_t[:, :, 1:], axis=(-2, -1))
                 + jnp.sum(d_bounds_kv[:, :, 1:] * self.bounds_kv[:, :, 1:], axis=(-2, -1)))
    return dk, dv, d_log_decay.at[..., -1].add(handed_on), dbeta
