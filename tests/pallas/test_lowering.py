"""impl="pallas" forward and backward lower for TPU (Mosaic) and GPU (Triton) on this CPU host, through jax.export:
Pallas' own lowering runs (block shapes, loads and stores, dot forms, loops); the backend compilers do not."""
import jax
import jax.numpy as jnp
import pytest

from mesanet_jax.ops import mesa_chunked
from pallas_kernels.mesa_cg.params import EXPORT_PLATFORMS, export_for
from tests.ops.mesa_inputs import random_inputs

KERNELS = ["mesa_chunk_states", "mesa_cg_solve", "mesa_causal_read", "mesa_chunk_states_reverse",
           "mesa_chunk_gradients"]


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")  # known: DESIGN.md §5
@pytest.mark.parametrize("cg_tol", [None, 1e-4])  # with a tolerance the solve kernel's CG is a while loop
@pytest.mark.parametrize("backend", EXPORT_PLATFORMS)
def test_forward_and_backward_lower(backend, cg_tol):
  _, custom_call = EXPORT_PLATFORMS[backend]
  # Shapes no other test traces, so nothing traced for interpret mode is reused.
  args = random_inputs(1, 48, 1, 16, 32, seed=9, with_state=True)
  op = lambda *a: mesa_chunked(*a, chunk_size=16, cg_steps=2, cg_tol=cg_tol, impl="pallas")
  loss = lambda *a: sum(jnp.sum(x) for x in jax.tree.leaves(op(*a)))  # o and the final state: every kernel runs
  exported = export_for(backend, jax.value_and_grad(loss, argnums=range(7)), *args)
  module = exported.mlir_module()
  # Forward: two state scans, solve, read; backward: the same again, two reverse scans, the gradients, H_kk·x read.
  assert module.count(f"custom_call @{custom_call}(") == 12
  for kernel in KERNELS:
    assert kernel in module, kernel
