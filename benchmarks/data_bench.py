"""Data path throughput on CPUs: mesanet-prepare's tokens/s, and the trainer's loader (data.source="arrayrecord":
ArrayRecord reads, row streams, grain's packer; no model) in tokens/s and resident memory at 1× and 10× the corpus.
Per core: with no workers, tokens per CPU-second of the loader's process; with workers, tokens per CPU-second of the
workers together (what one worker makes on a core of its own: the host's rate is about that times the workers,
while the main process, which only places the workers' rows, keeps up).

    python benchmarks/data_bench.py --work=/tmp/data_bench --corpus_mb=1000 --tokenizer=.whl/gpt2/tokenizer.json \
        --workers=16 --loader_workers=0,8 --results=$OUT/data_bench.json

The corpus is assembled here: the Lee news corpus (the default corpus, 300 articles) repeated with each copy's
sentences shuffled, as JSON lines in `--files` files. 10× is the 1× shards copied ten times under one manifest
(the loader's memory depends on the number of shards and records, not on their content).
"""
import argparse
import glob
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mesanet_jax.data import pipeline, prepare, readers, shards, text  # noqa: E402
from mesanet_jax.train.config import base_config  # noqa: E402


def make_corpus(directory: str, megabytes: float, files: int, source: str = text.DEFAULT_CORPUS) -> int:
  """JSON lines of shuffled-sentence copies of `source`'s documents (the Lee corpus), ~`megabytes` in all; returns
  the bytes written."""
  os.makedirs(directory, exist_ok=True)
  docs = [d.split(". ") for d in text.read_documents(source)]
  rng, written, copy = np.random.default_rng(0), 0, 0
  handles = [open(os.path.join(directory, f"part-{i:04d}.jsonl"), "w") for i in range(files)]
  while written < megabytes * 1e6:
    for i, sentences in enumerate(docs):
      line = json.dumps({"text": ". ".join(sentences[j] for j in rng.permutation(len(sentences)))}) + "\n"
      handles[(copy * len(docs) + i) % files].write(line)
      written += len(line)
    copy += 1
  for f in handles:
    f.close()
  return written


def _descendants(pid: int) -> list[int]:
  found = []
  for task in glob.glob(f"/proc/{pid}/task/*/children"):
    with open(task) as f:
      found += [int(c) for c in f.read().split()]
  return found + [g for c in found for g in _descendants(c)]


def resident_mib() -> float:
  """Resident memory of this process and its descendants (grain's workers), from /proc."""
  def rss(pid):
    with open(f"/proc/{pid}/status") as f:
      return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
  total = rss(os.getpid())
  for child in _descendants(os.getpid()):
    try:
      total += rss(child)
    except (OSError, StopIteration):
      pass
  return total


