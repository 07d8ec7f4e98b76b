"""The chunked Mesa operator's stage interface, the chunk-state layout its implementations share, and the registry
that `mesa_chunked(impl=...)` dispatches through.

An implementation ("xla": `xla_operator.XlaOperator`; "pallas": `pallas_kernels.mesa_cg.PallasOperator`, one
Pallas kernel per stage) is a pytree dataclass extending `ChunkedSequence` with the methods of `ChunkedOperator`.
`IMPLEMENTATIONS` is the one place that says which module provides each name; importing that module registers its
operator class, its decode step and (Pallas) its gated delta rule and linear scan (`register`), so a caller never
imports an implementation to use it, and the kernels package depends on this one, never the reverse.
"""
import dataclasses
import importlib
from typing import Callable, NamedTuple, Protocol, TypeVar, runtime_checkable

import jax
import jax.numpy as jnp
from jax import lax

from mesanet_jax.ops.inputs import CGOptions, MesaState

# impl name -> the module whose import registers its operator class.
IMPLEMENTATIONS = {"xla": "mesanet_jax.ops.xla_operator", "pallas": "pallas_kernels"}
ROLES = ("operator", "decode_step", "gated_delta", "linear_recurrence")
_REGISTERED: dict[tuple[str, str], object] = {}  # (impl, role) -> class or function


