"""Tokenizes a corpus once into ArrayRecord shards for `data.source="arrayrecord"`: `mesanet-prepare` or
`python -m experiments.prepare`.

    mesanet-prepare --input=corpus/ --tokenizer=gpt2/tokenizer.json --out=data/corpus-gpt2
    mesanet-prepare --input='shards/*.jsonl.zst' --tokenizer=gpt2/tokenizer.json --out=/mnt/data/sp --slice=3/16
    mesanet-prepare --tfds_name=lm1b --tfds_data_dir=~/tensorflow_datasets --out=data/lm1b-bytes
    mesanet-prepare --hf_dataset=saved/ --hf_split=train --field=text --out=data/saved --window=2049

One shard per input file (tfds: per file of the split; Hugging Face: per arrow file), `--workers` at a time, then
`<out>/manifest.json`. Runs again skip finished shards; `--slice=i/n` prepares every n-th file from the i-th, so n
hosts writing to one shared directory share the work.
"""
import os

from absl import app, flags

from . import cli

_INPUT = flags.DEFINE_list("input", [], "text files, directories or globs: .jsonl/.json (JSON lines), .txt, .cor, "
                           ".parquet; .gz or .zst compressed (not Parquet)")
_TFDS_NAME = flags.DEFINE_string("tfds_name", "", "a prepared tfds dataset instead of --input")
_TFDS_SPLIT = flags.DEFINE_string("tfds_split", "train", "its split")
_TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", "", "where it is prepared (tfds' default if empty)")
_HF_DATASET = flags.DEFINE_string("hf_dataset", "", "a Hugging Face `datasets` directory (save_to_disk) instead")
_HF_SPLIT = flags.DEFINE_string("hf_split", "train", "its split, if it holds a DatasetDict")
_FIELD = flags.DEFINE_string("field", "text", "the text field (JSON lines, Parquet, tfds, Hugging Face)")
_TEXT_LINES = flags.DEFINE_bool("text_lines", False, ".txt files: one document per non-empty line, not per file")
_TOKENIZER = flags.DEFINE_string("tokenizer", "bytes", "bytes, a SentencePiece .model or a tokenizer.json")
_OUT = flags.DEFINE_string("out", "", "the output directory (shards, sidecars, manifest.json)")
_WINDOW = flags.DEFINE_integer("window", 0, "0: one record per document; N: records of N tokens packed from "
                               "the BOS-separated documents (train with data.seq_len = N - 1)")
_WORKERS = flags.DEFINE_integer("workers", os.cpu_count() or 1,
                                "worker processes, each preparing one shard at a time (0: in this process)")
_SLICE = flags.DEFINE_string("slice", "0/1", "i/n: prepare the files k with k mod n = i (host i of n)")
_PROGRESS = flags.DEFINE_bool("progress", True, "a progress bar with tokens/s")


def _units():
  from mesanet_jax.data import readers
  chosen = [bool(_INPUT.value), bool(_TFDS_NAME.value), bool(_HF_DATASET.value)]
  if sum(chosen) != 1:
    raise ValueError("give exactly one of --input, --tfds_name, --hf_dataset")
  if _TFDS_NAME.value:
    return readers.tfds_units(_TFDS_NAME.value, _TFDS_SPLIT.value, _TFDS_DATA_DIR.value or None)
  if _HF_DATASET.value:
    return readers.hf_units(_HF_DATASET.value, _HF_SPLIT.value)
  return readers.file_units(_INPUT.value)


def _slice() -> tuple[int, int]:
  try:
    index, count = (int(x) for x in _SLICE.value.split("/"))
  except ValueError:
    raise ValueError(f"--slice must be i/n (e.g. 0/4), got {_SLICE.value!r}") from None
  return index, count


def main(argv):
  cli.start(argv)
  from mesanet_jax.data import prepare
  with cli.one_line_errors("mesanet-prepare"):
    if not _OUT.value:
      raise ValueError("--out is required")
    if _WORKERS.value < 0:
      raise ValueError(f"--workers must be >= 0, got {_WORKERS.value}")
    settings = prepare.settings_for(_TOKENIZER.value, _WINDOW.value, _FIELD.value, _TEXT_LINES.value)
    units = _units()
    result = prepare.prepare(units, _OUT.value, settings, _WORKERS.value, _slice(), _PROGRESS.value)
  rate = result["tokens"] / max(result["seconds"], 1e-9)
  print(f"{result['written']} shards written, {result['skipped']} already done; {result['documents']:,} documents, "
        f"{result['tokens']:,} tokens in {result['seconds']:.1f} s ({rate / 1e6:.2f}M tokens/s)")
  print(f"manifest: {result['manifest']}" if result["manifest"] else
        "the manifest is written once every slice's shards exist (run the command again then)")


def run():
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
