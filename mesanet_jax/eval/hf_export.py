"""Export to a Hugging Face directory (`config.json` + `model.safetensors`) in the layout of flash-linear-attention
0.6.0's `MesaNetForCausalLM` (fla/models/mesa_net/{configuration,modeling}_mesa_net.py, fla/layers/mesa_net.py), so
the model loads with `AutoModelForCausalLM.from_pretrained` after `import fla`.

Mapping (ours → fla; torch Linear weights are [out, in], our kernels [in, out], hence the transposes):
  embed [V, d] · √d                  → model.embeddings.weight (fla does not scale embeddings; we fold the √d in;
                                       1 instead of √d with LMConfig.embed_std)
  final_norm.scale                   → model.norm.weight (÷ √d when tied, which undoes the fold in the read-out)
  embed · √d (tied) / unembed.kernelᵀ → lm_head.weight
  blocks.i.mixer_norm / mlp_norm     → model.layers.i.attn_norm / mlp_norm .weight (a `scan_layers` model's stacked
                                       blocks.<name> [L, …] is first split into blocks.i.<name>: the same names)
  mixer.{q,k,v,o,g}_proj.kernelᵀ     → attn.{q,k,v,o,g}_proj.weight;   a_proj, b_proj (+ bias) likewise
  mixer.{q,k}_conv.kernel [K, C]     → attn.{q,k}_conv1d.weight [C, 1, K] (depthwise Conv1d; the same tap order:
                                       tap K−1 multiplies the current token)
  mixer.lam_param [H, Dk]            → attn.lambda_params [H·Dk] (both: λ = softplus(θ) + lambda_lower_bound)
  mixer.norm.scale                   → attn.o_norm.weight (per-head RMSNorm, gated by silu(g_proj x) with the gate)
  mlp.{gate,up,down}.kernelᵀ         → mlp.{gate,up,down}_proj.weight (GatedMLP, swish, intermediate_size = 3·d)

Refused (fla cannot express them): non-Mesa mixers, a logit soft-cap, the paper's γ cap, a Mesa output-norm eps
other than the model's norm_eps (fla uses one eps), head_dim > 128 (fla's kernels assert it). Not weights, so not
refused: cg_init (fla's chunked kernels start CG at zero, its decoding at the Jacobi guess), cg_preconditioner (fla
runs plain CG), decode_tol (fla has fixed steps), chunk_size (fla fixes 64). Train with
`--config.model.fla_compatible=True` for an exportable model.
"""
import json
import os

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from mesanet_jax.models.config import LMConfig, embedding_init_and_scale

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FLA_MAX_HEAD_DIM = 128


def _linear(w: np.ndarray) -> np.ndarray:
  return w.T


def _conv(w: np.ndarray) -> np.ndarray:
  return w.T[:, None, :]


def _flat(w: np.ndarray) -> np.ndarray:
  return w.reshape(-1)


def _same(w: np.ndarray) -> np.ndarray:
  return w


# Our parameter path inside a block -> (fla name inside model.layers.i, transform).
BLOCK_RULES = {
    ("mixer_norm", "scale"): ("attn_norm.weight", _same),
    ("mixer", "q_proj", "kernel"): ("attn.q_proj.weight", _linear),
    ("mixer", "k_proj", "kernel"): ("attn.k_proj.weight", _linear),
    ("mixer", "v_proj", "kernel"): ("attn.v_proj.weight", _linear),
    ("mixer", "a_proj", "kernel"): ("attn.a_proj.weight", _linear),
    ("mixer", "a_proj", "bias"): ("attn.a_proj.bias", _same),
    ("mixer", "b_proj", "kernel"): ("attn.b_proj.weight", _linear),
    ("mixer", "b_proj", "bias"): ("attn.b_proj.bias", _same),
    ("mixer", "lam_param"): ("attn.lambda_params", _flat),
    ("mixer", "q_conv", "kernel"): ("attn.q_conv1d.weight", _conv),
    ("mixer", "k_conv", "kernel"): ("attn.k_conv1d.weight", _conv),
    ("mixer", "g_proj", "kernel"): ("attn.g_proj.weight", _linear),
    ("mixer", "norm", "scale"): ("attn.o_norm.weight", _same),
    ("mixer", "o_proj", "kernel"): ("attn.o_proj.weight", _linear),
    ("mlp_norm", "scale"): ("mlp_norm.weight", _same),
    ("mlp", "gate", "kernel"): ("mlp.gate_proj.weight", _linear),
    ("mlp", "up", "kernel"): ("mlp.up_proj.weight", _linear),
    ("mlp", "down", "kernel"): ("mlp.down_proj.weight", _linear),
}


