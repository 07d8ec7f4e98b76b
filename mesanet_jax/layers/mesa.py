"""The MesaNet sequence-mixing layer (paper §2, App. E, G.2, G.5; flash-linear-attention's `MesaNet` layer).

Input pipeline and gates: see `recurrent.py`. The Mesa part: λ = softplus(λ_param) + λ_min per head and key dim,
initialised to `lambda_init`, stored as a `NoDecayParam` so the optimiser can exclude it from weight decay; training
and prefill run `mesa_chunked` with `cg_steps_train` fixed CG steps; decoding runs `mesa_decode_step` (impl="xla")
or the fused Pallas decode kernel (impl="pallas": one kernel per layer and token) with `cg_steps_decode` steps,
stopping early per head when `decode_tol` is set, and with `decode_warm_start` starting each token's CG from the
previous token's solution, which the decode cache then carries (`WarmStartState`).
"""
import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mesanet_jax import sharding
from mesanet_jax.layers.params import NoDecayParam, param
from mesanet_jax.layers.recurrent import RecurrentMixer
from mesanet_jax.ops import MesaState, mesa_chunked, mesa_decode_step
from mesanet_jax.ops.inputs import zero_state
from pallas_kernels.mesa_cg.decode import mesa_decode_fused


@dataclasses.dataclass(frozen=True)
class MesaConfig:
  """Mesa layer options. gamma_cap=0.9975 is the paper's forget-gate cap; None gives flash-linear-attention's
  g = log σ(a). cg_init: "jacobi" (paper) or "zero". impl: "xla" or "pallas", for `mesa_chunked` (training, prefill)
  and decoding (`mesa_decode_step` or the fused decode kernel); matmul_precision: the chunked matmuls ("highest":
  f32-accurate; "default": TF32-class, ~1e-3, faster on GPU; decoding is f32 always). decode_warm_start: each decoded
  token's CG starts from the previous token's solution (scaled; the first after a prefill from cg_init's guess) and
  decode_tol is then relative to ‖q‖ (`ops.decode.solve_token`)."""
  num_heads: int = 6
  head_dim: int = 128
  conv_size: int = 4
  lambda_lower_bound: float = 0.25
  lambda_init: float = 1.0
  gamma_cap: float | None = 0.9975
  cg_steps_train: int = 30
  cg_steps_decode: int = 30
  decode_tol: float | None = None
  chunk_size: int = 64
  impl: str = "xla"
  matmul_precision: str = "highest"
  cg_init: str = "jacobi"
  decode_warm_start: bool = False
  use_output_gate: bool = False
  norm_eps: float = 1e-6


class WarmStartState(NamedTuple):
  """A Mesa layer's decode-cache state with `decode_warm_start`: the decayed sums and the last token's solution."""
  sums: MesaState
  solution: jax.Array  # [B, H, Dk] x = (H_kk + Λ)⁻¹ q of the last decoded token; zeros after a prefill


class MesaLayer(RecurrentMixer):
  """Mesa mixer: o_t = H_kv[t]ᵀ (H_kk[t] + Λ)⁻¹ q_t per head, then per-head RMSNorm (optionally gated) and W_o."""

  def __init__(self, d_model: int, config: MesaConfig, *, rngs: nnx.Rngs, out_scale: float = 1.0,
               dtype=jnp.float32, param_dtype=jnp.float32):
    if not config.lambda_init > config.lambda_lower_bound:
      raise ValueError(f"lambda_init must exceed lambda_lower_bound, got {config.lambda_init} <= "
                       f"{config.lambda_lower_bound}")
    super().__init__(d_model, config.num_heads, config.head_dim, conv_size=config.conv_size,
                     gamma_cap=config.gamma_cap, use_output_gate=config.use_output_gate, norm_eps=config.norm_eps,
                     out_scale=out_scale, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.config = config
    start = math.log(math.expm1(config.lambda_init - config.lambda_lower_bound))  # softplus⁻¹(λ_init − λ_min)
    self.lam_param = param(rngs, nnx.initializers.constant(start), (config.num_heads, config.head_dim), param_dtype,
                           ("heads", "kv"), kind=NoDecayParam)

  def lam(self) -> jax.Array:
    """λ = softplus(λ_param) + λ_min, [H, Dk] in f32."""
    return jax.nn.softplus(self.lam_param[...].astype(jnp.float32)) + self.config.lambda_lower_bound

  def mix(self, q, k, v, g, beta, state):
    c = self.config
    op = functools.partial(mesa_chunked, chunk_size=c.chunk_size, cg_steps=c.cg_steps_train, impl=c.impl,
                           cg_init=c.cg_init, matmul_precision=c.matmul_precision)
    if state is None:
      state = self.zero_state(q.shape[0])
    if c.impl == "pallas":  # XLA cannot partition a pallas_call: run it per (batch, heads) shard of the mesh
      per_token, per_gate, per_state = ("batch", None, "heads", None), ("batch", None, "heads"), (
          "batch", "heads", None, None)
      op = sharding.per_shard(op, (per_token, per_token, per_token, per_gate, per_gate, ("heads", None),
                                   MesaState(per_state, per_state)), (per_token, MesaState(per_state, per_state)))
    return op(q, k, v, g, beta, self.lam(), state)

  def mix_token(self, q, k, v, g, beta, state):
    c = self.config
    sums, previous = (state.sums, state.solution) if c.decode_warm_start else (state, None)
    options = dict(cg_steps=c.cg_steps_decode, tol=c.decode_tol, cg_init=c.cg_init)
    step = mesa_decode_fused if c.impl == "pallas" else mesa_decode_step
    op = lambda q, k, v, g, beta, lam, sums, previous: step(q, k, v, g, beta, lam, sums, previous=previous, **options)
    if c.impl == "pallas":  # XLA cannot partition a pallas_call: run it per (batch, heads) shard of the mesh
      per_head, per_gate, per_state = ("batch", "heads", None), ("batch", "heads"), ("batch", "heads", None, None)
      sums_names = MesaState(per_state, per_state)
      op = sharding.per_shard(op, (per_head, per_head, per_head, per_gate, per_gate, ("heads", None), sums_names,
                                   None if previous is None else per_head),
                              (per_head, sums_names, per_gate, per_head))
    o, sums, iters, x = op(q, k, v, g, beta, self.lam(), sums, previous)
    return o, (WarmStartState(sums, x) if c.decode_warm_start else sums), iters

  def to_cache(self, state: MesaState):
    if not self.config.decode_warm_start:
      return state
    return WarmStartState(state, jnp.zeros(state.h_kk.shape[:-1], state.h_kk.dtype))

  def from_cache(self, cached) -> MesaState:
    return cached.sums if self.config.decode_warm_start else cached

  def zero_state(self, batch: int) -> MesaState:
    return zero_state(batch, self.num_heads, self.head_dim, self.head_dim)
