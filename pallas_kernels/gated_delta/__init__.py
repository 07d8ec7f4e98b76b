"""Pallas kernels for Gated DeltaNet's operator; reached through the layer's `impl="pallas"`: importing this package
registers `gated_delta_fused` as the "pallas" gated delta rule (`mesanet_jax.ops.operator.implementation`)."""
from pallas_kernels.gated_delta.recurrent import gated_delta_fused, unsupported_reason

__all__ = ["gated_delta_fused", "unsupported_reason"]
