"""Chunkwise-parallel Mesa: CG over all T systems at once, differentiated implicitly (one adjoint CG solve).

Split T into N chunks of C tokens; the operator of the chosen implementation (`operator.ChunkedOperator`: XLA or the
Pallas kernels) builds the chunk states and runs the stages. Forward: x = A⁻¹q by CG, o = H_kvᵀ x. Backward: the
adjoint systems A_t y_t = H_kv[t] do_t by the same CG, the state gradients scanned backwards over chunks, and the input
gradients from them. No CG iterate is stored: the residuals are the inputs and x. Where the backward needs H_kk[t] x_t
(the gates' gradient) it takes q_t − λ ⊙ x_t, equal at the solution (A_t x_t = q_t), instead of a causal read. With
`cg_tol` every system (forward and adjoint) stops once ‖r‖ ≤ cg_tol·‖r₀‖; the gradient is the implicit one, i.e. that
of the exact solution at the accuracy the solves reached. With `solve_precision` every solve is two cheaper solves and
one round of iterative refinement (`_solve`). DESIGN.md §1 derives the formulas; `xla_operator.py` has the chunked
forms.
"""
import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from mesanet_jax.ops.cg import rowdot
from mesanet_jax.ops.cg_steps import step_stats
from mesanet_jax.ops.inputs import (CGOptions, MesaState, check_cg_options, check_inputs, check_values,
                                    compute_dtype, zero_state)
from mesanet_jax.ops.operator import IMPLEMENTATIONS, chunk_major, operator_class, token_major

IMPLS = tuple(IMPLEMENTATIONS)
PRECISIONS = ("highest", "high", "default")


class _Static(NamedTuple):
  """The core's static arguments (hashable)."""
  cg: CGOptions
  precision: lax.Precision
  solve_precision: lax.Precision | None  # None: the solves at `precision`; else refined (`_solve`)
  impl: str
  length: int  # T before padding: the steps statistics skip the padded tokens
  save_states: bool  # the backward reuses the forward's operator (its chunk states) instead of rebuilding it
  row_dtypes: tuple  # q's, k's and v's dtypes as the core takes them: their gradients leave in these


HALF_ROWS = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # q, k, v dtypes that enter the operator as they are


def row_dtype(dtype, compute: jnp.dtype) -> jnp.dtype:
  """The dtype q, k or v enters the operator in: its own where it is a 16-bit float (bf16 or f16; an operator
  converts rows as it reads them, and on the GPU the kernels do so as they load them: chunk-major copies, kernel
  reads and saved rows at half the bytes of f32 ones), else the compute dtype."""
  return jnp.dtype(dtype) if jnp.dtype(dtype) in HALF_ROWS else jnp.dtype(compute)


def _solve(op, rhs: jax.Array, static: _Static) -> tuple[jax.Array, jax.Array]:
  """x = A⁻¹ rhs and the steps each row took, [B, H, N, C, Dk] and int32 [B, H, N, C].

  With a solve precision, one round of mixed-precision iterative refinement: x₀ by CG with the products at the
  solve precision, the residual r = rhs − A x₀ at the operator's, the correction A d = r at the solve precision
  again, x = x₀ + d. A solve's relative error ε (~4e-4 at one fp16 pass) becomes ~ε² · cond(A), so two cheap solves
  and one accurate matvec stand in for an accurate solve. r is scaled to max |r_t| = 1 per row first (each row is its
  own system), which keeps its small entries in fp16's range. The steps are those of both solves.
  """
  if static.solve_precision is None:
    return op.solve(rhs, static.cg)
  cheap = dataclasses.replace(op, precision=static.solve_precision)
  x, steps = cheap.solve(rhs, static.cg)
  residual = rhs - op.matvec(x)
  scale = jnp.max(jnp.abs(residual), axis=-1, keepdims=True)
  scale = jnp.where(scale > 0, scale, 1)
  correction, more_steps = cheap.solve(residual / scale, static.cg)
  return x + scale * correction, steps + more_steps


def _forward(q, k, v, log_decay, beta, lam, state, probe, static: _Static, solution: bool):
  """The core's outputs and its backward's residuals; without `solution` (no gradient taken) the operator need not
  write x out, and the residuals hold None for it."""
  op = operator_class(static.impl).build(k, v, log_decay, beta, lam, state, static.precision)
  if static.solve_precision is None:
    x, o, steps = op.solve_and_output(q, static.cg, solution)
  else:
    x, steps = _solve(op, chunk_major(q, k.shape[3]), static)
    o = token_major(op.output(x))
  o = o.astype(static.row_dtypes[0])  # q's: o leaves the core rounded once (the Hopper solve writes it so already)
  forward_steps = step_stats(steps, static.length)
  operator = op if static.save_states else (k, v, log_decay, beta, lam, state)
  return (o, op.states.at(-1), forward_steps), (operator, probe, q, x, forward_steps)


