"""The Hugging Face export against flash-linear-attention 0.6.0's MesaNetForCausalLM, without torch: the config keys
and the parameter names and shapes the target builds (written down here from its source), a numpy transcription of
the target's forward run on the exported tensors against our logits, and the refusals."""
import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from benchmarks.export_parity import CASES, parity_config, perturbed_params
from mesanet_jax.eval import hf_export
from mesanet_jax.models.config import fla_compatible, preset
from mesanet_jax.models.lm import LanguageModel
from tests.models.stacking import same_weights

# The arguments of MesaNetConfig.__init__ (fla/models/mesa_net/configuration_mesa_net.py, fla 0.6.0).
MESANET_CONFIG_ARGS = {
    "attn_mode", "hidden_size", "use_output_gate", "use_short_conv", "conv_size", "num_heads", "head_dim",
    "lambda_lower_bound", "max_position_embeddings", "hidden_ratio", "intermediate_size", "hidden_act",
    "num_hidden_layers", "norm_eps", "attn", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id",
    "tie_word_embeddings", "initializer_range", "fuse_norm", "fuse_swiglu", "fuse_cross_entropy",
    "fuse_linear_cross_entropy", "use_l2warp", "vocab_size", "max_cg_step_training", "max_cg_step_decoding",
    "attnres_block_size",
}


def fla_schema(c: dict) -> dict[str, tuple[int, ...]]:
  """Name -> shape of every parameter of MesaNetForCausalLM(MesaNetConfig(**c)) with attn=None, attnres off:
  modeling_mesa_net.py (MesaNetModel: embeddings, layers.i = MesaNetBlock(attn_norm, attn, mlp_norm, mlp), norm;
  MesaNetForCausalLM: lm_head, nn.Linear(hidden, vocab, bias=False)), fla/layers/mesa_net.py (MesaNet: q/k/v_proj
  without bias, a/b_proj Linear(hidden, num_heads, bias=True), lambda_params [key_dim], ShortConvolution = depthwise
  nn.Conv1d weight [key_dim, 1, conv_size] without bias, g_proj with the output gate, o_norm [head_dim], o_proj),
  fla/modules/mlp.py (GatedMLP: gate/up_proj [intermediate, hidden], down_proj [hidden, intermediate])."""
  d, heads, head_dim, inter = c["hidden_size"], c["num_heads"], c["head_dim"], c["intermediate_size"]
  key_dim = heads * head_dim
  schema = {"model.embeddings.weight": (c["vocab_size"], d), "model.norm.weight": (d,),
            "lm_head.weight": (c["vocab_size"], d)}
  for i in range(c["num_hidden_layers"]):
    layer = {
        "attn_norm.weight": (d,), "attn.q_proj.weight": (key_dim, d), "attn.k_proj.weight": (key_dim, d),
        "attn.v_proj.weight": (key_dim, d), "attn.a_proj.weight": (heads, d), "attn.a_proj.bias": (heads,),
        "attn.b_proj.weight": (heads, d), "attn.b_proj.bias": (heads,), "attn.lambda_params": (key_dim,),
        "attn.q_conv1d.weight": (key_dim, 1, c["conv_size"]), "attn.k_conv1d.weight": (key_dim, 1, c["conv_size"]),
        "attn.o_norm.weight": (head_dim,), "attn.o_proj.weight": (d, key_dim), "mlp_norm.weight": (d,),
        "mlp.gate_proj.weight": (inter, d), "mlp.up_proj.weight": (inter, d), "mlp.down_proj.weight": (d, inter)}
    if c["use_output_gate"]:
      layer["attn.g_proj.weight"] = (key_dim, d)
    schema.update({f"model.layers.{i}.{name}": shape for name, shape in layer.items()})
  return schema


