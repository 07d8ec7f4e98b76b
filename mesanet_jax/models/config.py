"""LM configuration and the paper's presets (App. G.4) for MesaNet and each baseline, plus a tiny CPU size.

Mixer names per layer: "mesa", "gdn" (Gated DeltaNet), "attention" (full causal, RoPE), "swa" (sliding-window
attention with `attention.window`) and "lru" (Hawk's RG-LRU block, width `lru.width` = 1.25·d in the presets).
Architectures: "mesanet", "gdn", "transformer", "swa", "hawk" (all one mixer), "hawk_mesa" (LRU and Mesa blocks
alternating, LRU first: the paper's Hawk-MesaNet) and "hybrid" (Mesa with every `hybrid_every`-th layer
sliding-window attention; the hybrid is ours, not in the paper's v2).

`fla_compatible` gives the variant that flash-linear-attention's `MesaNetForCausalLM` can express (the HF export's
requirement); `to_dict` / `from_dict` write and read an LMConfig as JSON-ready data.
"""
import dataclasses

import jax.numpy as jnp

from mesanet_jax.layers.attention import AttentionConfig
from mesanet_jax.layers.gated_deltanet import GatedDeltaNetConfig
from mesanet_jax.layers.hawk import HawkConfig, lru_width
from mesanet_jax.layers.mesa import MesaConfig

REMAT_MODES = ("none", "mixer", "mlp", "full")
MIXERS = ("mesa", "gdn", "attention", "swa", "lru")
ARCHITECTURES = ("mesanet", "gdn", "transformer", "swa", "hawk", "hawk_mesa", "hybrid")
# name: (blocks, d_model, heads, head_dim, vocab)
SIZES = {
    "tiny": (4, 64, 2, 32, 256),
    "mad": (2, 128, 8, 16, 16),  # the paper's MAD models (App. F.1 / Table 6); the vocabulary is each task's
    "small": (14, 768, 6, 128, 50_257),
    "medium": (28, 1024, 8, 128, 50_257),
    "large": (28, 1536, 12, 128, 50_257),
}


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Decoder-only LM: pre-RMSNorm blocks `x += mixer(norm(x)); x += mlp(norm(x))`, SwiGLU MLP of width
  mlp_ratio·d_model, tied embedding scaled by √d_model on input, logits soft-capped at `logit_cap`.

  embed_std: None is the paper's embedding (initial std 1/√d_model, multiplied by √d_model on input, G.2); a number
  is that initial std with no input scale (mad-lab's and GPT-2's 0.02). `embedding_init_and_scale` gives both.
  linear_init_variance multiplies every linear layer's initial kernel variance (N(0, 1/fan_in), output projections
  also × 2/n_layers): 1 ours; 1/3 that of PyTorch's nn.Linear default U(±1/√fan_in), which mad-lab's models use.

  dtype is the activation (compute) dtype, param_dtype the storage dtype; Mesa/GDN states and CG stay f32 always.
  residual_dtype: the residual stream's dtype between the blocks' sublayers (None: dtype). f32 with a bf16 dtype is
  mixed precision as PyTorch's autocast runs a pre-norm model (mad-lab's Lightning "bf16"): the embedding and every
  `x + sublayer(norm(x))` stay f32 while the sublayers compute in bf16.
  remat: what the backward pass recomputes instead of storing (`REMAT_MODES`): "none"; "mixer" (each block's norm +
  mixer: Mesa's CG solve runs again); "mlp" (each block's norm + SwiGLU: the [B, T, 2·3d] hidden activations are not
  kept, cheap to recompute); "full" (the whole block: only the residual stream between blocks is kept). True / False
  (the old boolean) mean "full" / "none".
  scan_layers: one Block whose params are stacked on a leading "layers" axis, run by `nnx.scan` (compile time flat in
  depth); needs every block to use the same mixer. Both change the computation's schedule, not its result.
  """
  vocab_size: int = 50_257
  d_model: int = 768
  mixers: tuple[str, ...] = ("mesa",) * 14
  mlp_ratio: int = 3
  tie_embeddings: bool = True
  embed_std: float | None = None
  linear_init_variance: float = 1.0
  logit_cap: float | None = 30.0
  norm_eps: float = 1e-6
  dtype: type = jnp.float32
  param_dtype: type = jnp.float32
  residual_dtype: type | None = None
  mesa: MesaConfig = MesaConfig()
  gdn: GatedDeltaNetConfig = GatedDeltaNetConfig()
  attention: AttentionConfig = AttentionConfig()
  lru: HawkConfig = HawkConfig()
  remat: str = "none"
  scan_layers: bool = False

  def __post_init__(self):
    object.__setattr__(self, "remat", remat_mode(self.remat))
    bad = [m for m in self.mixers if m not in MIXERS]
    if not self.mixers or bad:
      raise ValueError(f"mixers must be a non-empty tuple of {MIXERS}, got {self.mixers}")
    if self.embed_std is not None and not self.embed_std > 0:
      raise ValueError(f"embed_std must be a positive number or None (the paper's 1/√d_model with a √d_model input "
                       f"scale), got {self.embed_std}")
    if not self.linear_init_variance > 0:
      raise ValueError(f"linear_init_variance must be a positive number, got {self.linear_init_variance}")
    if self.residual_dtype is not None and not jnp.issubdtype(self.residual_dtype, jnp.floating):
      raise ValueError(f"residual_dtype must be a floating dtype or None (the activation dtype), got "
                       f"{self.residual_dtype}")
    if self.scan_layers and len(set(self.mixers)) > 1:
      raise ValueError(f"scan_layers=True needs every block to use one mixer, got mixers={self.mixers} (the hybrid "
                       f"architecture): set scan_layers=False")

  @property
  def n_layers(self) -> int:
    return len(self.mixers)

  @property
  def stream_dtype(self) -> jnp.dtype:
    """The residual stream's dtype: residual_dtype, or the activation dtype where that is None."""
    return jnp.dtype(self.dtype if self.residual_dtype is None else self.residual_dtype)


