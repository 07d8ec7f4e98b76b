"""The Mesa state pytree, argument checks shared by every Mesa op, and the compute-dtype rule.

Value checks (`check_values`: λ > 0, g ≤ 0, β ≥ 0, everything finite) run on concrete inputs always. Traced inputs
(under jit, grad, scan) are checked only in debug mode: `checked(fn)(*args)` traces `fn` with the checks on as
`jax.experimental.checkify` checks and raises (a JaxRuntimeError naming the argument) when a value is out of range.
"""
import contextlib
import functools
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from mesanet_jax.ops.cg import CARRIED, Iterate, conjugate_gradient

CG_INITS = ("jacobi", "zero")
CG_PRECONDITIONERS = ("none", "jacobi")
_DIAGONAL_FLOOR = 1e-6


class CGOptions(NamedTuple):
  """How every solve of a chunked sequence runs (static and hashable; `check_cg_options` validates the fields)."""
  steps: int  # CG steps of every solve (the cap when tol is set)
  init: str = "jacobi"  # x0: "jacobi" (rhs / diag(A), the paper's) or "zero" (fla's training kernels)
  tol: float | None = None  # None: exactly `steps`; else each system stops once ‖r‖ ≤ tol·‖r₀‖
  preconditioner: str = "none"  # "none" (plain CG, the paper's) or "jacobi" (z = r / diag(A))

  @property
  def preconditioned(self) -> bool:
    return self.preconditioner == "jacobi"

  @property
  def uses_diagonal(self) -> bool:
    """Whether the start or the preconditioner reads diag(A)."""
    return self.init == "jacobi" or self.preconditioned


class MesaState(NamedTuple):
  """Decayed sums of one Mesa layer; always held in the compute dtype (f32, or f64 under x64)."""
  h_kk: jax.Array  # [B, H, Dk, Dk]  Σ decay·β k kᵀ
  h_kv: jax.Array  # [B, H, Dk, Dv]  Σ decay·β k vᵀ


def compute_dtype(*arrays) -> jnp.dtype:
  """f32, or a wider float if an input is wider (f64 under x64 is used by the tests for tight checks)."""
  dtype = jnp.dtype(jnp.float32)
  for array in arrays:
    if array is not None:
      dtype = jnp.promote_types(dtype, array.dtype)
  return dtype


def zero_state(batch: int, heads: int, key_dim: int, value_dim: int, dtype=jnp.float32) -> MesaState:
  return MesaState(jnp.zeros((batch, heads, key_dim, key_dim), dtype), jnp.zeros((batch, heads, key_dim, value_dim), dtype))


def _expect(name: str, array, shape: tuple[int, ...], layout: str) -> None:
  if not hasattr(array, "shape") or not hasattr(array, "dtype"):
    raise ValueError(f"{name} must be an array of shape {layout} = {shape}, got {type(array).__name__}")
  if tuple(array.shape) != shape:
    raise ValueError(f"{name} must have shape {layout} = {shape}, got {tuple(array.shape)}")
  if not jnp.issubdtype(array.dtype, jnp.floating):
    raise ValueError(f"{name} must have a floating dtype, got {array.dtype}")


def check_inputs(q, k, v, g, beta, lam, state, *, per_token: bool) -> tuple[int, ...]:
  """Raises ValueError naming the first argument whose shape or dtype is wrong.

  per_token=True checks the sequence layout (q: [B, T, H, Dk]); False checks one decode token (q: [B, H, Dk]).
  Returns (B, T, H, Dk, Dv) or (B, H, Dk, Dv).
  """
  q_layout = "[B, T, H, Dk]" if per_token else "[B, H, Dk]"
  if not hasattr(q, "ndim") or q.ndim != len(q_layout.split(",")):
    raise ValueError(f"q must have shape {q_layout}, got {getattr(q, 'shape', type(q).__name__)}")
  if not hasattr(v, "ndim") or v.ndim != q.ndim:
    raise ValueError(f"v must have shape {q_layout.replace('Dk', 'Dv')}, got {getattr(v, 'shape', type(v).__name__)}")
  *lead, key_dim = q.shape
  value_dim = v.shape[-1]
  batch, heads = lead[0], lead[-1]
  _expect("q", q, (*lead, key_dim), q_layout)
  _expect("k", k, (*lead, key_dim), q_layout)
  _expect("v", v, (*lead, value_dim), q_layout.replace("Dk", "Dv"))
  _expect("g", g, tuple(lead), q_layout.replace(", Dk", ""))
  _expect("beta", beta, tuple(lead), q_layout.replace(", Dk", ""))
  _expect("lam", lam, (heads, key_dim), "[H, Dk]")
  if state is not None:
    if not isinstance(state, MesaState):
      raise ValueError(f"state must be a MesaState(h_kk, h_kv), got {type(state).__name__}")
    _expect("state.h_kk", state.h_kk, (batch, heads, key_dim, key_dim), "[B, H, Dk, Dk]")
    _expect("state.h_kv", state.h_kv, (batch, heads, key_dim, value_dim), "[B, H, Dk, Dv]")
  if per_token and lead[1] < 1:
    raise ValueError(f"q must hold at least one token (T >= 1), got shape {tuple(q.shape)}")
  return (*lead, key_dim, value_dim)


