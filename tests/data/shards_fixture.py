"""A small prepared corpus (ArrayRecord shards, bytes tokenizer) with documents of chosen lengths."""
import json

from mesanet_jax.data import prepare, readers, text

# Lengths in characters (bytes tokenizer: + 1 for BOS): short documents, several to a window of 64; 65 tokens,
# which grain's packer passes through as a window of its own at seq_len 64; long ones, split over windows.
LENGTHS = (64, 5, 300, 64, 1200, 63, 65, 128, 17)


def prepare_corpus(directory) -> str:
  """Three JSON-lines files of 120 Lee articles cut to LENGTHS → shards in `directory`/shards (returned)."""
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
