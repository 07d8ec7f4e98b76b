"""Gated DeltaNet baseline layer: the shared recurrent pipeline (`recurrent.py`) around the gated delta rule.

Gates follow the paper's baselines (γ = σ(a), β = σ(b), same as Mesa without the γ cap); the output gate is on by
default as in flash-linear-attention's GatedDeltaNet.
"""
import dataclasses

import jax.numpy as jnp
from flax import nnx

from mesanet_jax.ops.gated_delta_rule import TRIANGULAR, gated_delta_chunked, gated_delta_step
from mesanet_jax.layers.recurrent import RecurrentMixer


@dataclasses.dataclass(frozen=True)
class GatedDeltaNetConfig:
  num_heads: int = 6
  head_dim: int = 128
  conv_size: int = 4
  chunk_size: int = 64
  triangular: str = "solve"  # how each chunk's triangular system is solved: ops/gated_delta_rule.TRIANGULAR
  use_output_gate: bool = True
  norm_eps: float = 1e-6

  def __post_init__(self):
    if self.triangular not in TRIANGULAR:
      raise ValueError(f"gdn.triangular must be one of {TRIANGULAR}, got {self.triangular!r}")


class GatedDeltaNet(RecurrentMixer):
  """Gated DeltaNet mixer: chunkwise in training and prefill, one recurrent step per decoded token."""

  def __init__(self, d_model: int, config: GatedDeltaNetConfig, *, rngs: nnx.Rngs, out_scale: float = 1.0,
               dtype=jnp.float32, param_dtype=jnp.float32):
    super().__init__(d_model, config.num_heads, config.head_dim, conv_size=config.conv_size, gamma_cap=None,
                     use_output_gate=config.use_output_gate, norm_eps=config.norm_eps, out_scale=out_scale,
                     rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.config = config

  def mix(self, q, k, v, g, beta, state):
    return gated_delta_chunked(q, k, v, g, beta, state, chunk_size=self.config.chunk_size,
                               triangular=self.config.triangular)

  def mix_token(self, q, k, v, g, beta, state):
    return (*gated_delta_step(q, k, v, g, beta, state), None)

  def zero_state(self, batch: int):
    return jnp.zeros((batch, self.num_heads, self.head_dim, self.head_dim), jnp.float32)
