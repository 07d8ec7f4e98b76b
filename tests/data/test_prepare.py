"""mesanet-prepare: every input kind → ArrayRecord shards holding exactly the tokenized documents; deterministic,
resumable, sliced across hosts; windows; the trainer's "arrayrecord" source over the shards."""
import gzip
import json
import os

import numpy as np
import pytest
import zstandard
from array_record.python import array_record_module

from mesanet_jax.data import pipeline, prepare, readers, shards, text
from mesanet_jax.train.config import base_config
from tests import cli_runs

DOCS = text.read_documents(text.DEFAULT_CORPUS)[:40]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> str:
  """A small byte-level BPE tokenizer.json trained on the corpus with `tokenizers` (GPT-2's kind of tokenizer)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.train_from_iterator(DOCS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  path = str(tmp_path_factory.mktemp("bpe") / "tokenizer.json")
  tokenizer.save(path)
  return path


def _write_inputs(directory) -> list[str]:
  """The 40 documents as 10 JSON lines (.zst), 10 JSON lines (.gz), 10 Parquet rows and 10 .txt files."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  os.makedirs(directory / "txt")
  with zstandard.open(directory / "a.jsonl.zst", "wt") as f:
    f.writelines(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS[:10]))
  with gzip.open(directory / "b.jsonl.gz", "wt") as f:
    f.writelines(json.dumps({"text": d}) + "\n\n" for d in DOCS[10:20])
  pq.write_table(pa.table({"text": DOCS[20:30]}), directory / "c.parquet")
  for i, d in enumerate(DOCS[30:]):
    (directory / "txt" / f"{i:02d}.txt").write_text(d)
  return [str(directory / "a.jsonl.zst"), str(directory / "b.jsonl.gz"), str(directory / "c.parquet"),
          str(directory / "txt")]


def _records(directory: str, shard: dict, dtype: str) -> list[np.ndarray]:
  reader = array_record_module.ArrayRecordReader(os.path.join(directory, shard["path"]))
  records = [np.frombuffer(r, dtype).astype(np.int32) for r in reader.read_all()]
  reader.close()
  return records


def _data(**overrides):
  data = base_config().data
  data.update(overrides)
  return data


@pytest.mark.slow
def test_every_file_kind_becomes_shards_of_the_tokenized_documents(tmp_path, bpe):
  inputs = _write_inputs(tmp_path)
  units = readers.file_units(inputs)
  assert [u.kind for u in units] == ["jsonl", "jsonl", "parquet"] + ["text"] * 10
  settings = prepare.settings_for(bpe, 0, "text", False)
  result = prepare.prepare(units, str(tmp_path / "out"), settings, workers=2, progress=False)
  manifest = shards.read_manifest(str(tmp_path / "out"))
  tokenizer = text.make_tokenizer(bpe)
  assert tokenizer.bos_id == 0 and tokenizer.vocab_size == 400 and manifest["dtype"] == "uint16"
  expected = [text.with_bos(t, tokenizer.bos_id) for t in tokenizer.encode_batch(DOCS)]
  # The result's counts are the written shards' (not the progress queue's, which may still hold some at the end).
  assert (result["written"], result["documents"], manifest["documents"]) == (13, 40, 40)
  assert manifest["tokens"] == result["tokens"] == sum(map(len, expected))
  assert manifest["tokenizer"] == {"spec": bpe, "sha256": text.fingerprint(tokenizer), "vocab_size": 400,
                                   "bos_id": 0}
  records = [r for s in manifest["shards"] for r in _records(str(tmp_path / "out"), s, "<u2")]
  assert len(records) == 40
  for got, want in zip(records, expected):
    np.testing.assert_array_equal(got, want)
  assert tokenizer.decode(records[0]) == DOCS[0]


