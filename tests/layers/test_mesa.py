"""MesaLayer: gates and λ as specified, the core equals `mesa_exact` once CG has converged, streaming ≡ whole."""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mesanet_jax.layers.mesa import (CGStepsProbe, MesaConfig, MesaLayer, WarmStartState, add_cg_steps_probes,
                                     cg_steps_by_layer)
from mesanet_jax.layers.params import NoDecayParam
from mesanet_jax.ops import cg_steps, mesa_chunked, mesa_exact, mesa_recurrent
from tests.ops.mesa_inputs import max_abs, scale

# Dk = 8 with 3·Dk CG steps: CG is exact in Dk steps in exact arithmetic; 3·Dk leaves f32 rounding only.
# Fixed CG steps when decoding too (decode_tol=None; the default stops at 1e-4): every decoded token's solve is the
# forward's converged one, so decode ≡ forward to f32 rounding and each head reports cg_steps_decode steps.
CONFIG = MesaConfig(num_heads=2, head_dim=8, chunk_size=8, cg_steps_train=24, cg_steps_decode=24, decode_tol=None)


def _layer(config=CONFIG, seed=0):
  return MesaLayer(32, config, rngs=nnx.Rngs(seed))


def _x(length=21, seed=1):
  return jax.random.normal(jax.random.key(seed), (2, length, 32))


def test_lambda_initialised_to_one_and_marked_no_decay():
  layer = _layer()
  assert isinstance(layer.lam_param, NoDecayParam) and isinstance(layer.lam_param, nnx.Param)
  np.testing.assert_allclose(layer.lam(), np.ones((2, 8)), rtol=1e-6)
  assert layer.lam_param.get_metadata()["out_sharding"] == ("heads", "kv")
  decayed = nnx.state(layer, nnx.All(nnx.Param, nnx.Not(NoDecayParam)))
  assert "lam_param" not in decayed and "q_proj" in decayed
  with pytest.raises(ValueError, match="lambda_init"):
    _layer(dataclasses.replace(CONFIG, lambda_init=0.25))


@pytest.mark.parametrize("gamma_cap", [0.9975, None])
def test_gates(gamma_cap):
  layer = _layer(dataclasses.replace(CONFIG, gamma_cap=gamma_cap))
  x = _x(5)
  g, beta = layer.gates(layer.a_proj(x), layer.b_proj(x))
  a, b = np.asarray(layer.a_proj(x), np.float64), np.asarray(layer.b_proj(x), np.float64)
  beta_ref = 1 / (1 + np.exp(-b))
  gamma_ref = 1 / (1 + np.exp(-a))
  if gamma_cap is not None:
    gamma_ref = gamma_ref * (1 - (1 - gamma_cap) * beta_ref ** 2)
  assert g.dtype == jnp.float32 and beta.dtype == jnp.float32
  np.testing.assert_allclose(beta, beta_ref, rtol=1e-6)
  np.testing.assert_allclose(g, np.log(gamma_ref), rtol=1e-5, atol=1e-6)


@nnx.jit
def _core_and_exact(layer, x):
  """The layer's inputs to the core, the core's output and state, mesa_exact's, the layer's output and the output of
  mesa_exact's: one program instead of an eager compile per primitive."""
  (q, k, v, g, beta), out_gate, _ = layer._inputs(x, None)
  o, state = layer.mix(q, k, v, g, beta, None)
  o_exact, state_exact = mesa_exact(q, k, v, g, beta, layer.lam())
  return q, (o, state), (o_exact, state_exact), layer(x)[0], layer._output(o_exact, out_gate)


@pytest.mark.slow
def test_core_matches_exact_solve():
  q, (o, state), (o_exact, state_exact), y, y_exact = _core_and_exact(_layer(), _x())
  np.testing.assert_allclose(jnp.linalg.norm(q, axis=-1), 1.0, rtol=1e-5)  # q, k are L2-normalised
  # Converged f32 CG vs an f32 dense solve; λ ≥ 0.25 and ‖k‖ = 1 keep cond(A) ≲ 4·T, so ~1e-6 of scale.
  assert max_abs(o, o_exact) < 1e-4 * scale(o_exact)
  assert max_abs(state, state_exact) < 1e-5 * scale(state_exact)
  assert max_abs(y, y_exact) < 1e-4 * scale(y_exact)


# The fused decode kernel (and the chunked Pallas prefill) need head dims of 16 or more: 3·Dk = 48 steps converge.
PALLAS = dataclasses.replace(CONFIG, head_dim=16, chunk_size=16, cg_steps_train=48, cg_steps_decode=48, impl="pallas")


@pytest.mark.slow
@pytest.mark.parametrize("config", [CONFIG, dataclasses.replace(CONFIG, decode_warm_start=True), PALLAS,
                                    dataclasses.replace(PALLAS, decode_warm_start=True)],
                         ids=["xla", "xla-warm", "pallas", "pallas-warm"])