def fla_reference_logits(w: dict, c: dict, tokens: np.ndarray) -> np.ndarray:
  """numpy (f64) transcription of MesaNetForCausalLM.forward for one sequence [T], with an exact solve where fla runs
  CG: nn.Linear is x Wᵀ + b; ShortConvolution's kernel (fla/modules/causal_conv1d/ops.py) computes
  y_t = Σ_j w[:, 0, j] x_{t−(K−1)+j} then SiLU; q, k are L2-normalised with eps 1e-6 inside chunk_mesa_net;
  β = σ(b_proj x), g = log σ(a_proj x), λ = softplus(lambda_params) + lambda_lower_bound reshaped [H, K]."""
  w = {k: v.astype(np.float64) for k, v in w.items()}
  eps, heads, head_dim = c["norm_eps"], c["num_heads"], c["head_dim"]
  rms = lambda x, weight: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * weight
  sigmoid = lambda x: 1 / (1 + np.exp(-x))
  silu = lambda x: x * sigmoid(x)
  l2 = lambda x: x / np.sqrt(np.sum(x * x, -1, keepdims=True) + 1e-6)
  length = len(tokens)

  def conv(x, weight):
    size = weight.shape[-1]
    padded = np.concatenate([np.zeros((size - 1, x.shape[1])), x])
    return silu(sum(padded[j:j + length] * weight[:, 0, j] for j in range(size)))

  x = w["model.embeddings.weight"][tokens]
  for i in range(c["num_hidden_layers"]):
    p = lambda name: w[f"model.layers.{i}.{name}"]
    h = rms(x, p("attn_norm.weight"))
    q = l2(conv(h @ p("attn.q_proj.weight").T, p("attn.q_conv1d.weight")).reshape(length, heads, head_dim))
    k = l2(conv(h @ p("attn.k_proj.weight").T, p("attn.k_conv1d.weight")).reshape(length, heads, head_dim))
    v = (h @ p("attn.v_proj.weight").T).reshape(length, heads, head_dim)
    beta = sigmoid(h @ p("attn.b_proj.weight").T + p("attn.b_proj.bias"))
    gamma = sigmoid(h @ p("attn.a_proj.weight").T + p("attn.a_proj.bias"))
    lam = (np.log1p(np.exp(p("attn.lambda_params"))) + c["lambda_lower_bound"]).reshape(heads, head_dim)
    h_kk, h_kv = np.zeros((heads, head_dim, head_dim)), np.zeros((heads, head_dim, head_dim))
    o = np.zeros((length, heads, head_dim))
    for t in range(length):
      for j in range(heads):
        h_kk[j] = gamma[t, j] * h_kk[j] + beta[t, j] * np.outer(k[t, j], k[t, j])
        h_kv[j] = gamma[t, j] * h_kv[j] + beta[t, j] * np.outer(k[t, j], v[t, j])
        o[t, j] = h_kv[j].T @ np.linalg.solve(h_kk[j] + np.diag(lam[j]), q[t, j])
    o = rms(o, p("attn.o_norm.weight"))
    if c["use_output_gate"]:
      o = o * silu((h @ p("attn.g_proj.weight").T).reshape(length, heads, head_dim))
    x = x + o.reshape(length, -1) @ p("attn.o_proj.weight").T
    m = rms(x, p("mlp_norm.weight"))
    x = x + (silu(m @ p("mlp.gate_proj.weight").T) * (m @ p("mlp.up_proj.weight").T)) @ p("mlp.down_proj.weight").T
  return rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


