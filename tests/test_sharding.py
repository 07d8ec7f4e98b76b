"""Sharding: the rules table maps logical names to mesh axes; a sharded forward on 8 fake devices ≡ unsharded."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from mesanet_jax.sharding import MESH_AXES, logical_spec

ROOT = Path(__file__).resolve().parents[1]


def test_logical_spec_follows_rules_and_drops_non_dividing_axes():
  mesh = AbstractMesh((2, 4, 2), MESH_AXES)
  assert logical_spec(("embed", "heads"), (64, 128), mesh) == P("fsdp", "tensor")
  assert logical_spec(("vocab", "embed"), (50_257, 768), mesh) == P(None, "fsdp")  # 50,257 is odd
  assert logical_spec(("batch", None), (16, 7), mesh) == P(("data", "fsdp"), None)
  assert logical_spec(("heads", "kv"), (6, 128), AbstractMesh((1, 8, 1), MESH_AXES)) == P(None, None)
  with pytest.raises(ValueError, match="no rule"):
    logical_spec(("nonsense",), (4,), mesh)


def test_sharded_forward_matches_unsharded_on_8_devices():
  """Also checks impl="pallas" under jax.set_mesh runs per (batch, heads) shard and gives the same logits, the same
  inside a scanned, rematerialised block stack (forward and gradient), and the fused decode kernel per shard."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "tests.sharded_forward"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "sharded forward OK" in result.stdout and "pallas per-shard forward OK" in result.stdout
  assert "scanned pallas per-shard OK" in result.stdout and "pallas per-shard decode OK" in result.stdout
