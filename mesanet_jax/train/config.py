"""The trainer's config schema (an ml_collections ConfigDict every experiment config starts from) and its checks.

Stable keys other tools rely on: train.num_steps, train.log_every, train.eval_every, checkpoint.every_steps,
data.seed. The model is `model.size` × `model.architecture` (a preset of `mesanet_jax.models.config`) with the
overrides that are set (`OVERRIDES`, None until set); `lm_config` is the one translation into an LMConfig. The trainer
writes the config it ran with to `<workdir>/config.json` (with the vocabulary its model got); `load_run_config` reads
it back over the schema (so keys added later take their defaults).
"""
import contextlib
import dataclasses
import json
import os

import jax.numpy as jnp
import ml_collections
from ml_collections.config_dict import placeholder

from mesanet_jax.models import fast_path
from mesanet_jax.models.config import ARCHITECTURES, SIZES, LMConfig, fla_compatible, preset, remat_mode
from mesanet_jax.ops.chunked import IMPLS, PRECISIONS
from mesanet_jax.ops.inputs import CG_PRECONDITIONERS


RUN_CONFIG = "config.json"
MESA_PATH = "mesa_path"  # config.json's record of the resolved Mesa path


class ConfigError(ValueError):
  """A problem with the config, the data paths, the mesh or the workdir: reported as one line, exit code 2."""


@contextlib.contextmanager
def config_errors():
  """Turns the ValueErrors raised while setting a run up into ConfigErrors."""
  try:
    yield
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(str(e)) from None


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # parameter init

  c.model = ml_collections.ConfigDict(dict(
      size="tiny", architecture="mesanet", dtype="float32",  # dtype: activations; params stay f32
      # the residual stream's dtype, "float32" or "bfloat16" (LMConfig.residual_dtype); unset: dtype. "float32" with
      # dtype "bfloat16" adds the bf16 sublayers' outputs to an f32 stream, as PyTorch's autocast does
      residual_dtype=placeholder(str),
      # Overrides of the preset, None until set (OVERRIDES).
      vocab_size=placeholder(int),  # unset: the tokenizer's / task's vocabulary
      # impl, chunk_size, matmul_precision, cg_tol unset: Mesa's fastest path for the backend (models/fast_path.py)
      num_layers=placeholder(int), cg_steps=placeholder(int), chunk_size=placeholder(int), impl=placeholder(str),
      cg_tol=placeholder(float),  # > 0: each forward and adjoint CG system stops once ‖r‖ ≤ cg_tol·‖r₀‖ (at most
      # cg_steps); 0: fixed cg_steps
      matmul_precision=placeholder(str),  # Mesa's chunked matmuls: "highest", "high" or "default" (TF32-class)
      # a lower precision for Mesa's CG solves, each refined once to matmul_precision's accuracy (unset: the solves
      # at matmul_precision; MesaConfig.solve_precision)
      solve_precision=placeholder(str),
      cg_preconditioner=placeholder(str),  # training's CG: "none" (plain, the paper's) or "jacobi" (by diag(A_t))
      fla_compatible=False,  # True: flash-linear-attention's variant (no logit cap, no γ cap, CG from zero)
      # what the backward pass recomputes instead of storing: none | mixer | mlp | full (LMConfig.remat; True/False
      # = full/none). "mlp": the SwiGLU activations, cheap to recompute (to confirm by benchmarks/train_step_bench.py)
      remat="mlp",
      # Mesa's backward reuses the forward's chunk states (MesaConfig.save_states); unset: the fast path's (on GPU
      # True), else False
      save_mesa_states=placeholder(bool),
      scan_layers=False))  # one scanned block with params stacked on a "layers" axis (compile time flat in depth)

  c.data = ml_collections.ConfigDict(dict(
      source="text",  # "text", "synthetic", "tfds" or "arrayrecord" (shards written by mesanet-prepare)
      seed=0, seq_len=128,
      # text: path = files; tokenizer = "bytes", a SentencePiece .model or a Hugging Face tokenizer.json
      path="", tokenizer="bytes", eval_fraction=0.05,
      # arrayrecord: path = the prepared directory; tokenizer "" = the manifest's (else bytes); the last eval_shards
      # shards are held out
      eval_shards=1,
      # tfds (a dataset already prepared in tfds_data_dir; never downloaded)
      tfds_name="", tfds_split="train", tfds_eval_split="validation", tfds_data_dir="", tfds_feature="text",
      # synthetic (mesanet_jax.data.synthetic.TaskConfig)
      task="mqar", vocab_size=64, num_pairs=8, dim=8, noise_std=0.0,
      # grain
      num_threads=1, num_workers=0))

  c.train = ml_collections.ConfigDict(dict(
      num_steps=1000, batch_size=16, grad_accum=1, log_every=10, eval_every=100, eval_batches=4,
      progress_bar=True,
      loss_chunk_size=256))  # the LM loss reads logits out in chunks of this many positions (0: all at once)

  # Paper G.3: AdamW β = (0.9, 0.98), ε = 1e-8, wd 0.1, warmup 2000 steps from 1e-6, cosine to 10 %, clip 1.0.
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=3e-3, init_lr=1e-6, warmup_steps=2000, final_lr_frac=0.1, b1=0.9, b2=0.98, eps=1e-8,
      weight_decay=0.1, clip_norm=1.0, z_loss=0.0))

  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))  # one size may be -1 (the rest)

  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3, use_async=True, best_metric=""))
  return c


