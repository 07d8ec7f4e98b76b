"""The MAD models: the paper's sizes for every architecture and mad-lab's compression autoencoder."""
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mesanet_jax.mad import grid, models, table, training, variants
from mesanet_jax.mad.population import Population
from mesanet_jax.models.lm import count_params
from mesanet_jax.ops import mesa_chunked
from tests.ops.mesa_inputs import max_abs, random_inputs, scale


def test_sincos_is_mad_labs_position_embedding():
  # posemb_sincos_1d (mad-lab mad/model/layers/featurization/posemb.py): half = 2 frequencies 10000^(-i/(half-1)).
  np.testing.assert_allclose(models.sincos(3, 4)[2], [np.sin(2), np.sin(2e-4), np.cos(2), np.cos(2e-4)], rtol=1e-6)


@pytest.mark.parametrize("architecture", models.ARCHITECTURES)
def test_paper_mad_sizes(architecture):
  config = models.mad_config(architecture, 16)
  assert (config.n_layers, config.d_model) == (2, 128)
  assert (config.mesa.num_heads, config.mesa.head_dim, config.attention.num_heads, config.gdn.head_dim) == (8, 16, 8, 16)
  assert config.lru.width == 160 and config.lru.num_heads == 8
  assert 4.2e5 < count_params(config) < 4.8e5  # ≈ 0.43M: SwiGLU 3·128·384 + a mixer of ≈ 4·128² per block


def test_mesa_computation_defaults_per_backend_and_is_overridden():
  mesa = models.mad_config("mesanet", 16).mesa
  assert (mesa.impl, mesa.chunk_size, mesa.matmul_precision) == models.FAST_MESA.get(jax.default_backend(),
                                                                                       models.OTHER_MESA)
  config = models.mad_config("hawk_mesa", 16, impl="pallas", chunk_size=16, cg_steps=8, matmul_precision="default")
  assert (config.mesa.impl, config.mesa.chunk_size, config.mesa.cg_steps_train, config.mesa.matmul_precision) == (
      "pallas", 16, 8, "default")
  assert config.gdn.chunk_size == 16 and models.mad_config("gdn", 16).gdn.chunk_size == 64
  assert models.mad_config("gdn", 16).gdn.triangular == "solve"
  assert models.mad_config("gdn", 16, gdn_triangular="inverse").gdn.triangular == "inverse"
  with pytest.raises(ValueError, match="gdn.triangular must be one of"):
    models.mad_config("gdn", 16, gdn_triangular="lu")
  assert models.mad_config("gdn", 16).gdn.impl == models.FAST_GDN.get(jax.default_backend(), "xla")
  assert models.mad_config("gdn", 16, gdn_impl="pallas").gdn.impl == "pallas"
  with pytest.raises(ValueError, match="gdn.impl must be one of"):
    models.mad_config("gdn", 16, gdn_impl="cuda")
  default_attention = models.FAST_ATTENTION.get(jax.default_backend(), "auto")
  assert models.mad_config("transformer", 16).attention.kernel == default_attention
  assert models.mad_config("transformer", 16, attention_kernel="pallas").attention.kernel == "pallas"
  for architecture in ("hawk", "hawk_mesa"):
    assert models.mad_config(architecture, 16).lru.impl == models.FAST_HAWK.get(jax.default_backend(), "xla")
    assert models.mad_config(architecture, 16, hawk_impl="pallas").lru.impl == "pallas"
  with pytest.raises(ValueError, match="lru.impl must be one of"):
    models.mad_config("hawk", 16, hawk_impl="cuda")


def test_mad_lab_backbone_switches():
  tied, untied = models.mad_config("mesanet", 64), models.mad_config("mesanet", 64, tie_embeddings=False)
  assert tied.tie_embeddings and not untied.tie_embeddings
  assert count_params(untied) - count_params(tied) == 64 * 128  # a [d, V] read-out beside the [V, d] embedding
  assert tied.embed_std == models.EMBED_STD == 0.02  # mad-lab's embedding by default
  assert models.mad_config("mesanet", 64, embed_std=None).embed_std is None  # the paper's LM embedding
  assert grid.protocol_settings(grid.Settings(results=""))["embed_std"] == 0.02  # what the grid runs and records
  assert tied.linear_init_variance == models.LINEAR_INIT_VARIANCE == 1 / 3  # PyTorch's nn.Linear default variance
  assert grid.protocol_settings(grid.Settings(results=""))["linear_init_variance"] == 1 / 3


