"""Gated DeltaNet baseline layer: the shared recurrent pipeline (`recurrent.py`) around the gated delta rule.

Gates follow the paper's baselines (γ = σ(a), β = σ(b), same as Mesa without the γ cap); the output gate is on by
default as in flash-linear-attention's GatedDeltaNet.
"""
import dataclasses

import jax.numpy as jnp
from flax import nnx

from mesanet_jax import sharding
from mesanet_jax.layers.recurrent import RecurrentMixer
from mesanet_jax.ops.gated_delta_rule import TRIANGULAR, gated_delta_chunked, gated_delta_step
from mesanet_jax.ops.operator import implementation

# How the operator runs in training and prefill: "xla" the chunkwise (WY) form; "pallas" token by token in one
# kernel per direction (`pallas_kernels/gated_delta`), for heads of at most 64 × 64 (the MAD models' 16 × 16).
IMPLS = ("xla", "pallas")


@dataclasses.dataclass(frozen=True)
class GatedDeltaNetConfig:
  num_heads: int = 6
  head_dim: int = 128
  conv_size: int = 4
  chunk_size: int = 64
  triangular: str = "solve"  # how each chunk's triangular system is solved: ops/gated_delta_rule.TRIANGULAR
  impl: str = "xla"  # one of IMPLS; chunk_size and triangular are the "xla" form's
  use_output_gate: bool = True
  norm_eps: float = 1e-6

  def __post_init__(self):
    if self.triangular not in TRIANGULAR:
      raise ValueError(f"gdn.triangular must be one of {TRIANGULAR}, got {self.triangular!r}")
    if self.impl not in IMPLS:
      raise ValueError(f"gdn.impl must be one of {IMPLS}, got {self.impl!r}")


class GatedDeltaNet(RecurrentMixer):
  """Gated DeltaNet mixer: chunkwise (or, impl="pallas", token by token in a kernel) in training and prefill, one
  recurrent step per decoded token."""

  def __init__(self, d_model: int, config: GatedDeltaNetConfig, *, rngs: nnx.Rngs, out_scale: float = 1.0,
               dtype=jnp.float32, param_dtype=jnp.float32):
    super().__init__(d_model, config.num_heads, config.head_dim, conv_size=config.conv_size, gamma_cap=None,
                     use_output_gate=config.use_output_gate, norm_eps=config.norm_eps, out_scale=out_scale,
                     rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.config = config
    if config.impl == "pallas":  # imported now, not in the first trace (see MesaLayer.__init__)
      implementation(config.impl, "gated_delta")

  def mix(self, q, k, v, g, beta, state):
    c = self.config
    if c.impl == "xla":
      return gated_delta_chunked(q, k, v, g, beta, state, chunk_size=c.chunk_size, triangular=c.triangular)
    if state is None:
      state = self.zero_state(q.shape[0])
    # XLA cannot partition a pallas_call: run it per (batch, heads) shard of the mesh
    per_token, per_gate = ("batch", None, "heads", None), ("batch", None, "heads")
    per_state = ("batch", "heads", None, None)
    op = sharding.per_shard(implementation(c.impl, "gated_delta"),
                            (per_token, per_token, per_token, per_gate, per_gate, per_state), (per_token, per_state))
    return op(q, k, v, g, beta, state)

  def mix_token(self, q, k, v, g, beta, state):
    return (*gated_delta_step(q, k, v, g, beta, state), None)

  def zero_state(self, batch: int):
    return jnp.zeros((batch, self.num_heads, self.head_dim, self.head_dim), jnp.float32)