def test_prefill_in_pieces_and_decode_match_whole_sequence(config):
  layer, x = _layer(dataclasses.replace(config, use_output_gate=True)), _x()
  # Jitted calls: one program each instead of an eager compile per primitive.
  y, _ = nnx.jit(lambda layer, x: layer(x))(layer, x)
  y1, cache = nnx.jit(lambda layer, x: layer(x, layer.init_cache(2)))(layer, x[:, :13])
  assert isinstance(cache.state, WarmStartState) == config.decode_warm_start
  decode = nnx.jit(lambda layer, x, cache: layer.decode(x, cache))
  outs = [y1]
  for t in range(13, 21):
    y_t, cache, iters = decode(layer, x[:, t], cache)
    outs.append(y_t[:, None])
  assert iters.shape == (2, 2) and np.all(iters == config.cg_steps_decode)
  if config.decode_warm_start:  # the cache carries the last token's solution
    assert cache.state.solution.shape == (2, 2, config.head_dim) and bool(jnp.all(cache.state.solution != 0))
  # Converged solves on both paths: differences are f32 rounding, ~1e-6 of scale.
  assert max_abs(jnp.concatenate(outs, axis=1), y) < 1e-4 * scale(y)


def test_unknown_impl_is_rejected_when_the_layer_is_built():
  with pytest.raises(ValueError, match="impl must be one of"):
    _layer(dataclasses.replace(CONFIG, impl="cuda"))


@pytest.mark.slow
def test_pallas_impl_matches_xla():
  config = MesaConfig(num_heads=2, head_dim=16, chunk_size=16, cg_steps_train=20)
  x, call = _x(20), nnx.jit(lambda layer, x: layer(x))  # jitted: one program per layer
  y_xla, _ = call(_layer(config), x)
  y_pallas, _ = call(_layer(dataclasses.replace(config, impl="pallas")), x)
  # The op outputs differ by f32 rounding on CPU (~3e-7, tests/pallas/test_mesa_cg.py) and by the kernel's 3-pass
  # bf16 dots on GPU (~1.5e-6); the per-head RMSNorm rescales heads with small outputs, which amplified that to
  # 3.6e-5 of scale on an H200.
  assert max_abs(y_pallas, y_xla) < 1e-4 * scale(y_xla)


def test_lambda_param_value():
  assert math.isclose(float(_layer().lam_param[0, 0]), math.log(math.exp(0.75) - 1), rel_tol=1e-6)


@pytest.mark.slow  # compiles over ~8 s on one core
def test_cg_tol_stops_early_and_stays_accurate():
  layer, x = _layer(dataclasses.replace(CONFIG, cg_tol=1e-4)), _x()
  _, (o, _), (o_exact, _), _, _ = _core_and_exact(layer, x)
  # ‖r‖ ≤ 1e-4‖r₀‖ with cond(A) ≲ 1e2: ~1e-3 of scale at worst (measured 3e-5).
  assert max_abs(o, o_exact) < 1e-3 * scale(o_exact)
  _, steps = nnx.jit(lambda layer, x: layer.forward_with_cg_steps(x))(layer, x)
  assert 1 < float(steps[0]) < CONFIG.cg_steps_train


@pytest.mark.slow
@pytest.mark.parametrize("impl, head_dim", [("xla", 8), ("pallas", 16)])
def test_cg_steps_probe_reports_forward_and_adjoint_steps(impl, head_dim):
  config = dataclasses.replace(CONFIG, head_dim=head_dim, chunk_size=16, cg_tol=1e-4, impl=impl)
  layer, x = add_cg_steps_probes(_layer(config)), _x()
  weights = jax.random.normal(jax.random.key(2), x.shape)
  graphdef, params, probes = nnx.split(layer, nnx.Param, CGStepsProbe)
  loss = lambda params, probes: jnp.sum(nnx.merge(graphdef, params, probes)(x)[0] * weights)
  grads, probe_grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, probes)  # jitted: one program
  reported = cg_steps_by_layer(probe_grads)
  assert reported.shape == (1, 4)

  # Independent counts of the same systems, all in one jitted program (the layer's projections compile once).
  op = functools.partial(mesa_chunked, chunk_size=16, cg_steps=24, cg_tol=1e-4, impl=impl)

  def independent_counts(params, probes):
    layer = nnx.merge(graphdef, params, probes)
    (q, k, v, g, beta), out_gate = layer._inputs(x, None)[:2]
    lam = layer.lam()
    # Forward: the dense CG of mesa_recurrent, token by token.
    iters = mesa_recurrent(q, k, v, g, beta, lam, cg_steps=24, tol=1e-4)[2]
    forward_steps = layer.forward_with_cg_steps(x)[1]
    # Adjoint: what the op reports for the cotangent the layer's output sends into o.
    o = op(q, k, v, g, beta, lam)[0]
    do = jax.grad(lambda o: jnp.sum(layer._output(o, out_gate) * weights))(o)
    return iters, forward_steps, cg_steps.measure(op, lambda outputs: jnp.sum(outputs[0] * do), q, k, v, g, beta, lam)
  iters, forward_steps, op_steps = jax.jit(independent_counts)(params, probes)
  iters = np.asarray(iters, np.float64)
  np.testing.assert_allclose(reported[0, :2], [iters.mean(), iters.max()], rtol=1e-6)
  np.testing.assert_allclose(forward_steps, reported[0, :2], rtol=1e-6)
  np.testing.assert_allclose(reported[0], op_steps, rtol=1e-6)
  assert 1 < float(reported[0, 2]) < 24
  # The probe changes no gradient.
  plain_graphdef, plain_params = nnx.split(_layer(config), nnx.Param)
  plain_grads = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(plain_graphdef, p)(x)[0] * weights)))(plain_params)
  assert max_abs(grads, plain_grads) == 0.0
