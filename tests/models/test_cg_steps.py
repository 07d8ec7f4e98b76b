"""CG steps of the Mesa layers read from a model: per-layer probe gradients (forward and adjoint solves) and the
forward-only count, equal in the loop layout, the scanned layers and under remat."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mesanet_jax.layers.mesa import CGStepsProbe, add_cg_steps_probes, cg_steps_by_layer
from mesanet_jax.models.lm import LanguageModel
from tests.models.stacking import same_weights
from tests.models.test_lm import _tokens, small

pytestmark = pytest.mark.xdist_group("cg_steps")  # one worker: the cached loop model's steps compile once


def _loss_and_steps(model: LanguageModel, tokens: jax.Array):
  """(loss, param gradients as {path: array}, per-layer probe gradients [L, 4]), one jitted call."""
  graphdef, params, probes = nnx.split(model, nnx.Param, CGStepsProbe)

  def loss(params, probes):
    logits = nnx.merge(graphdef, params, probes)(tokens[:, :-1])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]))
  value, (grads, probe_grads) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, probes)
  return value, {path: g[...] for path, g in nnx.to_flat_state(grads)}, cg_steps_by_layer(probe_grads)


def _model(**overrides):
  config = small("mesanet", **overrides)
  return LanguageModel(dataclasses.replace(config, mesa=dataclasses.replace(config.mesa, cg_tol=1e-3)),
                       rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_probes_report_every_layer_and_change_nothing_else():
  model, tokens = _model(), _tokens()
  graphdef, params = nnx.split(model, nnx.Param)

  def plain_loss(params):
    logits = nnx.merge(graphdef, params)(tokens[:, :-1])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])), logits
  (plain_value, plain_logits), plain_grads = jax.jit(jax.value_and_grad(plain_loss, has_aux=True))(params)
  value, grads, steps = _loss_and_steps(add_cg_steps_probes(model), tokens)
  assert steps.shape == (2, 4)
  assert np.all(steps >= 1) and np.all(steps <= 10)  # at most cg_steps_train = 10 steps, tol 1e-3 stops earlier
  assert np.all(steps[:, 0] <= steps[:, 1]) and np.all(steps[:, 2] <= steps[:, 3])  # mean ≤ max
  assert float(value) == float(plain_value)
  for path, grad in nnx.to_flat_state(plain_grads):
    np.testing.assert_array_equal(grads[path], grad[...])
  # The forward-only count is the probes' forward columns.
  logits, forward_steps = jax.jit(lambda m, t: m.forward_with_cg_steps(t))(model, tokens[:, :-1])
  np.testing.assert_allclose(forward_steps, steps[:, :2], rtol=1e-6)
  # The same logits as `__call__`'s, up to f32 rounding in another program (measured ≤ 2e-6 on logits of scale ~5).
  np.testing.assert_allclose(logits, plain_logits, rtol=1e-5, atol=1e-5)


@functools.cache
def _loop_steps():
  """The loop-layout model (probes added) and its per-layer steps on `_tokens()`, shared by the cases below."""
  model = add_cg_steps_probes(_model())
  return model, _loss_and_steps(model, _tokens())[2]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [dict(scan_layers=True), dict(remat=True), dict(scan_layers=True, remat=True)])
def test_probes_under_scan_and_remat_match_the_loop(overrides):
  (model, steps), tokens = _loop_steps(), _tokens()
  copy = add_cg_steps_probes(same_weights(model, **overrides))
  if copy.config.scan_layers:  # one probe stacked on the layers axis
    probe = copy.blocks.mixer.cg_steps_probe
    assert probe.shape == (2, 4) and probe.get_metadata()["out_sharding"] == ("layers", None)
  _, _, copy_steps = _loss_and_steps(copy, tokens)
  # The same solves in another fusion order: equal counts unless a row sits at its threshold (none here).
  np.testing.assert_allclose(copy_steps, steps, rtol=1e-6)
  _, forward_steps = nnx.jit(lambda m, t: m.forward_with_cg_steps(t))(copy, tokens[:, :-1])  # one program
  np.testing.assert_allclose(forward_steps, steps[:, :2], rtol=1e-6)


def test_forward_steps_are_none_without_mesa_layers():
  model = LanguageModel(small("transformer"), rngs=nnx.Rngs(0))
  assert nnx.jit(lambda m, t: m.forward_with_cg_steps(t))(model, _tokens())[1] is None  # one program, not eager ops