@pytest.mark.slow  # a 3-block model, 60 CG steps, against a numpy forward
@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_fla_schema_and_forward(case, tmp_path):
  lm = parity_config(**CASES[case])
  params = perturbed_params(lm)
  hf_export.write_hf(str(tmp_path), lm, params, bos_token_id=0, eos_token_id=0, max_position_embeddings=512)
  config = json.loads((tmp_path / "config.json").read_text())
  assert set(config) == MESANET_CONFIG_ARGS | {"architectures", "model_type", "dtype"}
  assert config["model_type"] == "mesa_net" and config["architectures"] == ["MesaNetForCausalLM"]
  assert config["tie_word_embeddings"] == lm.tie_embeddings and config["intermediate_size"] == 3 * lm.d_model
  assert config["max_cg_step_training"] == 30 and config["norm_eps"] == lm.norm_eps

  tensors = load_file(str(tmp_path / "model.safetensors"))
  assert {k: v.shape for k, v in tensors.items()} == fla_schema(config)
  assert all(v.dtype == np.float32 for v in tensors.values())
  if lm.tie_embeddings:
    np.testing.assert_array_equal(tensors["lm_head.weight"], tensors["model.embeddings.weight"])

  # Our model with CG run to convergence (60 steps) vs the target's forward, in f64, on the exported tensors.
  lm = dataclasses.replace(lm, mesa=dataclasses.replace(lm.mesa, cg_steps_train=60))
  tokens = np.random.default_rng(1).integers(0, lm.vocab_size, 70)  # two chunks of 64 and a partial one
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: LanguageModel(lm, rngs=nnx.Rngs(0))))
  forward = jax.jit(lambda params, tokens: nnx.merge(graphdef, params)(tokens))  # one compile, not op by op
  ours = np.asarray(forward(params, tokens[None].astype(np.int32))[0])
  reference = fla_reference_logits(tensors, config, tokens)
  # f32 model (matmuls, conv, norms, CG) vs f64 reference: measured max |Δ| ≈ 5e-6 with logits up to ~10.
  # A layout error (transposed weight, reversed conv taps, λ order, unfolded √d) gives O(1).
  assert np.abs(reference).max() > 1.0
  np.testing.assert_allclose(ours, reference, atol=2e-4 * np.abs(reference).max())


def _mesa(**changes):
  return lambda lm: dataclasses.replace(lm, mesa=dataclasses.replace(lm.mesa, **changes))


@pytest.mark.parametrize("change, message", [
    (lambda lm: dataclasses.replace(lm, logit_cap=30.0), "logit_cap=30.0"),
    (_mesa(gamma_cap=0.9975), "mesa.gamma_cap=0.9975"),
    (lambda lm: dataclasses.replace(lm, mixers=("mesa", "swa")), r"mixers=\('mesa', 'swa'\)"),
    (lambda lm: dataclasses.replace(lm, norm_eps=1e-5), "mesa.norm_eps=1e-06 differs from norm_eps=1e-05"),
    (_mesa(head_dim=256), "mesa.head_dim=256"),
])
def test_refuses_what_fla_cannot_express(change, message):
  hf_export.check_expressible(fla_compatible(preset("tiny")))  # the fla-compatible variant passes
  with pytest.raises(ValueError, match=message):
    hf_export.hf_config(change(fla_compatible(preset("tiny"))), bos_token_id=0, eos_token_id=0)


def test_unscaled_embedding_exports_as_it_is():
  lm = dataclasses.replace(fla_compatible(preset("tiny")), embed_std=0.02)  # no √d to fold in
  model = LanguageModel(lm, rngs=nnx.Rngs(0))
  tensors = hf_export.hf_tensors(lm, nnx.state(model, nnx.Param))
  np.testing.assert_array_equal(tensors["model.embeddings.weight"], model.embed[...])
  np.testing.assert_array_equal(tensors["lm_head.weight"], model.embed[...])
  np.testing.assert_array_equal(tensors["model.norm.weight"], model.final_norm.scale[...])


def test_scanned_model_exports_the_same_tensors():
  model = LanguageModel(fla_compatible(preset("tiny")), rngs=nnx.Rngs(0))
  scanned = same_weights(model, scan_layers=True)
  expected = hf_export.hf_tensors(model.config, nnx.state(model, nnx.Param))
  exported = hf_export.hf_tensors(scanned.config, nnx.state(scanned, nnx.Param))
  assert exported.keys() == expected.keys()
  for name, value in expected.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
