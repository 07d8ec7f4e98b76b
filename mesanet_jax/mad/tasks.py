"""The six MAD tasks (Poli et al. 2024) as mad-lab generates them: one example = (inputs [L], targets [L]).

Written from mad-lab's `mad/data/instances.py` (github athms/mad-lab, commit 0f49a45; "instances.py:N" below are its
lines). Targets hold the token to predict at each input position, or IGNORE (mad-lab's `target_ignore_idx`, -100)
where nothing is scored. `training` picks the training or the test targets where mad-lab's generator does:

- in-context / noisy recall (instances.py:31-140): training targets are every next token (138); test targets only
  the value after a key that appeared earlier in the sequence (110-113) and the final probe's value (127-129).
- fuzzy recall (186-347): keys and values are 1-3 token strings without separators; test sequences use keys of the
  longest size only (238-240); left-padded to seq_len + 1 with the pad token before the shift (337-341).
- memorization (377-458): `key, insert-token` pairs; the value is the target at the insert token and never appears
  in the input (448-455); the key -> value map is fixed by the seed (352-375), the same for training and test.
- compression (464-509): random tokens and a final compression token; the target is the input itself (509), read
  by an autoencoder from the last position's state (`mad/model/auto_encoder.py`).
- selective copying (514-566): the tokens to copy with blanks inserted among them, the copy token, then blanks; the
  targets are the tokens at the final blanks (563-564): no teacher forcing.

We draw with numpy's Generator in vectorised form where the distribution is the same as mad-lab's one-draw-at-a-time
loop (noted at each such place), so datasets follow mad-lab's distributions but not its exact random streams.
"""
import numpy as np

IGNORE = -100  # mad-lab's target_ignore_idx


