"""The Hopper CG solve (Pallas Mosaic GPU), interpreted on CPU (its wgmma left operands staged in shared memory, as
the interpreter requires): against the Triton-path kernel, the f64 CG of the same steps, `conjugate_gradient`'s stops
and the exact dense solve, at the extremes of its fp16 scaling; lowered for CUDA (left operands in registers) in
test_lowering.py. Each kernel test traces one configuration (a few seconds on 2 cores)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mesanet_jax.ops import MesaState
from mesanet_jax.ops.cg import conjugate_gradient
from mesanet_jax.ops.inputs import CGOptions
from mesanet_jax.ops.operator import chunk_major, operator_class, token_major
from pallas_kernels.mesa_cg.solve import chunked_cg_solve
from pallas_kernels.mesa_cg.params import lowering_for
from pallas_kernels.mesa_cg.solve_hopper import fuses_read, hopper_cg_solve, unsupported_reason, use_hopper_solve
from tests.ops.mesa_inputs import as_f64, max_abs, random_inputs, scale

HIGHEST, DEFAULT = lax.Precision.HIGHEST, lax.Precision.DEFAULT
# Products of fp16 parts of scaled operands (chunk.SplitDot): 3 passes keep ~22 bits (2.4e-7 of the operands'
# scale), 1 pass 11 bits (4.9e-4); a few CG steps amplify that by up to cond(A) ~ 10 (measured on CPU: 2e-7 – 5e-7
# and 2e-4 – 4e-4 of max |x|).
TOLERANCE = {HIGHEST: 3e-6, DEFAULT: 1e-3}


def problem(chunk, key_dim, *, chunks=1, symmetric=True, seed=0, decay_bias=3.0, big_state=False, rank_one=False):
  """Chunk-major rhs, k, log_decay (cumulative), beta, lam, Sᵀ at every chunk start (B=1, H=2, N=chunks), f32, and the
  XLA operator of the same system in f64. A non-symmetric initial state (unless `symmetric`) checks that the kernel
  reads Sᵀ, not S; `decay_bias` sets the decays (as random_inputs); `big_state` makes the initial state 10^6 (S + I),
  which outweighs the keys' term and keeps A well conditioned; `rank_one` makes it 0.1 · 1 1ᵀ, every entry as large
  as the largest diagonal one."""
  q, k, _, g, beta, lam, state = random_inputs(1, chunks * chunk, 2, key_dim, 1, with_state=True, seed=seed,
                                               decay_bias=decay_bias)
  if big_state:
    state = MesaState(1e6 * (state.h_kk + jnp.eye(key_dim)), state.h_kv)
  if rank_one:
    state = MesaState(jnp.full_like(state.h_kk, 0.1), state.h_kv)
  if not symmetric:
    noise = jax.random.normal(jax.random.key(seed + 1), state.h_kk.shape)
    state = MesaState(state.h_kk + 0.1 * noise, state.h_kv)
  chunked = lambda x: chunk_major(x, chunk)  # -> [B, H, N, C, ...]
  q, k, g, beta = map(chunked, (q, k, g, beta))
  log_decay = jnp.cumsum(g, axis=-1)
  with jax.enable_x64(True):
    build = jax.jit(lambda *a: operator_class("xla").build(*a, HIGHEST))
    op = build(*as_f64((k, k, log_decay, beta, lam, MesaState(state.h_kk, state.h_kk))))
    states_kk_t = op.states.kk_t.astype(jnp.float32)
  return (q, k, log_decay, beta, lam, states_kk_t), op


@pytest.mark.slow
@pytest.mark.parametrize("chunk, key_dim, cg_init, precision", [
    (32, 64, "jacobi", HIGHEST),  # one chunk of 32 and an empty one: 64 rows
    (64, 128, "zero", HIGHEST),
    (64, 64, "jacobi", DEFAULT),
])
def test_matches_triton_kernel_and_f64_cg(chunk, key_dim, cg_init, precision):
  args, op = problem(chunk, key_dim, symmetric=False)
  x, steps = hopper_cg_solve(*args, cg_steps=4, cg_init=cg_init, precision=precision)
  triton, _ = chunked_cg_solve(*args, cg_steps=4, cg_init=cg_init, precision=HIGHEST)
  with jax.enable_x64(True):
    exact_steps, _ = op.solve(as_f64(args[0]), CGOptions(4, cg_init))
  np.testing.assert_array_equal(steps, 4)
  assert max_abs(x, triton) <= TOLERANCE[precision] * scale(triton)
  assert max_abs(x, exact_steps) <= TOLERANCE[precision] * scale(exact_steps)


@pytest.mark.slow
def test_tolerance_stops_rows_as_conjugate_gradient(x64):
  """cg_tol: the same steps per row as conjugate_gradient(tol) in f64, and the same x; rows stop before the cap."""
  args, op = problem(64, 64, seed=3)
  with jax.enable_x64(False):
    x, steps = hopper_cg_solve(*args, cg_steps=12, cg_init="zero", cg_tol=1e-3, precision=HIGHEST)
  rhs = as_f64(args[0])
  x_ref, steps_ref = conjugate_gradient(op.matvec, rhs, jnp.zeros_like(rhs), steps=12, tol=1e-3)
  np.testing.assert_array_equal(steps, steps_ref)
  assert int(jnp.max(steps)) < 12
  assert max_abs(x, x_ref) <= TOLERANCE[HIGHEST] * scale(x_ref)


@pytest.mark.slow
def test_jacobi_preconditioner_as_conjugate_gradient(x64):
  """cg_preconditioner="jacobi" (1 / diag(A) kept in shared memory): the steps per row and x of the f64 XLA solve
  with the same options, and the Triton-path kernel's x."""
  args, op = problem(64, 64, seed=3)
  options = dict(cg_steps=12, cg_init="zero", cg_tol=1e-3, cg_preconditioner="jacobi")
  with jax.enable_x64(False):
    x, steps = hopper_cg_solve(*args, **options, precision=HIGHEST)
    triton, triton_steps = chunked_cg_solve(*args, **options, precision=HIGHEST)
  x_ref, steps_ref = op.solve(as_f64(args[0]), CGOptions(12, "zero", 1e-3, "jacobi"))
  np.testing.assert_array_equal(steps, steps_ref)
  np.testing.assert_array_equal(triton_steps, steps_ref)
  assert int(jnp.max(steps)) < 12
  assert max_abs(x, x_ref) <= TOLERANCE[HIGHEST] * scale(x_ref)
  assert max_abs(triton, x_ref) <= TOLERANCE[HIGHEST] * scale(x_ref)


