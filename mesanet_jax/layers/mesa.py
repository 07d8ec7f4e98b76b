"""The MesaNet sequence-mixing layer (paper §2, App. E, G.2, G.5; flash-linear-attention's `MesaNet` layer).

Input pipeline and gates: see `recurrent.py`. The Mesa part: λ = softplus(λ_param) + λ_min per head and key dim,
initialised to `lambda_init`, stored as a `NoDecayParam` so the optimiser can exclude it from weight decay; training
and prefill run `mesa_chunked` with at most `cg_steps_train` CG steps (each system stopping early when `cg_tol` is
set); decoding runs `mesa_decode_step` (impl="xla") or the fused Pallas decode kernel (impl="pallas": one kernel
per layer and token) with `cg_steps_decode` steps, stopping early per head when `decode_tol` is set, and with
`decode_warm_start` starting each token's CG from the previous token's solution, which the decode cache then
carries (`WarmStartState`).

CG steps taken in training are observable two ways. With a `CGStepsProbe` attached (`add_cg_steps_probes`), the
gradient of the loss w.r.t. the probe is (forward mean, forward max, adjoint mean, adjoint max) of the layer's
solves; the probe is an ordinary leaf of the module's state, so it works under `jax.checkpoint` and, stacked on the
layers axis, under the scanned block stack. Without a backward pass, `forward_with_cg_steps` returns the forward's.
"""
import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mesanet_jax import sharding
from mesanet_jax.layers.params import NoDecayParam, param
from mesanet_jax.layers.recurrent import RecurrentMixer
from mesanet_jax.models.fast_path import resolve_mesa
from mesanet_jax.ops import MesaState, mesa_chunked
from mesanet_jax.ops.cg_steps import STATS, combine, spread_probe
from mesanet_jax.ops.inputs import zero_state
from mesanet_jax.ops.operator import implementation


@dataclasses.dataclass(frozen=True)
class MesaConfig:
  """Mesa layer options. gamma_cap=0.9975 is the paper's forget-gate cap; None gives flash-linear-attention's
  g = log σ(a). cg_init: "jacobi" (paper) or "zero". impl: "xla" or "pallas", for `mesa_chunked` (training, prefill)
  and decoding (`mesa_decode_step` or the fused decode kernel), or "auto": the fastest for the backend with the chunk
  size, precision and CG tolerance measured for it (`models/fast_path.py`; resolved when the layer is built, or once
  per run by the entry points); matmul_precision: the chunked matmuls ("highest":
  f32-accurate; "high": three bf16 passes, ~1.7e-6, cheaper than "highest" at small heads on GPU; "default":
  TF32-class, ~1e-3, faster on GPU; decoding is f32 always); solve_precision: None, or the CG solves' lower
  precision, each solve then refined once to matmul_precision's accuracy (`mesa_chunked`'s). decode_warm_start:
  each decoded token's CG starts from the previous token's solution (scaled; the first after a prefill from cg_init's guess) and
  decode_tol is then relative to ‖q‖ (`ops.decode.solve_token`). decode_tol: each decoded token's CG stops per head
  once ‖r‖ ≤ decode_tol·‖r₀‖ (at most cg_steps_decode steps); the paper's ε = 1e-4 by default (teacher-forced on a
  trained model: ΔNLL 2e-7 against 30 fixed steps at ~4 steps per token, benchmarks/RESULTS.md); None: fixed steps.
  cg_tol: None for exactly cg_steps_train steps in training; else each forward and adjoint system stops once
  ‖r‖ ≤ cg_tol·‖r₀‖ (at most cg_steps_train steps). cg_preconditioner: training's and prefill's CG, "none" (plain,
  the paper's) or "jacobi" (preconditioned by diag(A_t): fewer steps where the diagonal spreads; decoding runs plain
  CG). save_states: the backward reuses the forward's chunk states instead of computing them again
  (`mesa_chunked`'s save_states: more memory, less time)."""
  num_heads: int = 6
  head_dim: int = 128
  conv_size: int = 4
  lambda_lower_bound: float = 0.25
  lambda_init: float = 1.0
  gamma_cap: float | None = 0.9975
  cg_steps_train: int = 30
  cg_tol: float | None = None
  cg_steps_decode: int = 30
  decode_tol: float | None = 1e-4
  chunk_size: int = 64
  impl: str = "auto"
  matmul_precision: str = "highest"
  solve_precision: str | None = None
  cg_init: str = "jacobi"
  cg_preconditioner: str = "none"
  save_states: bool = False
  decode_warm_start: bool = False
  use_output_gate: bool = False
  norm_eps: float = 1e-6


class WarmStartState(NamedTuple):
  """A Mesa layer's decode-cache state with `decode_warm_start`: the decayed sums and the last token's solution."""
  sums: MesaState
  solution: jax.Array  # [B, H, Dk] x = (H_kk + Λ)⁻¹ q of the last decoded token; zeros after a prefill


class CGStepsProbe(nnx.Variable):
  """Zeros, f32 [4] ([L, 4] in a stacked block), that a Mesa layer passes to `mesa_chunked` as `cg_probe`: the
  gradient of a loss w.r.t. it is (forward mean, forward max, adjoint mean, adjoint max) of the CG steps the layer's
  solves took in that loss (`ops.cg_steps.STATS`; over the batch's tokens and heads). Not a parameter: differentiate
  w.r.t. it beside the params (e.g. `nnx.split(model, nnx.Param, CGStepsProbe)`) and log its gradient, not its value.
  The gradients of several calls add up: over micro-batches, divide the sum by their number."""


