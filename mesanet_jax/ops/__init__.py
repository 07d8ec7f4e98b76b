"""Mesa operator: references, chunkwise-parallel CG with implicit backward, and the decode step."""
from mesanet_jax.ops.cg import conjugate_gradient
from mesanet_jax.ops.chunked import mesa_chunked
from mesanet_jax.ops.decode import mesa_decode_step
from mesanet_jax.ops.inputs import MesaState
from mesanet_jax.ops.reference import mesa_exact, mesa_recurrent

__all__ = ["MesaState", "conjugate_gradient", "mesa_chunked", "mesa_decode_step", "mesa_exact", "mesa_recurrent"]