OVERRIDES = ("vocab_size", "num_layers", "cg_steps", "chunk_size", "impl", "matmul_precision", "solve_precision",
             "cg_tol",
             "cg_preconditioner")


def lm_config(model, data_vocab: int | None = None) -> LMConfig:
  """The LMConfig of `config.model`: the preset of (size, architecture) with the overrides that are set, made
  flash-linear-attention compatible when `model.fla_compatible`. The vocabulary is model.vocab_size when set (at
  least `data_vocab`, the tokenizer's or synthetic task's), else `data_vocab`, else the preset's (regression).

  Mesa's impl unset (or "auto") is resolved here for JAX's backend (`models/fast_path.py`: on GPU the Pallas kernels
  at their fastest chunk size, "default" precision, cg_tol 1e-4, chunk states saved); chunk_size, matmul_precision,
  cg_tol and save_mesa_states overrides that are set are applied after it, so they always win."""
  if model.vocab_size is not None and data_vocab is not None and model.vocab_size < data_vocab:
    raise ValueError(f"model.vocab_size {model.vocab_size} is smaller than the data's vocabulary {data_vocab}")
  lm = preset(model.size, model.architecture)
  set_only = lambda **values: {key: value for key, value in values.items() if value is not None}
  mesa = fast_path.resolve_mesa(dataclasses.replace(lm.mesa, **set_only(impl=model.impl)))
  mesa = dataclasses.replace(mesa, **set_only(cg_steps_train=model.cg_steps, chunk_size=model.chunk_size,
                                              matmul_precision=model.matmul_precision,
                                              solve_precision=model.solve_precision,
                                              cg_preconditioner=model.cg_preconditioner,
                                              save_states=model.save_mesa_states))
  if model.cg_tol is not None:  # 0: fixed steps
    mesa = dataclasses.replace(mesa, cg_tol=model.cg_tol or None)
  gdn = dataclasses.replace(lm.gdn, **set_only(chunk_size=model.chunk_size))
  layers = lm.n_layers if model.num_layers is None else model.num_layers
  vocab = next(v for v in (model.vocab_size, data_vocab, lm.vocab_size) if v is not None)
  residual = None if model.residual_dtype is None else jnp.dtype(model.residual_dtype).type
  lm = dataclasses.replace(lm, vocab_size=vocab, mixers=(lm.mixers * layers)[:layers], mesa=mesa, gdn=gdn,
                           dtype=jnp.dtype(model.dtype).type, residual_dtype=residual, remat=model.remat,
                           scan_layers=model.scan_layers)
  return fla_compatible(lm) if model.fla_compatible else lm


# What a resumed run may change (logged; config.json is updated): how long and how often, the mesh and the kernels,
# never what is trained. Any other difference to a workdir's config.json is refused.
RESUMABLE = ("train.num_steps", "train.log_every", "train.eval_every", "train.eval_batches", "train.progress_bar",
             "checkpoint.every_steps", "checkpoint.keep", "checkpoint.use_async", "data.num_threads",
             "data.num_workers", "mesh.data", "mesh.fsdp", "mesh.tensor", "model.impl", "model.remat",
             "model.save_mesa_states",
             "train.loss_chunk_size")


def run_config_dict(config, lm: LMConfig) -> dict:
  """What config.json holds: `config` with model.vocab_size set to the run's (`lm`, built by `lm_config`), so
  evaluation, export and generation rebuild the same model without the data, and under "mesa_path" the Mesa path
  the run resolved (a record only: other tools resolve "auto" again for their own backend)."""
  saved = json.loads(config.to_json())
  saved["model"]["vocab_size"] = lm.vocab_size
  saved[MESA_PATH] = fast_path.describe(lm)
  return saved


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
  return out


