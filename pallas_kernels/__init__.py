"""Pallas kernels: the Mesa operator's stages and decode step (`mesa_cg`), Gated DeltaNet's recurrent operator
(`gated_delta`) and Hawk's linear recurrence (`linear_scan`). `mesanet_jax.ops.operator` imports this package on
first use of impl="pallas", which registers them."""
from pallas_kernels import gated_delta, linear_scan, mesa_cg

__all__ = ["gated_delta", "linear_scan", "mesa_cg"]