def add_cg_steps_probes(model: nnx.Module) -> nnx.Module:
  """Attaches a CGStepsProbe to every MesaLayer in `model` (in place) and returns it. A layer whose params are stacked
  on leading axes (`LMConfig.scan_layers`) gets a probe stacked likewise. Models without probes run as before."""
  for _, module in nnx.iter_modules(model):
    if isinstance(module, MesaLayer):
      lead = module.lam_param.shape[:-2]  # λ is [H, Dk], or [L, H, Dk] stacked
      module.cg_steps_probe = CGStepsProbe(jnp.zeros((*lead, len(STATS)), jnp.float32),
                                           out_sharding=("layers",) * len(lead) + (None,), eager_sharding=False)
  return model


def cg_steps_by_layer(probe_grads: nnx.State) -> jax.Array:
  """The gradients w.r.t. a model's CGStepsProbes as one row per Mesa layer, in layer order: f32 [L, 4] with
  columns `ops.cg_steps.STATS`."""
  return jnp.concatenate([v.get_value().reshape(-1, len(STATS)) for _, v in nnx.to_flat_state(probe_grads)])


def cg_steps_layer_indices(probes: nnx.State) -> list[int]:
  """The block index of each row of `cg_steps_by_layer` for a model's probes (abstract or not): the first integer in
  a probe's path (blocks.3.mixer.cg_steps_probe), or 0..L−1 for a probe stacked [L, 4]."""
  indices = []
  for path, variable in nnx.to_flat_state(probes):
    shape = variable.get_value().shape
    indices += list(range(shape[0])) if len(shape) > 1 else [next(p for p in path if isinstance(p, int))]
  return indices


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
    self.config = config = resolve_mesa(config)
    # Import the implementation now, not inside the first trace: an import that registers jax config options (the
    # Pallas backends do) changes the tracing context, and every jitted function first traced before it is traced and
    # compiled again on its next call.
    implementation(config.impl, "operator")
    start = math.log(math.expm1(config.lambda_init - config.lambda_lower_bound))  # softplus⁻¹(λ_init − λ_min)
    self.lam_param = param(rngs, nnx.initializers.constant(start), (config.num_heads, config.head_dim), param_dtype,
                           ("heads", "kv"), kind=NoDecayParam)
    self.cg_steps_probe: CGStepsProbe | None = nnx.data(None)  # see add_cg_steps_probes

  def lam(self) -> jax.Array:
    """λ = softplus(λ_param) + λ_min, [H, Dk] in f32."""
    return jax.nn.softplus(self.lam_param[...].astype(jnp.float32)) + self.config.lambda_lower_bound

  def mix(self, q, k, v, g, beta, state):
    return self._chunked(q, k, v, g, beta, state, return_cg_steps=False)

  def forward_with_cg_steps(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The training-path call from an empty state, x [B, T, d] -> y [B, T, d], and the forward solve's CG steps,
    (mean, max) over the batch's tokens and heads, f32 [2]. No backward pass is needed (evaluation)."""
    (q, k, v, g, beta), out_gate, _ = self._inputs(x, None)
    o, _, steps = self._chunked(q, k, v, g, beta, None, return_cg_steps=True)
    return self._output(o, out_gate), combine(steps)

  def _chunked(self, q, k, v, g, beta, state, *, return_cg_steps: bool):
    """`mesa_chunked` with this layer's options and probe (per (batch, heads) shard for Pallas)."""
    c = self.config
    batch = q.shape[0]
    probe = None
    if self.cg_steps_probe is not None:
      probe = spread_probe(self.cg_steps_probe[...], (batch, c.num_heads, len(STATS)))

    def op(q, k, v, g, beta, lam, state, probe):
      return mesa_chunked(q, k, v, g, beta, lam, state, chunk_size=c.chunk_size, cg_steps=c.cg_steps_train,
                          cg_tol=c.cg_tol, impl=c.impl, cg_init=c.cg_init, cg_preconditioner=c.cg_preconditioner,
                          matmul_precision=c.matmul_precision, solve_precision=c.solve_precision,
                          cg_probe=probe, return_cg_steps=return_cg_steps, save_states=c.save_states)
    if state is None:
      state = self.zero_state(batch)
    if c.impl == "pallas":  # XLA cannot partition a pallas_call: run it per (batch, heads) shard of the mesh
      per_token, per_gate, per_head = ("batch", None, "heads", None), ("batch", None, "heads"), ("batch", "heads", None)
      per_state = MesaState(("batch", "heads", None, None), ("batch", "heads", None, None))
      outputs = (per_token, per_state, per_head) if return_cg_steps else (per_token, per_state)
      op = sharding.per_shard(op, (per_token, per_token, per_token, per_gate, per_gate, ("heads", None), per_state,
                                   None if probe is None else per_head), outputs)
    return op(q, k, v, g, beta, self.lam(), state, probe)

  def mix_token(self, q, k, v, g, beta, state):
    c = self.config
    sums, previous = (state.sums, state.solution) if c.decode_warm_start else (state, None)
    options = dict(cg_steps=c.cg_steps_decode, tol=c.decode_tol, cg_init=c.cg_init)
    step = implementation(c.impl, "decode_step")  # mesa_decode_step, or the fused kernel for "pallas"
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
