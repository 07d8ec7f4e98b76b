"""Gated DeltaNet's recurrent Pallas kernels (interpreted on CPU) against the token-by-token recurrence: values and
every gradient in f64 (the same products, so only rounding separates them), f32 and bf16 inputs, a population's
vmap, the layer against its chunked form, the Triton lowering, and the sizes they refuse."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mesanet_jax.layers.gated_deltanet import GatedDeltaNet, GatedDeltaNetConfig
from mesanet_jax.ops import gated_delta_rule
from pallas_kernels.gated_delta import gated_delta_fused
from pallas_kernels.mesa_cg.params import export_for
from tests.environment import subprocess_env
from tests.ops.mesa_inputs import as_f64, max_abs, random_inputs, scale
from tests.pallas.layer_grads import squared_output_and_grads

recurrent = jax.jit(gated_delta_rule.gated_delta_recurrent)
fused = jax.jit(gated_delta_fused, static_argnames=("interval", "num_warps"))


def _inputs(length=37, dim=16, seed=0, decay_bias=2.0):
  """Unit q, k; γ = σ(N(decay_bias, 1)) (decay_bias −2: most of the state forgotten at every token); a start state."""
  q, k, v, g, beta, _, state = random_inputs(2, length, 3, dim, dim, seed=seed, with_state=True,
                                             decay_bias=decay_bias)
  return q, k, v, g, beta, state.h_kv


def _loss(op, weights):
  """A scalar of both outputs with random weights, so every gradient path is exercised."""
  def loss(*args):
    o, state = op(*args)
    return jnp.sum(weights[0] * o) + jnp.sum(weights[1] * state)
  return loss


@pytest.mark.parametrize("interval", [1, 8, 64])  # 37 tokens: one per interval, a partial last one, all in one
def test_forward_matches_recurrence_f64(x64, interval):
  args = as_f64(_inputs())
  o_ref, state_ref = recurrent(*args)
  o, state = fused(*args, interval=interval)
  # The same products in the same order: f64 rounding at most.
  assert max_abs(o, o_ref) < 1e-13 * scale(o_ref)
  assert max_abs(state, state_ref) < 1e-13 * scale(state_ref)


@pytest.mark.parametrize("decay_bias", [2.0, -2.0])  # slow decay; fast decay (e^g ~ 0.1), where a state cannot be
def test_gradients_match_autodiff_of_recurrence_f64(x64, decay_bias):  # recovered backwards from the next one
  args = as_f64(_inputs(length=21, seed=1, decay_bias=decay_bias))
  rng = np.random.default_rng(2)
  weights = (rng.normal(size=args[2].shape), rng.normal(size=args[5].shape))
  grads = jax.jit(jax.grad(_loss(lambda *a: gated_delta_fused(*a, interval=8), weights), argnums=range(6)))(*args)
  grads_ref = jax.jit(jax.grad(_loss(gated_delta_rule.gated_delta_recurrent, weights), argnums=range(6)))(*args)
  for name, grad, grad_ref in zip(("q", "k", "v", "g", "beta", "state"), grads, grads_ref):
    assert grad.dtype == grad_ref.dtype, name
    # Autodiff of the scan and the hand-written reverse walk sum the same terms in another order: f64 rounding
    # (measured ≤ 1.5e-15 of scale, dg's).
    assert max_abs(grad, grad_ref) < 1e-12 * scale(grad_ref), name


def test_no_state_given_starts_from_zeros():
  q, k, v, g, beta, _ = _inputs(length=9)
  o, state = fused(q, k, v, g, beta, None)
  o_ref, state_ref = recurrent(q, k, v, g, beta, jnp.zeros_like(state))
  assert max_abs(o, o_ref) < 1e-6 * scale(o_ref) and max_abs(state, state_ref) < 1e-6 * scale(state_ref)


def test_f32_and_bf16_inputs():
  args = _inputs(length=40, seed=3)
  with jax.enable_x64(True):
    o_f64, _ = recurrent(*as_f64(args))
  o, state = fused(*args)
  # f32 rounding of 40 rank-one updates of a 16 × 16 state (measured 1e-7 of scale).
  assert max_abs(o, o_f64) < 1e-5 * scale(o_f64)
  bf16 = [x.astype(jnp.bfloat16) for x in args[:5]]
  o_bf16, state_bf16 = fused(*bf16, args[5])
  assert o_bf16.dtype == jnp.bfloat16 and state_bf16.dtype == jnp.float32
  o_ref, _ = recurrent(*bf16, args[5])  # the recurrence on the same bf16 inputs computes in f32 as well
  assert max_abs(o_bf16, o_ref) <= 2 ** -7 * scale(o_ref)  # o rounded to bf16 once (8 bits)
  grads = jax.grad(lambda *a: jnp.sum(gated_delta_fused(*a)[0].astype(jnp.float32)), argnums=range(5))(*bf16, args[5])
  assert all(grad.dtype == jnp.bfloat16 for grad in grads)


def test_population_vmap_equals_each_member():
  """The MAD population maps the op over its slots: pallas_call's batching rule adds a grid axis."""
  members = [_inputs(length=12, seed=s) for s in (4, 5)]
  stacked = [jnp.stack(xs) for xs in zip(*members)]
  loss = lambda *a: jnp.sum(gated_delta_fused(*a)[0] ** 2)
  grads = jax.jit(jax.vmap(jax.grad(loss, argnums=range(6))))(*stacked)
  for i, member in enumerate(members):
    grads_i = jax.jit(jax.grad(loss, argnums=range(6)))(*member)
    for grad, grad_i in zip(grads, grads_i):
      assert max_abs(grad[i], grad_i) <= 1e-6 * scale(grad_i)


