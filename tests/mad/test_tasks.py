"""The MAD tasks: mad-lab's 66 variants, properties that pin each task's semantics, and examples written by hand from
mad-lab's generator code (github athms/mad-lab, mad/data/instances.py, lines cited) under scripted random draws."""
import numpy as np
import pytest

from mesanet_jax.mad import tasks, variants

I = tasks.IGNORE


class Scripted:
  """A stand-in for np.random.Generator that returns scripted draws in order, checking the kind of each call."""

  def __init__(self, *draws):
    self.draws = list(draws)

  def _next(self, kind):
    got, value = self.draws.pop(0)
    assert got == kind, f"expected a {got} draw, the generator made a {kind} draw"
    return np.asarray(value) if isinstance(value, list) else value

  def integers(self, *args, **kwargs):
    return self._next("integers")

  def random(self, *args, **kwargs):
    return self._next("random")

  def choice(self, *args, **kwargs):
    return self._next("choice")

  def permutation(self, *args, **kwargs):
    return self._next("permutation")


def test_the_66_variants_of_mad_lab():
  counts = {task: len(variants.variants(task)) for task in variants.TASKS}
  assert counts == {"in_context_recall": 11, "noisy_recall": 14, "fuzzy_recall": 11, "memorize": 6, "compress": 11,
                    "selective_copy": 13}
  assert len(variants.all_variants()) == 66
  noisy = variants.find("noisy_recall", "vocab_size=144")
  assert (noisy.noise_vocab_size, noisy.frac_noise, noisy.seq_len, noisy.num_train_examples) == (16, 0.2, 128, 12_800)
  assert variants.find("memorize", "vocab_size=8192").num_train_examples == 256
  assert variants.find("selective_copy", "num_tokens_to_copy=96").seq_len == 256
  assert {v.num_test_examples for v in variants.all_variants()} == {1280}
  assert [v.autoencoder for v in variants.variants("compress")] == [True] * 11
  with pytest.raises(ValueError, match="variant 'seq_len=99'"):
    variants.find("compress", "seq_len=99")


def test_recall_example_by_hand():
  # V=8, seq_len=8: keys 0..3, values 4..7 (instances.py:64-67); 3 pairs and the probe (83, 119-129). Draws: the
  # non-noise pair index, the pair keys 1 2 1, each key's value, the probe key 2.
  rng = Scripted(("integers", 3), ("choice", [1, 2, 1]), ("choice", [4, 5, 6, 7]), ("choice", 2))
  inputs, targets = tasks.in_context_recall(rng, vocab_size=8, seq_len=8, training=False)
  np.testing.assert_array_equal(inputs, [1, 5, 2, 6, 1, 5, 2])  # instances.py:140: inputs[:-1]
  # The repeated key 1 scores its value (110-113), the probe scores its value (129); shifted by one (140).
  np.testing.assert_array_equal(targets, [I, I, I, I, 5, I, 6])
  rng = Scripted(("integers", 3), ("choice", [1, 2, 1]), ("choice", [4, 5, 6, 7]), ("choice", 2))
  _, targets = tasks.in_context_recall(rng, vocab_size=8, seq_len=8, training=True)
  np.testing.assert_array_equal(targets, [5, 2, 6, 1, 5, 2, 6])  # training: every next token (138)