@pytest.mark.slow
def test_converges_to_the_exact_solve(x64):
  """Enough steps reach (H_kk[t] + Λ)⁻¹ rhs_t, each A_t built densely by the token-by-token recurrence in f64."""
  args, _ = problem(32, 64, seed=5)
  with jax.enable_x64(False):
    x, _ = hopper_cg_solve(*args, cg_steps=40, cg_init="jacobi", precision=HIGHEST)
  q, k, _, g, beta, lam, state = as_f64(random_inputs(1, 32, 2, 64, 1, with_state=True, seed=5))

  def token(h_kk, inputs):
    k_t, g_t, beta_t = inputs  # [H, Dk], [H], [H]
    h_kk = jnp.exp(g_t)[:, None, None] * h_kk + beta_t[:, None, None] * k_t[:, :, None] * k_t[:, None, :]
    return h_kk, h_kk

  _, h_kk = lax.scan(token, state.h_kk[0], (k[0], g[0], beta[0]))  # [T, H, Dk, Dk]
  exact = jnp.linalg.solve(h_kk + jax.vmap(jnp.diag)(lam), q[0][..., None])[..., 0]  # [T, H, Dk]
  # f32 inputs and 22-bit products: a converged solve is as close to the f64 one as f32 rounding of cond ≲ 1e2 allows.
  assert max_abs(x[0, :, 0], jnp.moveaxis(exact, 0, 1)) <= 1e-5 * scale(exact)


@pytest.mark.slow
def test_chunks_of_32_in_pairs():
  """Three chunks of 32 as two programs of 64 rows (chunks 0-1 on chunk 0's start state, chunk 2 and an empty one):
  the same x as the Triton-path kernel, which solves chunk by chunk on each chunk's own state."""
  args, _ = problem(32, 64, chunks=3, symmetric=False, seed=11)
  # A tolerance no row reaches in 4 steps: the counted loop, its steps unpaired as well.
  x, steps = hopper_cg_solve(*args, cg_steps=4, cg_init="jacobi", cg_tol=1e-12, precision=HIGHEST)
  triton, _ = chunked_cg_solve(*args, cg_steps=4, cg_init="jacobi", precision=HIGHEST)
  np.testing.assert_array_equal(steps, np.full(args[0].shape[:-1], 4))
  assert max_abs(x, triton) <= TOLERANCE[HIGHEST] * scale(triton)


