"""The global batch sequence is pinned: sha256 of the first global batches (every key's dtype, shape and bytes) for
the text and arrayrecord sources, training (shuffled) and eval. A change of the loader that changes any batch
fails here; update the hashes only for an intended change of the sequence (and say so: runs would not resume)."""
import hashlib
import json

import numpy as np
import pytest

from mesanet_jax.data import pipeline, prepare, readers, text
from mesanet_jax.train.config import base_config

BATCH, SEQ_LEN, STEPS = 8, 64, 6
# Document lengths in characters (bytes tokenizer: + 1 for BOS): short ones, several to a window; exactly
# SEQ_LEN + 1 tokens, which grain's packer passes through as a window of its own; long ones, split over windows.
LENGTHS = (64, 5, 300, 64, 1200, 63, 65, 128, 17)
PINNED = {
    "text_train": "ee95f7c1",
    "text_eval": "8a894e9b",
    "arrayrecord_train": "0d861a8c",
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


def _corpus(directory) -> str:
  """Three JSON-lines files of the Lee articles cut to LENGTHS, prepared with the bytes tokenizer."""
  docs = text.read_documents(text.DEFAULT_CORPUS)[:120]
  inputs = directory / "inputs"
  inputs.mkdir()
  for part in range(3):
    with open(inputs / f"part-{part}.jsonl", "w") as f:
      f.writelines(json.dumps({"text": d[:LENGTHS[i % len(LENGTHS)]]}) + "\n" for i, d in enumerate(docs)
                   if i % 3 == part)
  out = str(directory / "shards")
  prepare.prepare(readers.file_units([str(inputs)]), out, prepare.settings_for("bytes", 0, "text", False),
                  workers=0, progress=False)
  return out


@pytest.mark.parametrize("source", ["text", "arrayrecord"])
def test_first_global_batches_are_pinned(tmp_path, source):
  data = base_config().data
  path = text.DEFAULT_CORPUS if source == "text" else _corpus(tmp_path)
  data.update(source=source, path=path, tokenizer="bytes" if source == "text" else "", seq_len=SEQ_LEN,
              eval_shards=1)
  train, evals, _ = pipeline.make_sources(data)
  batches = pipeline.train_dataset(train, data, BATCH)
  digests = {f"{source}_train": _digest([next(batches) for _ in range(STEPS)]),
             f"{source}_eval": _digest(pipeline.eval_batches(evals, BATCH, 2))}
  assert digests == {k: v for k, v in PINNED.items() if k.startswith(source)}