def _core_forward(q, k, v, log_decay, beta, lam, state, probe, static: _Static):
  return _forward(q, k, v, log_decay, beta, lam, state, probe, static, solution=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _chunked_core(q, k, v, log_decay, beta, lam, state, probe, static: _Static):
  """The core: q token-major [B, N·C, H, Dk] (as the caller lays it out), k [B, H, N, C, Dk], v [B, H, N, C, Dv]
  chunk-major (each in `row_dtype`'s dtype: the operator computes in log_decay's); log_decay, beta [B, H, N, C];
  lam [H, Dk]; probe None or [B, H, 4]. Returns o token-major [B, N·C, H, Dv] (in q's dtype), the final state and
  the forward steps statistics [B, H, 2]."""
  return _forward(q, k, v, log_decay, beta, lam, state, probe, static, solution=False)[0]


def _core_backward(static: _Static, residuals, cotangents):
  operator, probe, q, x, forward_steps = residuals
  do, d_final, _ = cotangents
  do = chunk_major(do.astype(x.dtype), x.shape[3])  # token-major in q's dtype, as o; the backward computes in x's
  op = operator if static.save_states else operator_class(static.impl).build(*operator, static.precision)
  if static.solve_precision is None:
    u, y, adjoint_steps = op.adjoint_solve(do, static.cg)
  else:
    u = op.adjoint_rhs(do)
    y, adjoint_steps = _solve(op, u, static)
  d_states = op.state_gradients(x, y, do, d_final)
  dk, dv, dbeta, handed_on = op.token_gradients(x, y, do, d_states)
  # ∂L/∂G_t: the scaling of everything decayed up to t, −y_t·H_kk[t]x_t + x_t·u_t, minus what token t itself added
  # (β_t dβ_t); H_kk[t]x_t = q_t − λ ⊙ x_t at the solution: no causal read (the difference, the residual r_t, is within
  # the accuracy the solve reached, as is the difference of the read's x from the exact solution's) ...
  kk_x = chunk_major(q, x.shape[3]).astype(x.dtype) - op.lam[:, None, None, :] * x
  d_log_decay = -rowdot(y, kk_x) + rowdot(x, u) - op.beta * dbeta
  # ... and at the chunk's last row, the scaling of the state handed to the next chunk.
  d_log_decay = d_log_decay.at[..., -1].add(handed_on)
  dlam = -jnp.sum(y * x, axis=(0, 2, 3))
  # The probe's "gradient" is the statistics of the solves (cg_steps.py), whatever the cotangents.
  d_probe = None if probe is None else jnp.concatenate(
      [forward_steps, step_stats(adjoint_steps, static.length)], axis=-1).astype(probe.dtype)
  dq, dk, dv = (grad.astype(dtype) for grad, dtype in zip((token_major(y), dk, dv), static.row_dtypes))
  return dq, dk, dv, d_log_decay, dbeta, dlam, d_states.at(0), d_probe


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
    cg_tol: float | None = None,
    impl: str = "xla",
    cg_init: str = "jacobi",
    cg_preconditioner: str = "none",
    matmul_precision: str = "highest",
    solve_precision: str | None = None,
    cg_probe: jax.Array | None = None,
    return_cg_steps: bool = False,
    save_states: bool = False,
):
  """Mesa layer over a whole sequence by chunkwise-parallel CG, with an implicit (adjoint CG) custom VJP.

  Args:
    q, k: [B, T, H, Dk] (L2-normalised by the layer); v: [B, T, H, Dv]; g (log forget gate ≤ 0), beta: [B, T, H];
    lam: [H, Dk] regulariser > 0; state: optional MesaState (h_kk [B, H, Dk, Dk], h_kv [B, H, Dk, Dv]) before token 0.
    Every stage computes in f32 (or a wider input's dtype); bf16 / f16 q, k, v are chunked and kept as they are and
    converted where a stage reads them (`row_dtype`), so their copies, reads and saved residuals take half the bytes.
    chunk_size: C; T need not be a multiple (the sequence is padded with tokens that change nothing).
    cg_steps: CG steps of every solve, forward and adjoint (the cap when cg_tol is set).
    cg_tol: None for exactly cg_steps steps; else every system stops once ‖r‖ ≤ cg_tol·‖r₀‖ (and a solve ends when
      all of its systems have stopped: the XLA path's one loop over all rows, each Pallas kernel program's rows).
    impl: a name of `operator.IMPLEMENTATIONS`: "xla", or "pallas": every stage (chunk states, CG solves, reads,
      gradient accumulation) runs as a Pallas kernel (Triton on GPU, Mosaic on TPU, interpret mode on CPU); needs
      C, Dk, Dv powers of two >= 16.
    cg_init: "jacobi" (x0 = q / diag(A_t), the paper's choice) or "zero" (flash-linear-attention's training kernels).
    cg_preconditioner: "none" (plain CG, the paper's and fla's) or "jacobi" (CG preconditioned by diag(A_t): the same
      solution, fewer steps where A_t's diagonal varies, e.g. λ or key scales spread over the dims; the stopping rule
      still reads ‖r‖).
    matmul_precision: `lax.Precision` name of every matmul: "highest" keeps them f32 as the paper does; "default"
      lets XLA use TF32 on GPU and bf16 passes on TPU (faster, ~1e-3 relative error); "high" is JAX's bf16_3x (the
      GPU Pallas kernels: three bf16 passes with no operand scaling, ~1.7e-6, `pallas_kernels/mesa_cg/params.py`).
    solve_precision: None: the CG solves' products at matmul_precision. A lower one (e.g. "default" under
      "highest") runs every solve, forward and adjoint, as two solves at it with one round of mixed-precision
      iterative refinement between them (the residual at matmul_precision; `_solve`): matmul_precision's accuracy
      from two one-pass solves and one accurate matvec. The steps reported are those of both solves.
    cg_probe: optional zeros, f32 [B, H, 4], never read: the gradient of a loss w.r.t. it is the CG steps taken per
      batch element and head, (forward mean, forward max, adjoint mean, adjoint max) over the tokens (cg_steps.py).
    return_cg_steps: also return the forward solve's steps per batch element and head, (mean, max) f32 [B, H, 2].
    save_states: keep the forward's chunk states (both, at every chunk boundary: 4·B·H·(N+1)·Dk·(Dk+Dv) bytes in
      f32) for the backward, which otherwise computes them again (on the GPU the chunk-state scans are ~1 ms of a
      ~8 ms forward+backward at B=8 T=2048 H=16 D=128, benchmarks/RESULTS.md). The gradients are the same.

  Returns:
    o: [B, T, H, Dv] in q's dtype; the final MesaState in the compute dtype (f32 for f32/bf16 inputs); with
    return_cg_steps, the forward steps statistics as a third output.
    Gradients flow to q, k, v, g, beta, lam and the initial state; memory is O(B·H·(T·D + T/C·D²)) (the T/C·D²
    term saved for the backward only with save_states).
  """
  batch, length, heads, key_dim, value_dim = check_inputs(q, k, v, g, beta, lam, state, per_token=True)
  check_values(q=q, k=k, v=v, g=g, beta=beta, lam=lam, **({} if state is None else state._asdict()))
  check_cg_options(cg_steps, cg_init, cg_tol, tol_name="cg_tol", preconditioner=cg_preconditioner)
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if not isinstance(save_states, bool):
    raise ValueError(f"save_states must be a bool, got {save_states!r}")
  if reason := operator_class(impl).unsupported_reason(chunk_size, key_dim, value_dim):
    raise ValueError(f"impl={impl!r} cannot run this input: {reason}; use impl='xla'")
  if matmul_precision not in PRECISIONS:
    raise ValueError(f"matmul_precision must be one of {PRECISIONS}, got {matmul_precision!r}")
  if solve_precision is not None and solve_precision not in PRECISIONS:
    raise ValueError(f"solve_precision must be None or one of {PRECISIONS}, got {solve_precision!r}")
  if cg_probe is not None and (getattr(cg_probe, "shape", None) != (batch, heads, 4)
                               or not jnp.issubdtype(cg_probe.dtype, jnp.floating)):
    raise ValueError(f"cg_probe must be a float array of shape [B, H, 4] = {(batch, heads, 4)}, got "
                     f"{getattr(cg_probe, 'shape', type(cg_probe).__name__)}")
  dtype = compute_dtype(q, k, v, g, beta, lam, *(state or ()))
  state = zero_state(batch, heads, key_dim, value_dim, dtype) if state is None else MesaState(
      state.h_kk.astype(dtype), state.h_kv.astype(dtype))
  pad = -length % chunk_size

  def padded(x: jax.Array, to_dtype=dtype) -> jax.Array:
    """[B, T, H, ...] -> [B, N·C, H, ...] in to_dtype, zero-padded (padded tokens have k = 0, β = 0, g = 0)."""
    return jnp.pad(x.astype(to_dtype), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))

  to_chunks = lambda x, to_dtype=dtype: chunk_major(padded(x, to_dtype), chunk_size)  # [B, H, N, C, ...]
  # q stays token-major (the forward's solve reads it so, `ChunkedOperator.solve_and_output`); k and v chunk-major
  rows = [padded(q, row_dtype(q.dtype, dtype))] + [to_chunks(x, row_dtype(x.dtype, dtype)) for x in (k, v)]
  cg = CGOptions(cg_steps, cg_init, None if cg_tol is None else float(cg_tol), cg_preconditioner)
  static = _Static(cg, lax.Precision(matmul_precision), None if solve_precision is None else
                   lax.Precision(solve_precision), impl, length, save_states, tuple(x.dtype for x in rows))
  log_decay = jnp.cumsum(to_chunks(g), axis=-1)
  o, final, forward_steps = _chunked_core(*rows, log_decay, to_chunks(beta), lam.astype(dtype), state, cg_probe, static)
  o = o[:, :length].astype(q.dtype)
  return (o, final, forward_steps) if return_cg_steps else (o, final)