def remat_mode(remat: str | bool) -> str:
  """One of REMAT_MODES, from the mode or the old boolean (True = "full", False = "none"; also as text)."""
  remat = {True: "full", False: "none", "true": "full", "false": "none"}.get(
      remat.lower() if isinstance(remat, str) else remat, remat)
  if remat not in REMAT_MODES:
    raise ValueError(f"remat must be one of {REMAT_MODES} (or True / False: full / none), got {remat!r}")
  return remat


def mixer_pattern(architecture: str, n_layers: int, hybrid_every: int = 4) -> tuple[str, ...]:
  if architecture not in ARCHITECTURES:
    raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
  if architecture == "hybrid":
    return tuple("swa" if (i + 1) % hybrid_every == 0 else "mesa" for i in range(n_layers))
  if architecture == "hawk_mesa":
    return tuple("lru" if i % 2 == 0 else "mesa" for i in range(n_layers))
  single = {"mesanet": "mesa", "gdn": "gdn", "transformer": "attention", "swa": "swa", "hawk": "lru"}[architecture]
  return (single,) * n_layers


def embedding_init_and_scale(config: LMConfig) -> tuple[float, float]:
  """(initial std of the embedding table, factor its rows are multiplied by on input)."""
  if config.embed_std is None:
    return config.d_model ** -0.5, config.d_model ** 0.5
  return config.embed_std, 1.0


def preset(size: str, architecture: str = "mesanet", *, hybrid_every: int = 4, **overrides) -> LMConfig:
  """The paper's size (`SIZES`) for one architecture; every head has key size head_dim. `overrides` replace
  LMConfig fields (e.g. dtype=jnp.bfloat16). The tiny size also shrinks chunks (16) and windows (8) for CPU tests."""
  if size not in SIZES:
    raise ValueError(f"size must be one of {tuple(SIZES)}, got {size!r}")
  n_layers, d_model, heads, head_dim, vocab = SIZES[size]
  chunk, window = (16, 8) if size == "tiny" else (64, 1024)
  config = LMConfig(
      vocab_size=vocab, d_model=d_model, mixers=mixer_pattern(architecture, n_layers, hybrid_every),
      mesa=MesaConfig(num_heads=heads, head_dim=head_dim, chunk_size=chunk),
      gdn=GatedDeltaNetConfig(num_heads=heads, head_dim=head_dim, chunk_size=chunk),
      attention=AttentionConfig(num_heads=heads, head_dim=head_dim, window=window),
      lru=HawkConfig(width=lru_width(d_model), num_heads=heads))
  return dataclasses.replace(config, **overrides)


def fla_compatible(config: LMConfig) -> LMConfig:
  """The same model as flash-linear-attention builds it: no logit soft-cap, no γ cap (g = log σ(a)) and CG started
  from zero as in fla's chunked kernels. The √d embedding scale needs no switch: the HF export folds it."""
  mesa = dataclasses.replace(config.mesa, gamma_cap=None, cg_init="zero")
  return dataclasses.replace(config, logit_cap=None, mesa=mesa)


_SUBCONFIGS = {"mesa": MesaConfig, "gdn": GatedDeltaNetConfig, "attention": AttentionConfig, "lru": HawkConfig}
_DTYPES = ("dtype", "param_dtype", "residual_dtype")  # residual_dtype may be None


def to_dict(config: LMConfig) -> dict:
  """LMConfig -> JSON-ready dict (dtypes by name, tuples as lists)."""
  data = dataclasses.asdict(config)
  data.update({key: jnp.dtype(data[key]).name for key in _DTYPES if data[key] is not None})
  data["mixers"] = list(config.mixers)
  return data


def from_dict(data: dict) -> LMConfig:
  """The inverse of `to_dict`; missing keys take their defaults, an unknown key is a ValueError naming it."""
  def build(cls, values: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ValueError(f"model config: unknown key {where}{unknown[0]!r}")
    return cls(**values)
  data = dict(data)
  for key, cls in _SUBCONFIGS.items():
    data[key] = build(cls, data.get(key, {}), f"{key}.")
  for key in _DTYPES:
    if data.get(key) is not None:
      data[key] = jnp.dtype(data[key]).type
  if "mixers" in data:
    data["mixers"] = tuple(data["mixers"])
  return build(LMConfig, data, "")