@pytest.mark.parametrize("chunk, chunks, key_dim, value_dim, cg_tol", [
    (64, 2, 64, 128, None),  # two chunks: the second reads a nonzero start state
    (32, 3, 64, 64, 1e-3),  # pairs of chunks of 32 (the second program starts at boundary 2), counted steps
])
@pytest.mark.slow
def test_read_from_x_on_chip_equals_the_causal_read(chunk, chunks, key_dim, value_dim, cg_tol):
  """read=(V, S_kv): the same x and steps as without it, and o = the causal read of that x (the XLA operator's output
  stage in f32), to one fp16 pass's rounding."""
  q, k, v, g, beta, lam, state = random_inputs(1, chunks * chunk, 2, key_dim, value_dim, with_state=True, seed=5)
  chunked = lambda x: chunk_major(x, chunk)
  q, k, v, g, beta = map(chunked, (q, k, v, g, beta))
  log_decay = jnp.cumsum(g, axis=-1)
  op = operator_class("xla").build(k, v, log_decay, beta, lam, state, HIGHEST)
  args = (q, k, log_decay, beta, lam, op.states.kk_t)
  solve = lambda **read: hopper_cg_solve(*args, cg_steps=4, cg_init="jacobi", cg_tol=cg_tol, precision=DEFAULT,
                                         **read)
  x, o, steps = solve(read=(v, op.states.kv))
  x_alone, steps_alone = solve()
  np.testing.assert_array_equal(x, x_alone)
  np.testing.assert_array_equal(steps, steps_alone)
  expected = op.output(x)
  assert max_abs(o, expected) <= TOLERANCE[DEFAULT] * scale(expected)


@pytest.mark.parametrize("chunk, chunks, key_dim, value_dim, cg_tol", [
    (64, 2, 64, 128, None),  # Dv ≠ Dk: do and u differ in width
    (32, 3, 64, 64, 1e-3),  # pairs of chunks of 32, counted steps
])
@pytest.mark.slow
def test_adjoint_right_hand_side_made_on_chip(chunk, chunks, key_dim, value_dim, cg_tol):
  """rhs_read=(V, S_kv), the backward's adjoint solve: u = H_kv[t] do_t made from do on chip is the causal read (the
  XLA operator's adjoint_rhs in f32) to one fp16 pass's rounding, and y and the steps are those of the solve of the
  u it returns, bit for bit."""
  _, k, v, g, beta, lam, state = random_inputs(1, chunks * chunk, 2, key_dim, value_dim, with_state=True, seed=7)
  do = jax.random.normal(jax.random.key(7), v.shape)
  chunked = lambda x: chunk_major(x, chunk)
  k, v, do, g, beta = map(chunked, (k, v, do, g, beta))
  log_decay = jnp.cumsum(g, axis=-1)
  op = operator_class("xla").build(k, v, log_decay, beta, lam, state, HIGHEST)
  solve = lambda rhs, **fused: hopper_cg_solve(rhs, k, log_decay, beta, lam, op.states.kk_t, cg_steps=4,
                                               cg_init="jacobi", cg_tol=cg_tol, precision=DEFAULT, **fused)
  y, u, steps = solve(do, rhs_read=(v, op.states.kv))
  expected = op.adjoint_rhs(do)
  assert u.shape == expected.shape
  assert max_abs(u, expected) <= TOLERANCE[DEFAULT] * scale(expected)
  y_alone, steps_alone = solve(u)
  np.testing.assert_array_equal(y, y_alone)
  np.testing.assert_array_equal(steps, steps_alone)


@pytest.mark.slow
def test_x_in_shared_memory_solves_as_x_in_registers():
  """x_in_shared_memory=True (the loop adds α·p to x in shared memory and carries a token): the same steps, x to f32
  rounding (x + α·p in another order), and the fused read made from x loaded back."""
  q, k, v, g, beta, lam, state = random_inputs(1, 128, 2, 64, 64, with_state=True, seed=7)
  chunked = lambda x: chunk_major(x, 64)
  q, k, v, g, beta = map(chunked, (q, k, v, g, beta))
  log_decay = jnp.cumsum(g, axis=-1)
  op = operator_class("xla").build(k, v, log_decay, beta, lam, state, HIGHEST)
  solve = lambda x_in_shared_memory: hopper_cg_solve(
      q, k, log_decay, beta, lam, op.states.kk_t, cg_steps=30, cg_init="jacobi", cg_tol=1e-3, precision=DEFAULT,
      x_in_shared_memory=x_in_shared_memory, read=(v, op.states.kv))
  (x, o, steps), (x_ref, o_ref, steps_ref) = solve(True), solve(False)
  np.testing.assert_array_equal(steps, steps_ref)
  assert int(jnp.min(steps)) < int(jnp.max(steps)) < 30  # rows stopped at different steps, the loop before the cap
  assert max_abs(x, x_ref) <= 1e-6 * scale(x_ref)
  assert max_abs(o, o_ref) <= 1e-6 * scale(o_ref)