_debug_checks = False  # set while `checked` traces: traced values are checked too


@contextlib.contextmanager
def _debug_value_checks():
  global _debug_checks
  previous, _debug_checks = _debug_checks, True
  try:
    yield
  finally:
    _debug_checks = previous


def checked(fn):
  """`fn` with the value checks of every Mesa op it calls applied to traced inputs too (checkify): raises on NaN/Inf
  and on out-of-range λ, g, β. A debug mode: the checks cost a reduction over every input. A jitted function keeps
  the checks it was first traced with: give `checked` a function not traced before, e.g. `checked(jax.jit(f))`."""
  @functools.wraps(fn)
  def call(*args, **kwargs):
    with _debug_value_checks():
      error, out = checkify.checkify(fn, errors=checkify.user_checks)(*args, **kwargs)
    error.throw()
    return out
  return call


def check_values(**arrays) -> None:
  """Raises ValueError naming the first argument with a NaN/Inf, lam ≤ 0, g > 0 or beta < 0 (concrete arrays; traced
  ones only under `checked`). `arrays`: name → array or None (skipped)."""
  ranges = {"lam": ("> 0", lambda x: x > 0), "g": ("<= 0 (a log forget gate)", lambda x: x <= 0),
            "beta": (">= 0", lambda x: x >= 0)}
  for name, x in arrays.items():
    if x is None:
      continue
    what, holds = ranges.get(name, ("finite", lambda x: True))
    if isinstance(x, jax.core.Tracer):
      if _debug_checks:
        checkify.check(jnp.all(jnp.isfinite(x)), f"{name} has NaN or Inf values")
        checkify.check(jnp.all(holds(x)), f"{name} must be {what}; min {{}}, max {{}}", jnp.min(x), jnp.max(x))
      continue
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
      raise ValueError(f"{name} has {int(np.sum(~np.isfinite(x)))} NaN or Inf values")
    if not np.all(holds(x)):
      raise ValueError(f"{name} must be {what}, got values in [{x.min():g}, {x.max():g}]")


def check_cg_options(cg_steps: int, cg_init: str, tol: float | None = None, *, tol_name: str = "tol",
                     preconditioner: str = "none") -> None:
  if not isinstance(cg_steps, int) or cg_steps < 0:
    raise ValueError(f"cg_steps must be a non-negative int, got {cg_steps!r}")
  if cg_init not in CG_INITS:
    raise ValueError(f"cg_init must be one of {CG_INITS}, got {cg_init!r}")
  if tol is not None and not (isinstance(tol, numbers.Real) and tol > 0):
    raise ValueError(f"{tol_name} must be a positive float or None, got {tol!r}")
  if preconditioner not in CG_PRECONDITIONERS:
    raise ValueError(f"cg_preconditioner must be one of {CG_PRECONDITIONERS}, got {preconditioner!r}")


def initial_guess(rhs: jax.Array, diagonal: jax.Array, cg_init: str) -> jax.Array:
  """CG starting point: the Jacobi guess rhs / diag(A) (the paper's choice) or zero (the PyTorch reference's)."""
  if cg_init == "zero":
    return jnp.zeros_like(rhs)
  # diag(A) ≥ λ > 0 for valid input; the floor only keeps invalid input (λ = 0 with an empty state) finite.
  return rhs / jnp.maximum(diagonal, _DIAGONAL_FLOOR)


def inverse_diagonal(diagonal: jax.Array) -> jax.Array:
  """1 / diag(A), floored as `initial_guess`'s: Jacobi's preconditioner M⁻¹."""
  return 1 / jnp.maximum(diagonal, _DIAGONAL_FLOOR)


def solve_from_diagonal(matvec, rhs: jax.Array, diagonal: jax.Array, options: CGOptions,
                        preconditioner=None, iterate: Iterate = CARRIED) -> tuple[jax.Array, jax.Array]:
  """`cg.conjugate_gradient` as `options` say, given diag(A) (same shape as rhs): the start from `initial_guess`,
  Jacobi's preconditioner r ↦ r / diag(A) if asked (`preconditioner` overrides how it is applied, e.g. a kernel's
  r ↦ r · (1 / diag(A) kept in shared memory)); x kept as `iterate` says. Returns x (what `iterate` carries) and the
  steps each row took."""
  if not options.preconditioned:
    preconditioner = None
  elif preconditioner is None:
    inverse = inverse_diagonal(diagonal)
    preconditioner = lambda r: r * inverse
  return conjugate_gradient(matvec, rhs, initial_guess(rhs, diagonal, options.init), steps=options.steps,
                            tol=options.tol, preconditioner=preconditioner, iterate=iterate)
