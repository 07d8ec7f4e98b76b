"""Optimiser and train step, in process on one device: the paper's schedule, the weight-decay mask, gradient
accumulation ≡ one big batch, and the NaN guard. The module's tests run on one xdist worker (the shared mqar run)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs import lm as lm_presets
from mesanet_jax import sharding
from mesanet_jax.data import pipeline
from mesanet_jax.layers.mesa import cg_steps_by_layer
from mesanet_jax.train import config as train_config
from mesanet_jax.train import optimizer, steps
from mesanet_jax.train.loss import loss_sums
from mesanet_jax.train import state as train_state
from tests.train.tiny import get_config

pytestmark = pytest.mark.xdist_group("train_steps")


def test_schedule_warms_up_from_init_lr_and_decays_to_a_tenth():
  optim = get_config().optim
  optim.lr, optim.init_lr, optim.warmup_steps, optim.final_lr_frac = 3e-3, 1e-6, 10, 0.1
  lr = optimizer.schedule(optim, 100)
  assert float(lr(0)) == pytest.approx(1e-6, rel=1e-5)  # f32 schedule arithmetic
  assert float(lr(10)) == pytest.approx(3e-3, rel=1e-6)
  assert float(lr(100)) == pytest.approx(3e-4, rel=1e-6)
  assert float(lr(55)) == pytest.approx(3e-4 + (3e-3 - 3e-4) * 0.5, rel=1e-5)  # cosine midpoint


def test_decay_mask_excludes_norms_biases_lambda_and_embedding():
  config = get_config("mqar")
  config.model.vocab_size = 32
  make_model = train_state.model_factory(config, train_config.lm_config(config.model))
  params = nnx.state(nnx.eval_shape(make_model), nnx.Param)  # the mask needs the tree, not the values
  flat = lambda mask: {".".join(map(str, path)): v.get_value() for path, v in nnx.to_flat_state(mask)}
  mask = flat(optimizer.decay_mask(params))
  assert mask["embed"] is False and mask["final_norm.scale"] is False
  assert mask["blocks.0.mixer.lam_param"] is False and mask["blocks.0.mixer.a_proj.bias"] is False
  assert mask["blocks.0.mixer.q_proj.kernel"] is True and mask["blocks.0.mlp.down.kernel"] is True
  # mad-lab's groups (decay_embedding): the embedding too, and nothing else changes.
  madlab = flat(optimizer.decay_mask(params, decay_embedding=True))
  assert madlab == {**mask, "embed": True}


def _setup(config):
  """(graphdef, tx, fresh state, abstract probes, lm) of the run `config`."""
  lm = train_config.lm_config(config.model)
  graphdef, tx, _, shardings, probes = train_state.setup(config, lm, sharding.make_mesh())
  return graphdef, tx, train_state.init_state(config, lm, tx, shardings), probes, lm


def _run(config, batches):
  graphdef, tx, state, probes, _ = _setup(config)
  step = jax.jit(steps.make_train_step(config, graphdef, tx, probes))
  history = []
  for batch in batches:
    state, metrics = step(state, batch)
    history.append(jax.device_get(metrics))
  return state, history


def _batches(config, n):
  train, _, _ = pipeline.make_sources(config.data)
  it = iter(pipeline.train_dataset(train, config.data, config.train.batch_size))
  return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def mqar_run():
  """(config, 3 batches, state after them, metrics history) of tiny.py:mqar with vocabulary 32: the run the other
  settings below are compared with (a test's shorter run is a prefix of it)."""
  config = get_config("mqar")
  config.model.vocab_size = 32
  batches = _batches(config, 3)
  return (config, batches, *_run(config, batches))


@pytest.mark.slow  # compiles whole train steps
def test_gradient_accumulation_matches_one_big_batch(mqar_run):
  config, batches, state1, h1 = mqar_run
  config = config.copy_and_resolve_references()
  config.train.grad_accum = 4
  state4, h4 = _run(config, batches)
  # Same sums in another order (f32): agreement to rounding, ~1e-6 relative.
  np.testing.assert_allclose([m["loss"] for m in h4], [m["loss"] for m in h1], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state4.params), jax.tree.leaves(state1.params)):
    np.testing.assert_allclose(a, b, atol=2e-5)