def test_layer_pallas_matches_chunked():
  """GatedDeltaNet(impl="pallas") and the chunked form: the same outputs and parameter gradients (f32)."""
  config = GatedDeltaNetConfig(num_heads=2, head_dim=16)
  make = lambda impl: GatedDeltaNet(64, dataclasses.replace(config, impl=impl), rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 19, 64)), jnp.float32)
  value, grads = squared_output_and_grads(make("pallas"), x)
  value_ref, grads_ref = squared_output_and_grads(make("xla"), x)
  # f32: a chunked triangular solve against a recurrence (measured: value 6e-8, gradients ≤ 2.4e-6 of scale).
  assert abs(float(value) - float(value_ref)) < 1e-5 * abs(float(value_ref))
  for grad, grad_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    assert max_abs(grad, grad_ref) < 1e-4 * scale(grad_ref)


# A fresh process builds Mesa and GDN layers with impl="pallas" (nothing imports the kernels before) and runs a
# jitted step twice on new inputs, counting backend compiles.
_COMPILES_ONCE = """
import dataclasses, jax, jax.numpy as jnp
from flax import nnx
compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, _, **k: compiles.append(1) if event == "/jax/core/compile/backend_compile_duration" else None)
from mesanet_jax.layers.gated_deltanet import GatedDeltaNet, GatedDeltaNetConfig
from mesanet_jax.layers.mesa import MesaConfig, MesaLayer
layers = [GatedDeltaNet(32, GatedDeltaNetConfig(num_heads=2, head_dim=16, impl="pallas"), rngs=nnx.Rngs(0)),
          MesaLayer(32, MesaConfig(num_heads=2, head_dim=16, impl="pallas", chunk_size=16, cg_steps_train=4),
                    rngs=nnx.Rngs(0))]
graphdef, state = nnx.split(layers)
step = jax.jit(lambda state, x: sum(jnp.sum(l(x)[0]) for l in nnx.merge(graphdef, state)))
for seed in range(2):
  step(state, jax.random.normal(jax.random.key(seed), (1, 16, 32))).block_until_ready()
  print(len(compiles))
"""


@pytest.mark.slow
def test_pallas_layers_compile_their_step_once():
  """The kernels are imported when a layer is built, not inside the first trace: that import registers jax config
  options, which changed the tracing context and made every jitted step compile twice (a MAD population's first
  two calls: ~10-15 s each on a GPU)."""
  result = subprocess.run([sys.executable, "-c", _COMPILES_ONCE], cwd=Path(__file__).resolve().parents[2],
                          env=subprocess_env(1), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  first, second = map(int, result.stdout.split()[-2:])
  assert second == first, (first, second)


def test_lowers_for_triton_forward_and_backward():
  """Both kernels lower to Triton calls from a CPU host, alone and under a population's vmap (one launch each)."""
  shape = lambda *dims: jax.ShapeDtypeStruct(dims, jnp.float32)
  args = (shape(4, 127, 8, 16), shape(4, 127, 8, 16), shape(4, 127, 8, 16), shape(4, 127, 8), shape(4, 127, 8))
  grad = jax.grad(lambda *a: jnp.sum(gated_delta_fused(*a)[0]), argnums=range(5))
  for fn, operands in ((grad, args), (jax.vmap(grad), [shape(3, *a.shape) for a in args])):
    text = export_for("gpu", fn, *operands).mlir_module()
    assert text.count("__gpu$xla.gpu.triton") == 2
    assert "gated_delta_forward" in text and "gated_delta_backward" in text


@pytest.mark.parametrize("dims, message", [((24, 16), "key_dim=24"), ((8, 16), "key_dim=8"),
                                           ((128, 128), "registers")])
def test_refuses_sizes_it_cannot_take(dims, message):
  key_dim, value_dim = dims
  q = jnp.zeros((1, 4, 1, key_dim))
  with pytest.raises(ValueError, match=message):
    gated_delta_fused(q, q, jnp.zeros((1, 4, 1, value_dim)), jnp.zeros((1, 4, 1)), jnp.zeros((1, 4, 1)))


def test_refuses_bad_arguments():
  q, k, v, g, beta, state = _inputs(length=4)
  with pytest.raises(ValueError, match="expected q, k"):
    gated_delta_fused(q, k, v, g[..., None], beta)
  with pytest.raises(ValueError, match="state must have shape"):
    gated_delta_fused(q, k, v, g, beta, state[:1])
  with pytest.raises(ValueError, match="interval"):
    gated_delta_fused(q, k, v, g, beta, interval=0)
  for op in (gated_delta_fused, gated_delta_rule.gated_delta_chunked):
    with pytest.raises(ValueError, match="at least one token"):
      op(q[:, :0], k[:, :0], v[:, :0], g[:, :0], beta[:, :0])
  with pytest.raises(ValueError, match="gdn.impl"):
    GatedDeltaNetConfig(impl="triton")