@pytest.mark.parametrize("model_class", [models.LanguageModel, models.AutoEncoder])
def test_linear_init_variance_scales_every_linear_kernel_and_nothing_else(model_class):
  """The same seed with variance 1 and 1/4: every nnx.Linear kernel halves (exactly: a power of two), every other
  parameter (embedding, norms, biases, gates, convolutions) is unchanged."""
  make = lambda variance: nnx.state(model_class(models.mad_config("hawk_mesa", 16, linear_init_variance=variance),
                                                rngs=nnx.Rngs(0)), nnx.Param)
  ours, quarter = make(1.0), make(0.25)
  kernels = 0
  for (path, a), (_, b) in zip(nnx.to_flat_state(ours), nnx.to_flat_state(quarter)):
    linear_kernel = path[-1] == "kernel" and a[...].ndim == 2 and "conv" not in str(path[-2])
    np.testing.assert_array_equal(np.asarray(b[...]), np.asarray(a[...]) * (0.5 if linear_kernel else 1.0), path)
    kernels += linear_kernel
  assert kernels >= 10, kernels
  with pytest.raises(ValueError, match="linear_init_variance must be a positive number"):
    models.mad_config("mesanet", 16, linear_init_variance=0.0)


def test_a_cg_tolerance_is_a_setting_whose_runs_keep_their_own_results(tmp_path):
  assert models.mad_config("mesanet", 16).mesa.cg_tol is None  # the paper's fixed steps
  assert models.mad_config("hawk_mesa", 16, cg_tol=1e-4).mesa.cg_tol == 1e-4
  fixed = grid.Settings(results=str(tmp_path / "results.jsonl"))
  tolerant = dataclasses.replace(fixed, cg_tol=1e-4)
  assert grid.protocol_settings(fixed)["cg_tol"] is None and grid.protocol_settings(tolerant)["cg_tol"] == 1e-4
  job = {"architecture": "mesanet", "task": "memorize", "variant": "baseline", "lr": 1e-3, "weight_decay": 0.1,
         "accuracy": 0.5}
  (tmp_path / "results.jsonl").write_text(json.dumps({**job, **grid.protocol_settings(fixed)}) + "\n")
  assert grid.done_keys(fixed, ["mesanet"]) == {("mesanet", "memorize", "baseline", 1e-3, 0.1)}
  # The fixed-steps job must not count as done for a run at a tolerance (nor the other way round).
  with pytest.raises(ValueError, match=r"holds mesanet jobs run with cg_tol=None, this run has cg_tol=0.0001"):
    grid.done_keys(tolerant, ["mesanet"])
  assert grid.done_keys(tolerant, ["gdn"])  # other architectures' runs are not concerned


def test_the_seed_the_epochs_and_an_example_cap_are_settings_whose_runs_keep_their_own_results(tmp_path):
  """A run of another seed, of fewer epochs or on capped datasets (a smoke run) must not count the grid's jobs as
  done, nor add its own to the grid's file; records from before these were recorded ran seed 0, 200 epochs and every
  variant's own sizes."""
  default = grid.Settings(results=str(tmp_path / "results.jsonl"))
  recorded = grid.protocol_settings(default)
  assert (recorded["seed"], recorded["max_epochs"], recorded["num_examples"]) == (0, 200, None)
  assert all(recorded[k] == table.PROTOCOL[k] for k in ("seed", "max_epochs", "num_examples"))
  job = {"architecture": "gdn", "task": "fuzzy_recall", "variant": "baseline", "lr": 1e-3, "weight_decay": 0.1,
         "accuracy": 0.5, **recorded}
  (tmp_path / "results.jsonl").write_text(json.dumps(job) + "\n")
  for other, message in ((dataclasses.replace(default, seed=1), "seed=0, this run has seed=1"),
                         (dataclasses.replace(default, protocol=training.Protocol(epochs=2)),
                          "max_epochs=200, this run has max_epochs=2"),
                         (dataclasses.replace(default, num_examples=64), "num_examples=None, this run has "
                          "num_examples=64")):
    with pytest.raises(ValueError, match=f"holds gdn jobs run with {message}"):
      grid.done_keys(other, ["gdn"])
  before = {k: v for k, v in job.items() if k not in ("seed", "max_epochs", "num_examples")}
  (tmp_path / "results.jsonl").write_text(json.dumps(before) + "\n")
  assert grid.done_keys(default, ["gdn"]) == {("gdn", "fuzzy_recall", "baseline", 1e-3, 0.1)}
  # The cap is the grid's: its jobs train on capped variants of the same names.
  jobs = training.jobs(["gdn"], [variants.find("fuzzy_recall", "baseline")])
  smoke = grid.capped(dataclasses.replace(default, num_examples=64), jobs)
  assert [j.key for j in smoke] == [j.key for j in jobs] and grid.capped(default, jobs) == jobs
  assert {(j.variant.num_train_examples, j.variant.num_test_examples) for j in smoke} == {(64, 64)}


