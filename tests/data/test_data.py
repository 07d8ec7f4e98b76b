"""Data: synthetic tasks are pure functions of (seed, index) whose masked targets follow from the context; the
default corpus is English; grain pipelines are deterministic, resume from a saved iterator state, and split
examples across processes."""
import numpy as np
import pytest
from absl import flags
from ml_collections import ConfigDict

from mesanet_jax.data import pipeline, synthetic, text
from mesanet_jax.train.config import base_config


def _data(**overrides) -> ConfigDict:
  data = base_config().data
  data.update(overrides)
  return data


@pytest.mark.parametrize("task", sorted(synthetic.TASKS))
def test_tasks_are_deterministic_in_seed_and_index(task):
  config = synthetic.TaskConfig()
  fn = synthetic.TASKS[task]
  a, b, other = fn(config, 7, 11), fn(config, 7, 11), fn(config, 7, 12)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a["inputs"], other["inputs"])
  assert a["mask"].sum() > 0 and a["inputs"].shape[0] == config.seq_len


def test_mqar_targets_are_the_values_of_the_queried_keys():
  config = synthetic.TaskConfig(seq_len=64, vocab_size=64, num_pairs=8)
  for index in range(20):
    ex = synthetic.mqar(config, 0, index)
    tokens = np.concatenate([ex["inputs"], ex["targets"][-1:]])
    pairs = dict(zip(tokens[0:16:2], tokens[1:16:2]))
    positions = np.nonzero(ex["mask"])[0]
    assert len(positions) == 8
    for t in positions:  # target at t is the value of the key at input t
      assert ex["targets"][t] == pairs[ex["inputs"][t]]


def test_regression_targets_are_linear_in_context():
  config = synthetic.TaskConfig(seq_len=40, dim=4)
  ex = synthetic.linear_regression(config, 1, 2)
  x, y = ex["inputs"][0::2, :4], ex["inputs"][1::2, 4]
  w, *_ = np.linalg.lstsq(x, y, rcond=None)
  np.testing.assert_allclose(x @ w, y, atol=1e-5)  # noiseless: one w explains every pair (f32 inputs)
  np.testing.assert_array_equal(ex["targets"][ex["mask"] == 1], y)


def test_default_corpus_is_english_prose_packed_with_bos():
  docs = text.read_documents(text.DEFAULT_CORPUS)
  assert len(docs) == 300 and sum(map(len, docs)) > 300_000
  assert " the " in docs[0] and docs[0][0].isupper()
  tokenizer = text.ByteTokenizer()
  assert tokenizer.decode(tokenizer.encode("Hällo")) == "Hällo"
  train, evals = text.text_sources(text.DEFAULT_CORPUS, tokenizer, 64, eval_fraction=0.05)
  ex = train[0]
  assert ex["inputs"][0] == tokenizer.bos_id and ex["mask"].sum() == 64  # BOS is an input, never a target
  np.testing.assert_array_equal(ex["inputs"][1:], ex["targets"][:-1])
  np.testing.assert_array_equal(train[1]["inputs"][0], ex["targets"][-1])  # windows tile the stream
  assert len(evals) > 0


def test_unreadable_paths_and_unprepared_tfds_raise_one_clear_error(tmp_path):
  with pytest.raises(ValueError, match="cannot read"):
    text.read_documents(str(tmp_path / "missing.txt"))
  with pytest.raises(ValueError, match="not installed"):
    text.read_documents("no_such_package_xyz:corpus.txt")
  # No tfds dataset is prepared on these machines: only the error path can be tested here.
  with pytest.raises(ValueError, match="is not prepared"):
    pipeline.make_sources(_data(source="tfds", tfds_name="lm1b", tfds_data_dir=str(tmp_path)))


def test_pipeline_is_deterministic_and_resumes_from_iterator_state():
  data = _data(source="text", path=text.DEFAULT_CORPUS, seq_len=32)
  train, _, _ = pipeline.make_sources(data)
  first = iter(pipeline.train_dataset(train, data, 4))
  batches = [next(first) for _ in range(5)]
  again = iter(pipeline.train_dataset(train, data, 4))
  for b in batches:
    np.testing.assert_array_equal(next(again)["inputs"], b["inputs"])
  resumed = iter(pipeline.train_dataset(train, data, 4))
  fresh = iter(pipeline.train_dataset(train, data, 4))
  for _ in range(2):
    next(fresh)
  resumed.set_state(fresh.get_state())
  for b in batches[2:]:
    np.testing.assert_array_equal(next(resumed)["inputs"], b["inputs"])
  other_seed = iter(pipeline.train_dataset(train, _data(source="text", path=text.DEFAULT_CORPUS, seq_len=32,
                                                         seed=1), 4))
  assert not np.array_equal(next(other_seed)["inputs"], batches[0]["inputs"])


