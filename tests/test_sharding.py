"""Sharding: the rules table maps logical names to mesh axes; a sharded forward on 8 fake devices ≡ unsharded."""
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from mesanet_jax.models.config import preset
from mesanet_jax.models.lm import LanguageModel
from mesanet_jax.sharding import MESH_AXES, batch_shardings, logical_spec, shardings
from tests.environment import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def test_logical_spec_follows_rules_and_drops_non_dividing_axes():
  mesh = AbstractMesh((2, 4, 2), MESH_AXES)
  assert logical_spec(("embed", "heads"), (64, 128), mesh) == P("fsdp", "tensor")
  assert logical_spec(("vocab", "embed"), (50_257, 768), mesh) == P(None, "fsdp")  # 50,257 is odd
  assert logical_spec(("batch", None), (16, 7), mesh) == P(("data", "fsdp"), None)
  assert logical_spec(("heads", "kv"), (6, 128), AbstractMesh((1, 8, 1), MESH_AXES)) == P(None, None)
  with pytest.raises(ValueError, match="no rule"):
    logical_spec(("nonsense",), (4,), mesh)


@pytest.mark.slow
def test_sharded_forward_matches_unsharded_on_8_devices():
  """Also checks impl="pallas" under jax.set_mesh runs per (batch, heads) shard and gives the same logits, and the
  same inside a scanned, rematerialised block stack (forward and gradient), and the fused decode kernel per shard."""
  result = subprocess.run([sys.executable, "-m", "tests.sharded_forward"], cwd=ROOT, env=subprocess_env(8),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "sharded forward OK" in result.stdout and "pallas per-shard forward OK" in result.stdout
  assert "scanned pallas per-shard OK" in result.stdout and "pallas per-shard decode OK" in result.stdout


def test_shardings_place_every_param_by_its_logical_names():
  """The table applied to a model's abstract params (structure kept) and to a batch, on an 8-device mesh shape."""
  mesh = AbstractMesh((1, 4, 2), MESH_AXES)
  abstract = nnx.state(nnx.eval_shape(lambda: LanguageModel(preset("tiny"), rngs=nnx.Rngs(0))), nnx.Param)
  placed = shardings(abstract, mesh)
  assert jax.tree.structure(placed) == jax.tree.structure(abstract)
  assert placed["embed"].get_value().spec == P("tensor", "fsdp")
  assert placed["blocks"][0]["mixer"]["q_proj"]["kernel"].get_value().spec == P("fsdp", "tensor")
  assert placed["blocks"][0]["mixer"]["lam_param"].get_value().spec == P("tensor", None)
  assert placed["blocks"][0]["mlp"]["down"]["kernel"].get_value().spec == P("tensor", "fsdp")
  batch = {"inputs": jax.ShapeDtypeStruct((8, 5), jnp.int32), "mask": jax.ShapeDtypeStruct((6, 5), jnp.float32)}
  placed = batch_shardings(batch, mesh)
  assert placed["inputs"].spec == P("fsdp", None) and placed["mask"].spec == P(None, None)  # 6 rows: not by 4
