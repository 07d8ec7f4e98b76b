"""mesa_chunked against the exact dense solve: outputs, final state and the gradients of every input."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mesanet_jax.ops import MesaState, mesa_chunked, mesa_exact
from tests.ops.mesa_inputs import as_f64, max_abs, random_inputs, scale, value_and_gradients

# (B, T, H, Dk, Dv, C): T = 1, T < C, T not a multiple of C with Dk ≠ Dv, T a multiple of C, C = 1, Dv > Dk.
SHAPES = [
    (1, 1, 1, 4, 4, 4),
    (2, 5, 2, 8, 8, 16),
    (2, 37, 3, 8, 5, 8),
    (1, 48, 2, 16, 16, 16),
    (2, 6, 1, 4, 3, 1),
    (1, 20, 2, 4, 12, 8),
]
ARGNAMES = ("q", "k", "v", "g", "beta", "lam", "state")


# Every op below is jitted: one compiled program per op and shape instead of an eager compile per primitive (about
# half the compile time; the same math, so the same tolerances). Cached: tests of one op and shape share programs.
@functools.cache
def _chunked(chunk_size, cg_steps, **kwargs):
  return jax.jit(functools.partial(mesa_chunked, chunk_size=chunk_size, cg_steps=cg_steps, **kwargs))


_exact = jax.jit(mesa_exact)


def _gradients(op, args):
  return value_and_gradients(op, args)[1]


# In f64, 3·Dk CG steps converge the systems here (condition numbers ≲ 1e2) to rounding, so the chunked path must
# equal the dense solve to ~1e-12 of scale; 1e-9 leaves room for the longer sums of the chunked form.
F64_TOL = 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_state", [False, True])
def test_forward_matches_exact(x64, shape, with_state):
  batch, length, heads, key_dim, value_dim, chunk = shape
  args = as_f64(random_inputs(batch, length, heads, key_dim, value_dim, with_state=with_state))
  o, state = _chunked(chunk, 3 * key_dim)(*args)
  o_exact, state_exact = _exact(*args)
  assert o.shape == (batch, length, heads, value_dim)
  assert max_abs(o, o_exact) < F64_TOL * scale(o_exact)
  assert max_abs(state, state_exact) < F64_TOL * scale(state_exact)


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gradients_of_every_input_match_exact(x64, shape):
  batch, length, heads, key_dim, value_dim, chunk = shape
  args = as_f64(random_inputs(batch, length, heads, key_dim, value_dim, with_state=True, seed=1))
  grads = _gradients(_chunked(chunk, 3 * key_dim), args)
  grads_exact = _gradients(_exact, args)
  for name, grad, grad_exact in zip(ARGNAMES, grads, grads_exact):
    assert max_abs(grad, grad_exact) < F64_TOL * scale(grad_exact), name


@pytest.mark.slow  # compile-heavy (~10 s on 2 cores)
def test_gradients_match_finite_differences(x64):
  """Checks the implicit backward against numerical derivatives, independently of autodiff of the reference."""
  args = as_f64(random_inputs(1, 11, 2, 4, 3, with_state=True, seed=2))
  op = _chunked(4, 12)
  loss = jax.jit(lambda *a: jnp.sum(jnp.sin(op(*a)[0])) + jnp.sum(jnp.cos(op(*a)[1].h_kk)))
  check_grads(loss, args, order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


@pytest.mark.slow  # compile-heavy (~10 s on 2 cores)
def test_f32_accuracy_at_training_settings():
  """f32 inputs, 30 CG steps (the paper's training setting), Dk = 32, errors vs the f64 exact solve."""
  args = random_inputs(2, 200, 2, 32, 32, with_state=True, seed=4)
  (o, state), grads = value_and_gradients(_chunked(16, 30), args)
  with jax.enable_x64(True):
    args64 = as_f64(args)
    (o_exact, state_exact), grads_exact = value_and_gradients(_exact, args64)
  # CG stops at relative residual ~1e-6 after 30 steps on these well-conditioned systems; f32 rounding of the
  # chunk sums adds ~1e-6 of scale. Measured: output 3e-6, gradients ≤ 3e-5 of scale.
  assert max_abs(o, o_exact) < 1e-4 * scale(o_exact)
  assert max_abs(state, state_exact) < 1e-5 * scale(state_exact)
  for name, grad, grad_exact in zip(ARGNAMES, grads, grads_exact):
    assert max_abs(grad, grad_exact) < 5e-4 * scale(grad_exact), name


@pytest.mark.slow  # compile-heavy (~10 s on 2 cores per impl)
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_bf16_inputs_compute_in_f32(impl):
  """bf16 q, k, v enter the operator as bf16 (`chunked.row_dtype`: half the bytes) and every stage computes in f32:
  the result is that of the same values given in f32, up to the final roundings to bf16 (≤ 2⁻⁹ relative; the
  gradients of q, k, v in bf16 too)."""
  args = random_inputs(2, 40, 2, 16, 16, with_state=True, seed=5)
  args_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), args)
  op = _chunked(16, 30, impl=impl)
  (o, state), grads = value_and_gradients(op, args_bf16)
  assert o.dtype == jnp.bfloat16 and state.h_kk.dtype == jnp.float32 and state.h_kv.dtype == jnp.float32
  (o_f32, state_f32), grads_f32 = value_and_gradients(op, jax.tree.map(lambda x: x.astype(jnp.float32), args_bf16))
  assert max_abs(o, o_f32) <= 2.0**-8 * scale(o_f32)
  assert max_abs(state, state_f32) <= 1e-6 * scale(state_f32)  # the same sums; XLA may fuse them otherwise
  for name, grad, want, arg in zip(ARGNAMES, grads, grads_f32, args_bf16):
    for leaf_grad, leaf_want, leaf in zip(jax.tree.leaves(grad), jax.tree.leaves(want), jax.tree.leaves(arg)):
      assert leaf_grad.dtype == leaf.dtype and bool(jnp.all(jnp.isfinite(leaf_grad))), name
      assert max_abs(leaf_grad, leaf_want) <= 2.0**-8 * scale(leaf_want), name
  if impl == "pallas":  # the kernels that read v take it as bf16 (converted as loaded): here the solves, which make
    # both reads at these heads (`solve.fuses_reads`), else the causal read
    loss = lambda *a: jnp.sum(op(*a)[0].astype(jnp.float32))
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=range(7)))(*args_bf16)
    readers = [eqn for eqn in _equations(jaxpr.jaxpr) if eqn.primitive.name == "pallas_call"
               and eqn.params.get("name") in ("mesa_causal_read", "mesa_cg_solve")]
    assert readers and all(any(v.aval.dtype == jnp.bfloat16 for v in eqn.invars) for eqn in readers)


