"""The Mesa operator of `mesa_chunked(impl="pallas")`: `operator.ChunkedOperator`'s stages, each one Pallas kernel.

The states are `operator.BoundaryStates`, the layout the XLA operator shares: every chunk boundary ([B, H, N+1, ...],
`states.chunk_states` writes it), so the start and the end state of chunk n are entries n and n+1 of one array, which
the kernels address by their block index maps without a copy; H_kk (and its gradient) is kept transposed, the layout
the solve kernel reads.
"""
import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from mesanet_jax.ops.inputs import CGOptions, MesaState
from mesanet_jax.ops.operator import BoundaryStates, ChunkedSequence, chunk_major, register, token_major
from pallas_kernels.mesa_cg.gradients import chunk_gradients
from pallas_kernels.mesa_cg.gradients_hopper import hopper_chunk_gradients, use_hopper_gradients
from pallas_kernels.mesa_cg.gradients_hopper import unsupported_reason as hopper_gradients_reason
from pallas_kernels.mesa_cg.hopper import ROWS, is_hopper_kind, split_passes
from pallas_kernels.mesa_cg.params import unsupported_reason
from pallas_kernels.mesa_cg.read import causal_read
from pallas_kernels.mesa_cg.solve import chunked_cg_solve, fuses_reads
from pallas_kernels.mesa_cg.solve_hopper import fuses_read, hopper_cg_solve, use_hopper_solve
from pallas_kernels.mesa_cg.states import chunk_states_sharing_a


def _kernel_options(cg: CGOptions) -> dict:
  """The solve kernels' keyword arguments for `cg`."""
  return dict(cg_steps=cg.steps, cg_init=cg.init, cg_tol=cg.tol, cg_preconditioner=cg.preconditioner)


