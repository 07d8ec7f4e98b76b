"""Logit parity of the Hugging Face export with flash-linear-attention 0.6.0's MesaNetForCausalLM (device script:
torch, triton, transformers and a CUDA GPU; fla itself from the carried wheels).

For each case (tied embeddings without output gate; untied with the output gate) it builds a small fla-compatible
MesaNet with our code, perturbs every parameter so that no tensor is trivial (norm scales, λ per head and key dim,
conv taps, gate biases with forget gates near 1 so the state carries across fla's 64-token chunks), exports it with
`mesanet_jax.eval.hf_export.write_hf`, loads the directory with `AutoModelForCausalLM.from_pretrained` after
`import fla`, checks that every loaded tensor equals the exported one, and runs both models on the same tokens
(2 × 300: four full chunks and a partial one), in float32 and in bfloat16. fla's forward (eval, use_cache=False)
takes its chunked path, `chunk_mesa_net` with max_cg_step_training CG steps from x₀ = 0, which our fla-compatible
config matches (30 steps, cg_init="zero").

Printed per case and dtype: max |Δlogit|, the relative error max |Δlogit| / max |logit|, and the mean NLL of both.
Tolerance on the relative error: 2e-2 in float32, 1e-1 in bfloat16; exit 1 above it, 2 when fla cannot be loaded.
Why not tighter: fla's kernel casts q and k to fp16, keeps the chunk states h_kv in bf16 and runs the CG matmuls in
fp16 (fla/ops/mesa_net/chunk.py, chunk_h_fwd.py, chunk_cg_solver_fwd.py), so even with f32 weights its Mesa output
is ~4e-3 (relative) from an f32 solve (benchmarks/RESULTS.md, kernel_bench). A layout error (a transposed weight,
reversed conv taps, λ in the wrong order, a missed √d fold) moves logits by O(1).

    python3 -m pip install -q --no-index --no-deps --target /tmp/site \
        .whl/flash_linear_attention-0.6.0-py3-none-any.whl .whl/fla_core-0.6.0-py3-none-any.whl
    export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2; python3 benchmarks/export_parity.py
"""
import dataclasses
import os
import sys
import tempfile

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX shares the GPU with torch

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from mesanet_jax.eval.hf_export import hf_tensors, write_hf  # noqa: E402
from mesanet_jax.models.config import LMConfig, fla_compatible, preset  # noqa: E402
from mesanet_jax.models.lm import LanguageModel  # noqa: E402

CASES = {"tied": dict(tie_embeddings=True, use_output_gate=False),
         "untied+gate": dict(tie_embeddings=False, use_output_gate=True)}
TOLERANCE = {"float32": 2e-2, "bfloat16": 1e-1}
TOKENS_SHAPE = (2, 300)


def parity_config(tie_embeddings: bool, use_output_gate: bool, dtype=jnp.float32) -> LMConfig:
  """3 Mesa blocks, d_model 128, 2 heads × 64, byte vocabulary, fla-compatible, 30 CG steps, chunk 64 (fla's)."""
  base = fla_compatible(preset("tiny"))
  mesa = dataclasses.replace(base.mesa, num_heads=2, head_dim=64, chunk_size=64, cg_steps_train=30,
                             use_output_gate=use_output_gate)
  return dataclasses.replace(base, d_model=128, mixers=("mesa",) * 3, tie_embeddings=tie_embeddings, dtype=dtype,
                             mesa=mesa)


def perturbed_params(lm: LMConfig, seed: int = 0) -> nnx.State:
  """The model's init with every tensor made generic: matrices × (1 + 0.3 ε), vectors (norm scales, λ, biases)
  + 0.5 ε, and the forget-gate biases drawn from [2, 6] (γ = σ(a) ≈ 0.88 … 0.998)."""
  params = nnx.state(LanguageModel(lm, rngs=nnx.Rngs(seed)), nnx.Param)
  flat = nnx.to_flat_state(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(flat))
  out = []
  for key, (path, variable) in zip(keys, flat):
    value = variable[...]
    noise = jax.random.normal(key, value.shape, value.dtype)
    if tuple(str(p) for p in path[-2:]) == ("a_proj", "bias"):
      value = jax.random.uniform(key, value.shape, value.dtype, 2.0, 6.0)
    elif value.ndim >= 2 and path[-1] != "lam_param":
      value = value * (1 + 0.3 * noise)
    else:
      value = value + 0.5 * noise
    out.append((path, variable.replace(value)))
  return nnx.from_flat_state(out)