@pytest.mark.slow
def test_bf16_rows_solve_as_their_f32_values():
  """rhs, k and v given as bf16 (as a bf16 model's q, k, v reach the op) are converted as the kernel loads them: x
  and the steps are those of the same values given in f32, bit for bit, and o (written in rhs's dtype) is their o
  rounded to bf16."""
  q, k, v, g, beta, lam, state = random_inputs(1, 64, 2, 64, 64, with_state=True, seed=9)
  chunked = lambda x: chunk_major(x, 64)
  q, k, v, g, beta = map(chunked, (q, k, v, g, beta))
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  log_decay = jnp.cumsum(g, axis=-1)
  op = operator_class("xla").build(k, v, log_decay, beta, lam, state, HIGHEST)
  solve = lambda q, k, v: hopper_cg_solve(q, k, log_decay, beta, lam, op.states.kk_t, cg_steps=30, cg_init="jacobi",
                                          cg_tol=1e-3, precision=DEFAULT, read=(v, op.states.kv))
  (x, o, steps), (want_x, want_o, want_steps) = solve(q, k, v), solve(*(x.astype(jnp.float32) for x in (q, k, v)))
  assert x.dtype == jnp.float32 and o.dtype == jnp.bfloat16
  np.testing.assert_array_equal(x, want_x)
  np.testing.assert_array_equal(steps, want_steps)
  np.testing.assert_array_equal(o, want_o.astype(jnp.bfloat16))


@pytest.mark.slow
def test_without_the_solution_o_and_the_steps_are_the_same():
  """solution=False (a forward no gradient is taken of): x is not written, o and the steps are as with it."""
  q, k, v, g, beta, lam, state = random_inputs(1, 64, 2, 64, 64, with_state=True, seed=10)
  chunked = lambda x: chunk_major(x, 64)
  q, k, v, g, beta = map(chunked, (q, k, v, g, beta))
  log_decay = jnp.cumsum(g, axis=-1)
  op = operator_class("xla").build(k, v, log_decay, beta, lam, state, HIGHEST)
  solve = lambda solution: hopper_cg_solve(q, k, log_decay, beta, lam, op.states.kk_t, cg_steps=30, cg_init="jacobi",
                                           cg_tol=1e-3, precision=DEFAULT, read=(v, op.states.kv), solution=solution)
  (x, o, steps), (_, want_o, want_steps) = solve(False), solve(True)
  assert x is None
  np.testing.assert_array_equal(o, want_o)
  np.testing.assert_array_equal(steps, want_steps)
  with pytest.raises(ValueError, match="solution=False needs read"):
    hopper_cg_solve(q, k, log_decay, beta, lam, op.states.kk_t, cg_steps=1, cg_init="zero", precision=DEFAULT,
                    solution=False)


@pytest.mark.parametrize("chunk, chunks", [
    (64, 2),
    (32, 3),  # pairs of chunks of 32, the last one alone: q padded to 128 tokens, o cut back to 96
])
@pytest.mark.slow
def test_token_major_rhs_and_o_are_the_chunk_major_ones_in_place(chunk, chunks):
  """token_major=True reads q [B, N·C, H, Dk] and writes o [B, N·C, H, Dv] in place (the forward's layout): x, o
  and the steps are the chunk-major call's, bit for bit."""
  q, k, v, g, beta, lam, state = random_inputs(2, chunks * chunk, 2, 64, 64, with_state=True, seed=11)
  chunked = lambda x: chunk_major(x, chunk)
  k, v, g, beta = map(chunked, (k, v, g, beta))
  q = q.astype(jnp.bfloat16)
  log_decay = jnp.cumsum(g, axis=-1)
  op = operator_class("xla").build(k, v, log_decay, beta, lam, state, HIGHEST)
  solve = lambda q, in_place: hopper_cg_solve(
      q, k, log_decay, beta, lam, op.states.kk_t, cg_steps=30, cg_init="jacobi", cg_tol=1e-3, precision=DEFAULT,
      read=(v, op.states.kv), token_major=in_place)
  x, o, steps = solve(q, True)
  want_x, want_o, want_steps = solve(chunked(q), False)
  assert o.shape == (2, chunks * chunk, 2, 64) and o.dtype == jnp.bfloat16
  np.testing.assert_array_equal(x, want_x)
  np.testing.assert_array_equal(steps, want_steps)
  np.testing.assert_array_equal(o, token_major(want_o))
  with pytest.raises(ValueError, match="token-major"):
    solve(chunked(q), True)