def check_expressible(lm: LMConfig) -> None:
  """Raises ValueError naming the first model-config key whose value fla's MesaNetForCausalLM cannot express."""
  hint = "; train with --config.model.fla_compatible=True"
  if any(m != "mesa" for m in lm.mixers):
    raise ValueError(f"model config mixers={lm.mixers}: the export maps Mesa layers only (fla's hybrid attention "
                     f"layers are not ours)")
  if lm.logit_cap is not None:
    raise ValueError(f"model config logit_cap={lm.logit_cap}: fla's MesaNetForCausalLM has no logit soft-cap{hint}")
  if lm.mesa.gamma_cap is not None:
    raise ValueError(f"model config mesa.gamma_cap={lm.mesa.gamma_cap}: fla's forget gate is log σ(a) without the "
                     f"paper's γ cap{hint}")
  if lm.mesa.norm_eps != lm.norm_eps:
    raise ValueError(f"model config mesa.norm_eps={lm.mesa.norm_eps} differs from norm_eps={lm.norm_eps}: fla uses "
                     f"one norm_eps for every norm")
  if lm.mesa.head_dim > FLA_MAX_HEAD_DIM:
    raise ValueError(f"model config mesa.head_dim={lm.mesa.head_dim}: fla's Mesa kernels take at most "
                     f"{FLA_MAX_HEAD_DIM}")


def hf_config(lm: LMConfig, *, bos_token_id: int, eos_token_id: int, max_position_embeddings: int = 2048) -> dict:
  """config.json: every argument of fla's MesaNetConfig, plus the HF architecture keys."""
  check_expressible(lm)
  m = lm.mesa
  return {
      "architectures": ["MesaNetForCausalLM"], "model_type": "mesa_net", "dtype": "float32",
      "attn_mode": "chunk", "hidden_size": lm.d_model, "use_output_gate": m.use_output_gate, "use_short_conv": True,
      "conv_size": m.conv_size, "num_heads": m.num_heads, "head_dim": m.head_dim,
      "lambda_lower_bound": m.lambda_lower_bound, "max_position_embeddings": max_position_embeddings,
      "hidden_ratio": lm.mlp_ratio, "intermediate_size": lm.mlp_ratio * lm.d_model, "hidden_act": "swish",
      "num_hidden_layers": lm.n_layers, "norm_eps": lm.norm_eps, "attn": None, "use_cache": True,
      "pad_token_id": None, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
      "tie_word_embeddings": lm.tie_embeddings, "initializer_range": 0.02, "fuse_norm": True, "fuse_swiglu": True,
      "fuse_cross_entropy": True, "fuse_linear_cross_entropy": False, "use_l2warp": False,
      "vocab_size": lm.vocab_size, "max_cg_step_training": m.cg_steps_train, "max_cg_step_decoding": m.cg_steps_decode,
      "attnres_block_size": None,
  }


def _unstacked(flat: dict, n_layers: int) -> dict:
  """A `scan_layers` model's blocks.<name> [L, ...] -> blocks.<i>.<name> [...], the paths of the loop layout."""
  out = {}
  for path, value in flat.items():
    if path[0] == "blocks":
      out.update({("blocks", str(i), *path[1:]): value[i] for i in range(n_layers)})
    else:
      out[path] = value
  return out


def hf_tensors(lm: LMConfig, params: nnx.State) -> dict[str, np.ndarray]:
  """fla parameter name -> float32 array, for every parameter of MesaNetForCausalLM (lm_head included when tied)."""
  check_expressible(lm)
  flat = {tuple(str(p) for p in path): np.asarray(v[...], np.float32) for path, v in nnx.to_flat_state(params)}
  if lm.scan_layers:
    flat = _unstacked(flat, lm.n_layers)
  _, scale = embedding_init_and_scale(lm)
  embeddings = flat.pop(("embed",)) * np.float32(scale)
  norm = flat.pop(("final_norm", "scale"))
  tensors = {"model.embeddings.weight": embeddings}
  if lm.tie_embeddings:
    tensors["model.norm.weight"] = norm / np.float32(scale)
    tensors["lm_head.weight"] = embeddings
  else:
    tensors["model.norm.weight"] = norm
    tensors["lm_head.weight"] = _linear(flat.pop(("unembed", "kernel")))
  for path, value in flat.items():
    if path[0] != "blocks" or path[2:] not in BLOCK_RULES:
      raise ValueError(f"parameter {'.'.join(path)} has no flash-linear-attention name")
    name, transform = BLOCK_RULES[path[2:]]
    tensors[f"model.layers.{path[1]}.{name}"] = transform(value)
  return {name: np.ascontiguousarray(value) for name, value in tensors.items()}  # safetensors writes raw buffers


def write_hf(directory: str, lm: LMConfig, params: nnx.State, **config_args) -> None:
  """Writes `<directory>/config.json` and `<directory>/model.safetensors` (refuses an existing weights file)."""
  config = hf_config(lm, **config_args)
  tensors = hf_tensors(lm, params)
  weights = os.path.join(directory, WEIGHTS_FILE)
  if os.path.exists(weights):
    raise ValueError(f"{weights} already exists; choose another output directory")
  os.makedirs(directory, exist_ok=True)
  save_file(tensors, weights, metadata={"format": "pt"})
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2)