def _recall_vocab(vocab_size: int, noise_vocab_size: int, specials: int):
  """(key ids, value ids, noise ids): the first vocab_size − specials − noise ids split in halves, noise after them
  (instances.py:64-73 with multi_query, 224-228 and 249-250)."""
  plain = vocab_size - specials - noise_vocab_size
  if plain // 2 < 1:
    raise ValueError(f"vocab_size {vocab_size} leaves no key tokens (noise_vocab_size {noise_vocab_size})")
  return np.arange(plain // 2), np.arange(plain // 2, plain), np.arange(plain, plain + noise_vocab_size)


def in_context_recall(rng: np.random.Generator, *, vocab_size: int, seq_len: int, training: bool,
                      frac_noise: float = 0.0, noise_vocab_size: int = 0, **_) -> tuple[np.ndarray, np.ndarray]:
  """Multi-query associative recall (noisy recall when frac_noise > 0): seq_len − 1 tokens of key-value pairs (or
  noise pairs) and a final probe pair."""
  keys, values, noise_vocab = _recall_vocab(vocab_size, noise_vocab_size, specials=0)
  pairs = seq_len // 2
  while True:
    forced = rng.integers(pairs)  # not_noise_idx (instances.py:82): this pair is never noise
    noise = rng.random(pairs - 1) < frac_noise if frac_noise > 0 else np.zeros(pairs - 1, bool)
    if forced < pairs - 1:
      noise[forced] = False
    if not noise.all():
      break  # mad-lab fails (rng.choice of no keys, instances.py:120) when every pair is noise; we draw again
  # One key per pair (instances.py:97); each key's value is drawn at its first use (99-101), which is the same as
  # drawing every key's value up front.
  pair_keys = rng.choice(keys, pairs - 1)
  key_value = rng.choice(values, len(keys))
  tokens = np.stack([pair_keys, key_value[pair_keys]], axis=1)
  if frac_noise > 0:
    tokens[noise] = rng.choice(noise_vocab, (int(noise.sum()), 2))  # instances.py:89-92
  targets = np.full_like(tokens, IGNORE)
  kv_rows = np.flatnonzero(~noise)
  _, first = np.unique(tokens[kv_rows, 0], return_index=True)
  repeated = np.ones(len(kv_rows), bool)
  repeated[first] = False
  targets[kv_rows[repeated], 1] = tokens[kv_rows[repeated], 1]  # value of a key presented before (110-113)
  probe = rng.choice(np.unique(tokens[kv_rows, 0]))  # a presented key (instances.py:120-121)
  tokens = np.concatenate([tokens.reshape(-1), [probe, key_value[probe]]])
  targets = np.concatenate([targets.reshape(-1), [IGNORE, key_value[probe]]])  # instances.py:127-129
  return tokens[:-1], (tokens[1:] if training else targets[1:])  # instances.py:136-140


def _distinct(rng: np.random.Generator, vocab: np.ndarray, size: int) -> tuple:
  """A uniform random ordered tuple of `size` distinct tokens: what rng.choice over the shuffled list of all
  permutations draws (instances.py:11-26, 296)."""
  return tuple(vocab[rng.permutation(len(vocab))[:size]].tolist())


def _pick(rng: np.random.Generator, options: np.ndarray) -> int:
  """rng.choice(options): the same draw from the same stream, ~6× faster (fuzzy recall draws ~300 a sequence)."""
  return int(options[rng.integers(len(options))])


def fuzzy_recall(rng: np.random.Generator, *, vocab_size: int, seq_len: int, training: bool, k_motif_size: int = 3,
                 v_motif_size: int = 3, **_) -> tuple[np.ndarray, np.ndarray]:
  """Recall with keys and values of 1..k_motif_size / 1..v_motif_size tokens, seq_len tokens (left-padded)."""
  keys, values, _ = _recall_vocab(vocab_size, 0, specials=1)
  pad = vocab_size - 1  # instances.py:223
  key_sizes = np.arange(1, k_motif_size + 1) if training else np.array([k_motif_size])
  value_sizes = np.arange(1, v_motif_size + 1)
  probe_key = _distinct(rng, keys, _pick(rng, key_sizes))  # instances.py:253-256
  probe_value = _distinct(rng, values, _pick(rng, value_sizes))
  probe_len = len(probe_key) + len(probe_value)
  probe_at = rng.integers(seq_len - 2 * probe_len)  # instances.py:258
  probe_added = False
  key_value, inputs, targets = {}, [], []  # mad-lab's kv_map and keys_presented at once: a key's value is fixed
  while len(inputs) < seq_len - probe_len - (k_motif_size + v_motif_size):  # instances.py:267
    if len(inputs) >= probe_at and not probe_added:  # instances.py:274-281
      inputs += probe_key + probe_value
      targets += [IGNORE] * probe_len
      key_value[probe_key] = probe_value
      probe_added = True
      continue
    key = _distinct(rng, keys, _pick(rng, key_sizes))
    presented = key in key_value
    if key == probe_key:  # instances.py:300-302
      key_value[key], probe_added = probe_value, True
    elif not presented:
      key_value[key] = _distinct(rng, values, _pick(rng, value_sizes))
    value = key_value[key]
    inputs += key + value
    targets += [IGNORE] * len(key) + (list(value) if presented else [IGNORE] * len(value))  # 311-317
  inputs += probe_key + probe_value  # the final probe, always scored (instances.py:320-330)
  targets += [IGNORE] * len(probe_key) + list(probe_value)
  padding = seq_len + 1 - len(inputs)  # instances.py:337-341
  inputs = np.array([pad] * padding + inputs)
  targets = np.array([IGNORE] * padding + targets)
  return inputs[:-1], (inputs[1:] if training else targets[1:])


def memorization_map(rng: np.random.Generator, vocab_size: int) -> np.ndarray:
  """The fixed key -> value map: value_of[key] for key ids 0..(V−1)//2 − 1, a random injection into the value ids
  (generate_kv_map over V − 1 tokens, configs.py:89-94 and instances.py:352-375)."""
  keys, values, _ = _recall_vocab(vocab_size, 0, specials=1)
  return rng.permutation(values)[:len(keys)]


def memorization(rng: np.random.Generator, *, vocab_size: int, seq_len: int, value_of: np.ndarray,
                 **_) -> tuple[np.ndarray, np.ndarray]:
  """seq_len // 2 pairs `key, insert-token`; the target at the insert token is the key's value (instances.py:
  440-455); keys uniform over the map's keys (448)."""
  insert = vocab_size - 1  # instances.py:409
  keys = rng.integers(len(value_of), size=seq_len // 2)
  inputs = np.stack([keys, np.full_like(keys, insert)], axis=1).reshape(-1)
  targets = np.stack([np.full_like(keys, IGNORE), value_of[keys]], axis=1).reshape(-1)
  return inputs, targets


def compression(rng: np.random.Generator, *, vocab_size: int, seq_len: int, **_) -> tuple[np.ndarray, np.ndarray]:
  """seq_len − 1 random tokens and the compression token; targets = inputs (instances.py:492-509)."""
  inputs = np.concatenate([rng.integers(vocab_size - 1, size=seq_len - 1), [vocab_size - 1]])
  return inputs, inputs.copy()


def selective_copying(rng: np.random.Generator, *, vocab_size: int, seq_len: int, num_tokens_to_copy: int,
                      **_) -> tuple[np.ndarray, np.ndarray]:
  """n tokens with seq_len − 2n − 1 blanks inserted before them, the copy token, n blanks; the targets at the final
  n positions are the n tokens in order (instances.py:541-566)."""
  copy, blank = vocab_size - 1, vocab_size - 2
  n = num_tokens_to_copy
  blanks = seq_len - 2 * n - 1
  if blanks < 1:
    raise ValueError(f"selective copying needs seq_len > 2 * num_tokens_to_copy + 1, got {seq_len} and {n}")
  to_copy = rng.integers(blank, size=n)
  # Each blank goes before a uniformly drawn token index in [0, n) (np.insert at randint(0, n), instances.py:
  # 556-557; mad-lab draws these from the global numpy RNG): never after the last token.
  before = np.bincount(rng.integers(n, size=blanks), minlength=n)
  head = np.repeat(np.stack([np.full(n, blank), to_copy], axis=1).reshape(-1),
                   np.stack([before, np.ones(n, int)], axis=1).reshape(-1))
  inputs = np.concatenate([head, [copy], np.full(n, blank)])
  targets = np.concatenate([np.full(seq_len - n, IGNORE), to_copy])  # instances.py:563-564
  return inputs, targets


GENERATORS = {
    "in_context_recall": in_context_recall,
    "noisy_recall": in_context_recall,
    "fuzzy_recall": fuzzy_recall,
    "memorize": memorization,
    "compress": compression,
    "selective_copy": selective_copying,
}