def test_read_refused_where_it_does_not_fit():
  rows = lambda *shape: jnp.zeros((1, 2, 1, 64, *shape))  # refused before anything is traced: zeros will do
  args = (rows(64), rows(64), rows(), rows(), jnp.ones((2, 64)), jnp.zeros((1, 2, 2, 64, 64)))
  values, states_kv = rows(32), jnp.zeros((1, 2, 2, 64, 32))
  assert fuses_read(128, DEFAULT) and not fuses_read(128, HIGHEST) and not fuses_read(32, DEFAULT)
  with pytest.raises(ValueError, match="Dv=32"):
    hopper_cg_solve(*args, cg_steps=1, cg_init="zero", precision=DEFAULT, read=(values, states_kv))


@pytest.mark.parametrize("decay_bias, big_state", [
    (-4.0, False),  # γ ≈ 0.02: e^{G_t} underflows within the chunk, the state term vanishes beside the keys'
    (3.0, True),  # a state 10^6 times the keys' term
])
@pytest.mark.slow  # compiles over ~8 s on one core
def test_scaling_holds_when_one_term_dominates(decay_bias, big_state):
  """Round 2 puts the larger of the state and key terms at fp16's top: the smaller one must not overflow or lose
  the larger one's accuracy."""
  args, op = problem(32, 64, seed=7, decay_bias=decay_bias, big_state=big_state)
  x, _ = hopper_cg_solve(*args, cg_steps=4, cg_init="jacobi", precision=HIGHEST)
  with jax.enable_x64(True):
    exact_steps, _ = op.solve(as_f64(args[0]), CGOptions(4, "jacobi"))
  assert max_abs(x, exact_steps) <= TOLERANCE[HIGHEST] * scale(exact_steps)


@pytest.mark.slow  # compiles over ~8 s on one core
def test_state_scale_from_the_diagonal_bounds_every_entry(x64):
  """S's fp16 scale is max_i S_ii (S is positive semidefinite, so no entry is larger): a rank-one state whose every
  entry reaches that bound is staged at fp16's top without overflow and solved as the f64 CG solves it."""
  args, op = problem(64, 64, seed=5, rank_one=True)
  x, _ = hopper_cg_solve(*args, cg_steps=4, cg_init="jacobi", precision=HIGHEST)
  exact_steps, _ = op.solve(as_f64(args[0]), CGOptions(4, "jacobi"))
  assert bool(jnp.all(jnp.isfinite(x)))
  assert max_abs(x, exact_steps) <= TOLERANCE[HIGHEST] * scale(exact_steps)


def test_refuses_what_it_cannot_take():
  assert unsupported_reason(16, 128, jnp.float32).startswith("chunk_size=16")
  assert unsupported_reason(64, 32, jnp.float32).startswith("key_dim=32")
  assert unsupported_reason(64, 128, jnp.float64).startswith("dtype=float64")
  assert unsupported_reason(32, 128, jnp.float32) is None
  assert unsupported_reason(64, 128, jnp.bfloat16) is None  # 16-bit rows, converted as the kernel loads them
  args, _ = problem(32, 64)
  with pytest.raises(ValueError, match="precision must be"):
    hopper_cg_solve(*args, cg_steps=1, cg_init="zero", precision=lax.DotAlgorithmPreset.TF32_TF32_F32)


def test_chosen_for_sm90_gpu_kernels_only():
  device = lambda kind: jax.sharding.AbstractDevice(device_kind=kind, num_cores=132, platform="gpu")
  mesh = lambda kind: jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Auto,),
                                                abstract_device=device(kind))
  with lowering_for("cpu"):
    assert not use_hopper_solve(32, 128, jnp.float32)  # interpret mode: the Triton-path kernel
  with lowering_for("gpu"):
    with jax.sharding.use_abstract_mesh(mesh("NVIDIA H200")):
      assert use_hopper_solve(64, 128, jnp.float32)
      assert not use_hopper_solve(16, 128, jnp.float32)
    with jax.sharding.use_abstract_mesh(mesh("NVIDIA A100-SXM4-80GB")):
      assert not use_hopper_solve(64, 128, jnp.float32)
