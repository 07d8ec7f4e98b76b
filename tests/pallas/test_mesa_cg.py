"""mesa_chunked(impl="pallas") against the XLA path and the exact solve: outputs, final state and every gradient
(q, k, v, g, β, λ, initial state); the kernels run in interpret mode on CPU."""
import functools

import jax
import pytest

from mesanet_jax.ops import mesa_chunked, mesa_exact
from tests.pallas.precision import F32_PRODUCT_ERROR
from tests.ops.mesa_inputs import (as_f64, max_abs, output_weights, random_inputs, scale, value_and_gradients,
                                  weighted_sum_loss)

# (B, T, H, Dk, Dv, C): T a multiple of C; T not a multiple of C with Dv > Dk.
SHAPES = [(1, 32, 2, 16, 16, 16), (2, 21, 1, 16, 32, 16)]


# Every op below is jitted and cached: one compiled program per op and shape instead of an eager compile per
# primitive.
@functools.cache
def _op(impl, chunk_size, cg_steps, **kwargs):
  return jax.jit(functools.partial(mesa_chunked, chunk_size=chunk_size, cg_steps=cg_steps, impl=impl, **kwargs))


@pytest.mark.slow  # every kernel interpreted, forward and backward
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("cg_init", ["jacobi", "zero"])
def test_pallas_matches_xla_in_f32(shape, cg_init):
  batch, length, heads, key_dim, value_dim, chunk = shape
  args = random_inputs(batch, length, heads, key_dim, value_dim, with_state=True, seed=3)
  (o, state), grads = value_and_gradients(_op("pallas", chunk, 20, cg_init=cg_init), args)
  (o_xla, state_xla), grads_xla = value_and_gradients(_op("xla", chunk, 20, cg_init=cg_init), args)
  # The same CG with the products rounded differently (tests/pallas/precision.py), amplified by at most
  # cond(A) ≲ 1e2 through the solve, far less in practice. Measured on CPU: ≤ 5e-7 of scale.
  assert max_abs(o, o_xla) < 10 * F32_PRODUCT_ERROR * scale(o_xla)
  assert max_abs(state, state_xla) < F32_PRODUCT_ERROR * scale(state_xla)  # a scan in both: no solve in between
  for grad, grad_xla in zip(grads, grads_xla):
    assert max_abs(grad, grad_xla) < 10 * F32_PRODUCT_ERROR * scale(grad_xla)


@pytest.mark.slow  # every kernel interpreted, forward and backward
def test_pallas_is_exact_cg_in_f64(x64):
  args = as_f64(random_inputs(1, 40, 2, 16, 16, with_state=True, seed=4))
  (o, _), grads = value_and_gradients(_op("pallas", 16, 48), args)
  (o_exact, _), grads_exact = value_and_gradients(mesa_exact, args)
  # 3·Dk CG steps in f64: converged to rounding, as the XLA path (tests/ops/test_chunked.py).
  assert max_abs(o, o_exact) < 1e-9 * scale(o_exact)
  for grad, grad_exact in zip(grads, grads_exact):
    assert max_abs(grad, grad_exact) < 1e-9 * scale(grad_exact)


@pytest.mark.slow
def test_adaptive_pallas_matches_xla_in_f32():
  """With cg_tol both paths stop every row at the same step (the kernels end a program's loop once its rows have
  stopped, the XLA path runs one loop over all rows): same outputs, gradients and step counts."""
  args = random_inputs(2, 21, 1, 16, 32, with_state=True, seed=3)
  weights = output_weights(mesa_exact, args)
  probe = jax.numpy.zeros((2, 1, 4))
  results = []
  for impl in ("pallas", "xla"):
    op = _op(impl, 16, 20, cg_tol=1e-4)
    loss = lambda probe, *a: weighted_sum_loss(functools.partial(op, cg_probe=probe), weights)(*a)
    results.append(jax.jit(lambda probe, *a: (op(*a), jax.grad(loss, argnums=range(8))(probe, *a)))(probe, *args))
  ((o, state), (steps, *grads)), ((o_xla, state_xla), (steps_xla, *grads_xla)) = results
  # As test_pallas_matches_xla_in_f32; a row whose residual sat within rounding of the threshold could stop a step
  # apart, which this input does not have (the counts are equal).
  assert max_abs(o, o_xla) < 10 * F32_PRODUCT_ERROR * scale(o_xla)
  assert max_abs(state, state_xla) < F32_PRODUCT_ERROR * scale(state_xla)
  for grad, grad_xla in zip(grads, grads_xla):
    assert max_abs(grad, grad_xla) < 10 * F32_PRODUCT_ERROR * scale(grad_xla)
  assert max_abs(steps, steps_xla) == 0 and 1 < float(steps[0, 0, 0]) < 20


@pytest.mark.slow
def test_adaptive_pallas_is_exact_in_f64(x64):
  args = as_f64(random_inputs(1, 40, 2, 16, 16, with_state=True, seed=4))
  (o, _), grads = value_and_gradients(_op("pallas", 16, 48, cg_tol=1e-13), args)
  (o_exact, _), grads_exact = value_and_gradients(mesa_exact, args)
  # As the fixed-step f64 test: a relative residual of 1e-13 leaves ~1e-11 of scale (tests/ops/test_adaptive_cg.py).
  assert max_abs(o, o_exact) < 1e-9 * scale(o_exact)
  for grad, grad_exact in zip(grads, grads_exact):
    assert max_abs(grad, grad_exact) < 1e-9 * scale(grad_exact)


@pytest.mark.parametrize("chunk_size, key_dim, value_dim, name", [(8, 16, 16, "chunk_size"), (16, 24, 16, "key_dim"),
                                                                  (16, 16, 8, "value_dim")])
def test_sizes_the_kernel_cannot_take_raise(chunk_size, key_dim, value_dim, name):
  args = random_inputs(1, 16, 1, key_dim, value_dim)
  with pytest.raises(ValueError, match=rf"impl='pallas' cannot run this input: {name}=.*powers of two"):
    mesa_chunked(*args, chunk_size=chunk_size, impl="pallas")