def _equations(jaxpr):
  """Every equation of a jaxpr and of the jaxprs in its equations' parameters (jit, custom_vjp, ...), not those of
  a pallas_call's kernel."""
  for eqn in jaxpr.eqns:
    yield eqn
    if eqn.primitive.name == "pallas_call":
      continue
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _equations(inner)


@pytest.mark.slow
def test_jit_and_chunk_size_do_not_change_the_result(x64):
  args = as_f64(random_inputs(2, 30, 2, 8, 8, with_state=True, seed=6))
  results = [_chunked(chunk, 24)(*args) for chunk in (1, 7, 8, 64)]
  for result in results[1:]:
    assert max_abs(result, results[0]) < 1e-11


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_saved_states_give_the_gradients_of_rebuilt_ones(impl):
  """save_states=True: the backward takes the forward's chunk states instead of computing them again. f32 (the
  Pallas kernels interpreted): the same sums in another program may round differently, by ~1e-7 of scale."""
  args = random_inputs(2, 40, 2, 16, 16, with_state=True, seed=8)
  saved, rebuilt = (_gradients(_chunked(16, 6, impl=impl, save_states=save), args) for save in (True, False))
  for name, got, want in zip(ARGNAMES, saved, rebuilt):
    assert max_abs(got, want) <= 1e-6 * scale(want), name
  if impl == "pallas":  # the forward scans (H_kk and H_kv) run once, not again in the backward
    for save, scans in ((True, 2), (False, 4)):
      loss = lambda *a: jnp.sum(mesa_chunked(*a, chunk_size=16, cg_steps=2, impl=impl, save_states=save)[0])
      jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=range(7)))(*args))
      assert re.findall(r"name=(mesa_\w+)", jaxpr).count("mesa_chunk_states") == scans, save


