"""Each Pallas kernel against the XLA code it replaces (interpret mode on CPU), in f32 and in f64."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesanet_jax.ops import MesaState
from mesanet_jax.ops.inputs import CGOptions
from mesanet_jax.ops.operator import ChunkedOperator, operator_class, token_major
from mesanet_jax.ops.xla_operator import scan_chunks
from pallas_kernels.mesa_cg import chunk_states
from pallas_kernels.mesa_cg.read import causal_read
from pallas_kernels.mesa_cg.solve import chunked_cg_solve
from tests.ops.mesa_inputs import max_abs, random_inputs, scale
from tests.pallas.precision import F32_PRODUCT_ERROR

CHUNK = 16
# The kernels compute the same products as the XLA code, rounded differently (tests/pallas/precision.py), amplified by
# up to cond(A) ≲ 1e2 through a solve. Measured on CPU: f32 ≤ 2e-7 of scale, f64 ≤ 4e-16.
TOLERANCE = {jnp.float32: 10 * F32_PRODUCT_ERROR, jnp.float64: 1e-12}


@pytest.fixture(params=["f32", "f64"])
def dtype(request):
  """f32, or f64 with the x64 fixture active."""
  if request.param == "f32":
    return jnp.float32
  request.getfixturevalue("x64")
  return jnp.float64


def _chunk_major(x, dtype):
  """[B, T, H, ...] -> [B, H, T / C, C, ...]."""
  x = jnp.moveaxis(jnp.asarray(x, dtype), 2, 1)
  return x.reshape(*x.shape[:2], -1, CHUNK, *x.shape[3:])


def _operator_inputs(dtype):
  """Chunk-major q, k, v, log_decay, beta, do, lam and a non-symmetric initial state (B=1, H=2, N=3, Dk=16, Dv=32)."""
  q, k, v, g, beta, lam, state = random_inputs(1, 3 * CHUNK, 2, 16, 32, with_state=True, seed=5)
  noise = jax.random.normal(jax.random.key(6), state.h_kk.shape)
  state = MesaState(state.h_kk + 0.1 * noise, state.h_kv)
  do = jax.random.normal(jax.random.key(7), v.shape)
  q, k, v, do, g, beta = (_chunk_major(x, dtype) for x in (q, k, v, do, g, beta))
  state = MesaState(*(x.astype(dtype) for x in state))
  return q, k, v, jnp.cumsum(g, axis=-1), beta, do, lam.astype(dtype), state


def _close(a, b, dtype):
  return max_abs(a, b) <= TOLERANCE[dtype] * scale(b)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("row_block", [None, 16])
def test_chunk_states_match_xla_scan(dtype, reverse, row_block):
  keys = jax.random.split(jax.random.key(0), 5)
  a, b = (jax.random.normal(key, (2, 1, 3, CHUNK, 32), dtype) for key in keys[:2])
  weights = jax.random.normal(keys[2], (2, 1, 3, CHUNK), dtype)
  decay = jax.random.uniform(keys[3], (2, 1, 3), dtype)
  initial = jax.random.normal(keys[4], (2, 1, 32, 32), dtype)
  increments = jnp.einsum("bhncd,bhnce->bhnde", a * weights[..., None], b, precision="highest")
  expected = scan_chunks(increments, decay, initial, reverse=reverse)
  # block=16 < E=32: two programs per batch·head, each scanning its half of the value dim; row_block=16 < D=32
  # splits the key dim too (four programs, each its quarter of the carry).
  bounds = chunk_states(a, b, weights, decay, initial, reverse=reverse, precision=jax.lax.Precision.HIGHEST,
                        row_block=row_block, block=16)
  assert _close(bounds, expected, dtype)


@pytest.mark.slow
def test_operator_stages_match_xla(dtype):
  """Every stage of the Pallas operator (each one kernel, or two for the chunk states) against the XLA operator's,
  in the boundary layout both share."""
  q, k, v, log_decay, beta, do, lam, state = _operator_inputs(dtype)

  def stages(impl):  # jitted whole, the operator's build included: one program per implementation
    op = operator_class(impl).build(k, v, log_decay, beta, lam, state, jax.lax.Precision.HIGHEST)
    assert isinstance(op, ChunkedOperator)
    keys = jax.random.split(jax.random.key(8), 4)
    d_final = MesaState(*(jax.random.normal(key, x.shape, dtype) for key, x in zip(keys, state)))
    x, y = (jax.random.normal(key, q.shape, dtype) for key in keys[2:])  # any rows: the stages are linear in them
    u = op.adjoint_rhs(do)
    d_states = op.state_gradients(x, y, do, d_final)
    adaptive_x, adaptive_steps = op.solve(q, CGOptions(16, "jacobi", 1e-3))
    preconditioned_x, preconditioned_steps = op.solve(q, CGOptions(16, "zero", 1e-3, "jacobi"))
    fused_x, fused_o, _ = op.solve_and_output(token_major(q), CGOptions(16, "jacobi"))  # Pallas: one kernel here
    fused_u, fused_y, _ = op.adjoint_solve(do, CGOptions(16, "jacobi", 1e-3))
    return dict(states=op.states, final=op.states.at(-1), solve=op.solve(q, CGOptions(16, "jacobi"))[0],
                solve_and_output_x=fused_x, solve_and_output_o=fused_o, adjoint_solve_u=fused_u,
                adjoint_solve_y=fused_y,
                adaptive_solve=adaptive_x, adaptive_steps=adaptive_steps.astype(dtype),
                preconditioned_solve=preconditioned_x, preconditioned_steps=preconditioned_steps.astype(dtype),
                output=op.output(x), adjoint_rhs=u, d_states=d_states, d_initial=d_states.at(0),
                token_gradients=op.token_gradients(x, y, do, d_states))

  stages = [jax.jit(stages, static_argnums=0)(impl) for impl in ("xla", "pallas")]
  for name, expected in stages[0].items():
    assert _close(stages[1][name], expected, dtype), name


@pytest.mark.slow
def test_solve_fuses_the_reads():
  """`chunked_cg_solve(read=...)`: x as without it and o the read kernel's of that x; `(rhs_read=...)`: u the read
  kernel's of do, y and the steps those of solving that u; bit for bit (the same products, interpreted)."""
  q, k, v, log_decay, beta, do, lam, state = _operator_inputs(jnp.float32)
  op = operator_class("xla").build(k, v, log_decay, beta, lam, state, jax.lax.Precision.HIGHEST)
  args = (k, log_decay, beta, lam, op.states.kk_t)
  solve = lambda rhs, **fused: chunked_cg_solve(rhs, *args, cg_steps=8, cg_init="jacobi", cg_tol=1e-4,
                                                precision=jax.lax.Precision.HIGHEST, **fused)
  read = lambda rows, keys, values, **transposed: causal_read(rows, keys, values, op.states.kv, log_decay, beta,
                                                              precision=jax.lax.Precision.HIGHEST, **transposed)
  x, o, steps = solve(q, read=(v, op.states.kv))
  x_alone, steps_alone = solve(q)
  np.testing.assert_array_equal(x, x_alone)
  np.testing.assert_array_equal(steps, steps_alone)
  np.testing.assert_array_equal(o, read(x, k, v))
  y, u, steps = solve(do, rhs_read=(v, op.states.kv))
  np.testing.assert_array_equal(u, read(do, v, k, transpose_states=True))
  y_alone, steps_alone = solve(u)
  np.testing.assert_array_equal(y, y_alone)
  np.testing.assert_array_equal(steps, steps_alone)
