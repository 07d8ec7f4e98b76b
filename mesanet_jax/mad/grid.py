"""Runs the MAD grid: jobs grouped by the model shapes they share, each group trained as one population whose slots
are refilled from the group's queue (longest jobs first) as jobs finish, results appended to a JSONL file as each
job finishes, so an interrupted grid resumes and skips what is done. Once the queue is empty, a population whose
jobs in flight fit a smaller power of two of slots shrinks to it (`compacted_size`): a finished slot still computes
every step, and with early stopping most of a group's slots finish long before its last job. The smaller
populations' programs compile in a thread from the moment the queue empties (`shrink_sizes`), so a shrink does not
wait on them.

As mad-lab validates after every epoch, each job is evaluated on its test set at each of its epoch ends: it stops
early once its test accuracy exceeds 99.9 %, and its record reports the evaluation of least test perplexity, the
checkpoint whose accuracy mad-lab's `train.py` reports (ModelCheckpoint on test/Perplexity_epoch, then
`trainer.validate` of the best checkpoint), beside the last evaluation's (`final_accuracy`). A queued job starts only
at a population step that is a multiple of its epoch (`may_start`), so the epochs of a group's jobs (25 · 2^k steps:
its training-set sizes) end together and one evaluation serves all the jobs due; it evaluates only those
(`population.evaluation_index`), so a job's evaluations cost what mad-lab's do whatever the epochs of the others.

A population has one slot per job of its group, at most `max_slots` and `max_tokens` per step, halved until its
compiled train step fits in the device's memory (`fit_to_memory`). While a group trains, the next one's train step
and evaluations compile in a thread (`_compile_ahead`), so a group starts without waiting on them.

A group's in-flight slots are saved to `state_dir` when the time limit stops the run (`slot_state`: in parts of at
most 16 MiB, the slots furthest along first within what `state_budget` leaves beside the other groups' saves
there), and resumed from there by the next run with the same settings, in a population of the usual size or of the
saved slots if more, and of the saved vocabulary and training-set length if larger; the jobs of slots not saved
start over. A resumed slot trains on its own job's dataset whichever jobs are left in its group (`_restore`). In the
last `drain` seconds before the time limit no queued job starts, so that fewer are in flight then. A run that could
not resume a saved group's slots (it does not select their jobs, a variant it adds to the group needs a larger
vocabulary or training set, or it runs under other recorded settings, such as another seed) holds that group back
with a note saying what to run, rather than start its jobs over and lose the save.

Several runs may share one results file and state directory (one process per GPU, each with the same selection):
each claims a group before training it (`claims`) and skips those another live process holds, and re-reads the
results and saves once it holds one, so no group is trained twice at once and no finished job again.
"""
import concurrent.futures
import dataclasses
import functools
import heapq
import json
import multiprocessing
import os
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from mesanet_jax.mad import claims, models, slot_state, table, training, usage, variants
from mesanet_jax.mad.population import Population, evaluation_index, stack_datasets
from mesanet_jax.models.config import LMConfig


@dataclasses.dataclass(frozen=True)
class Settings:
  results: str  # the JSONL file of finished jobs
  protocol: training.Protocol = training.Protocol()
  data_dir: str = ""  # dataset cache ("": none)
  state_dir: str = ""  # in-flight populations at the time limit ("": not saved)
  # Bytes the state directory holds at most after a group's save at the time limit, every group's saves together: the
  # group saves its slots furthest along first, as many as the others leave room for (0: every slot in flight). What
  # the next run can be given, e.g. the files a device call returns; ~5.3 MB per MAD slot.
  state_budget: int = 0
  max_tokens: int = 1 << 20  # tokens per population step (slots × batch × length) at most
  max_slots: int = 256
  steps_per_call: int = 200  # steps per jitted call at most (calls also end at every epoch end of a job in flight)
  time_limit: float = 0.0  # seconds; 0: none
  # Seconds before the time limit from which no queued job (or group) starts: the jobs in flight finish or are saved,
  # fewer of them than a full population (a device call's saved slots are bounded by what can travel back).
  drain: float = 0.0
  usage: str = ""  # JSONL of each group run's device time (`usage.record`; "": not recorded)
  device_share: int = 1  # processes side by side on the one device: a run's device time is its wall time over this
  # Activations (params stay f32): bf16, as mad-lab trains (`train.py`: Lightning precision "bf16", i.e. bf16
  # autocast; the MesaNet paper's mixed precision too). Mesa's CG runs in f32 inside its kernels either way.
  dtype: str = "bfloat16"
  # The residual stream's dtype ("": dtype; `LMConfig.residual_dtype`). Autocast keeps it f32 (mad-lab's embedding
  # output is f32 and `x + layer(x)` promotes), which "float32" reproduces: the sublayers compute in bf16, their sums
  # stay f32. On fuzzy recall it lifted GDN's best point from 19.6 to 36.4 and MesaNet's from 75.3 to 83.7 over a bf16
  # stream (benchmarks/RESULTS.md, "MAD: the residual stream in f32").
  residual_dtype: str = "float32"
  impl: str = ""  # how Mesa computes: impl, chunk_size, matmul_precision ("" / 0: models.FAST_MESA's for the backend)
  chunk_size: int = 0
  matmul_precision: str = ""
  cg_steps: int = 0  # 0: models.exact_cg_steps (16 at the MAD heads' Dk = 16)
  cg_tol: float | None = None  # None: every Mesa solve runs cg_steps (the paper's fixed steps); else the CG tolerance
  gdn_impl: str = ""  # how GDN's operator runs ("": models.FAST_GDN's for the backend)
  hawk_impl: str = ""  # how Hawk's recurrence runs ("": models.FAST_HAWK's for the backend)
  attention_kernel: str = ""  # how the Transformer attends ("": models.FAST_ATTENTION's for the backend)
  tie_embeddings: bool = True  # False: the LM read-out is its own matrix (mad-lab's backbone)
  embed_std: float | None = models.EMBED_STD  # the embedding's init std, no √d input scale; None: 1/√d, scaled by √d
  linear_init_variance: float = models.LINEAR_INIT_VARIANCE  # × the linear layers' initial variance (1: ours)
  # The compression autoencoder's linear kernels all N(0, std²) (mad-lab's: models.MADLAB_AUTOENCODER_LINEAR_STD);
  # None: as the language model's (linear_init_variance).
  autoencoder_linear_std: float | None = None
  seed: int = 0
  num_examples: int = 0  # > 0: every variant's training and test sets capped at this many examples (smoke runs)
  workers: int = 0  # data-generation processes (0: cores − 1)
  # Share of the device memory left after the group's datasets that a population's train step may plan to use; a
  # larger population is halved until its compiled step fits (`fit_to_memory`). On a device that reports no memory
  # limit (CPU): of the host memory available (`memory_budget`).
  memory_fraction: float = 0.9
  # Shrink a population once its queue is empty and its jobs fit a smaller power of two of slots, if the longest of
  # them has at least this many steps left (the smaller population's programs compile in a thread meanwhile, ~10-15 s
  # for MesaNet on an H200); None: never.
  compact_min_steps: int | None = 1000
  # Groups of an architecture costliest first instead of cheapest first (`group_order`): for several processes
  # sharing the groups (one per GPU), so the long groups start early and the short ones fill in around them.
  longest_first: bool = False


