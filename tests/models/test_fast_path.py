"""impl="auto": the resolution table per backend (the backend monkeypatched), explicit values winning, CPU → XLA."""
import dataclasses
import json

import jax
import ml_collections
import pytest

from mesanet_jax.layers.mesa import MesaConfig
from mesanet_jax.models import fast_path
from mesanet_jax.models.config import preset
from mesanet_jax.ops.operator import operator_class
from mesanet_jax.train import config as train_config

SMALL = preset("small").mesa  # chunk 64, "highest", 30 fixed steps, head_dim 128


@pytest.mark.parametrize("backend, expected", [
    ("gpu", ("pallas", 32, "default", 1e-4, True)),  # this host's device kind is no Hopper GPU's
    ("tpu", ("pallas", 64, "highest", None, False)),
    ("cpu", ("xla", 64, "highest", None, False)),
    ("metal", ("xla", 64, "highest", None, False)),  # anything unknown: the XLA path
])
def test_resolution_table(monkeypatch, backend, expected):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  mesa = fast_path.resolve_mesa(SMALL)
  assert (mesa.impl, mesa.chunk_size, mesa.matmul_precision, mesa.cg_tol, mesa.save_states) == expected
  assert mesa.cg_steps_train == SMALL.cg_steps_train  # the cap stays the preset's


@pytest.mark.parametrize("device_kind, head_dim, chunk_size", [
    ("NVIDIA H200", 128, 64),  # the Hopper token gradients take C = 64 at Dk = Dv = 128
    ("NVIDIA H100 80GB HBM3", 64, 64),
    ("NVIDIA H200", 32, 32),  # they take Dk, Dv of 64 or 128 only: the Triton kernels, fastest at 32
    ("NVIDIA A100-SXM4-80GB", 128, 32),
])
def test_the_gpu_chunk_size_is_the_kernels_fastest(device_kind, head_dim, chunk_size):
  mesa = fast_path.resolve_mesa(dataclasses.replace(SMALL, head_dim=head_dim), "gpu", device_kind)
  assert (mesa.impl, mesa.chunk_size) == ("pallas", chunk_size)


def test_the_kernels_fastest_chunk_size():
  fastest = operator_class("pallas").fastest_chunk_size
  assert fastest("gpu", "NVIDIA H200", 128, 128, "default") == 64
  assert fastest("gpu", "NVIDIA H200", 128, 128, "highest") == 32  # 3 fp16 passes overflow the Hopper kernel's memory
  assert fastest("tpu", "TPU v5 lite", 128, 128, "default") is None  # never timed: the preset's
  assert operator_class("xla").fastest_chunk_size("gpu", "NVIDIA H200", 128, 128, "default") is None


def test_sizes_the_kernels_cannot_take_fall_back_to_xla():
  mesa = fast_path.resolve_mesa(dataclasses.replace(SMALL, head_dim=24), "gpu")  # not a power of two
  assert (mesa.impl, mesa.chunk_size, mesa.matmul_precision, mesa.cg_tol) == ("xla", 64, "highest", None)


def test_a_named_impl_is_left_alone():
  mesa = dataclasses.replace(SMALL, impl="xla", chunk_size=16)
  assert fast_path.resolve_mesa(mesa, "gpu") == mesa
  assert MesaConfig().impl == "auto"


def _model(**overrides) -> ml_collections.ConfigDict:
  model = train_config.base_config().model
  model.update({"size": "small", **overrides})
  return model


def test_trainer_resolves_auto_and_explicit_overrides_win(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  mesa = train_config.lm_config(_model()).mesa
  assert (mesa.impl, mesa.chunk_size, mesa.matmul_precision, mesa.cg_tol, mesa.save_states) == (
      "pallas", 32, "default", 1e-4, True)
  mesa = train_config.lm_config(_model(chunk_size=64, matmul_precision="highest", cg_tol=0.0,
                                       save_mesa_states=False)).mesa
  assert (mesa.impl, mesa.chunk_size, mesa.matmul_precision, mesa.cg_tol, mesa.save_states) == (
      "pallas", 64, "highest", None, False)
  mesa = train_config.lm_config(_model(impl="xla")).mesa  # a named impl keeps the preset's other settings
  assert (mesa.impl, mesa.chunk_size, mesa.matmul_precision, mesa.cg_tol) == ("xla", 64, "highest", None)


def test_on_cpu_auto_is_xla_with_the_presets_settings():
  lm = train_config.lm_config(_model(size="tiny"))
  assert (lm.mesa.impl, lm.mesa.chunk_size, lm.mesa.matmul_precision, lm.mesa.cg_tol) == ("xla", 16, "highest", None)
  line = fast_path.summary_line(lm)
  assert line.startswith("Mesa path: impl=xla chunk_size=16 matmul_precision=highest fixed steps") and "cpu" in line
  assert fast_path.describe(lm)["mesa_impl"] == "xla"
  assert not lm.mesa.save_states  # the backward computes the chunk states again unless asked
  saved = train_config.lm_config(_model(size="tiny", save_mesa_states=True))
  assert saved.mesa.save_states and fast_path.summary_line(saved).endswith(", chunk states saved")
  refined = train_config.lm_config(_model(size="tiny", solve_precision="default"))
  assert "fixed steps, solves at default refined once" in fast_path.summary_line(refined)
  assert fast_path.describe(refined)["mesa_solve_precision"] == "default"


def test_the_run_config_records_the_path_and_reads_back_without_it(tmp_path):
  config = train_config.base_config()
  lm = train_config.lm_config(config.model, 259)
  train_config.save_run_config(train_config.run_config_dict(config, lm), str(tmp_path))
  saved = json.loads((tmp_path / train_config.RUN_CONFIG).read_text())
  assert saved[train_config.MESA_PATH] == fast_path.describe(lm)
  assert train_config.MESA_PATH not in train_config.load_run_config(str(tmp_path))


def test_a_resume_elsewhere_is_no_config_change(tmp_path):
  """The "mesa_path" record says where a run ran; a resume on another backend resolves its own and is not refused."""
  config = train_config.base_config()
  lm = train_config.lm_config(config.model, 259)
  train_config.save_run_config(train_config.run_config_dict(config, lm), str(tmp_path))
  elsewhere = {**train_config.run_config_dict(config, lm), train_config.MESA_PATH: {"backend": "gpu"}}
  assert train_config.config_changes(str(tmp_path), elsewhere) == {}