def descendants_cpu_s() -> float:
  """CPU seconds (user + system) used so far by this process's descendants (grain's workers), from /proc."""
  total = 0
  for child in _descendants(os.getpid()):
    try:
      with open(f"/proc/{child}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    except (OSError, IndexError):
      pass
  return total / os.sysconf("SC_CLK_TCK")


def scaled(directory: str, times: int) -> str:
  """A prepared directory `times` as large: the shards copied, one manifest over all copies."""
  target = f"{directory}_x{times}"
  manifest = shards.read_manifest(directory)
  os.makedirs(target, exist_ok=True)
  listed = []
  for copy in range(times):
    for shard in manifest["shards"]:
      name = f"copy{copy:02d}-{shard['path']}"
      if not os.path.exists(os.path.join(target, name)):
        shutil.copyfile(os.path.join(directory, shard["path"]), os.path.join(target, name))
      listed.append(dict(shard, path=name))
  shards.write_json(os.path.join(target, shards.MANIFEST),
                    dict(manifest, shards=listed, documents=manifest["documents"] * times,
                         tokens=manifest["tokens"] * times))
  return target


def loader(directory: str, batch: int, seq_len: int, workers: int, seconds: float) -> dict:
  """The trainer's loader alone for `seconds`, in a fresh process (so its memory is its own)."""
  context = multiprocessing.get_context("spawn")
  results = context.Queue()
  process = context.Process(target=_loader, args=(results, directory, batch, seq_len, workers, seconds))
  process.start()  # not a Pool: its daemonic processes could not start grain's workers
  result = results.get()
  process.join()
  return result


def _loader(results, directory: str, batch: int, seq_len: int, workers: int, seconds: float) -> None:
  from absl import flags
  flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
  data = base_config().data
  data.update(source="arrayrecord", path=directory, tokenizer="", seq_len=seq_len, num_workers=workers)
  before = resident_mib()
  train, _, _ = pipeline.make_sources(data)
  batches = pipeline.train_dataset(train, data, batch)
  start = time.perf_counter()
  next(batches)
  first = time.perf_counter() - start
  steps, start, cpu, workers_cpu = 0, time.perf_counter(), time.process_time(), descendants_cpu_s()
  while time.perf_counter() - start < seconds:
    next(batches)
    steps += 1
  elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
  workers_cpu = descendants_cpu_s() - workers_cpu
  memory = resident_mib()
  batches.close()
  tokens = steps * batch * seq_len
  results.put({"batch": batch, "seq_len": seq_len, "workers": workers, "first_batch_s": round(first, 2), "steps": steps,
          "tokens_per_s": tokens / elapsed, "tokens_per_main_cpu_s": tokens / cpu,
          "tokens_per_worker_cpu_s": tokens / workers_cpu if workers else None,
          "resident_mib": round(memory, 1), "resident_before_mib": round(before, 1)})


def one_core(units: list, settings) -> dict:
  """One shard prepared in this process: tokens per second of wall and of CPU time (contention aside)."""
  directory = tempfile.mkdtemp()
  start, cpu = time.perf_counter(), time.process_time()
  sidecar = prepare.prepare_shard(units[0], os.path.join(directory, "one.array_record"), settings)
  elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
  shutil.rmtree(directory)
  return {"tokens": sidecar["tokens"], "tokens_per_s": sidecar["tokens"] / elapsed,
          "tokens_per_cpu_s": sidecar["tokens"] / cpu}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--work", default="/tmp/data_bench", help="corpus and shards (removed with --clean)")
  parser.add_argument("--corpus_mb", type=float, default=200)
  parser.add_argument("--files", type=int, default=32, help="input files = shards")
  parser.add_argument("--source", default=text.DEFAULT_CORPUS,
                      help="documents the corpus is made of (a machine without gensim: a copy of lee_background.cor)")
  parser.add_argument("--tokenizer", default="bytes", help="GPT-2's: benchmarks/gpt2_tokenizer.py")
  parser.add_argument("--workers", type=int, default=os.cpu_count())
  parser.add_argument("--loader_workers", default="0", help="comma-separated data.num_workers to time")
  parser.add_argument("--batches", default="8x2048,256x2048", help="global batch x seq_len")
  parser.add_argument("--scales", default="1,10")
  parser.add_argument("--loader_seconds", type=float, default=10)
  parser.add_argument("--results", default="", help="JSON results file")
  parser.add_argument("--reuse", action="store_true", help="time the loader on the shards already in --work")
  parser.add_argument("--clean", action="store_true", help="remove --work at the end")
  args = parser.parse_args()
  results = {"cpus": os.cpu_count(), "tokenizer": args.tokenizer, "corpus_mb": args.corpus_mb}
  corpus, out = os.path.join(args.work, "corpus"), os.path.join(args.work, "shards")

  def save():
    print(json.dumps(results, indent=1), flush=True)
    if args.results:
      with open(args.results, "w") as f:
        json.dump(results, f, indent=1)

  if not args.reuse:
    start = time.perf_counter()
    results["corpus_bytes"] = make_corpus(corpus, args.corpus_mb, args.files, args.source)
    results["corpus_s"] = round(time.perf_counter() - start, 1)
    settings = prepare.settings_for(args.tokenizer, 0, "text", False)
    shutil.rmtree(out, ignore_errors=True)
    units = readers.file_units([corpus])
    results["prepare_one_core"] = one_core(units, settings)
    save()
    done = prepare.prepare(units, out, settings, args.workers, progress=False)
    results["prepare"] = {"workers": args.workers, "tokens": done["tokens"], "documents": done["documents"],
                          "seconds": round(done["seconds"], 2), "tokens_per_s": done["tokens"] / done["seconds"],
                          "tokens_per_s_per_worker": done["tokens"] / done["seconds"] / args.workers,
                          "bytes_per_token": results["corpus_bytes"] / done["tokens"]}
    save()
  manifest = shards.read_manifest(out)
  results["corpus_1x"] = {"documents": manifest["documents"], "tokens": manifest["tokens"],
                          "records": sum(s["records"] for s in manifest["shards"]),
                          "shard_bytes": sum(os.path.getsize(os.path.join(out, s["path"])) for s in manifest["shards"])}
  results["loader"] = []
  for times in [int(s) for s in args.scales.split(",")]:
    directory = out if times == 1 else scaled(out, times)
    for spec in args.batches.split(","):
      batch, seq_len = (int(x) for x in spec.split("x"))
      for workers in [int(w) for w in args.loader_workers.split(",")]:
        if workers and batch % workers:  # the loader refuses it (workers take rows w::W)
          print(f"skipped: {workers} loader workers do not divide batch {batch}", flush=True)
          continue
        results["loader"].append(dict(loader(directory, batch, seq_len, workers, args.loader_seconds),
                                      corpus_scale=times))
        save()
  if args.clean:
    shutil.rmtree(args.work, ignore_errors=True)
    for extra in glob.glob(f"{out}_x*"):
      shutil.rmtree(extra, ignore_errors=True)


if __name__ == "__main__":
  main()