def group_key(job: training.Job) -> tuple:
  return (job.architecture, job.variant.autoencoder, job.variant.seq_len)


def group_name(key: tuple) -> str:
  architecture, autoencoder, length = key
  return f"{architecture}.{'autoencoder' if autoencoder else 'lm'}.L{length}"


def group_vocabulary(jobs: list[training.Job], saved: dict | None = None) -> int:
  """The vocabulary a group's population is built for: its variants' largest (the others mask the rest), or the
  population's whose slots it resumes (`slot_state.load`) where that is larger: a group resumed with fewer jobs left
  keeps the shapes it saved."""
  return max([j.variant.vocab_size for j in jobs] + [saved["population"].get("vocab", 0) if saved else 0])


def population_size(settings: Settings, num_jobs: int, length: int) -> int:
  """Slots of a group's population: one per job, at most max_slots and max_tokens // (batch · length)."""
  return max(1, min(num_jobs, settings.max_slots, settings.max_tokens // (settings.protocol.batch_size * length)))


def population_steps(job_steps: list[int], slots: int) -> int:
  """Steps a population of `slots` takes for jobs of `job_steps` steps when each freed slot takes the longest queued
  job (as `_run_group` does) and none stops early: the largest slot load of longest-first list scheduling. Every
  slot computes at every step, a finished one too, so this (× slots) is what the group costs."""
  loads = [0] * slots
  for steps in sorted(job_steps, reverse=True):
    heapq.heapreplace(loads, loads[0] + steps)
  return max(loads)


def token_steps(jobs: list[training.Job], protocol: training.Protocol) -> int:
  """The jobs' steps × sequence lengths, none stopping early: what the progress bar counts and a group costs."""
  return sum(j.steps(protocol) * j.variant.seq_len for j in jobs)


def memory_budget(fraction: float) -> int | None:
  """Bytes a population's train step may take on the default device: `fraction` of what its allocator has left; on
  a device that reports no limit (CPU), of the host memory available (a CPU run of MAD's L 1,024 groups at 16 slots
  plans ~22 GiB); None where neither is known."""
  stats = jax.devices()[0].memory_stats()
  if stats and "bytes_limit" in stats:
    return int(fraction * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))
  available = _host_memory_available()
  return None if available is None else int(fraction * available)


def _host_memory_available() -> int | None:
  """The host's available memory in bytes (/proc/meminfo's MemAvailable), None where it is not known."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def train_step_bytes(population: Population, data: dict) -> int:
  """Device bytes one `population.train` call on `data` plans to use: arguments, outputs not aliased to them, and
  temporaries, as the compiler's buffer assignment has them (compiled from abstract slots; nothing is allocated)."""
  memory = population.compiled_train(data, int(data["train_inputs"].shape[1])).memory_analysis()
  return (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
          + memory.temp_size_in_bytes)


def fit_to_memory(size: int, step_bytes, budget: int) -> int:
  """The largest of size, size / 2, size / 4, ... whose `step_bytes(slots)` is within `budget`; a ValueError if not
  even one slot fits. E.g. the Transformer at L 1024 materialises [32, 8, 1024, 1024] f32 attention scores per slot
  and layer: 32 slots plan ~240 GiB (CPU buffer assignment), more than an H200 has."""
  while (needed := step_bytes(size)) > budget:
    if size == 1:
      raise ValueError(f"one slot's train step needs {needed / 2**30:.1f} GiB, more than the {budget / 2**30:.1f} GiB "
                       f"left on the device")
    size //= 2
  return size


def compacted_size(in_flight: int, size: int) -> int | None:
  """The slots to shrink a population of `size` to when `in_flight` jobs remain and none is queued: the smallest
  power of two that holds them (few distinct sizes, so few compiles), if that is smaller than `size`; else None."""
  smaller = 1 << max(in_flight - 1, 0).bit_length()
  return smaller if in_flight and smaller < size else None


def shrink_sizes(in_flight: int, size: int) -> list[int]:
  """Every size a population of `size` with `in_flight` jobs and none queued may shrink to (`compacted_size`, again
  and again as its jobs finish), largest first: what the grid compiles in the background once its queue is empty."""
  largest = 1 << max(in_flight - 1, 0).bit_length()
  return [s for s in (1 << k for k in range(size.bit_length() - 1, -1, -1)) if s < size and s <= largest]


def call_length(settings: Settings, steps: np.ndarray, per_epoch: np.ndarray, in_flight: list[int],
                queued_per_epoch: set[int], population_step: int) -> int:
  """Steps of the next train call: up to the next epoch end of a job in flight (where it is evaluated, as mad-lab
  validates after every epoch) or, while slots are free (queued_per_epoch non-empty), the next population step at
  which a queued job may start (`may_start`); at most `steps_per_call`."""
  ends = [int(per_epoch[i] - steps[i] % per_epoch[i]) for i in in_flight]
  starts = [e - population_step % e for e in queued_per_epoch]
  return min([settings.steps_per_call] + ends + starts)


def may_start(job: training.Job, protocol: training.Protocol, population_step: int) -> bool:
  """Whether a job may take a free slot at this population step: only where its epochs end in step with those of
  the jobs in flight (at multiples of its epoch), so that the MAD grid's epochs of 25 · 2^k steps (its training-set
  sizes) end together and one evaluation serves every job due."""
  return population_step % job.steps_per_epoch(protocol) == 0


def model_config(settings: Settings, architecture: str, vocab: int) -> LMConfig:
  """The MAD model of `architecture` and vocabulary `vocab` as this run trains it."""
  s = settings
  return models.mad_config(architecture, vocab, dtype=jnp.dtype(s.dtype).type,
                           residual_dtype=jnp.dtype(s.residual_dtype).type if s.residual_dtype else None,
                           chunk_size=s.chunk_size, impl=s.impl,
                           cg_steps=s.cg_steps, cg_tol=s.cg_tol, matmul_precision=s.matmul_precision,
                           gdn_impl=s.gdn_impl, attention_kernel=s.attention_kernel, hawk_impl=s.hawk_impl,
                           tie_embeddings=s.tie_embeddings, embed_std=s.embed_std,
                           linear_init_variance=s.linear_init_variance)


def protocol_settings(settings: Settings) -> dict:
  """The values of `table.PROTOCOL`'s settings (those that change the model or its training) this run records."""
  config = model_config(settings, "mesanet", 16)
  residual = config.stream_dtype.name if config.stream_dtype != jnp.dtype(config.dtype) else None  # None: dtype's
  return {"dtype": settings.dtype, "residual_dtype": residual, "tie_embeddings": config.tie_embeddings,
          "embed_std": config.embed_std, "decay_embedding": settings.protocol.decay_embedding,
          "linear_init_variance": config.linear_init_variance, "cg_steps": config.mesa.cg_steps_train,
          "cg_tol": config.mesa.cg_tol, "selection": "least_test_perplexity", "seed": settings.seed,
          "max_epochs": settings.protocol.epochs, "num_examples": settings.num_examples or None,
          "autoencoder_linear_std": settings.autoencoder_linear_std}


def capped(settings: Settings, jobs: list[training.Job]) -> list[training.Job]:
  """The jobs on variants of at most settings.num_examples training and test examples (the same jobs if 0)."""
  if not settings.num_examples:
    return jobs
  return [dataclasses.replace(j, variant=variants.shrunk(j.variant, settings.num_examples)) for j in jobs]


def done_keys(settings: Settings, architectures) -> set:
  """The keys of the jobs settings.results holds; a ValueError if it holds jobs of these architectures run with other
  `protocol_settings` (they would be skipped as done)."""
  if not os.path.exists(settings.results):
    return set()
  records = table.read(settings.results)
  ours = protocol_settings(settings)
  for r in records:
    differs = table.settings_that_differ(r, ours, [r["task"]])
    if r["architecture"] in architectures and differs:
      k = differs[0]
      raise ValueError(f"{settings.results} holds {r['architecture']} jobs run with {k}={r.get(k, table.PROTOCOL[k])}"
                       f", this run has {k}={ours[k]}: they would count as done; give this run its own --results")
  return {table.record_key(r) for r in records}


class _Progress:
  """A tqdm bar over the grid's token-steps (job steps × sequence length), with an ETA; notes start with the seconds
  since the run began, so a log shows where the time went."""

  def __init__(self, total: int):
    from tqdm import tqdm
    self.bar = tqdm(total=total, unit="tok·step", unit_scale=True, smoothing=0.05, dynamic_ncols=True)

  def advance(self, amount: int, skipped: int = 0):
    if skipped:
      self.bar.total -= skipped
    self.bar.update(amount)

  def note(self, text: str):
    self.bar.write(f"[{self.bar.format_dict['elapsed']:6.0f} s] {text}")


def group_order(settings: Settings, groups: dict[tuple, list], architectures: list[str]) -> list[tuple]:
  """The order to train groups ({group key: jobs}) in: those saved at an earlier run's time limit first (their slots
  are furthest along), then by architecture as given, then cheapest first (job steps × sequence length: the most
  jobs done by a time limit), or costliest first with `settings.longest_first`."""
  saved = lambda key: bool(settings.state_dir) and slot_state.exists(settings.state_dir, group_name(key))
  sign = -1 if settings.longest_first else 1
  return sorted(groups, key=lambda k: (not saved(k), architectures.index(k[0]),
                                       sign * token_steps(groups[k], settings.protocol)))


def _pending_groups(settings: Settings, all_jobs: list[training.Job]) -> tuple[dict[tuple, list], list[tuple],
                                                                                dict[tuple, tuple[list, str]]]:
  """The jobs not yet in settings.results by group, the groups to train in their order (`group_order`), and those
  held back: {group key: (its jobs, `_held_note`)}, the groups whose saved slots hold pending jobs `all_jobs` leaves
  out or were trained under other recorded settings (a save from before they were saved with it counts as the
  defaults', as its records do). Training such a group would drop those slots and then overwrite or remove their
  save, so it waits for a run that selects them with their settings."""
  done = done_keys(settings, {j.architecture for j in all_jobs})
  groups: dict[tuple, list] = {}
  for job in capped(settings, all_jobs):
    if job.key not in done:
      groups.setdefault(group_key(job), []).append(job)
  known = done | {j.key for j in all_jobs}
  ours = protocol_settings(settings)
  held = {}
  for key in list(groups):
    saved = slot_state.load(settings.state_dir, group_name(key)) if settings.state_dir else None
    if not saved:
      continue
    left_out = [tuple(k) for k in saved["jobs"] if k and tuple(k) not in known]
    trained_under = saved["population"].get("protocol", ours)
    differs = table.settings_that_differ(trained_under, ours, {j.variant.task for j in groups[key]})
    if left_out:
      variants_left_out = ", ".join(sorted({f"{task} {variant}" for _, task, variant, _, _ in left_out}))
      why, remedy = f"hold {len(left_out)} jobs this run does not select ({variants_left_out})", "select them too"
    elif differs:
      k = differs[0]
      why = f"were trained with {k}={trained_under.get(k, table.PROTOCOL[k])}, this run has {k}={ours[k]}"
      remedy = "run with their settings"
    else:
      continue
    jobs = groups.pop(key)
    held[key] = (jobs, _held_note(settings, key, jobs, why, remedy))
  return groups, group_order(settings, groups, list(dict.fromkeys(j.architecture for j in all_jobs))), held


def _held_note(settings: Settings, key: tuple, jobs: list, why: str, remedy: str) -> str:
  """The note of a group held back (`_pending_groups`, `_train_group`): its saved slots `why`, and `remedy` (or
  removing the save) is what to do instead."""
  return (f"{group_name(key)}: {len(jobs)} jobs held back: its saved slots {why}; {remedy} to resume them, or remove "
          f"{group_name(key)}.* from {settings.state_dir} to start them over")


def plan(settings: Settings, all_jobs: list[training.Job]) -> list[dict]:
  """What `run` would train, group by group in its order, without training: the group, its jobs not yet in
  settings.results, the longest one's steps, the population's slots (before the memory fit) and its steps when no
  job stops early (`population_steps`: an upper bound), and the slots saved in `state_dir` that it would resume."""
  groups, keys, _ = _pending_groups(settings, all_jobs)
  rows = []
  for key in keys:
    steps = [j.steps(settings.protocol) for j in groups[key]]
    saved = slot_state.load(settings.state_dir, group_name(key)) if settings.state_dir else None
    slots = max(population_size(settings, len(steps), key[2]), len(saved["jobs"]) if saved else 0)
    rows.append({"group": group_name(key), "jobs": len(steps), "longest": max(steps), "slots": slots,
                 "population_steps": population_steps(steps, slots), "saved": len(saved["jobs"]) if saved else 0})
  return rows


def held_back(settings: Settings, all_jobs: list[training.Job]) -> list[str]:
  """A note for each group `run` would hold back (`_pending_groups`): why, and what to run instead."""
  return [note for _, note in _pending_groups(settings, all_jobs)[2].values()]


class _Deadline:
  """When a run stops (`stop_reason`) and whether it still starts queued jobs (`admits`): not in the last
  `settings.drain` seconds before its time limit, so that fewer jobs are in flight to save or start over."""

  def __init__(self, settings: Settings, sigterm):
    self.start, self.settings, self.sigterm = time.time(), settings, sigterm

  def stop_reason(self) -> str:
    if self.sigterm is not None and self.sigterm.raised:
      return "SIGTERM"
    limit = self.settings.time_limit
    return "time limit" if limit and time.time() - self.start > limit else ""

  def admits(self) -> bool:
    limit, drain = self.settings.time_limit, self.settings.drain
    return not (limit and drain and time.time() - self.start > limit - drain)


def run(settings: Settings, all_jobs: list[training.Job], sigterm=None) -> int:
  """Trains every job not yet in settings.results; returns the number of jobs finished by this run. It stops, saving
  the slots in flight, at the time limit or once `sigterm.raised` (a `train.sigterm.SigtermFlag`) is set; in the
  last `settings.drain` seconds before the time limit it starts no queued job (and no group)."""
  deadline = _Deadline(settings, sigterm)
  groups, keys, held = _pending_groups(settings, all_jobs)
  pending = [j for key in keys for j in groups[key]]
  protocol = settings.protocol
  progress = _Progress(token_steps(pending, protocol))
  held_jobs = sum(len(jobs) for jobs, _ in held.values())
  progress.note(f"{len(pending)} jobs to train ({len(all_jobs) - len(pending) - held_jobs} done) in {len(keys)} "
                f"groups")
  for _, note in held.values():
    progress.note(note)
  needed = list(dict.fromkeys(j.variant for j in pending))  # generated in the order their groups train
  pool = concurrent.futures.ProcessPoolExecutor(settings.workers or max(os.cpu_count() - 1, 1),
                                                mp_context=multiprocessing.get_context("spawn"))
  futures = {v: pool.submit(variants.load, v, settings.seed, settings.data_dir) for v in needed}
  programs = _Programs(settings)
  ahead = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # compiles the next group while one trains
  finished = 0
  try:
    for key, following in zip(keys, keys[1:] + [None]):
      if deadline.stop_reason() or not deadline.admits():
        break
      if following is not None:
        ahead.submit(_compile_ahead, programs.planned(following, groups[following]), groups[following], futures)
      finished += _run_claimed_group(settings, key, groups[key], futures, progress, deadline, programs)
  finally:
    ahead.shutdown(wait=False, cancel_futures=True)
    pool.shutdown(cancel_futures=True)
    progress.bar.close()
  return finished


class _Programs:
  """The populations (their jitted programs) of a run's groups, one per (group, vocabulary, slots): a train step
  compiled ahead of its group (`_compile_ahead`) is the one the group runs and checks against the device memory, not
  compiled again (~10-20 s a group on the GPU)."""

  def __init__(self, settings: Settings):
    self.settings, self._populations = settings, {}

  def population(self, key: tuple, vocab: int, slots: int) -> Population:
    if (key, vocab, slots) not in self._populations:
      self._populations[key, vocab, slots] = Population(model_config(self.settings, key[0], vocab), key[1],
                                                      self.settings.protocol, slots,
                                                      self.settings.autoencoder_linear_std)
    return self._populations[key, vocab, slots]

  def planned(self, key: tuple, jobs: list) -> Population:
    """The population a group of `jobs` plans to start with (before a saved state or the memory check changes it)."""
    return self.population(key, group_vocabulary(jobs), population_size(self.settings, len(jobs), key[2]))


def _compile_ahead(population: Population, jobs: list, futures: dict) -> None:
  """Compiles `population`'s train step and evaluations for the group of `jobs` from the shapes of its data (nothing
  is allocated), once the data is generated; run in a thread while the group before trains. A failure here is left
  to the group, which compiles what it needs itself."""
  datasets = [futures[v].result() for v in dict.fromkeys(j.variant for j in jobs)]
  data = jax.eval_shape(lambda: stack_datasets(datasets, jobs[0].variant.seq_len))
  population.precompile(data, data["train_inputs"].shape[1])


def _run_claimed_group(settings: Settings, key: tuple, jobs: list, futures: dict, progress: _Progress,
                       deadline: _Deadline, programs: _Programs) -> int:
  """`_run_group` for the group's jobs still pending, if this process can claim the group (`claims`; without a
  state_dir the run is alone); returns the jobs it finished. Another process sharing the state directory may hold
  the group now, or have finished jobs of it or saved its slots since this run listed them."""
  name = group_name(key)
  listed = token_steps(jobs, settings.protocol)
  if settings.state_dir and not claims.take(settings.state_dir, name):
    progress.note(f"{name}: skipped, another process trains it ({claims.path(settings.state_dir, name)}: "
                  f"{claims.holder(settings.state_dir, name)})")
    progress.advance(0, skipped=listed)
    return 0
  try:
    groups, _, held = _pending_groups(settings, jobs)
    if key not in groups:
      progress.note(held[key][1] if key in held else f"{name}: finished by another process")
      progress.advance(0, skipped=listed)
      return 0
    progress.advance(0, skipped=listed - token_steps(groups[key], settings.protocol))
    return _run_group(settings, key, groups[key], futures, progress, deadline, programs)
  finally:
    if settings.state_dir:
      claims.release(settings.state_dir, name)


def _run_group(settings: Settings, key: tuple, jobs: list, futures: dict, progress: _Progress,
               deadline: _Deadline, programs: _Programs) -> int:
  """Trains one group (`_train_group`); returns the jobs it finished and records its device time where
  settings.usage names a file (`usage.record`, also when training fails)."""
  start, counts, finished = time.time(), {"member_steps": 0, "slots": 0}, 0
  try:
    finished = _train_group(settings, key, jobs, futures, progress, deadline, programs, counts)
  finally:
    if settings.usage:
      usage.record(settings.usage, group=group_name(key), architecture=key[0], length=key[2],
                   seconds=time.time() - start, member_steps=counts["member_steps"], jobs_finished=finished,
                   slots=counts["slots"], device_share=settings.device_share)
  return finished


def _train_group(settings: Settings, key: tuple, jobs: list, futures: dict, progress: _Progress, deadline: _Deadline,
                 programs: _Programs, counts: dict) -> int:
  """The group's population trained until its queue and slots are empty, or until `deadline` says stop or admits no
  queued job while none is in flight; returns the jobs finished; counts["member_steps"] and counts["slots"] (the
  population's first size) follow as it runs."""
  length = key[2]
  protocol = settings.protocol
  started = time.perf_counter()  # the group's start, timed in its first note: data, the memory check, the state
  group_variants = list(dict.fromkeys(j.variant for j in jobs))
  datasets = [futures[v].result() for v in group_variants]
  saved = slot_state.load(settings.state_dir, group_name(key)) if settings.state_dir else None
  vocab = group_vocabulary(jobs, saved)
  size = max(population_size(settings, len(jobs), length), len(saved["jobs"]) if saved else 0)
  # A resumed population keeps its epoch orders' length (the saving run's largest training set) too.
  data = stack_datasets(datasets, length, saved["population"].get("num_examples", 0) if saved else 0)
  queue = sorted(jobs, key=lambda j: -j.steps(protocol))
  config = model_config(settings, key[0], vocab)
  # slots -> Population: the one whose step was compiled (ahead, or for the memory check) runs, not compiled again
  population_of = functools.partial(programs.population, key, vocab)
  data_seconds = time.perf_counter() - started
  budget = memory_budget(settings.memory_fraction)
  if budget is not None:  # compiled as the run will call it
    step_bytes = lambda slots: train_step_bytes(population_of(slots), data)
    if (fitted := fit_to_memory(size, step_bytes, budget)) != size:
      progress.note(f"{group_name(key)}: the train step of {size} slots would not fit in device memory, of {fitted} "
                    f"it does")
      size = fitted
  population = population_of(size)
  check_seconds = time.perf_counter() - started - data_seconds
  counts["slots"] = size
  recorded = protocol_settings(settings)
  slot_jobs: list = [None] * size
  num_examples = int(data["train_inputs"].shape[1])
  slots = population.init(num_examples, settings.seed)
  if saved and not _fits(saved, slots):
    progress.note(_held_note(settings, key, jobs, "are of another population's shapes (a smaller vocabulary or "
                             "training set than a variant this run adds to the group needs, or other model settings)",
                             "run that selection"))
    progress.advance(0, skipped=token_steps(jobs, protocol))
    return 0
  if saved:
    slots, slot_jobs = _restore(saved, slots, slot_jobs, queue, group_variants)
    progress.advance(int(sum(np.asarray(slots.step)[i] for i, j in enumerate(slot_jobs) if j)) * length)  # done before
  room = slot_state.room(settings.state_dir, group_name(key), settings.state_budget) if settings.state_dir else None
  savable = size if room is None else room // slot_state.slot_bytes(slots)
  progress.note(f"{group_name(key)}: {len(jobs)} jobs, {size} slots, vocab {vocab}, "
                f"{sum(j is not None for j in slot_jobs)} resumed, ready in {time.perf_counter() - started:.1f} s (data "
                f"{data_seconds:.1f}, memory check {check_seconds:.1f})"
                + (f"; at the time limit the state budget saves {savable} of them, the others start over unless "
                   f"done (--max_slots={savable} keeps all)" if settings.time_limit and savable < size else ""))
  finished, tick, stepped, calls_stepped = 0, time.time(), 0, 0  # member-steps, population steps
  # The population's steps, at whose multiples each job's epochs end (`may_start`); a resumed population takes the
  # phase of its job of the longest epoch.
  resumed = [i for i, j in enumerate(slot_jobs) if j is not None]
  per_epoch = np.asarray(slots.per_epoch)
  longest = max(resumed, key=lambda i: per_epoch[i], default=None)
  population_step = 0 if longest is None else int(np.asarray(slots.step)[longest])
  # The evaluations of every size compile in a thread while the population trains; once nothing is queued, so do the
  # populations this one may shrink to: neither an evaluation nor a shrink then waits on a compile (~5-8 s a program
  # on the GPU where no compile is cached).
  compiler, compiling = concurrent.futures.ThreadPoolExecutor(max_workers=1), None
  compiler.submit(population.precompile_evaluations, data, num_examples)
  try:
    while True:
      if all(j is None for j in slot_jobs):
        if not queue:
          break
        population_step = 0  # no epochs in flight to keep in step with
      free = [i for i, j in enumerate(slot_jobs) if j is None]
      if free and queue and deadline.admits():
        slots = _fill(population, slots, slot_jobs, free, queue, group_variants, settings.seed, population_step)
      if not queue and compiling is None and settings.compact_min_steps is not None:
        sizes = shrink_sizes(sum(j is not None for j in slot_jobs), population.size)
        compiling = {size: compiler.submit(population_of(size).precompile, data, num_examples) for size in sizes}
      idle = all(j is None for j in slot_jobs)
      if reason := deadline.stop_reason() or ("the time limit is near (drain)" if idle else ""):
        in_flight = sum(j is not None for j in slot_jobs)
        if settings.state_dir:
          kept, dropped = slot_state.save(settings.state_dir, group_name(key), slots, slot_jobs,
                                          {"vocab": vocab, "num_examples": num_examples, "protocol": recorded},
                                          settings.state_budget)
          progress.note(f"{group_name(key)}: {reason}; of {in_flight} jobs in flight {len(kept)} saved "
                        f"({len(kept) * slot_state.slot_bytes(slots) / 2**20:.1f} MiB), {len(dropped)} start over")
        else:
          progress.note(f"{group_name(key)}: {reason}; {in_flight} jobs in flight dropped (no state_dir)")
        return finished
      in_flight = [i for i, j in enumerate(slot_jobs) if j is not None]
      before, per_epoch = np.asarray(slots.step), np.asarray(slots.per_epoch)
      queued = {j.steps_per_epoch(protocol) for j in queue} if len(in_flight) < population.size else set()
      per_call = call_length(settings, before, per_epoch, in_flight, queued, population_step)
      slots, train_loss = population.train(slots, data, num_steps=per_call)
      population_step += per_call
      steps = np.asarray(slots.step)
      progress.advance(int(np.sum(steps - before)) * length)
      stepped += int(np.sum(steps - before))
      counts["member_steps"] += int(np.sum(steps - before))
      calls_stepped += per_call
      due = [i for i in in_flight if steps[i] % per_epoch[i] == 0]
      if not due:
        continue
      # Every job at an epoch end: its test evaluation, its best checkpoint, mad-lab's early stop at 99.9 %.
      index = jnp.asarray(evaluation_index(due, population.size))
      metrics = population.evaluate(slots, data, index)
      slots = population.keep_best(slots, metrics, index)
      metrics = {k: np.asarray(v) for k, v in metrics.items()}  # of due[n] at n
      best = {k: np.asarray(getattr(slots, f"best_{k}")) for k in ("perplexity", "accuracy", "accuracy_micro", "loss",
                                                                     "step")}
      total = np.asarray(slots.total)
      train_loss = np.asarray(train_loss)
      before_jobs = list(slot_jobs)
      for n, i in enumerate(due):
        job = slot_jobs[i]
        if not (metrics["accuracy"][n] > protocol.stop_accuracy or steps[i] >= total[i]):
          continue
        record = {"architecture": job.architecture, "task": job.variant.task, "variant": job.variant.name,
                  "lr": job.lr, "weight_decay": job.weight_decay,
                  # the checkpoint mad-lab reports: the epoch end of least test perplexity
                  "accuracy": float(best["accuracy"][i]), "accuracy_micro": float(best["accuracy_micro"][i]),
                  "test_loss": float(best["loss"][i]), "test_perplexity": float(best["perplexity"][i]),
                  "best_step": int(best["step"][i]),
                  "final_accuracy": float(metrics["accuracy"][n]), "final_test_loss": float(metrics["loss"][n]),
                  "train_loss": float(train_loss[i]), "steps": int(steps[i]), "total_steps": int(total[i]),
                  "early_stopped": bool(steps[i] < total[i]), "epochs": steps[i] / job.steps_per_epoch(protocol),
                  "slots": population.size, "impl": config.mesa.impl, "chunk_size": config.mesa.chunk_size,
                  "matmul_precision": config.mesa.matmul_precision, "gdn_impl": config.gdn.impl,
                  "hawk_impl": config.lru.impl, "attention_kernel": config.attention.kernel, **recorded,
                  "finished_at": time.time()}
        with open(settings.results, "a") as f:
          f.write(json.dumps(record) + "\n")
        progress.advance(0, skipped=int(total[i] - steps[i]) * length)
        slot_jobs[i] = None
        finished += 1
      if finished_now := sum(j is None for j in slot_jobs) - sum(j is None for j in before_jobs):
        seconds = max(time.time() - tick, 1e-9)
        rate = stepped / seconds
        # At most this long at this size (no early stop; a shrink makes the steps cheaper): the population's steps
        # for what is left, queued jobs into freed slots longest first, at this window's seconds per step.
        left = [int(total[i] - steps[i]) for i, j in enumerate(slot_jobs) if j is not None]
        left += [j.steps(protocol) for j in queue]
        minutes = population_steps(left, population.size) * seconds / max(calls_stepped, 1) / 60 if left else 0.0
        progress.note(f"{group_name(key)}: {finished}/{len(jobs)} done (+{finished_now}), {rate:.4g} member-steps/s "
                      f"({1e3 / max(rate, 1e-9):.4g} ms per member-step, evaluation included), at most "
                      f"{minutes:.3g} min left")
        tick, stepped, calls_stepped = time.time(), 0, 0
      slots = dataclasses.replace(slots, active=jnp.asarray([j is not None for j in slot_jobs]))
      in_flight = [i for i, j in enumerate(slot_jobs) if j is not None]
      smaller = None if queue or settings.compact_min_steps is None else compacted_size(len(in_flight), population.size)
      # The smaller population once its programs have compiled in the background: until then the jobs train on at
      # this size rather than wait (on an H100 a shrink that waited for them stood still for 17-43 s).
      future = (compiling or {}).get(smaller)
      compiled = future is None or future.done()
      if smaller and compiled and max(total[i] - steps[i] for i in in_flight) >= settings.compact_min_steps:
        if future is not None:
          future.result()  # re-raises a failed compile
        population = population_of(smaller)
        slots, slot_jobs = _compact(slots, slot_jobs, smaller)
        progress.note(f"{group_name(key)}: {len(in_flight)} jobs in flight, the population shrinks to {smaller} slots")
    if settings.state_dir:
      slot_state.remove(settings.state_dir, group_name(key))
    return finished
  finally:
    compiler.shutdown(wait=False, cancel_futures=True)


def _compact(slots, slot_jobs: list, size: int):
  """The slots in flight gathered into the first of `size` slots (each keeps its member, optimiser state, step and
  epoch order); the rest are copies of a finished slot, inactive."""
  in_flight = [i for i, j in enumerate(slot_jobs) if j is not None]
  idle = slot_jobs.index(None)
  index = jnp.asarray(in_flight + [idle] * (size - len(in_flight)))
  return (jax.tree.map(lambda x: x[index], slots),
          [slot_jobs[i] for i in in_flight] + [None] * (size - len(in_flight)))


def _fill(population, slots, slot_jobs, free, queue, group_variants, seed, population_step):
  """Assigns to the free slots (fresh members) the first queued jobs that may start at this step (`may_start`)."""
  mask = np.zeros(population.size, bool)
  arrays = {k: np.array(v) for k, v in dict(total=slots.total, per_epoch=slots.per_epoch, dataset=slots.dataset,
                                           vocab=slots.vocab, lr=slots.lr, weight_decay=slots.weight_decay).items()}
  protocol = population.protocol
  startable = [j for j in queue if may_start(j, protocol, population_step)]
  for i, job in zip(free, startable):
    queue.remove(job)
    slot_jobs[i], mask[i] = job, True
    arrays["total"][i], arrays["per_epoch"][i] = job.steps(protocol), job.steps_per_epoch(protocol)
    arrays["dataset"][i], arrays["vocab"][i] = group_variants.index(job.variant), job.variant.vocab_size
    arrays["lr"][i], arrays["weight_decay"][i] = job.lr, job.weight_decay
  if not mask.any():
    return slots
  # Each job's init and shuffling key follows from the job alone (not from the slot or the order of the queue).
  keys = [jax.random.key(seed) if j is None else
          jax.random.fold_in(jax.random.key(seed), zlib.crc32(repr(j.key).encode()) % (1 << 31)) for j in slot_jobs]
  return population.assign(slots, jnp.asarray(mask), **{k: jnp.asarray(v) for k, v in arrays.items()},
                           keys=jnp.stack(keys))


def _fits(saved: dict, slots) -> bool:
  """Whether the saved slots (`slot_state.load`) have the shapes of this population's."""
  return [slot_state.host_shape(t).shape[1:] for t in jax.tree.leaves(slots)] == [x.shape[1:] for x in saved["leaves"]]


def _restore(saved: dict, slots, slot_jobs, queue, group_variants: list):
  """The saved slots (`slot_state.load`: furthest along first, of this population's shapes: `_fits`) in the first
  slots, as many as the population holds (the jobs of the others stay queued and start over); a saved slot whose job
  is no longer queued (done) is emptied. Each resumed slot's dataset is its job's variant in `group_variants` (this
  run's datasets, `stack_datasets`): the run that saved it had other jobs pending, so its index meant another list."""
  template, treedef = jax.tree.flatten(slots)
  resumed = min(len(saved["jobs"]), len(slot_jobs))
  as_leaf = lambda t, x: (jax.random.wrap_key_data(jnp.asarray(x)) if jnp.issubdtype(t.dtype, jax.dtypes.prng_key)
                          else jnp.asarray(x, t.dtype))
  leaves = [jnp.concatenate([as_leaf(t, x[:resumed]), t[resumed:]]) for t, x in zip(template, saved["leaves"])]
  slots = jax.tree.unflatten(treedef, leaves)
  by_key = {j.key: j for j in queue}
  dataset = np.array(slots.dataset)
  for i, key in enumerate(saved["jobs"][:resumed]):
    job = by_key.get(tuple(key) if key else None)
    slot_jobs[i] = job
    if job is not None:
      queue.remove(job)
      dataset[i] = group_variants.index(job.variant)
  return dataclasses.replace(slots, dataset=jnp.asarray(dataset, slots.dataset.dtype),
                             active=jnp.asarray([j is not None for j in slot_jobs])), slot_jobs