def _ours(lm: LMConfig, params: nnx.State, tokens: np.ndarray) -> np.ndarray:
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: LanguageModel(lm, rngs=nnx.Rngs(0))))
  with jax.default_matmul_precision("highest"):  # no TF32 on our side
    return np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens), np.float32)


def _nll(logits: np.ndarray, tokens: np.ndarray) -> float:
  logits = logits[:, :-1].astype(np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  return float(-np.take_along_axis(log_probs, tokens[:, 1:, None], -1).mean())


def _import_fla():
  try:
    import torch
    import transformers
    import fla  # registers MesaNetForCausalLM with the Auto classes
    return torch, transformers, fla
  except Exception as e:  # ImportError, or a triton / CUDA error raised while fla imports
    print(f"export_parity: cannot import flash-linear-attention with torch: {type(e).__name__}: {e}\n"
          f"  python {sys.version.split()[0]}, PYTHONPATH={os.environ.get('PYTHONPATH', '')!r}\n"
          f"  install the carried wheels first: python3 -m pip install --no-index --no-deps --target /tmp/site "
          f".whl/flash_linear_attention-0.6.0-py3-none-any.whl .whl/fla_core-0.6.0-py3-none-any.whl and put "
          f"/tmp/site on PYTHONPATH", file=sys.stderr)
    sys.exit(2)


def main() -> int:
  torch, transformers, fla = _import_fla()
  if not torch.cuda.is_available():
    print("export_parity: torch sees no CUDA device; fla's Triton kernels need one", file=sys.stderr)
    return 2
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  print(f"torch {torch.__version__}, transformers {transformers.__version__}, fla {fla.__version__}, "
        f"jax {jax.__version__} on {jax.devices()[0].device_kind} / {torch.cuda.get_device_name()}")
  failed = False
  for case, options in CASES.items():
    lm = parity_config(**options)
    params = perturbed_params(lm)
    tokens = np.random.default_rng(0).integers(0, lm.vocab_size, TOKENS_SHAPE).astype(np.int32)
    with tempfile.TemporaryDirectory() as directory:
      write_hf(directory, lm, params, bos_token_id=0, eos_token_id=0)
      model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).cuda().eval()
    print(f"\n{case}: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters")
    loaded = {k: v.float().cpu().numpy() for k, v in model.state_dict().items()}
    exported = hf_tensors(lm, params)
    wrong = sorted(set(loaded) ^ set(exported)) + [k for k in exported if k in loaded and not np.array_equal(
        loaded[k], exported[k])]
    if wrong:
      print(f"  FAIL: loaded tensors missing, unexpected or different from the export: {wrong}")
      failed = True
    for dtype, torch_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
      ours = _ours(dataclasses.replace(lm, dtype=jnp.dtype(dtype).type), params, tokens)
      with torch.no_grad():
        theirs = model.to(torch_dtype)(input_ids=torch.from_numpy(tokens).long().cuda(), use_cache=False)
        theirs = theirs.logits.float().cpu().numpy()
      diff = float(np.abs(ours - theirs).max())
      relative = diff / float(np.abs(ours).max())
      ok = relative <= TOLERANCE[dtype]
      failed |= not ok
      print(f"  {dtype:8s} max|Δlogit| {diff:.3e}  relative {relative:.3e} (tolerance {TOLERANCE[dtype]:.0e})  "
            f"NLL ours {_nll(ours, tokens):.5f} fla {_nll(theirs, tokens):.5f}  "
            f"argmax agreement {float(np.mean(ours.argmax(-1) == theirs.argmax(-1))):.4f}  {'ok' if ok else 'FAIL'}")
  print("\nPASS" if not failed else "\nFAIL")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