@pytest.mark.slow
def test_final_state_continues_the_sequence(x64):
  args = as_f64(random_inputs(2, 40, 2, 8, 6, seed=7))
  op = _chunked(8, 24)
  o_full, state_full = op(*args)
  first = [x[:, :17] for x in args[:5]]
  second = [x[:, 17:] for x in args[:5]]
  o_first, state_first = op(*first, args[5])
  o_second, state_second = op(*second, args[5], state_first)
  assert max_abs(jnp.concatenate([o_first, o_second], axis=1), o_full) < 1e-11
  assert max_abs(state_second, state_full) < 1e-12


@pytest.mark.slow
def test_cg_error_decreases_with_steps(x64):
  args = as_f64(random_inputs(2, 64, 2, 16, 16, seed=8))
  o_exact, _ = _exact(*args)
  # Every budget in one program: the chunk sums they share compile once (~5x less compile time than one program
  # per budget).
  outputs = jax.jit(lambda *args: {init: [mesa_chunked(*args, chunk_size=16, cg_steps=steps, cg_init=init)[0]
                                          for steps in (1, 2, 4, 8, 16, 32)] for init in ("jacobi", "zero")})(*args)
  errors = {init: [max_abs(o, o_exact) for o in outs] for init, outs in outputs.items()}
  for init, err in errors.items():
    assert all(later < earlier for earlier, later in zip(err, err[1:])), (init, err)
    assert err[-1] < 1e-10, (init, err)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_refined_solves_correct_the_first_solves_error(x64, impl):
  # solve_precision runs every solve (forward and adjoint) as two CG solves, the second on the first's residual
  # (computed at matmul_precision). On the CPU every precision computes in f64 here, so what shows is the algebra:
  # a refined solve of n steps is a CG restarted once, about as accurate as 2n plain steps (measured, worst of o, the
  # final state and every gradient: 4 steps 2.2e-2 plain, 5.7e-4 refined; 16 steps 1e-13 plain, 8e-16 refined), and
  # the steps reported are both solves'. tests/pallas/test_split_dot.py shows it correcting the GPU's one-pass dots.
  args = as_f64(random_inputs(2, 64, 2, 16, 16, seed=8, with_state=True))
  exact = jax.tree.leaves(value_and_gradients(_exact, args))
  error = lambda op: max(max_abs(g, e) / scale(e) for g, e in zip(jax.tree.leaves(value_and_gradients(op, args)),
                                                                  exact))
  plain, refined = (_chunked(16, 4, impl=impl, solve_precision=p) for p in (None, "default"))
  assert error(refined) < error(plain) / 10
  assert error(_chunked(16, 16, impl=impl, solve_precision="default")) < 1e-12
  steps = jax.jit(functools.partial(mesa_chunked, chunk_size=16, cg_steps=4, impl=impl, solve_precision="default",
                                    return_cg_steps=True))(*args)[2]
  np.testing.assert_array_equal(steps, 8)  # (mean, max) of 4 + 4 steps every row


# Stress inputs, in f32 (the training precision) against the f64 exact solve. Each is near a boundary of the input
# ranges; the bounds are loose multiples of what was measured, chosen to catch blow-ups, not rounding.
def _stress_case(name):
  batch, heads, key_dim = 1, 2, 16
  length = 3000 if name in ("gamma_near_one", "repeated_keys") else 256
  q, k, v, g, beta, lam, _ = random_inputs(batch, length, heads, key_dim, key_dim, seed=9)
  if name == "gamma_near_one":  # γ = 1 − 1e-5 over 3000 tokens: H_kk grows to ~T/Dk, cond(A) ~ 1e3
    g = jnp.full_like(g, jnp.log1p(-1e-5))
  elif name == "beta_near_zero":
    beta = jnp.full_like(beta, 1e-6)
  elif name == "beta_near_one":
    beta = jnp.full_like(beta, 1 - 1e-6)
  elif name == "lambda_at_lower_bound":
    lam = jnp.full_like(lam, 0.25)
  elif name == "repeated_keys":  # one key for every token, γ = β = 1: A = T k kᵀ + 0.25 I, cond(A) = 1.2e4
    k = jnp.broadcast_to(k[:, :1], k.shape)
    g, beta, lam = jnp.zeros_like(g), jnp.ones_like(beta), jnp.full_like(lam, 0.25)
  return q, k, v, g, beta, lam, None