@pytest.mark.slow  # compiles whole train steps
def test_nan_guard_skips_the_update_and_counts_it():
  config = get_config("mqar")
  config.data.task, config.data.dim = "regression", 4
  batches = _batches(config, 2)
  poisoned = dict(batches[0], inputs=np.where(np.arange(batches[0]["inputs"].shape[1])[None, :, None] == 3,
                                              np.nan, batches[0]["inputs"]).astype(np.float32))
  graphdef, tx, state, probes, _ = _setup(config)
  before = jax.tree.map(np.asarray, state.params)
  step = jax.jit(steps.make_train_step(config, graphdef, tx, probes))
  state, metrics = step(state, poisoned)
  assert not np.isfinite(float(metrics["loss"])) and int(metrics["skipped"]) == 1
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)
  assert int(state.step) == 1
  state, metrics = step(state, batches[1])
  assert np.isfinite(float(metrics["loss"])) and int(metrics["skipped"]) == 1
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before)))


@pytest.mark.slow  # compiles whole train steps
def test_z_loss_changes_gradients_not_the_reported_loss(mqar_run):
  config, batches, _, h0 = mqar_run
  config = config.copy_and_resolve_references()
  batch = jax.tree.map(jnp.asarray, batches[0])
  config.optim.z_loss = 1e-2
  _, hz = _run(config, [batch])
  assert float(hz[0]["loss"]) == pytest.approx(float(h0[0]["loss"]), rel=1e-6)
  assert float(hz[0]["grad_norm"]) != pytest.approx(float(h0[0]["grad_norm"]), rel=1e-4)


@pytest.mark.slow  # compiles whole train steps
def test_bf16_activations_keep_f32_master_params_and_track_the_f32_loss(mqar_run):
  config, batches, _, h32 = mqar_run
  config, batches, h32 = config.copy_and_resolve_references(), batches[:2], h32[:2]
  config.model.dtype = "bfloat16"
  state, h16 = _run(config, batches)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  # bf16 activations (8 mantissa bits) move the loss by ~5e-4 relative here (measured); not identical, not far.
  losses16, losses32 = np.array([m["loss"] for m in h16]), np.array([m["loss"] for m in h32])
  np.testing.assert_allclose(losses16, losses32, rtol=5e-3)
  assert np.any(losses16 != losses32)


@pytest.mark.slow  # compiles whole train steps
@pytest.mark.parametrize("scan_layers", [False, True], ids=["loop", "scan_remat"])
def test_steps_report_each_mesa_layers_cg_steps_as_the_probes_give_them(scan_layers):
  config = get_config("mqar")
  config.model.update(vocab_size=32, num_layers=2, cg_steps=10, cg_tol=1e-2, scan_layers=scan_layers,
                      remat="full" if scan_layers else "none")
  config.train.grad_accum = 2
  batch = jax.tree.map(jnp.asarray, _batches(config, 1)[0])
  graphdef, tx, state, probes, _ = _setup(config)
  _, metrics = jax.jit(steps.make_train_step(config, graphdef, tx, probes))(state, batch)
  sums, eval_steps = jax.jit(steps.make_eval_step(config, graphdef, probes))(state.params, batch)

  # Reference: the probes' gradient of each micro-batch's loss (the step's strided rows), means averaged, maxima
  # maximised; the forward's on the whole batch is what evaluation reports.
  zeros = jax.tree.map(jnp.zeros_like, probes)
  probe_grads = jax.jit(jax.grad(lambda p, b: loss_sums(graphdef, state.params, p, b, "lm", 0.0)[0]))  # one program
  probe_steps = lambda b: cg_steps_by_layer(probe_grads(zeros, b))  # per batch shape
  micro = np.stack([probe_steps(jax.tree.map(lambda x: x[i::2], batch)) for i in range(2)])
  expected = np.stack([micro[:, :, 0].mean(0), micro[:, :, 1].max(0), micro[:, :, 2].mean(0), micro[:, :, 3].max(0)],
                      -1)
  keys = ("fwd_mean", "fwd_max", "adj_mean", "adj_max")
  logged = np.array([[metrics[f"cg/layer_{layer:02d}/{key}"] for key in keys] for layer in (0, 1)])
  # Step counts are integers; the means are sums of them over the same tokens: equal up to f32 rounding.
  np.testing.assert_allclose(logged, expected, rtol=1e-6)
  # Every forward system takes a step; an adjoint system whose right-hand side is 0 (a token outside the loss mask,
  # most of MQAR's) has converged at its start and takes none.
  assert np.all((1 <= logged[:, 0]) & (0 < logged[:, 2]) & (logged[:, 0::2] <= logged[:, 1::2])), logged
  assert np.all((1 <= logged[:, 1::2]) & (logged[:, 1::2] <= 10) & (logged[:, 1::2] == np.round(logged[:, 1::2])))
  assert np.any(logged[:, 1::2] < 10), logged  # the tolerance stopped the systems early
  np.testing.assert_allclose(eval_steps, probe_steps(batch)[:, :2], rtol=1e-6)
  assert float(sums["count"]) == float(np.sum(batch["mask"]))


