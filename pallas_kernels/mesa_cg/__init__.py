"""Pallas kernels for the Mesa operator; reached through `mesa_chunked(..., impl="pallas")`: importing this package
registers `PallasOperator` as the "pallas" operator (`mesanet_jax.ops.operator`, which imports it on first use)."""
from pallas_kernels.mesa_cg.gradients import chunk_gradients
from pallas_kernels.mesa_cg.operator import PallasOperator
from pallas_kernels.mesa_cg.params import unsupported_reason
from pallas_kernels.mesa_cg.read import causal_read
from pallas_kernels.mesa_cg.solve import chunked_cg_solve
from pallas_kernels.mesa_cg.states import chunk_states

__all__ = ["PallasOperator", "causal_read", "chunk_gradients", "chunk_states", "chunked_cg_solve",
           "unsupported_reason"]