def test_fuzzy_recall_example_by_hand():
  # V=8: pad 7, keys 0..2, values 3..6 (instances.py:223-227); test keys have 3 tokens (240). Probe key (2,0,1),
  # value (4,), probe_idx 11 (253-258). Loop (267): key (0,1,2) -> new value (6,5); key (0,1,2) again -> scored.
  # The loop stops at length 10 < probe_idx, so the probe is never inserted, yet the final probe is scored (320-330).
  # Motif sizes are drawn as rng.choice draws them, an index into the sizes (test keys: [3]; values: [1, 2, 3]).
  rng = Scripted(("integers", 0), ("permutation", [2, 0, 1]), ("integers", 0), ("permutation", [1, 0, 2, 3]),
                 ("integers", 11),
                 ("integers", 0), ("permutation", [0, 1, 2]), ("integers", 1), ("permutation", [3, 2, 0, 1]),
                 ("integers", 0), ("permutation", [0, 1, 2]))
  inputs, targets = tasks.fuzzy_recall(rng, vocab_size=8, seq_len=20, training=False)
  full = [7] * 7 + [0, 1, 2, 6, 5] + [0, 1, 2, 6, 5] + [2, 0, 1, 4]  # left-padded to seq_len + 1 (337-341)
  np.testing.assert_array_equal(inputs, full[:-1])
  np.testing.assert_array_equal(targets, ([I] * 7 + [I] * 5 + [I, I, I, 6, 5] + [I, I, I, 4])[1:])


def test_memorization_example_by_hand():
  # V=8: insert token 7 (instances.py:409); map over 7 tokens: keys 0..2, values 3..6 zipped after shuffling (352-375).
  value_of = tasks.memorization_map(Scripted(("permutation", [5, 3, 6, 4])), 8)
  np.testing.assert_array_equal(value_of, [5, 3, 6])
  inputs, targets = tasks.memorization(Scripted(("integers", [2, 0, 2])), vocab_size=8, seq_len=6, value_of=value_of)
  np.testing.assert_array_equal(inputs, [2, 7, 0, 7, 2, 7])  # key, insert token (448-452)
  np.testing.assert_array_equal(targets, [I, 6, I, 5, I, 6])  # the value at the insert token (454-455)


def test_compression_and_selective_copying_examples_by_hand():
  inputs, targets = tasks.compression(Scripted(("integers", [2, 0, 1, 2])), vocab_size=4, seq_len=5)
  np.testing.assert_array_equal(inputs, [2, 0, 1, 2, 3])  # compression token V-1 last (492-497)
  np.testing.assert_array_equal(targets, inputs)  # (509)
  # V=6: copy 5, blank 4, vocab 0..3 (541-545); n=2, 10 - 4 - 1 = 5 blanks (548). np.insert([3, 1], [0, 1, 0, 0, 1],
  # blank) puts 3 blanks before the first token and 2 before the second (556-557).
  inputs, targets = tasks.selective_copying(Scripted(("integers", [3, 1]), ("integers", [0, 1, 0, 0, 1])),
                                            vocab_size=6, seq_len=10, num_tokens_to_copy=2)
  np.testing.assert_array_equal(inputs, [4, 4, 4, 3, 4, 4, 1, 5, 4, 4])  # + copy token + n blanks (558-560)
  np.testing.assert_array_equal(targets, [I] * 8 + [3, 1])  # (563-564)


def _data(task, name, split, n=64):
  return variants.generate(variants.find(task, name), split, seed=3, num_examples=n)


@pytest.mark.parametrize("task, name", [("in_context_recall", "baseline"), ("noisy_recall", "frac_noise=0.4"),
                                        ("in_context_recall", "seq_len=256")])
def test_recall_scores_exactly_the_values_of_repeated_keys(task, name):
  variant = variants.find(task, name)
  test, train = _data(task, name, "test"), _data(task, name, "train")
  plain = variant.vocab_size - variant.noise_vocab_size
  for inputs, targets in zip(test["inputs"], test["targets"]):
    assert len(inputs) == variant.seq_len - 1
    value_of, expected = {}, np.full_like(targets, I)
    for t in range(0, len(inputs), 2):  # pairs start at even positions; noise pairs use ids >= plain
      key = inputs[t]
      value = inputs[t + 1] if t + 1 < len(inputs) else targets[t]
      if key >= plain:
        assert value >= plain
        continue
      assert key < plain // 2 <= value < plain
      if key in value_of:
        assert value_of[key] == value  # a key keeps its value within the sequence
        expected[t] = value
      value_of[key] = value
    np.testing.assert_array_equal(targets, expected)
  np.testing.assert_array_equal(train["targets"][:, :-1], train["inputs"][:, 1:])  # training: next token everywhere
  if variant.frac_noise:
    noise_share = np.mean(test["inputs"][:, 0:-1:2] >= plain)
    assert abs(noise_share - variant.frac_noise) < 0.05, noise_share