def test_an_f32_residual_stream_is_a_setting_whose_runs_keep_their_own_results(tmp_path):
  """The grid keeps the residual stream f32 around bf16 sublayers (autocast's mixed precision, as mad-lab trains) and
  records "float32"; `residual_dtype=""` (the stream in the activation dtype) records None, which is what records
  written before the setting existed mean: a file of those is not resumed by a run of the default."""
  default = grid.Settings(results=str(tmp_path / "results.jsonl"))
  bf16_stream = dataclasses.replace(default, residual_dtype="")
  assert grid.model_config(default, "gdn", 16).stream_dtype == jnp.float32
  assert grid.model_config(bf16_stream, "gdn", 16).stream_dtype == jnp.bfloat16
  assert grid.protocol_settings(default)["residual_dtype"] == "float32"
  assert grid.protocol_settings(bf16_stream)["residual_dtype"] is None and table.PROTOCOL["residual_dtype"] is None
  assert grid.protocol_settings(dataclasses.replace(default, dtype="float32"))[
      "residual_dtype"] is None  # the same model as the stream in the activation dtype
  job = {"architecture": "gdn", "task": "memorize", "variant": "baseline", "lr": 1e-3, "weight_decay": 0.1,
         "accuracy": 0.5, **grid.protocol_settings(bf16_stream)}
  del job["residual_dtype"]  # a record from before the setting
  (tmp_path / "results.jsonl").write_text(json.dumps(job) + "\n")
  assert grid.done_keys(bf16_stream, ["gdn"]) == {("gdn", "memorize", "baseline", 1e-3, 0.1)}
  with pytest.raises(ValueError, match=r"holds gdn jobs run with residual_dtype=None, this run has "
                                       r"residual_dtype=float32"):
    grid.done_keys(default, ["gdn"])


def test_mad_labs_embedding_decay_is_a_setting_that_reaches_the_optimizer(tmp_path):
  """--decay_embedding (mad-lab's AdamW groups): recorded; with zero gradients a population's update shrinks the
  embedding by lr × wd, where the paper's mask leaves it alone (matrices decay either way)."""
  default = grid.Settings(results=str(tmp_path / "results.jsonl"))
  madlab = dataclasses.replace(default, protocol=dataclasses.replace(default.protocol, decay_embedding=True))
  assert grid.protocol_settings(default)["decay_embedding"] is False and table.PROTOCOL["decay_embedding"] is False
  assert grid.protocol_settings(madlab)["decay_embedding"] is True
  config = models.mad_config("gdn", 16)
  params = nnx.state(models.LanguageModel(config, rngs=nnx.Rngs(0)), nnx.Param)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for protocol, decayed in ((default.protocol, False), (madlab.protocol, True)):
    tx = Population(config, False, protocol, 1).tx
    opt_state = training.with_hyperparams(tx.init(params), jnp.float32(1e-2), jnp.float32(0.1))
    updates = dict(nnx.to_flat_state(tx.update(zeros, opt_state, params)[0]))  # zero gradients: decay alone
    embed, rows = updates[("embed",)].get_value(), params["embed"].get_value()
    np.testing.assert_allclose(embed, -1e-3 * rows if decayed else 0 * rows, rtol=1e-5, atol=1e-12)
    kernel = ("blocks", 0, "mlp", "down", "kernel")
    np.testing.assert_allclose(updates[kernel].get_value(), -1e-3 * dict(nnx.to_flat_state(params))[kernel].get_value(),
                               rtol=1e-5)  # matrices decay either way


@pytest.mark.slow  # compiles over ~8 s on one core
def test_cg_steps_default_to_the_head_size_which_gives_the_result_of_30():
  assert models.mad_config("mesanet", 16).mesa.cg_steps_train == 16 == models.mad_config("hawk_mesa", 16).mesa.head_dim
  # Slow decay (γ ≈ 0.998) over 2 × 96 tokens, so the systems are the worst conditioned in the test inputs' range.
  inputs = random_inputs(2, 192, 4, 16, 16, seed=3, decay_bias=6.0)[:6]
  weights = jax.random.normal(jax.random.key(4), inputs[2].shape)

  @functools.partial(jax.jit, static_argnums=0)
  def output_and_gradients(steps, *args):  # o and the gradients of Σ weights·o
    o, vjp = jax.vjp(lambda *a: mesa_chunked(*a, chunk_size=32, cg_steps=steps)[0], *args)
    return o, vjp(weights)
  sixteen, thirty = output_and_gradients(16, *inputs), output_and_gradients(30, *inputs)
  # Measured (output and all six gradients): 16 steps 2.4e-8 of the scale (f32 rounding), 12 steps 3.8e-7, 8 steps
  # 4.8e-5: the bound passes a converged solve with 4× margin and fails one that stopped early.
  assert max_abs(sixteen, thirty) <= 1e-7 * scale(thirty)