def chunk_major(x: jax.Array, chunk_size: int) -> jax.Array:
  """Token-major [B, T, H, ...] (T a multiple of chunk_size) -> chunk-major [B, H, N, C, ...]."""
  x = jnp.moveaxis(x, 2, 1)
  return x.reshape(*x.shape[:2], x.shape[2] // chunk_size, chunk_size, *x.shape[3:])


def token_major(x: jax.Array) -> jax.Array:
  """Chunk-major [B, H, N, C, ...] -> token-major [B, N·C, H, ...]."""
  return jnp.moveaxis(x.reshape(*x.shape[:2], -1, *x.shape[4:]), 1, 2)


class BoundaryStates(NamedTuple):
  """A Mesa state (or a gradient w.r.t. one) at every chunk boundary: entry n is the state before chunk n, so the
  start and the end state of chunk n are entries n and n+1; entry 0 is the initial state, entry N the final one.

  H_kk is held transposed (the kernels read Sᵀ; a chunk's increment Σ w k kᵀ is symmetric, so scanning from the
  transposed initial state gives Sᵀ at no cost, also for a non-symmetric initial state). Gradients are held alike:
  `kk_t` is the gradient w.r.t. H_kkᵀ.
  """
  kk_t: jax.Array  # H_kkᵀ, [B, H, N+1, Dk, Dk]
  kv: jax.Array  # H_kv, [B, H, N+1, Dk, Dv]

  def at(self, n: int) -> MesaState:
    """The state at boundary n (0: initial, -1: final) as a MesaState, [B, H, Dk, Dk] and [B, H, Dk, Dv]."""
    return MesaState(jnp.matrix_transpose(self.kk_t[:, :, n]), self.kv[:, :, n])

  def handed_on(self, gradients: "BoundaryStates") -> jax.Array:
    """⟨D, S⟩ at every chunk's end boundary, [B, H, N]: the loss's derivative w.r.t. a scale of the state chunk n
    hands on (self: the states S, gradients: the loss's gradient D w.r.t. them), which the chunk's last log-decay
    applies: the gates' gradient at the chunk's last row has it on top of the token's own terms."""
    return (jnp.sum(gradients.kk_t[:, :, 1:] * self.kk_t[:, :, 1:], axis=(-2, -1))
            + jnp.sum(gradients.kv[:, :, 1:] * self.kv[:, :, 1:], axis=(-2, -1)))


@dataclasses.dataclass(frozen=True)
class ChunkedSequence:
  """What every operator holds: the chunk-major inputs and their boundary states (an implementation adds its own
  precomputed operands and registers itself as a pytree with `jax.tree_util.register_dataclass`)."""
  k: jax.Array  # [B, H, N, C, Dk]
  v: jax.Array  # [B, H, N, C, Dv]
  log_decay: jax.Array  # within-chunk cumulative log-decay G, [B, H, N, C]
  beta: jax.Array  # [B, H, N, C]
  lam: jax.Array  # [H, Dk]
  states: BoundaryStates
  precision: lax.Precision = dataclasses.field(metadata=dict(static=True))

  def solve_and_output(self, q: jax.Array, cg: CGOptions, solution: bool = True):
    """The forward's x, o and steps from q token-major: `solve` of its chunk-major rows, then `output` (an
    implementation may make o inside its solve, reading q and writing o token-major, and without `solution` return
    None for x)."""
    del solution  # x is made either way here
    x, steps = self.solve(chunk_major(q, self.k.shape[3]), cg)
    return x, token_major(self.output(x)), steps

  def adjoint_solve(self, do: jax.Array, cg: CGOptions):
    """The backward's u = `adjoint_rhs(do)`, y = A⁻¹u by `solve` and its steps (an implementation may make u inside
    its solve, from do)."""
    u = self.adjoint_rhs(do)
    y, steps = self.solve(u, cg)
    return u, y, steps

  def matvec(self, x: jax.Array) -> jax.Array:
    """A_t x_t = H_kk[t] x_t + λ ⊙ x_t for every row: the implementation's `read_kk` plus the regulariser."""
    return self.read_kk(x) + self.lam[:, None, None, :] * x


Operator = TypeVar("Operator", bound="ChunkedOperator")


@runtime_checkable
class ChunkedOperator(Protocol):
  """A_t = H_kk[t] + Λ for every token of a chunked sequence, with its chunk states: the stages of `mesa_chunked`'s
  forward (build, solve, output) and backward (build, adjoint_rhs, solve, state_gradients, token_gradients) pass.

  Chunk-major shapes (but the forward's q and o, token-major: `solve_and_output`): rows x, y, rhs [B, H, N, C, Dk];
  do [B, H, N, C, Dv]; gates [B, H, N, C]; lam [H, Dk].
  k, v and the forward's rhs (q) may come as 16-bit floats (`chunked.row_dtype`): every stage computes in
  log_decay's dtype, converting them where it reads them.
  DESIGN.md §1 derives every stage; `xla_operator.py` is the reference implementation.
  """
  states: BoundaryStates

  @classmethod
  def build(cls: type[Operator], k: jax.Array, v: jax.Array, log_decay: jax.Array, beta: jax.Array, lam: jax.Array,
            state: MesaState, precision: lax.Precision) -> Operator:
    """The operator of keys k [B, H, N, C, Dk], values v [B, H, N, C, Dv], within-chunk cumulative log-decay G and β
    [B, H, N, C], λ [H, Dk], from `state` before the first chunk; computes the boundary states."""

  @staticmethod
  def unsupported_reason(chunk_size: int, key_dim: int, value_dim: int) -> str | None:
    """Why this implementation cannot take these sizes (one plain sentence), or None."""

  @staticmethod
  def fastest_chunk_size(backend: str, device_kind: str, key_dim: int, value_dim: int,
                         precision: str) -> int | None:
    """The chunk size this implementation measured fastest at on `backend` ("gpu", "tpu", ...) and `device_kind`
    (`jax.Device.device_kind`) for these head sizes and matmul precision (benchmarks/RESULTS.md), or None where it
    has not been measured; `models/fast_path.py` picks it for impl="auto"."""

  def solve(self, rhs: jax.Array, cg: CGOptions) -> tuple[jax.Array, jax.Array]:
    """x_t = A_t⁻¹ rhs_t for every row by `mesanet_jax.ops.cg.conjugate_gradient` as `cg` says (`inputs.
    solve_from_diagonal`): at most cg.steps steps, each row stopping once ‖r‖ ≤ cg.tol·‖r₀‖ (None: exactly
    cg.steps), from cg.init's start, preconditioned as cg.preconditioner. Returns x [B, H, N, C, Dk] and the steps
    each row took, int32 [B, H, N, C]."""

  def read_kk(self, x: jax.Array) -> jax.Array:
    """H_kk[t] x_t for every row, [B, H, N, C, Dk]."""

  def matvec(self, x: jax.Array) -> jax.Array:
    """A_t x_t = H_kk[t] x_t + λ ⊙ x_t for every row, [B, H, N, C, Dk] (`ChunkedSequence` provides it from
    `read_kk`: CG's product, and the residual of a refined solve)."""

  def output(self, x: jax.Array) -> jax.Array:
    """o_t = H_kv[t]ᵀ x_t, [B, H, N, C, Dv]."""

  def solve_and_output(self, q: jax.Array, cg: CGOptions,
                       solution: bool = True) -> tuple[jax.Array | None, jax.Array, jax.Array]:
    """`solve` and `output` of its x, for q token-major [B, N·C, H, Dk] (as the caller lays it out: no copy to
    chunk-major where a kernel reads it so): x (chunk-major), o token-major [B, N·C, H, Dv] and the steps
    (`ChunkedSequence` provides it as the two stages). solution=False: x is not needed (a forward no gradient is
    taken of), and may come back as None."""

  def adjoint_rhs(self, do: jax.Array) -> jax.Array:
    """u_t = H_kv[t] do_t, the adjoint solve's right-hand side, [B, H, N, C, Dk]."""

  def adjoint_solve(self, do: jax.Array, cg: CGOptions) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`adjoint_rhs` and `solve` of it: u, y = A⁻¹u [B, H, N, C, Dk] and the steps (`ChunkedSequence` provides it
    as the two stages; an implementation may make u inside its solve)."""

  def state_gradients(self, x: jax.Array, y: jax.Array, do: jax.Array, d_final: MesaState) -> BoundaryStates:
    """The loss's gradient w.r.t. the state at every boundary (D_t = −y_t x_tᵀ on H_kk[t], x_t do_tᵀ on H_kv[t],
    summed backwards over chunks from d_final); entry 0 is the initial state's gradient."""

  def token_gradients(self, x: jax.Array, y: jax.Array, do: jax.Array,
                      d_states: BoundaryStates) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """dk [B, H, N, C, Dk], dv [B, H, N, C, Dv], dβ [B, H, N, C] (the state gradient at every token applied to what
    the token wrote) and ⟨D, S⟩ at every chunk's end boundary [B, H, N] (`BoundaryStates.handed_on`); `chunked`
    makes the log-decay's gradient from dβ and these."""


