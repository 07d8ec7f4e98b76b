"""Synthetic tasks, each example a pure function of (seed, index): MQAR, in-context linear regression and the MAD
suite (paper App. F / PAPER_NOTES §6.7: in-context recall, noisy recall, fuzzy recall, memorize, selective copy,
compress).

Token tasks return {"inputs": [T] int32, "targets": [T] int32, "mask": [T] f32}: next-token targets, with the loss
and accuracy counted only where mask = 1 (the positions whose answer is determined by the context). The MAD tasks
follow the task descriptions of Poli et al. (2024) in next-token form; they are not a port of MAD's generator code.
Regression returns {"inputs": [T, D+1] f32, "targets": [T] f32, "mask": [T] f32}.
"""
import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """Sizes shared by the token tasks. vocab_size counts every token id the task may emit."""
  seq_len: int = 64
  vocab_size: int = 64
  num_pairs: int = 8            # key-value pairs (recall tasks, MQAR)
  key_len: int = 2              # tokens per key / value (fuzzy recall)
  noise_frac: float = 0.2       # share of noise tokens (noisy recall)
  num_tokens: int = 8           # tokens to copy (selective copy, compress)
  dim: int = 8                  # input dimension (regression)
  noise_std: float = 0.0        # label noise (regression)


def _rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
  return np.random.default_rng([seed, stream, index])


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


def _recall(c: TaskConfig, rng: np.random.Generator, keys, values, key_len: int, noise_frac: float) -> dict:
  """Repeated key→value lookups from a fixed in-sequence mapping; a value is predicted when its key was seen."""
  keys_vocab, values_vocab = _halves(c)
  noise_vocab = np.arange(1, 4)  # noise ids are reserved keys never used as keys below
  tokens, answer, seen = [], [], set()
  while len(tokens) < c.seq_len + 1:
    if noise_frac and rng.random() < noise_frac:
      tokens.append(int(rng.choice(noise_vocab)))
      answer.append(False)
      continue
    i = int(rng.integers(len(keys)))
    tokens += list(keys[i]) + list(values[i])
    answer += [False] * key_len + [i in seen] * key_len
    seen.add(i)
  return _lm(np.array(tokens[:c.seq_len + 1]), np.array(answer[:c.seq_len + 1]))


def _mapping(c: TaskConfig, rng: np.random.Generator, key_len: int = 1, reserve: int = 0):
  """num_pairs distinct keys (strings of key_len key ids, none of the first `reserve`) and their values."""
  keys_vocab, values_vocab = _halves(c)
  keys_vocab = keys_vocab[reserve:]
  n = len(keys_vocab)
  if c.num_pairs > n ** key_len:
    raise ValueError(f"num_pairs {c.num_pairs} exceeds the {n ** key_len} distinct keys of vocab_size {c.vocab_size}")
  codes = rng.choice(n ** key_len, c.num_pairs, replace=False)
  digits = (codes[:, None] // n ** np.arange(key_len)[::-1]) % n  # base-n digits: distinct rows
  return keys_vocab[digits], rng.choice(values_vocab, (c.num_pairs, key_len))


def in_context_recall(c: TaskConfig, seed: int, index: int) -> dict:
  rng = _rng(seed, index)
  keys, values = _mapping(c, rng, reserve=3)
  return _recall(c, rng, keys, values, 1, 0.0)


def noisy_recall(c: TaskConfig, seed: int, index: int) -> dict:
  rng = _rng(seed, index)
  keys, values = _mapping(c, rng, reserve=3)
  return _recall(c, rng, keys, values, 1, c.noise_frac)


def fuzzy_recall(c: TaskConfig, seed: int, index: int) -> dict:
  """Keys and values are `key_len`-token strings; every value token after a seen key is predicted."""
  rng = _rng(seed, index)
  keys, values = _mapping(c, rng, key_len=c.key_len, reserve=3)
  return _recall(c, rng, keys, values, c.key_len, 0.0)


def memorize(c: TaskConfig, seed: int, index: int) -> dict:
  """One key→value mapping shared by every example (drawn from the seed only): recall from the weights, so every
  value is predicted, including the first occurrence."""
  keys, values = _mapping(c, _rng(seed, 0, stream=1), reserve=3)
  rng = _rng(seed, index)
  picks = rng.integers(len(keys), size=(c.seq_len + 2) // 2)
  tokens = np.stack([keys[picks, 0], values[picks, 0]], axis=1).reshape(-1)[:c.seq_len + 1]
  answer = np.tile([False, True], len(picks))[:c.seq_len + 1]
  return _lm(tokens, answer)


def selective_copy(c: TaskConfig, seed: int, index: int) -> dict:
  """num_tokens tokens scattered among blanks (0), then a copy marker (1) and the tokens again, in order."""
  rng = _rng(seed, index)
  n = c.num_tokens
  context = c.seq_len + 1 - n - 1
  if context < n:
    raise ValueError(f"selective_copy needs seq_len + 1 >= 3 * num_tokens + 1, got seq_len={c.seq_len}")
  content = rng.integers(2, c.vocab_size, n)
  tokens = np.zeros(c.seq_len + 1, np.int64)
  tokens[np.sort(rng.choice(context, n, replace=False))] = content
  tokens[context] = 1
  tokens[context + 1:] = content
  answer = np.zeros(c.seq_len + 1, bool)
  answer[context + 1:] = True
  return _lm(tokens, answer)


def compress(c: TaskConfig, seed: int, index: int) -> dict:
  """A random string, a compression marker (1), blanks (0), then the string again: the model has to carry the
  whole string across the blanks in its state."""
  rng = _rng(seed, index)
  n = c.num_tokens
  gap = c.seq_len + 1 - 2 * n - 1
  if gap < 0:
    raise ValueError(f"compress needs seq_len + 1 >= 2 * num_tokens + 1, got seq_len={c.seq_len}")
  content = rng.integers(2, c.vocab_size, n)
  tokens = np.concatenate([content, [1], np.zeros(gap, np.int64), content])
  answer = np.zeros(c.seq_len + 1, bool)
  answer[-n:] = True
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
    "in_context_recall": in_context_recall,
    "noisy_recall": noisy_recall,
    "fuzzy_recall": fuzzy_recall,
    "memorize": memorize,
    "selective_copy": selective_copy,
    "compress": compress,
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