def test_fuzzy_recall_shapes_padding_and_targets():
  variant = variants.find("fuzzy_recall", "baseline")
  test, train = _data("fuzzy_recall", "baseline", "test"), _data("fuzzy_recall", "baseline", "train")
  pad, keys = variant.vocab_size - 1, (variant.vocab_size - 1) // 2
  for data in (test, train):
    assert data["inputs"].shape == (64, 128) and data["inputs"].max() <= pad
  for inputs, targets in zip(test["inputs"], test["targets"]):
    scored = targets[targets != I]
    assert len(scored) >= 1 and np.all(scored >= keys) and np.all(scored < pad)  # values only
    pads = np.argmax(inputs != pad)
    assert np.all(inputs[:pads] == pad) and np.all(targets[:pads] == I)
  np.testing.assert_array_equal(train["targets"][:, :-1], train["inputs"][:, 1:])


def test_memorize_values_never_in_inputs_and_one_map_for_train_and_test():
  variant = variants.find("memorize", "baseline")
  data = variants.load(variants.shrunk(variant, 64), seed=3)
  value_of = {}
  for split in ("train", "test"):
    inputs, targets = data[split]["inputs"], data[split]["targets"]
    keys = (variant.vocab_size - 1) // 2
    assert np.all(inputs[:, 1::2] == variant.vocab_size - 1)  # the insert token
    assert np.all(inputs[:, 0::2] < keys)  # only keys: values never appear in the input
    assert np.all(targets[:, 0::2] == I)
    for key, value in zip(inputs[:, 0::2].ravel(), targets[:, 1::2].ravel()):
      assert value_of.setdefault(key, value) == value  # one map across examples and splits
  assert len(value_of) > 100


def test_selective_copy_targets_are_the_tokens_in_order_and_inputs_blank_there():
  variant = variants.find("selective_copy", "num_tokens_to_copy=32")
  n, blank, copy = 32, variant.vocab_size - 2, variant.vocab_size - 1
  data = _data("selective_copy", "num_tokens_to_copy=32", "test")
  for inputs, targets in zip(data["inputs"], data["targets"]):
    head = inputs[:-n - 1]
    np.testing.assert_array_equal(targets[-n:], head[head != blank])
    assert np.all(targets[:-n] == I) and inputs[-n - 1] == copy and np.all(inputs[-n:] == blank)
    assert head[-1] != blank  # no blank after the last token (randint(0, n) indices, instances.py:556)


def test_compress_reconstructs_the_input_and_datasets_are_fixed(tmp_path):
  variant = variants.shrunk(variants.find("compress", "seq_len=64"), 16)
  first = variants.load(variant, seed=1, cache_dir=str(tmp_path))
  again = variants.load(variant, seed=1, cache_dir=str(tmp_path))  # from the cache file
  fresh = variants.generate(variant, "train", seed=1)
  for key in ("inputs", "targets"):
    np.testing.assert_array_equal(first["train"][key], again["train"][key])
    np.testing.assert_array_equal(first["train"][key], fresh[key])
  np.testing.assert_array_equal(first["test"]["inputs"], first["test"]["targets"])
  assert np.all(first["test"]["inputs"][:, -1] == variant.vocab_size - 1)
  assert not np.array_equal(first["train"]["inputs"], first["test"]["inputs"])


def test_pick_draws_what_rng_choice_draws():
  # Fuzzy recall's motif sizes: the same values from the same stream as rng.choice, so the datasets (and the results
  # recorded on them) are those of the generator before `_pick`.
  for options in (np.arange(1, 4), np.array([3]), np.arange(7)):
    a, b = np.random.default_rng(11), np.random.default_rng(11)
    assert [tasks._pick(a, options) for _ in range(500)] == [int(b.choice(options)) for _ in range(500)]
    assert a.integers(1 << 62) == b.integers(1 << 62)