def register(impl: str, role: str) -> Callable:
  """Decorator: makes the decorated class or function the `role` of `impl` (a name of `IMPLEMENTATIONS`). Roles:
  "operator" (a `ChunkedOperator` class, `mesa_chunked`'s stages), "decode_step" (a function with the signature
  of `ops.decode.mesa_decode_step`), "gated_delta" (one with that of `ops.gated_delta_rule.gated_delta_recurrent`,
  Gated DeltaNet's operator; the XLA side is the chunked form, called directly) and "linear_recurrence" (one with
  that of `layers.hawk.linear_recurrence`, Hawk's scan, which is the XLA side)."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"impl {impl!r} is not declared in mesanet_jax.ops.operator.IMPLEMENTATIONS")
  if role not in ROLES:
    raise ValueError(f"role must be one of {ROLES}, got {role!r}")

  def add(provided):
    _REGISTERED[impl, role] = provided
    return provided
  return add


def implementation(impl: str, role: str):
  """The `role` of `impl` (see `register`), importing the module that provides it on first use."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"impl must be one of {tuple(IMPLEMENTATIONS)}, got {impl!r}")
  if (impl, role) not in _REGISTERED:
    try:
      importlib.import_module(IMPLEMENTATIONS[impl])
    except ImportError as error:
      raise ValueError(f"impl={impl!r} needs the module {IMPLEMENTATIONS[impl]}, which does not import here: "
                       f"{error}") from error
  return _REGISTERED[impl, role]


def operator_class(impl: str) -> type[ChunkedOperator]:
  """The operator class of `impl`."""
  return implementation(impl, "operator")
