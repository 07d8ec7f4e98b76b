"""remat and scan_layers change the schedule, not the math: with the same weights the scanned model gives the loop's
logits, gradients, decoding and parameter count; remat gives the same loss and gradients."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from mesanet_jax import sharding
from mesanet_jax.models.config import ARCHITECTURES, preset
from mesanet_jax.models.lm import LanguageModel, count_params
from tests.models.stacking import same_weights, stacked
from tests.models.test_lm import _prefill_then_decode, _tokens, small

pytestmark = pytest.mark.xdist_group("scan_remat")  # one worker: the cached reference models' gradients compile once


def loss_and_grads(model: LanguageModel, tokens: jax.Array):
  """((mean next-token cross-entropy, logits), gradient w.r.t. every param as {path: array}), one jitted call."""
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(params):
    logits = nnx.merge(graphdef, params)(tokens[:, :-1])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])), logits
  aux, grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return aux, {path: g[...] for path, g in nnx.to_flat_state(grads)}


def assert_close(actual, expected, what):
  """Max |Δ| relative to the largest |entry|: f32 rounding of the same math in another fusion order."""
  error = float(jnp.max(jnp.abs(actual - expected)) / jnp.max(jnp.abs(expected)))
  assert error < 2e-5, (what, error)  # measured ≤ 5e-6 (CG in f32)


@functools.cache
def reference(architecture: str):
  """A 2-block loop-layout model, its loss, logits and gradients on `_tokens()` (shared by the cases below)."""
  model = LanguageModel(small(architecture), rngs=nnx.Rngs(0))
  return model, *loss_and_grads(model, _tokens())


def assert_same_math(architecture: str, **overrides):
  """The reference model and its copy with `overrides`: same logits, loss and gradients (in the loop layout)."""
  model, (loss, logits), grads = reference(architecture)
  copy = same_weights(model, **overrides)
  (copy_loss, copy_logits), copy_grads = loss_and_grads(copy, _tokens())
  assert_close(copy_logits, logits, "logits")
  np.testing.assert_allclose(copy_loss, loss, rtol=1e-6)
  if copy.config.scan_layers:
    grads = stacked(nnx.from_flat_state(list(grads.items())), model.config.n_layers)
  assert grads.keys() == copy_grads.keys()
  for path, grad in copy_grads.items():
    assert_close(grad, grads[path], ".".join(map(str, path)))


@pytest.mark.slow  # compiles a whole model's gradients twice
@pytest.mark.parametrize("overrides", [dict(scan_layers=True), dict(remat=True), dict(scan_layers=True, remat=True),
                                       dict(remat="mixer"), dict(remat="mlp"), dict(scan_layers=True, remat="mlp")])
def test_mesanet_scan_and_remat_match_the_loop(overrides):
  assert_same_math("mesanet", **overrides)


@pytest.mark.slow  # compiles a whole model's gradients twice
def test_transformer_scan_matches_the_loop():
  assert_same_math("transformer", scan_layers=True)


@pytest.mark.slow
@pytest.mark.parametrize("architecture, mesa", [("mesanet", {}), ("transformer", {}),
                                                ("mesanet", {"impl": "pallas", "decode_warm_start": True})])
def test_scanned_prefill_then_decode_matches_full_forward(architecture, mesa):
  config = small(architecture, scan_layers=True)
  mesa = dataclasses.replace(config.mesa, decode_tol=None, **mesa)  # fixed steps: every decoded solve converged
  model = LanguageModel(dataclasses.replace(config, mesa=mesa), rngs=nnx.Rngs(0))
  stepped, full = _prefill_then_decode(model, _tokens(), 12)
  assert float(jnp.max(jnp.abs(stepped - full))) < 1e-4  # as the loop's test: f32 rounding, converged CG


@pytest.mark.parametrize("size, architecture", [("tiny", a) for a in ARCHITECTURES if a not in ("hybrid", "hawk_mesa")]
                         + [("medium", "mesanet")])
def test_count_params_is_layout_independent(size, architecture):
  assert count_params(preset(size, architecture, scan_layers=True)) == count_params(preset(size, architecture))


def test_remat_modes_and_the_old_boolean():
  assert [preset("tiny", remat=r).remat for r in (True, False, "True", "mixer", "mlp")] == [
      "full", "none", "full", "mixer", "mlp"]
  with pytest.raises(ValueError, match="remat must be one of"):
    preset("tiny", remat="attention")


def test_hybrid_refuses_scan_layers():
  with pytest.raises(ValueError, match="scan_layers"):
    preset("tiny", "hybrid", scan_layers=True)


def test_stacked_params_name_the_layers_axis():
  abstract = nnx.eval_shape(lambda: LanguageModel(preset("tiny", scan_layers=True), rngs=nnx.Rngs(0)))
  kernel = abstract.blocks.mixer.q_proj.kernel
  assert kernel.shape == (4, 64, 64) and kernel.get_metadata()["out_sharding"] == ("layers", "embed", "heads")
  mesh = AbstractMesh((1, 4, 2), sharding.MESH_AXES)
  assert sharding.logical_spec(kernel.get_metadata()["out_sharding"], kernel.shape, mesh) == P(None, "fsdp", "tensor")
