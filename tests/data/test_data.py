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
  data = _data(source="text", path=text.DEFAULT_CORPUS, seq_len=64)
  train, evals, _ = pipeline.make_sources(data)
  assert len(train.source) == 285 and len(evals.source) == 15  # the last 5 % of the documents are held out
  batches = pipeline.train_dataset(train, data, 4)
  first, second = next(batches), next(batches)
  assert first["inputs"].shape == first["segment_ids"].shape == (4, 64)
  np.testing.assert_array_equal(first["inputs"][:, 1:], first["targets"][:, :-1])
  np.testing.assert_array_equal(first["mask"], first["targets"] != tokenizer.bos_id)  # no loss on BOS
  assert (first["inputs"][:, 0] == tokenizer.bos_id).all()  # each row starts with its first document
  row = np.concatenate([first["inputs"][0], first["targets"][0, -1:], second["inputs"][0]])  # disjoint windows
  assert any(d.startswith(tokenizer.decode(row)) for d in docs)  # a shuffled document, read on
  eval_batch = pipeline.eval_batches(evals, 4, 1)[0]
  assert tokenizer.decode(eval_batch["inputs"][0][1:]) == text.read_documents(text.DEFAULT_CORPUS)[285][:63]


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


def test_processes_read_their_contiguous_rows_of_the_global_batch(monkeypatch):
  data = _data(source="synthetic", task="mqar", seq_len=32, vocab_size=32, num_pairs=4)
  train, _, _ = pipeline.make_sources(data)
  whole = next(pipeline.train_dataset(train, data, 8))["inputs"]
  monkeypatch.setattr(pipeline.jax, "process_count", lambda: 2)
  parts = []
  for index in range(2):
    monkeypatch.setattr(pipeline.jax, "process_index", lambda index=index: index)
    parts.append(next(pipeline.train_dataset(train, data, 8))["inputs"])
  assert parts[0].shape == (4, 32)
  np.testing.assert_array_equal(np.concatenate(parts), whole)
  with pytest.raises(ValueError, match="not divisible by the 2 processes"):
    pipeline.train_dataset(train, data, 7)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_states():
  flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags; the trainer parses them, pytest does not
  data = _data(source="text", path=text.DEFAULT_CORPUS, seq_len=64)
  train, _, _ = pipeline.make_sources(data)
  inline = pipeline.train_dataset(train, data, 4)
  data.num_workers = 2
  workers = pipeline.train_dataset(train, data, 4)
  for _ in range(3):
    np.testing.assert_array_equal(next(workers)["inputs"], next(inline)["inputs"])
  assert workers.get_state() == inline.get_state()
  workers.close()
  with pytest.raises(ValueError, match="data.num_workers 3 must divide"):
    data.num_workers = 3
    pipeline.train_dataset(train, data, 4)


def test_tfds_source_packs_a_prepared_array_record_dataset(tmp_path):
  from tests.data import tfds_fixture
  name = tfds_fixture.prepare(str(tmp_path))
  data = _data(source="tfds", tfds_name=name, tfds_data_dir=str(tmp_path), seq_len=40)
  train, evals, tokenizer = pipeline.make_sources(data)
  assert (len(train.source), len(evals.source)) == (40, 8)
  texts = {f"{i}: {tfds_fixture.SENTENCES[i % 4]}" for i in range(40)}  # tfds stores the split shuffled
  batch = next(pipeline.train_dataset(train, data, 4))
  assert batch["inputs"].shape == (4, 40) and batch["mask"].all() is not True
  for row in range(4):  # windows of BOS-separated documents, no padding; segment ids count the documents
    stream = np.concatenate([batch["inputs"][row], batch["targets"][row, -1:]])
    pieces = tokenizer.decode(np.where(stream == tokenizer.bos_id, ord("|"), stream)).split("|")
    assert pieces[0] == "" and all(p in texts for p in pieces[1:-1])
    assert any(t.startswith(pieces[-1]) for t in texts)
    assert batch["segment_ids"][row].max() == len(pieces) - 1 and batch["segment_ids"][row, 0] == 1


def test_sentencepiece_tokenizer_from_a_model_file(tmp_path):
  spm = pytest.importorskip("sentencepiece")  # the "data" extra; skipped where it is not installed
  docs = text.read_documents(text.DEFAULT_CORPUS)
  spm.SentencePieceTrainer.train(sentence_iterator=iter(docs[:100]), model_prefix=str(tmp_path / "sp"),
                                 vocab_size=400, model_type="unigram", bos_id=1, eos_id=2, unk_id=0, pad_id=-1)
  tokenizer = text.make_tokenizer(str(tmp_path / "sp.model"))
  assert tokenizer.vocab_size == 400 and tokenizer.bos_id == 1
  assert tokenizer.decode(tokenizer.encode(docs[0][:200])) == docs[0][:200]
  tokens = tokenizer.encode_batch(docs[:5])
  assert sum(map(len, tokens)) < sum(len(d) for d in docs[:5]) / 2  # subwords: far fewer tokens than bytes
  np.testing.assert_array_equal(tokens[0], tokenizer.encode(docs[0]))
  with pytest.raises(ValueError, match="cannot read SentencePiece model"):
    text.make_tokenizer(str(tmp_path / "missing.model"))