@pytest.mark.slow  # up to 3000 tokens in f32 and f64, with gradients
@pytest.mark.parametrize("name", ["gamma_near_one", "beta_near_zero", "beta_near_one", "lambda_at_lower_bound",
                                  "repeated_keys"])
def test_stress_inputs_stay_finite_and_accurate(name):
  args = _stress_case(name)
  op = _chunked(64, 2 * args[0].shape[-1] + 8)
  (o, state), grads = value_and_gradients(op, args)
  with jax.enable_x64(True):
    args64 = as_f64(args)
    (o_exact, _), grads_exact = value_and_gradients(_exact, args64)
  assert bool(jnp.all(jnp.isfinite(o))) and all(bool(jnp.all(jnp.isfinite(x))) for x in state)
  assert max_abs(o, o_exact) < 1e-3 * scale(o_exact)
  for argname, grad, grad_exact in zip(ARGNAMES[:6], grads[:6], grads_exact[:6]):
    assert bool(jnp.all(jnp.isfinite(grad))), argname
    assert max_abs(grad, grad_exact) < 1e-2 * scale(grad_exact), argname


@pytest.mark.parametrize("bad, message", [
    ({"k": np.zeros((2, 9, 3, 7))}, r"k must have shape \[B, T, H, Dk\] = \(2, 9, 3, 8\)"),
    ({"v": np.zeros((2, 8, 3, 5))}, r"v must have shape \[B, T, H, Dv\] = \(2, 9, 3, 5\)"),
    ({"g": np.zeros((2, 9, 3, 1))}, r"g must have shape \[B, T, H\] = \(2, 9, 3\)"),
    ({"beta": np.zeros((2, 9), np.float32)}, r"beta must have shape \[B, T, H\]"),
    ({"lam": np.ones((8,))}, r"lam must have shape \[H, Dk\] = \(3, 8\)"),
    ({"q": np.zeros((2, 9, 8))}, r"q must have shape \[B, T, H, Dk\]"),
    ({"q": np.zeros((2, 9, 3, 8), np.int32)}, r"q must have a floating dtype"),
    ({"state": MesaState(np.zeros((2, 3, 8, 8)), np.zeros((2, 3, 8, 4)))}, r"state.h_kv must have shape"),
    ({"state": (np.zeros((2, 3, 8, 8)), np.zeros((2, 3, 8, 5)))}, r"state must be a MesaState"),
    ({"chunk_size": 0}, r"chunk_size must be a positive int"),
    ({"cg_steps": -1}, r"cg_steps must be a non-negative int"),
    ({"cg_init": "ones"}, r"cg_init must be one of"),
    ({"cg_preconditioner": "ilu"}, r"cg_preconditioner must be one of \('none', 'jacobi'\), got 'ilu'"),
    ({"impl": "cuda"}, r"impl must be one of"),
    ({"matmul_precision": "tf32"}, r"matmul_precision must be one of"),
    ({"solve_precision": "fp16"}, r"solve_precision must be None or one of \('highest', 'high', 'default'\), "
                                  r"got 'fp16'"),
    ({"cg_tol": 0.0}, r"cg_tol must be a positive float or None"),
    ({"save_states": "yes"}, r"save_states must be a bool, got 'yes'"),
    ({"cg_probe": np.zeros((2, 3))}, r"cg_probe must be a float array of shape \[B, H, 4\] = \(2, 3, 4\)"),
])
def test_bad_arguments_raise_clear_errors(bad, message):
  q, k, v, g, beta, lam, _ = random_inputs(2, 9, 3, 8, 5)
  kwargs = dict(q=q, k=k, v=v, g=g, beta=beta, lam=lam, state=None) | bad
  with pytest.raises(ValueError, match=message):
    mesa_chunked(**kwargs)