def test_deterministic_resumable_and_sliced_over_hosts(tmp_path):
  units = readers.file_units([str(p) for p in _write_inputs(tmp_path)][:3])
  settings = prepare.settings_for("bytes", 0, "text", False)
  whole, sliced = str(tmp_path / "whole"), str(tmp_path / "sliced")
  prepare.prepare(units, whole, settings, workers=0, progress=False)
  first = prepare.prepare(units, sliced, settings, workers=0, slice_=(1, 2), progress=False)
  assert (first["written"], first["manifest"]) == (1, None)  # host 1 of 2: shard 1 only; shards 0, 2 missing
  second = prepare.prepare(units, sliced, settings, workers=0, slice_=(0, 2), progress=False)
  assert second["written"] == 2 and second["manifest"] == os.path.join(sliced, shards.MANIFEST)
  for name in sorted(os.listdir(whole)):  # the same bytes, however the work was split
    assert open(os.path.join(whole, name), "rb").read() == open(os.path.join(sliced, name), "rb").read(), name
  os.remove(os.path.join(whole, shards.shard_name(1, 3) + ".json"))  # an interrupted shard: no sidecar yet
  again = prepare.prepare(units, whole, settings, workers=0, progress=False)
  assert (again["written"], again["skipped"]) == (1, 2)
  with pytest.raises(ValueError, match="with other settings"):
    prepare.prepare(units, whole, prepare.settings_for("bytes", 33, "text", False), workers=0, progress=False)
  with pytest.raises(ValueError, match="no field 'body'"):
    prepare.prepare(units[:1], str(tmp_path / "bad"), prepare.settings_for("bytes", 0, "body", False), workers=0,
                    progress=False)


def test_windows_cut_the_bos_separated_stream_and_train_as_is(tmp_path):
  units = readers.file_units([str(p) for p in _write_inputs(tmp_path)][:1])
  prepare.prepare(units, str(tmp_path / "out"), prepare.settings_for("bytes", 65, "text", False), workers=0,
                  progress=False)
  manifest = shards.read_manifest(str(tmp_path / "out"))
  records = _records(str(tmp_path / "out"), manifest["shards"][0], "<u2")
  assert {len(r) for r in records[:-1]} == {65} and 0 < len(records[-1]) <= 65
  stream = np.concatenate([text.with_bos(text.ByteTokenizer().encode(d), 0) for d in DOCS[:10]])
  np.testing.assert_array_equal(np.concatenate(records), stream)
  source = pipeline.Documents(shards.ShardRecords(str(tmp_path / "out"), manifest["shards"], "uint16"), 0, 64)
  batch = pipeline.eval_batches(source, 2, 1)[0]  # unshuffled: row r is record r, passed through whole
  for row in range(2):
    window = records[row]
    np.testing.assert_array_equal(batch["inputs"][row], window[:-1])
    np.testing.assert_array_equal(batch["segment_ids"][row], np.cumsum(window == 0)[:-1] + (window[0] != 0))


def test_tfds_and_hugging_face_datasets_inputs(tmp_path):
  from tests.data import tfds_fixture
  datasets = pytest.importorskip("datasets")  # the test extra installs it
  name = tfds_fixture.prepare(str(tmp_path / "tfds"))
  units = readers.tfds_units(name, "train", str(tmp_path / "tfds"))
  hf = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS[:12]})})
  hf.save_to_disk(str(tmp_path / "hf"), num_shards={"train": 3})
  hf_units = readers.hf_units(str(tmp_path / "hf"), "train")
  assert len(hf_units) == 3
  settings = prepare.settings_for("bytes", 0, "text", False)
  for found, out in ((units, "from_tfds"), (hf_units, "from_hf")):
    prepare.prepare(found, str(tmp_path / out), settings, workers=0, progress=False)
  tfds_docs = [text.ByteTokenizer().decode(r) for s in shards.read_manifest(str(tmp_path / "from_tfds"))["shards"]
               for r in _records(str(tmp_path / "from_tfds"), s, "<u2")]
  assert sorted(tfds_docs) == sorted(f"{i}: {tfds_fixture.SENTENCES[i % 4]}" for i in range(40))
  hf_docs = [text.ByteTokenizer().decode(r) for s in shards.read_manifest(str(tmp_path / "from_hf"))["shards"]
             for r in _records(str(tmp_path / "from_hf"), s, "<u2")]
  assert hf_docs == DOCS[:12]
  with pytest.raises(ValueError, match="--hf_split 'test' is not in"):
    readers.hf_units(str(tmp_path / "hf"), "test")