def test_processes_read_disjoint_interleaved_shards(monkeypatch):
  data = _data(source="synthetic", task="mqar", seq_len=32, vocab_size=32, num_pairs=4)
  train, _, _ = pipeline.make_sources(data)
  whole = next(iter(pipeline.train_dataset(train, data, 8)))["inputs"]
  monkeypatch.setattr(pipeline.jax, "process_count", lambda: 2)
  parts = []
  for index in range(2):
    monkeypatch.setattr(pipeline.jax, "process_index", lambda index=index: index)
    parts.append(next(iter(pipeline.train_dataset(train, data, 8)))["inputs"])
  assert parts[0].shape == (4, 32)
  np.testing.assert_array_equal(parts[0], whole[0::2])
  np.testing.assert_array_equal(parts[1], whole[1::2])
  with pytest.raises(ValueError, match="not divisible by the 2 processes"):
    pipeline.train_dataset(train, data, 7)


def test_worker_processes_give_the_same_batches():
  flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags; the trainer parses them, pytest does not
  data = _data(source="synthetic", task="mqar", seq_len=32, vocab_size=32, num_pairs=4)
  train, _, _ = pipeline.make_sources(data)
  inline = iter(pipeline.train_dataset(train, data, 4))
  data.num_workers = 2
  workers = iter(pipeline.train_dataset(train, data, 4))
  for _ in range(3):
    np.testing.assert_array_equal(next(workers)["inputs"], next(inline)["inputs"])


def test_tfds_source_reads_a_prepared_array_record_dataset(tmp_path):
  from tests.data import tfds_fixture
  name = tfds_fixture.prepare(str(tmp_path))
  data = _data(source="tfds", tfds_name=name, tfds_data_dir=str(tmp_path), seq_len=40)
  train, evals, tokenizer = pipeline.make_sources(data)
  assert (len(train), len(evals)) == (40, 8)
  texts = {f"{i}: {tfds_fixture.SENTENCES[i % 4]}" for i in range(40)}  # tfds stores the split shuffled
  for index in range(len(train)):
    ex = train[index]
    n = int(ex["mask"].sum())  # BOS + text, cut at seq_len + 1 tokens or padded (pad masked)
    text = tokenizer.decode(ex["targets"][:n])
    assert ex["inputs"][0] == tokenizer.bos_id and ex["mask"][:n].all()
    assert any(t[:40] == text for t in texts), text
    assert n == min(len(next(t for t in texts if t.startswith(text))), 40)
  batch = next(iter(pipeline.train_dataset(train, data, 4)))
  assert batch["inputs"].shape == (4, 40)


def test_sentencepiece_tokenizer_from_a_model_file(tmp_path):
  spm = pytest.importorskip("sentencepiece")  # the "data" extra; skipped where it is not installed
  docs = text.read_documents(text.DEFAULT_CORPUS)
  spm.SentencePieceTrainer.train(sentence_iterator=iter(docs[:100]), model_prefix=str(tmp_path / "sp"),
                                 vocab_size=400, model_type="unigram", bos_id=1, eos_id=2, unk_id=0, pad_id=-1)
  tokenizer = text.make_tokenizer(str(tmp_path / "sp.model"))
  assert tokenizer.vocab_size == 400 and tokenizer.bos_id == 1
  assert tokenizer.decode(tokenizer.encode(docs[0][:200])) == docs[0][:200]
  train, _ = text.text_sources(text.DEFAULT_CORPUS, tokenizer, 64, eval_fraction=0.05)
  stream = text.pack_documents(docs[:5], tokenizer)
  assert len(stream) < sum(len(d) for d in docs[:5]) / 2  # subwords: far fewer tokens than bytes
  assert train[0]["inputs"][0] == 1
  with pytest.raises(ValueError, match="cannot read SentencePiece model"):
    text.make_tokenizer(str(tmp_path / "missing.model"))
