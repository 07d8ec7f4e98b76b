"""Pallas kernels for the Mesa operator; reached through `mesa_chunked(..., impl="pallas")`: importing this package
registers `PallasOperator` and `mesa_decode_fused` as the "pallas" operator and decode step (`mesanet_jax.ops.operator`,
which imports this package on first use)."""
from pallas_kernels.mesa_cg.decode import mesa_decode_fused
from pallas_kernels.mesa_cg.gradients import chunk_gradients
from pallas_kernels.mesa_cg.operator import PallasOperator
from pallas_kernels.mesa_cg.params import unsupported_reason
from pallas_kernels.mesa_cg.read import causal_read
from pallas_kernels.mesa_cg.solve import chunked_cg_solve
from pallas_kernels.mesa_cg.states import chunk_states

__all__ = ["PallasOperator", "causal_read", "chunk_gradients", "chunk_states", "chunked_cg_solve",
           "mesa_decode_fused", "unsupported_reason"]