def test_madlab_autoencoder_init_draws_every_linear_kernel_at_its_std_and_nothing_else(tmp_path):
  """mad-lab's AutoEncoder re-initialises every nn.Linear weight as N(0, 0.02²) (`_init_weights`): with linear_std
  every nnx.Linear kernel (the mixers', MLPs', decoder's, read-out's) is drawn at that std, every other parameter is
  as without it; the language model has no such setting. Recorded for compression records only."""
  config = models.mad_config("hawk_mesa", 16)
  ours = nnx.state(models.make_model(config, True, nnx.Rngs(params=0)), nnx.Param)
  madlab = nnx.state(models.make_model(config, True, nnx.Rngs(params=0), models.MADLAB_AUTOENCODER_LINEAR_STD),
                     nnx.Param)
  kernels = 0
  for (path, a), (_, b) in zip(nnx.to_flat_state(ours), nnx.to_flat_state(madlab)):
    if path[-1] == "kernel" and a[...].ndim == 2 and "conv" not in str(path[-2]):
      kernels += 1
      # ≥ 1,024 draws a kernel (the [128, 8] gate projections): the sample std within 10 % of 0.02, ~4.5 of its
      # standard errors (0.02 / √(2 · 1024), 2.2 %) at the smallest
      assert np.std(np.asarray(b[...])) == pytest.approx(0.02, rel=0.1), path
      assert abs(np.mean(np.asarray(b[...]))) < 0.003, path
    else:
      np.testing.assert_array_equal(np.asarray(b[...]), np.asarray(a[...]), path)
  assert kernels >= 15, kernels  # hawk_mesa's Hawk gates are block-diagonal params, not nnx.Linear
  # The setting concerns compression alone: a file may hold LM records of any value beside compression records.
  default = grid.Settings(results=str(tmp_path / "results.jsonl"))
  madlab_run = dataclasses.replace(default, autoencoder_linear_std=0.02)
  record = lambda task, **settings: {"architecture": "gdn", "task": task, "variant": "baseline", "lr": 1e-3,
                                     "weight_decay": 0.1, "accuracy": 0.5, **settings}
  (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
      record("memorize", **grid.protocol_settings(default)), record("compress", **grid.protocol_settings(madlab_run)),
      record("in_context_recall", **grid.protocol_settings(madlab_run))]))
  assert len(table.read(str(tmp_path / "results.jsonl"))) == 3
  assert len(grid.done_keys(madlab_run, ["gdn"])) == 3
  with pytest.raises(ValueError, match="holds gdn jobs run with autoencoder_linear_std=0.02, this run has "
                                       "autoencoder_linear_std=None"):
    grid.done_keys(default, ["gdn"])
  with open(tmp_path / "results.jsonl", "a") as f:
    f.write(json.dumps(record("compress", **grid.protocol_settings(default))) + "\n")
  with pytest.raises(ValueError, match="the gdn jobs mix autoencoder_linear_std"):
    table.read(str(tmp_path / "results.jsonl"))


@pytest.mark.slow
def test_autoencoder_decodes_every_position_from_the_last_state():
  model = models.AutoEncoder(models.mad_config("transformer", 16), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 16)
  graphdef, state = nnx.split(model)
  logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
  assert logits.shape == (2, 8, 16) and logits.dtype == jnp.float32
  # Position 0's output depends on the whole input through the last state: every embedding row used gets gradient.
  grads = jax.jit(jax.grad(lambda s, t: jnp.sum(nnx.merge(graphdef, s)(t)[:, 0])))(state, tokens)
  used = np.unique(np.asarray(tokens))
  assert np.all(np.abs(np.asarray(grads["embed"][...]))[used].sum(-1) > 0)
  # Changing only the first token changes the decoded last position (nothing but the last state is read).
  other = tokens.at[:, 0].set((tokens[:, 0] + 1) % 16)
  changed = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, other)
  assert float(jnp.max(jnp.abs(changed[:, -1] - logits[:, -1]))) > 0