def test_only_adaptive_cg_gives_the_model_probes():
  config = get_config("mqar")
  probes = lambda: train_state.setup(config, train_config.lm_config(config.model), sharding.make_mesh())[4]
  assert not probes()  # unset: the preset's fixed steps, the step programs of a model without probes
  config.model.cg_tol = 0.0  # fixed steps
  assert not probes()
  config.model.update(cg_tol=1e-3, num_layers=2)
  assert [v.get_value().shape for _, v in nnx.to_flat_state(probes())] == [(4,), (4,)]


def test_model_overrides_reach_the_mesa_config():
  config = get_config("mqar")
  base = train_config.lm_config(config.model).mesa
  config.model.update(impl="pallas", chunk_size=32, matmul_precision="highest", solve_precision="default",
                      cg_steps=7, cg_preconditioner="jacobi")
  mesa = train_config.lm_config(config.model).mesa
  assert (mesa.impl, mesa.chunk_size, mesa.matmul_precision, mesa.solve_precision, mesa.cg_steps_train,
          mesa.cg_preconditioner) == ("pallas", 32, "highest", "default", 7, "jacobi")
  assert (base.impl, base.matmul_precision) == ("xla", "highest")  # unset: auto, on CPU the XLA path
  assert base.solve_precision is None  # unset: the solves at matmul_precision, not refined
  assert base.cg_preconditioner == "none"  # unset: the preset's, plain CG


def test_residual_dtype_reaches_the_model_and_a_bad_one_is_named():
  config = get_config("mqar")
  assert train_config.lm_config(config.model).residual_dtype is None  # unset: the stream in model.dtype
  config.model.update(dtype="bfloat16", residual_dtype="float32")
  train_config.validate(config)
  lm = train_config.lm_config(config.model)
  assert (lm.dtype, lm.stream_dtype) == (jnp.bfloat16, jnp.float32)
  config.model.residual_dtype = "float16"
  with pytest.raises(ValueError, match="model.residual_dtype must be 'float32', 'bfloat16' or unset"):
    train_config.validate(config)


def test_vocab_comes_from_the_data_unless_set_and_never_smaller():
  model = get_config().model
  assert train_config.lm_config(model, 259).vocab_size == 259  # e.g. the byte tokenizer's
  assert train_config.lm_config(model).vocab_size == 256  # no tokens (regression): the preset's, unused
  model.vocab_size = 512
  assert train_config.lm_config(model, 259).vocab_size == 512
  with pytest.raises(ValueError, match="model.vocab_size 512 is smaller than the data's vocabulary 1000"):
    train_config.lm_config(model, 1000)


def test_old_run_configs_with_zero_or_empty_overrides_still_load(tmp_path):
  """config.json of runs saved while 0 / "" meant "the preset's" (the vocabulary was written out resolved)."""
  saved = json.loads(get_config().to_json())
  saved["model"].update(vocab_size=256, num_layers=0, cg_steps=4, chunk_size=0, impl="", matmul_precision="")
  (tmp_path / train_config.RUN_CONFIG).write_text(json.dumps(saved))
  config = train_config.load_run_config(str(tmp_path))
  train_config.validate(config)
  lm = train_config.lm_config(config.model)
  assert (lm.vocab_size, lm.n_layers, lm.mesa.cg_steps_train, lm.mesa.chunk_size, lm.mesa.impl) == (
      256, 4, 4, 16, "xla")


@pytest.mark.parametrize("key, value", [("impl", "triton"), ("matmul_precision", "tf32"),
                                        ("solve_precision", "fp16"), ("cg_preconditioner", "ilu")])
def test_unknown_mesa_options_are_refused_by_name(key, value):
  config = get_config("mqar")
  config.model[key] = value
  with pytest.raises(ValueError, match=rf"model\.{key} must be one of"):
    train_config.validate(config)


@pytest.mark.parametrize("architecture", ["mesanet", "gdn", "transformer", "swa", "hawk", "hawk_mesa", "hybrid"])
def test_lm_presets_validate_as_written(architecture):
  """experiments/configs/lm.py passes validation with no overrides (the vocabulary left to the tokenizer's)."""
  config = lm_presets.get_config(f"{architecture},small,15b")
  train_config.validate(config)
  assert config.model.vocab_size is None and train_config.lm_config(config.model, 50_257).vocab_size == 50_257
