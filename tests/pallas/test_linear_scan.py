"""Hawk's linear recurrence as Pallas kernels (interpreted on CPU) against the sequential recurrence: values and
every gradient in f64 (the same products, so only rounding separates them), a population's vmap, the Hawk layer
and a Hawk LM against impl="xla", the Triton lowering, and the widths and arguments it refuses."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mesanet_jax.layers.hawk import HawkConfig, HawkLayer, linear_recurrence
from pallas_kernels.linear_scan import channel_block, linear_scan
from pallas_kernels.mesa_cg.params import export_for
from tests.pallas.layer_grads import squared_output_and_grads


def _inputs(batch=2, length=37, width=48, seed=0, dtype=jnp.float32):
  """a ∈ (0, 1) as the RG-LRU makes it (some near 1, some small), x and h0 normal."""
  rng = np.random.default_rng(seed)
  a = 1 / (1 + np.exp(-rng.normal(1.0, 2.0, size=(batch, length, width))))
  x, h0 = rng.normal(size=(batch, length, width)), rng.normal(size=(batch, width))
  return tuple(jnp.asarray(v, dtype) for v in (a, x, h0))


def _sequential(a, x, h0):
  """The recurrence token by token in numpy (f64)."""
  a, x, h = np.asarray(a, np.float64), np.asarray(x, np.float64), np.asarray(h0, np.float64)
  out = []
  for t in range(a.shape[1]):
    h = a[:, t] * h + x[:, t]
    out.append(h)
  return np.stack(out, axis=1)


def _loss(op, weights):
  """A scalar of both outputs with random weights, so every gradient path (h and the last state) is exercised."""
  def loss(a, x, h0):
    h, last = op(a, x, h0)
    return jnp.sum(weights[0] * h) + jnp.sum(weights[1] * last)
  return loss


@pytest.mark.parametrize("width", [48, 16, 8])  # blocks of 16 (three programs a row), one block, the smallest
def test_values_and_gradients_match_the_sequential_recurrence_f64(x64, width):
  a, x, h0 = _inputs(width=width, dtype=jnp.float64)
  h, last = jax.jit(linear_scan)(a, x, h0)
  expected = _sequential(a, x, h0)
  np.testing.assert_allclose(h, expected, rtol=1e-13, atol=1e-13)  # the same products in the same order
  np.testing.assert_allclose(last, expected[:, -1], rtol=1e-13, atol=1e-13)
  rng = np.random.default_rng(1)
  weights = (rng.normal(size=a.shape), rng.normal(size=h0.shape))
  grads = jax.jit(jax.grad(_loss(linear_scan, weights), argnums=(0, 1, 2)))(a, x, h0)
  grads_ref = jax.jit(jax.grad(_loss(linear_recurrence, weights), argnums=(0, 1, 2)))(a, x, h0)
  for name, grad, grad_ref in zip(("a", "x", "h0"), grads, grads_ref):
    # The reverse walk and autodiff of the associative scan sum the same terms in another order: f64 rounding.
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-11, atol=1e-11, err_msg=name)


def test_no_initial_state_starts_from_zeros_and_one_token_works():
  a, x, h0 = _inputs(length=5)
  h, last = linear_scan(a, x)
  np.testing.assert_allclose(h, _sequential(a, x, jnp.zeros_like(h0)), rtol=1e-6, atol=1e-6)
  h, last = linear_scan(a[:, :1], x[:, :1], h0)
  np.testing.assert_allclose(last, a[:, 0] * h0 + x[:, 0], rtol=1e-6, atol=1e-6)


def test_population_vmap_equals_each_member():
  """The MAD population maps the op over its slots: pallas_call's batching rule adds a grid axis."""
  members = [_inputs(length=12, seed=s) for s in (4, 5)]
  stacked = [jnp.stack(xs) for xs in zip(*members)]
  loss = lambda *args: jnp.sum(jnp.sin(linear_scan(*args)[0]))
  grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2))))(*stacked)
  for i, member in enumerate(members):
    for grad, grad_i in zip(grads, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*member)):
      np.testing.assert_allclose(grad[i], grad_i, rtol=1e-6, atol=1e-6)


def test_hawk_layer_pallas_matches_xla():
  """HawkLayer(impl="pallas") and the associative scan: the same outputs and parameter gradients (f32), and the
  same piecewise prefill (the cache's state goes in as h0)."""
  config = HawkConfig(width=32, num_heads=2)
  make = lambda impl: HawkLayer(24, dataclasses.replace(config, impl=impl), rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 19, 24)), jnp.float32)
  value, grads = squared_output_and_grads(make("pallas"), x)
  value_ref, grads_ref = squared_output_and_grads(make("xla"), x)
  # f32: a sequential walk against a log-depth scan (products in another order).
  np.testing.assert_allclose(value, value_ref, rtol=1e-5)
  for grad, grad_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(grad_ref))))
  layer = make("pallas")
  whole, _ = layer(x)
  first, cache = layer(x[:, :11])
  rest, _ = layer(x[:, 11:], cache)
  np.testing.assert_allclose(jnp.concatenate([first, rest], 1), whole, rtol=1e-5, atol=1e-6)


def test_lowers_for_triton_forward_and_backward():
  """Both kernels lower to Triton calls from a CPU host, alone and under a population's vmap (one launch each), at
  the MAD Hawk's width (160: blocks of 32)."""
  shape = lambda *dims: jax.ShapeDtypeStruct(dims, jnp.float32)
  args = (shape(32, 128, 160), shape(32, 128, 160), shape(32, 160))
  grad = jax.grad(lambda *args: jnp.sum(linear_scan(*args)[0]), argnums=(0, 1, 2))
  assert channel_block(160) == 32
  for fn, operands in ((grad, args), (jax.vmap(grad), [shape(3, *a.shape) for a in args])):
    text = export_for("gpu", fn, *operands).mlir_module()
    assert text.count("__gpu$xla.gpu.triton") == 2
    assert "linear_scan_forward" in text and "linear_scan_backward" in text


def test_refuses_what_it_cannot_take():
  a, x, h0 = _inputs(length=4, width=20)  # 20 = 4 · 5: no power-of-two block of 8 or more
  with pytest.raises(ValueError, match="width 20 has no power-of-two factor"):
    linear_scan(a, x, h0)
  a, x, h0 = _inputs(length=4)
  with pytest.raises(ValueError, match="expected a, x of one shape"):
    linear_scan(a, x[:, :3], h0)
  with pytest.raises(ValueError, match="expected a, x of one shape"):
    linear_scan(a, x.astype(jnp.bfloat16), h0)
  with pytest.raises(ValueError, match=r"h0 must have shape \[B, W\]"):
    linear_scan(a, x, h0[:1])
  with pytest.raises(ValueError, match="at least one token"):
    linear_scan(a[:, :0], x[:, :0], h0)
  with pytest.raises(ValueError, match="lru.impl"):
    HawkConfig(impl="triton")
