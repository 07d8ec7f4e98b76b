"""impl="pallas" forward and backward lower for TPU (Mosaic) and GPU (Triton) on this CPU host, through jax.export:
Pallas' own lowering runs (block shapes, loads and stores, dot forms, loops); the backend compilers do not."""
import jax
import jax.numpy as jnp
import pytest
from jax import export

from mesanet_jax.ops import mesa_chunked
from pallas_kernels.mesa_cg.params import lowering_for
from tests.ops.mesa_inputs import random_inputs

# Per export platform: the kernel backend and the custom call that carries a kernel.
PLATFORMS = {"tpu": ("tpu", "tpu_custom_call"), "cuda": ("gpu", "__gpu$xla.gpu.triton")}
KERNELS = ["mesa_chunk_states", "mesa_cg_solve", "mesa_causal_read", "mesa_chunk_states_reverse",
           "mesa_chunk_gradients"]


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")  # known: DESIGN.md §5
@pytest.mark.parametrize("platform", PLATFORMS)
def test_forward_and_backward_lower(platform):
  backend, custom_call = PLATFORMS[platform]
  # Shapes no other test traces, so nothing traced for interpret mode is reused.
  args = random_inputs(1, 48, 1, 16, 32, seed=9, with_state=True)
  op = lambda *a: mesa_chunked(*a, chunk_size=16, cg_steps=2, impl="pallas")
  loss = lambda *a: sum(jnp.sum(x) for x in jax.tree.leaves(op(*a)))  # o and the final state: every kernel runs
  # The Triton lowering asks for the GPU's compute capability: name one (an H200) through an abstract device.
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Auto,), abstract_device=device)
  with lowering_for(backend), jax.sharding.use_abstract_mesh(mesh):
    exported = export.export(jax.jit(jax.value_and_grad(loss, argnums=range(7))), platforms=[platform],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(custom_call)])(*args)
  module = exported.mlir_module()
  # Forward: two state scans, solve, read; backward: the same again, two reverse scans, the gradients, H_kk·x read.
  assert module.count(f"custom_call @{custom_call}(") == 12
  for kernel in KERNELS:
    assert kernel in module, kernel
