"""mad-lab's 66 task variants and their fixed datasets.

Each task has a baseline setting and changes, one axis at a time (mad-lab `configs/tasks/*.yml`, expanded by
`mad/configs.py: make_benchmark_mad_configs`): 11 + 14 + 11 + 6 + 11 + 13 = 66 variants. Unset fields take
`MADConfig`'s defaults (configs.py:33-44): 12,800 training and 1,280 test examples, no noise, motifs of 1.

Every variant has a fixed training set and a fixed test set, pure functions of (seed, task, variant): the same for
every architecture and grid point, as mad-lab generates them once and stores them (`mad/data/dataset.py`).
"""
import dataclasses
import os

import numpy as np

from mesanet_jax.mad import tasks

TASKS = ("in_context_recall", "noisy_recall", "fuzzy_recall", "memorize", "compress", "selective_copy")
# our name: (mad-lab's name, baseline, changes) from configs/tasks/<name>.yml
TASK_SPECS = {
    "in_context_recall": ("in-context-recall", dict(vocab_size=16, seq_len=128),
                          dict(vocab_size=(32, 64, 128), seq_len=(256, 512, 1024),
                               num_train_examples=(6400, 3200, 1600, 800))),
    "noisy_recall": ("noisy-in-context-recall", dict(vocab_size=32, noise_vocab_size=16, seq_len=128, frac_noise=0.2),
                     dict(vocab_size=(48, 80, 144), seq_len=(256, 512, 1024),
                          num_train_examples=(6400, 3200, 1600, 800), frac_noise=(0.4, 0.6, 0.8))),
    "fuzzy_recall": ("fuzzy-in-context-recall", dict(vocab_size=16, seq_len=128, k_motif_size=3, v_motif_size=3),
                     dict(vocab_size=(32, 64, 128), seq_len=(256, 512, 1024),
                          num_train_examples=(6400, 3200, 1600, 800))),
    "memorize": ("memorization", dict(vocab_size=256, seq_len=32, num_train_examples=256),
                 dict(vocab_size=(512, 1024, 2048, 4096, 8192))),
    "compress": ("compression", dict(vocab_size=16, seq_len=32),
                 dict(vocab_size=(32, 64, 128), seq_len=(64, 128, 256), num_train_examples=(6400, 3200, 1600, 800))),
    "selective_copy": ("selective-copying", dict(vocab_size=16, seq_len=256, num_tokens_to_copy=16),
                       dict(vocab_size=(32, 64, 128), seq_len=(512, 1024), num_train_examples=(6400, 3200, 1600, 800),
                            num_tokens_to_copy=(32, 64, 96))),
}


@dataclasses.dataclass(frozen=True)
class Variant:
  """One difficulty setting of a task; `name` is "baseline" or "<axis>=<value>" (the changed axis)."""
  task: str
  name: str
  index: int  # position in the task's list (seeds the data)
  vocab_size: int
  seq_len: int
  num_train_examples: int = 12_800
  num_test_examples: int = 1_280
  frac_noise: float = 0.0
  noise_vocab_size: int = 0
  num_tokens_to_copy: int = 0
  k_motif_size: int = 1
  v_motif_size: int = 1

  @property
  def autoencoder(self) -> bool:
    """Compression is read out by an autoencoder (mad-lab benchmark.py:213), every other task by the LM."""
    return self.task == "compress"

  @property
  def settings(self) -> dict:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("task", "name", "index")}


def variants(task: str) -> list[Variant]:
  """The task's baseline, then each change in mad-lab's order."""
  if task not in TASK_SPECS:
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")
  _, baseline, changes = TASK_SPECS[task]
  out = [Variant(task, "baseline", 0, **baseline)]
  for axis, values in changes.items():
    for value in values:
      out.append(Variant(task, f"{axis}={value}", len(out), **{**baseline, axis: value}))
  return out


def all_variants() -> list[Variant]:
  return [v for task in TASKS for v in variants(task)]


def shrunk(variant: Variant, num_examples: int) -> Variant:
  """The variant with at most num_examples training and test examples (smoke runs; same name)."""
  return dataclasses.replace(variant, num_train_examples=min(num_examples, variant.num_train_examples),
                             num_test_examples=min(num_examples, variant.num_test_examples))


def find(task: str, name: str) -> Variant:
  for v in variants(task):
    if v.name == name:
      return v
  raise ValueError(f"{task} has no variant {name!r}; variants: {[v.name for v in variants(task)]}")


def _rng(seed: int, variant: Variant, stream: int) -> np.random.Generator:
  return np.random.default_rng([seed, TASKS.index(variant.task), variant.index, stream])


def generate(variant: Variant, split: str, seed: int = 0, num_examples: int | None = None) -> dict:
  """{"inputs", "targets"}: [N, L] int32 (targets IGNORE where nothing is scored) for split "train" or "test";
  N = the variant's size unless `num_examples` is given. Memorization's map is drawn once per variant and shared by
  both splits."""
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  count = num_examples or (variant.num_train_examples if split == "train" else variant.num_test_examples)
  rng = _rng(seed, variant, 0 if split == "train" else 1)
  kwargs = dict(variant.settings, training=split == "train")
  if variant.task == "memorize":
    kwargs["value_of"] = tasks.memorization_map(_rng(seed, variant, 2), variant.vocab_size)
  examples = [tasks.GENERATORS[variant.task](rng, **kwargs) for _ in range(count)]
  return {"inputs": np.stack([e[0] for e in examples]).astype(np.int32),
          "targets": np.stack([e[1] for e in examples]).astype(np.int32)}


def load(variant: Variant, seed: int = 0, cache_dir: str = "") -> dict:
  """{"train": {...}, "test": {...}} for the variant, read from (or written to) `cache_dir` when given."""
  path = cache_dir and os.path.join(cache_dir, f"{variant.task}.{variant.name}.seed{seed}.train"
                                               f"{variant.num_train_examples}.test{variant.num_test_examples}.npz")
  if path and os.path.exists(path):
    with np.load(path) as f:
      return {split: {"inputs": f[f"{split}_inputs"], "targets": f[f"{split}_targets"]} for split in ("train", "test")}
  data = {split: generate(variant, split, seed) for split in ("train", "test")}
  if path:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"  # per process: grids side by side may write the same variant at once
    np.savez(tmp, **{f"{s}_{k}": v for s, d in data.items() for k, v in d.items()})
    os.replace(tmp, path)
  return data
