"""The global batch sequence is pinned: sha256 of the first global batches (every key's dtype, shape and bytes) for
the text and arrayrecord sources, training (shuffled) and eval, whatever the number of documents a row reads at once.
A change of the loader that changes any batch fails here (`shards_fixture` has documents of exactly seq_len + 1
tokens, which grain's packer passes through as windows of their own); update the hashes only for an intended change
of the sequence (and say so: runs would not resume)."""
import hashlib

import numpy as np
import pytest

from mesanet_jax.data import pipeline, rows, text
from mesanet_jax.train.config import base_config
from tests.data import shards_fixture

BATCH, SEQ_LEN = 8, 64
STEPS = {"text": 6, "arrayrecord": 80}  # 80: each row reads its 10 documents ~2.4 times (new epochs)
PINNED = {
    "text_train": "ee95f7c1",
    "text_eval": "8a894e9b",
    "arrayrecord_train": "74561223",
    "arrayrecord_eval": "6aa2a7e6",
}


def _digest(batches: list[dict]) -> str:
  sha = hashlib.sha256()
  for batch in batches:
    for key in sorted(batch):
      value = np.ascontiguousarray(batch[key])
      sha.update(f"{key} {value.dtype} {value.shape}".encode())
      sha.update(value.tobytes())
  return sha.hexdigest()[:8]


@pytest.mark.parametrize("per_read", [1, 5, rows.DOCUMENTS_PER_READ])
@pytest.mark.parametrize("source", ["text", "arrayrecord"])
def test_first_global_batches_are_pinned(monkeypatch, tmp_path, source, per_read):
  monkeypatch.setattr(rows, "DOCUMENTS_PER_READ", per_read)
  data = base_config().data
  path = text.DEFAULT_CORPUS if source == "text" else shards_fixture.prepare_corpus(tmp_path)
  data.update(source=source, path=path, tokenizer="bytes" if source == "text" else "", seq_len=SEQ_LEN,
              eval_shards=1)
  train, evals, _ = pipeline.make_sources(data)
  batches = pipeline.train_dataset(train, data, BATCH)
  digests = {f"{source}_train": _digest([next(batches) for _ in range(STEPS[source])]),
             f"{source}_eval": _digest(pipeline.eval_batches(evals, BATCH, 2))}
  assert digests == {k: v for k, v in PINNED.items() if k.startswith(source)}
