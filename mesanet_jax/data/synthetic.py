"""Synthetic tasks for the trainer, each example a pure function of (seed, index): MQAR and in-context linear
regression. (The MAD benchmark, with its fixed datasets per variant, lives in `mesanet_jax/mad`.)

Token tasks return {"inputs": [T] int32, "targets": [T] int32, "mask": [T] f32}: next-token targets, with the loss
and accuracy counted only where mask = 1 (the positions whose answer is determined by the context). Regression returns {"inputs": [T, D+1] f32, "targets": [T] f32, "mask": [T] f32}.
"""
import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """Sizes shared by the token tasks. vocab_size counts every token id the task may emit."""
  seq_len: int = 64
  vocab_size: int = 64
  num_pairs: int = 8            # key-value pairs (MQAR)
  dim: int = 8                  # input dimension (regression)
  noise_std: float = 0.0        # label noise (regression)


def _rng(seed: int, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, 0, index])


def _lm(tokens: np.ndarray, answer: np.ndarray) -> dict:
  """Shifts a token sequence [T+1] into next-token (inputs, targets); answer[t] marks tokens to be predicted."""
  return {"inputs": tokens[:-1].astype(np.int32), "targets": tokens[1:].astype(np.int32),
          "mask": answer[1:].astype(np.float32)}


def _halves(c: TaskConfig):
  """Key ids [1, V/2), value ids [V/2, V); 0 is the pad / blank token."""
  if c.vocab_size < 8:
    raise ValueError(f"vocab_size must be >= 8, got {c.vocab_size}")
  half = c.vocab_size // 2
  return np.arange(1, half), np.arange(half, c.vocab_size)


def mqar(c: TaskConfig, seed: int, index: int) -> dict:
  """Multi-query associative recall (Zoology): k1 v1 … kP vP, then queries `k v` for shuffled keys; the values
  of the queries are predicted. Sequence: 2P pair tokens + 2Q query tokens + padding (pad id 0, never predicted)."""
  rng = _rng(seed, index)
  keys_vocab, values_vocab = _halves(c)
  n = c.num_pairs
  if 4 * n > c.seq_len + 1:
    raise ValueError(f"mqar needs seq_len + 1 >= 4 * num_pairs, got seq_len={c.seq_len}, num_pairs={n}")
  keys = rng.choice(keys_vocab, n, replace=False)
  values = rng.choice(values_vocab, n)
  order = rng.permutation(n)
  tokens = np.zeros(c.seq_len + 1, np.int64)
  answer = np.zeros(c.seq_len + 1, bool)
  tokens[0:2 * n:2], tokens[1:2 * n:2] = keys, values
  tokens[2 * n:4 * n:2], tokens[2 * n + 1:4 * n:2] = keys[order], values[order]
  answer[2 * n + 1:4 * n:2] = True
  return _lm(tokens, answer)


def linear_regression(c: TaskConfig, seed: int, index: int) -> dict:
  """In-context linear regression: a fresh w ~ N(0, I/D) per sequence; tokens alternate x_i = [x, 0] and
  y_i = [0, wᵀx + noise]. The model predicts y_i at the position of x_i (mask there); inputs [T, D+1]."""
  rng = _rng(seed, index)
  d, pairs = c.dim, c.seq_len // 2
  w = rng.normal(size=d) / np.sqrt(d)
  x = rng.normal(size=(pairs, d))
  y = x @ w + c.noise_std * rng.normal(size=pairs)
  inputs = np.zeros((pairs, 2, d + 1), np.float32)
  inputs[:, 0, :d] = x
  inputs[:, 1, d] = y
  targets = np.zeros((pairs, 2), np.float32)
  targets[:, 0] = y
  mask = np.zeros((pairs, 2), np.float32)
  mask[:, 0] = 1.0
  return {"inputs": inputs.reshape(2 * pairs, d + 1), "targets": targets.reshape(-1), "mask": mask.reshape(-1)}


TASKS = {
    "mqar": mqar,
    "regression": linear_regression,
}


class SyntheticSource:
  """A grain random-access source: example i = task(config, seed, i), for i < num_examples."""

  def __init__(self, task: str, config: TaskConfig, seed: int, num_examples: int):
    if task not in TASKS:
      raise ValueError(f"data.task must be one of {tuple(TASKS)}, got {task!r}")
    self.fn, self.config, self.seed, self.num_examples = TASKS[task], config, seed, num_examples

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict:
    return self.fn(self.config, self.seed, int(index))
