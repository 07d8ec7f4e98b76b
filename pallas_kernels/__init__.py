"""Pallas kernels: the Mesa operator's stages and decode step (`mesa_cg`) and Gated DeltaNet's recurrent operator
(`gated_delta`). `mesanet_jax.ops.operator` imports this package on first use of impl="pallas", which registers
both."""
from pallas_kernels import gated_delta, mesa_cg

__all__ = ["gated_delta", "mesa_cg"]