@register("pallas", "operator")
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PallasOperator(ChunkedSequence):
  """A_t = H_kk[t] + Λ for every token, with its boundary states; `operator.ChunkedOperator` in Pallas kernels."""

  unsupported_reason = staticmethod(unsupported_reason)

  @staticmethod
  def fastest_chunk_size(backend: str, device_kind: str, key_dim: int, value_dim: int, precision: str) -> int | None:
    """On GPUs 64 where the Hopper token-gradients kernel takes the sizes (sm_90, Dk and Dv 64 or 128, the
    precision's fp16 passes fitting shared memory): forward+backward 0.92× of C = 32, 0.88× with the chunk states
    saved (H200, B=8 T=2048 H=16 D=128, "default", tol 1e-4). Elsewhere 32: with the Triton kernels alone C = 64
    was 1.04× slower. None on TPU (never timed there)."""
    if backend != "gpu":
      return None
    passes = split_passes(lax.Precision(precision))
    if is_hopper_kind(device_kind) and hopper_gradients_reason(ROWS, key_dim, value_dim, passes) is None:
      return ROWS
    return 32

  @classmethod
  def build(cls, k, v, log_decay, beta, lam, state: MesaState, precision: lax.Precision):
    to_end = jnp.exp(log_decay[..., -1:] - log_decay) * beta
    chunk_decay = jnp.exp(log_decay[..., -1])
    states = BoundaryStates(*chunk_states_sharing_a(
        k, (k, v), (to_end, to_end), chunk_decay, (jnp.matrix_transpose(state.h_kk), state.h_kv), precision=precision))
    return cls(k, v, log_decay, beta, lam, states, precision)

  def _uses_hopper_solve(self, rhs) -> bool:
    return isinstance(self.precision, lax.Precision) and use_hopper_solve(*self.k.shape[3:], rhs.dtype)

  def solve(self, rhs, cg: CGOptions):
    """The Hopper (Mosaic GPU) solve on sm_90 where it takes the sizes (1.3-1.5x the Triton kernel's speed on an
    H200, benchmarks/RESULTS.md), else the Triton / Mosaic TPU / interpreted one."""
    solve = hopper_cg_solve if self._uses_hopper_solve(rhs) else chunked_cg_solve
    return solve(rhs, self.k, self.log_decay, self.beta, self.lam, self.states.kk_t, **_kernel_options(cg),
                 precision=self.precision)

  def read_kk(self, x):
    """H_kk[t] x_t for every row (the read kernel over the transposed H_kk states)."""
    return causal_read(x, self.k, self.k, self.states.kk_t, self.log_decay, self.beta, precision=self.precision)

  def output(self, x):
    return causal_read(x, self.k, self.v, self.states.kv, self.log_decay, self.beta, precision=self.precision)

  def _fused_solve(self, rhs, cg: CGOptions, solution: bool = True, **fused):
    """The solve that also makes a read (`fused`: read= or rhs_read= (v, S_kv)) in one kernel where one does: the
    Hopper solve at one fp16 pass (`solve_hopper.fuses_read`; q and o token-major, x only if `solution`), the
    Triton / Mosaic TPU / interpreted one for small heads (`solve.fuses_reads`, chunk-major); None elsewhere."""
    options = dict(**_kernel_options(cg), precision=self.precision)
    operands = (self.k, self.log_decay, self.beta, self.lam, self.states.kk_t)
    if self._uses_hopper_solve(rhs):
      if not fuses_read(self.v.shape[-1], self.precision):
        return None
      return hopper_cg_solve(rhs, *operands, **options, **fused, solution=solution, token_major="read" in fused)
    if not fuses_reads(self.k.shape[-1], self.v.shape[-1]):
      return None
    if "read" in fused:  # the Triton kernel reads and writes chunk-major rows
      x, o, steps = chunked_cg_solve(chunk_major(rhs, self.k.shape[3]), *operands, **options, **fused)
      return x, token_major(o), steps
    return chunked_cg_solve(rhs, *operands, **options, **fused)

  def solve_and_output(self, q, cg: CGOptions, solution: bool = True):
    """The solve makes o from x on chip where it fuses the read (`_fused_solve`), instead of the read kernel loading
    x, k, v and the gates again; the Hopper solve reads q and writes o token-major, and x only if `solution`. Else
    solve, then the read kernel."""
    fused = self._fused_solve(q, cg, solution, read=(self.v, self.states.kv))
    return super().solve_and_output(q, cg, solution) if fused is None else fused

  def adjoint_solve(self, do, cg: CGOptions):
    """The solve makes u = H_kv·do from do on chip before its loop where it fuses the read (`_fused_solve`, as the
    forward's o after it), instead of the read kernel writing u for the solve to load. Else the two stages."""
    fused = self._fused_solve(do, cg, rhs_read=(self.v, self.states.kv))
    if fused is None:
      return super().adjoint_solve(do, cg)
    y, u, steps = fused
    return u, y, steps

  def adjoint_rhs(self, do):
    return causal_read(do, self.v, self.k, self.states.kv, self.log_decay, self.beta, transpose_states=True,
                       precision=self.precision)

  def state_gradients(self, x, y, do, d_final: MesaState) -> BoundaryStates:
    weights = jnp.exp(self.log_decay)
    chunk_decay = jnp.exp(self.log_decay[..., -1])
    return BoundaryStates(*chunk_states_sharing_a(
        x, (y, do), (-weights, weights), chunk_decay, (jnp.matrix_transpose(d_final.h_kk), d_final.h_kv),
        reverse=True, precision=self.precision))

  def token_gradients(self, x, y, do, d_states: BoundaryStates):
    """dk, dv, dβ (one kernel: Mosaic GPU on sm_90 where it takes the sizes, else Triton / Mosaic TPU / interpreted)
    and ⟨D, S⟩ at every chunk's end boundary (`BoundaryStates.handed_on`; the Hopper kernel sums it from the D it
    loads anyway, so that XLA does not read both boundary arrays again)."""
    rows = (self.k, self.v, x, y, do, self.log_decay, self.beta, *d_states)
    if use_hopper_gradients(x.shape[3], x.shape[4], do.shape[4], self.precision):
      return hopper_chunk_gradients(*rows, precision=self.precision, states=self.states)
    return (*chunk_gradients(*rows, precision=self.precision), self.states.handed_on(d_states))