def config_changes(workdir: str, saved: dict) -> dict[str, tuple]:
  """{key: (value in <workdir>/config.json, value in `saved`)} for every key that differs; {} without a config.json.
  The "mesa_path" record is not compared: it says where a run ran, and a resume may run elsewhere."""
  if not os.path.exists(os.path.join(workdir, RUN_CONFIG)):
    return {}
  old = _flat(json.loads(load_run_config(workdir).to_json()))
  new = _flat({key: value for key, value in saved.items() if key != MESA_PATH})
  return {key: (old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)}


def save_run_config(saved: dict, workdir: str) -> None:
  """Writes `saved` (`run_config_dict`) to `<workdir>/config.json`, atomically (readers never see half a file)."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, RUN_CONFIG)
  with open(path + ".tmp", "w") as f:
    f.write(json.dumps(saved, indent=2) + "\n")
  os.replace(path + ".tmp", path)


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with, from `<workdir>/config.json`, over `base_config()`."""
  path = os.path.join(workdir, RUN_CONFIG)
  try:
    with open(path) as f:
      saved = json.load(f)
  except OSError as e:
    raise ValueError(f"cannot read {path} ({e.strerror or e}): not a training workdir?") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e})") from None
  saved.pop(MESA_PATH, None)
  if isinstance(saved.get("model", {}).get("remat"), bool):  # runs saved while remat was a boolean
    saved["model"]["remat"] = remat_mode(saved["model"]["remat"])
  for key in OVERRIDES:  # runs saved before the overrides were optional wrote 0 / "" for "the preset's"
    if saved.get("model", {}).get(key) in (0, ""):
      saved["model"][key] = None
  config = base_config()
  with config.unlocked():
    config.update(saved)
  return config


def validate(c) -> None:
  """Raises ValueError naming the first inconsistent key."""
  if c.model.size not in SIZES:
    raise ValueError(f"model.size must be one of {tuple(SIZES)}, got {c.model.size!r}")
  if c.model.architecture not in ARCHITECTURES:
    raise ValueError(f"model.architecture must be one of {ARCHITECTURES}, got {c.model.architecture!r}")
  try:
    remat_mode(c.model.remat)
  except ValueError as e:
    raise ValueError(f"model.{e}") from None
  if c.model.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got {c.model.dtype!r}")
  if c.model.residual_dtype not in (None, "float32", "bfloat16"):
    raise ValueError(f"model.residual_dtype must be 'float32', 'bfloat16' or unset (model.dtype), got "
                     f"{c.model.residual_dtype!r}")
  for key, allowed, unset in (("impl", (fast_path.AUTO, *IMPLS), "auto"), ("matmul_precision", PRECISIONS, "auto"),
                               ("solve_precision", PRECISIONS, "the solves at matmul_precision"),
                               ("cg_preconditioner", CG_PRECONDITIONERS, "the preset's")):
    if c.model[key] not in (None, *allowed):
      raise ValueError(f"model.{key} must be one of {allowed} (or unset: {unset}), got {c.model[key]!r}")
  for key in ("vocab_size", "num_layers", "cg_steps", "chunk_size"):
    if c.model[key] is not None and c.model[key] < 1:
      raise ValueError(f"model.{key} must be >= 1 (or unset: the preset's), got {c.model[key]}")
  if c.model.cg_tol is not None and c.model.cg_tol < 0:
    raise ValueError(f"model.cg_tol must be >= 0 (0: fixed CG steps; unset: the preset's), got {c.model.cg_tol}")
  for key in ("num_steps", "batch_size", "grad_accum", "log_every", "eval_every", "eval_batches"):
    if c.train[key] < 1:
      raise ValueError(f"train.{key} must be >= 1, got {c.train[key]}")
  if c.train.loss_chunk_size < 0:
    raise ValueError(f"train.loss_chunk_size must be >= 0 (0: the whole logits at once), got {c.train.loss_chunk_size}")
  if c.train.batch_size % c.train.grad_accum:
    raise ValueError(f"train.batch_size {c.train.batch_size} is not divisible by train.grad_accum "
                     f"{c.train.grad_accum}")
  if c.checkpoint.every_steps < 1 or c.checkpoint.keep < 1:
    raise ValueError("checkpoint.every_steps and checkpoint.keep must be >= 1")
  if c.data.seq_len < 2:
    raise ValueError(f"data.seq_len must be >= 2, got {c.data.seq_len}")