def test_arrayrecord_source_holds_out_shards_and_checks_the_tokenizer(tmp_path, bpe):
  units = readers.file_units(_write_inputs(tmp_path))
  prepare.prepare(units, str(tmp_path / "out"), prepare.settings_for(bpe, 0, "text", False), workers=0,
                  progress=False)
  data = _data(source="arrayrecord", path=str(tmp_path / "out"), tokenizer="", seq_len=32, eval_shards=3)
  train, evals, tokenizer = pipeline.make_sources(data)
  assert data.tokenizer == bpe  # the manifest's, written back so the run's config.json names it
  assert (len(train.source), len(evals.source)) == (37, 3)  # the last 3 shards (3 .txt files) are held out
  held_out = tokenizer.decode(pipeline.eval_batches(evals, 3, 1)[0]["inputs"][0])
  assert DOCS[37].startswith(held_out)
  batch = next(pipeline.train_dataset(train, data, 4))
  assert batch["inputs"].shape == (4, 32) and batch["inputs"].max() < 400
  np.testing.assert_array_equal(batch["mask"], batch["targets"] != tokenizer.bos_id)
  with pytest.raises(ValueError, match="is not the tokenizer"):
    pipeline.make_sources(_data(source="arrayrecord", path=str(tmp_path / "out"), tokenizer="bytes"))
  with pytest.raises(ValueError, match="data.eval_shards must be in"):
    pipeline.make_sources(_data(source="arrayrecord", path=str(tmp_path / "out"), tokenizer="", eval_shards=13))
  with pytest.raises(ValueError, match="cannot read manifest.json"):
    pipeline.make_sources(_data(source="arrayrecord", path=str(tmp_path)))


@pytest.mark.slow
def test_trainer_runs_on_prepared_shards_with_the_tokenizers_vocabulary(tmp_path, bpe):
  from mesanet_jax.train.config import load_run_config
  from mesanet_jax.train.trainer import train_and_evaluate
  from tests.train import tiny
  prepare.prepare(readers.file_units(_write_inputs(tmp_path)), str(tmp_path / "out"),
                  prepare.settings_for(bpe, 0, "text", False), workers=0, progress=False)
  config = tiny.get_config()
  config.data.update(source="arrayrecord", path=str(tmp_path / "out"), tokenizer="")
  config.train.num_steps = 2
  metrics = train_and_evaluate(config, str(tmp_path / "run"))
  assert np.isfinite(metrics["loss"])
  saved = load_run_config(str(tmp_path / "run"))
  assert (saved.model.vocab_size, saved.data.tokenizer) == (400, bpe)


def test_bad_inputs_and_tokenizers_are_one_clear_error(tmp_path):
  from tokenizers import Tokenizer, models
  (tmp_path / "notes.md").write_text("# not a corpus")
  with pytest.raises(ValueError, match="unknown kind"):
    readers.file_units([str(tmp_path / "notes.md")])
  with pytest.raises(ValueError, match="no such file or directory"):
    readers.file_units([str(tmp_path / "missing.jsonl")])
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="holds no .jsonl"):
    readers.file_units([str(tmp_path / "empty")])
  Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[])).save(str(tmp_path / "no_bos.json"))
  with pytest.raises(ValueError, match="none of the special tokens"):
    text.make_tokenizer(str(tmp_path / "no_bos.json"))
  with pytest.raises(ValueError, match="cannot read tokenizer.json"):
    text.make_tokenizer(str(tmp_path / "missing.json"))
  with pytest.raises(ValueError, match="--window must be 0"):
    prepare.settings_for("bytes", 1, "text", False)
  with pytest.raises(ValueError, match="--slice must be i/n"):
    prepare.prepare([], str(tmp_path / "out"), prepare.settings_for("bytes", 0, "text", False), slice_=(2, 2))


@pytest.mark.slow
def test_command_line(tmp_path):
  inputs = _write_inputs(tmp_path)
  flags = [f"--input={inputs[0]},{inputs[2]}", "--workers=0", "--progress=false"]
  # The three command lines in one process start, one after another (tests/cli_runs.py).
  done, again, bad = cli_runs.run([("experiments.prepare", flags + [f"--out={tmp_path / 'out'}"], 1),
                                   ("experiments.prepare", flags + ["--slice=1/2", f"--out={tmp_path / 'out'}"], 1),
                                   ("experiments.prepare", flags, 1)])
  assert done.returncode == 0, done.stderr
  assert "2 shards written, 0 already done; 20 documents" in done.stdout and "manifest: " in done.stdout
  assert "0 shards written, 1 already done" in again.stdout
  assert bad.returncode == 2 and bad.stderr.strip() == "mesanet-prepare: error: --out is required"
