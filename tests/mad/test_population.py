"""The population trainer: mad-lab's accuracy and the paper's schedule; slots train exactly as members alone (per-slot
lr, own data order, frozen when done); in-flight state saved and restored; the grid's results resume; Table 9 scored
both ways."""
import concurrent.futures
import dataclasses
import functools
import json
import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesanet_jax.mad import grid, models, slot_state, table, training, variants
from mesanet_jax.mad import population as population_module
from mesanet_jax.mad.population import Population, evaluation_index, evaluation_sizes, stack_datasets

pytestmark = pytest.mark.xdist_group("population")  # one worker: the cached populations' programs compile once

I = -100
_BACKEND_COMPILES = []  # every backend compile in this process from here on (tests read how many a call adds)
jax.monitoring.register_event_duration_secs_listener(
    lambda event, _, **kw: _BACKEND_COMPILES.append(event) if event == "/jax/core/compile/backend_compile_duration"
    else None)


def test_batch_accuracy_is_torchmetrics_macro_accuracy():
  targets = jnp.array([[0, 0, 1, I], [2, 1, I, I]])
  predictions = jnp.array([[0, 1, 1, 3], [3, 1, 0, 0]])
  macro, correct = training.batch_accuracy(predictions, targets, 6)
  # Scored: class 0 hit 1 of 2, class 1 hit 2 of 2, class 2 hit 0 of 1, class 3 predicted once but never a target
  # (tp + fp + fn > 0: counts, recall 0), classes 4-5 absent (not counted); ignored positions drop their predictions.
  assert float(macro) == pytest.approx((0.5 + 1.0 + 0.0 + 0.0) / 4)
  assert int(correct) == 3


def test_learning_rate_warmup_and_cosine():
  p = training.Protocol()
  lr = lambda step, total: float(training.learning_rate(jnp.asarray(step), jnp.asarray(1e-3), jnp.asarray(total), p))
  assert lr(0, 80_000) == pytest.approx(1e-7)
  assert lr(750, 80_000) == pytest.approx(1e-3)
  assert lr((80_000 + 750) / 2, 80_000) == pytest.approx((1e-3 + 1e-5) / 2)
  assert lr(80_000, 80_000) == pytest.approx(1e-5)
  assert lr(99, 100) == pytest.approx(1e-3)  # warmup shortened to total − 1 steps


VARIANT = variants.Variant("in_context_recall", "tiny", 0, vocab_size=16, seq_len=16, num_train_examples=64,
                           num_test_examples=32)


@functools.cache
def _population(size: int) -> Population:
  """The paper's MAD Transformer over `size` slots (one compile per size for every test here)."""
  return Population(models.mad_config("transformer", 16), False, training.Protocol(), size)


@functools.cache
def _data():
  return stack_datasets([variants.load(VARIANT, seed=0)], 16)


def _run(population, data, jobs, steps):
  """jobs: [(total steps, lr, key)] assigned to the slots in order; `steps` training steps. Returns the slots and
  each slot's mean training loss."""
  slots = population.init(64)
  column = lambda i: jnp.asarray([job[i] for job in jobs])
  slots = population.assign(slots, jnp.ones(len(jobs), bool), total=column(0), per_epoch=jnp.full(len(jobs), 2),
                            dataset=jnp.zeros(len(jobs), jnp.int32), vocab=jnp.full(len(jobs), 16), lr=column(1),
                            weight_decay=jnp.full(len(jobs), 0.1), keys=jnp.stack([job[2] for job in jobs]))
  return population.train(slots, data, num_steps=steps)


@pytest.mark.slow
def test_slots_train_like_members_alone_and_freeze_when_done():
  a, b = (2, 1e-3, jax.random.key(1)), (8, 3e-3, jax.random.key(2))
  pair, pair_loss = _run(_population(2), _data(), [a, b], 3)
  np.testing.assert_array_equal(pair.step, [2, 3])  # slot 0 reached its 2 steps and stayed there
  for index, job in enumerate([a, b]):
    alone, alone_loss = _run(_population(1), _data(), [job], 3)
    for x, y in zip(jax.tree.leaves(pair.params), jax.tree.leaves(alone.params)):
      np.testing.assert_allclose(x[index], y[0], rtol=2e-5, atol=2e-6)  # f32: another batching of the same math
    np.testing.assert_allclose(pair_loss[index], alone_loss[0], rtol=2e-5)
  # The training loss is the mean over the steps a slot took: slot 0 took 2 of the call's 3, as in a call of 2.
  _, two_steps_loss = _run(_population(1), _data(), [a], 2)
  np.testing.assert_allclose(pair_loss[0], two_steps_loss[0], rtol=2e-5)
  metrics = _population(2).evaluate(pair, _data(), jnp.arange(2))
  assert metrics["accuracy"].shape == (2,) and np.all((0 <= metrics["accuracy"]) & (metrics["accuracy"] <= 1))
  # One slot alone (padded with itself, as the grid pads the slots due) has the metrics it has among all.
  second = _population(2).evaluate(pair, _data(), jnp.array([1, 1]))
  for name, values in metrics.items():
    np.testing.assert_allclose(second[name], [values[1]] * 2, rtol=1e-5, err_msg=name)


@pytest.mark.slow  # compiles over ~8 s on one core
def test_state_saved_and_restored(tmp_path):
  population = _population(2)
  slots, _ = _run(population, _data(), [(8, 1e-3, jax.random.key(1)), (8, 3e-3, jax.random.key(2))], 3)
  jobs = [training.Job("transformer", VARIANT, 1e-3, 0.1), training.Job("transformer", VARIANT, 3e-3, 0.1)]
  slot_state.save(str(tmp_path), "g", slots, [None, jobs[0]])
  queue = list(jobs)
  saved = slot_state.load(str(tmp_path), "g")
  fresh = population.init(64)
  restored, slot_jobs = grid._restore(saved, fresh, [None, None], queue, [VARIANT])  # into the first of two slots
  assert slot_jobs == [jobs[0], None] and queue == [jobs[1]]
  np.testing.assert_array_equal(restored.active, [True, False])
  host = slot_state.host_array
  for x, y, z in zip(jax.tree.leaves(restored), jax.tree.leaves(slots), jax.tree.leaves(fresh)):
    np.testing.assert_array_equal(host(x)[0], host(y)[1])  # the saved slot's params, optimiser state, step, key
    np.testing.assert_array_equal(host(x)[1], host(z)[1])  # the other as it was


@pytest.mark.slow
def test_grid_writes_each_job_once_and_resumes(tmp_path):
  variant = variants.shrunk(variants.find("memorize", "baseline"), 32)
  settings = grid.Settings(results=str(tmp_path / "results.jsonl"), protocol=training.Protocol(epochs=2),
                           steps_per_call=1, workers=1)
  jobs = training.jobs(["transformer"], [variant], lrs=(1e-3, 3e-3), weight_decays=(0.1,))
  assert grid.run(settings, jobs) == 2
  records = table.read(settings.results)
  assert sorted(r["lr"] for r in records) == [1e-3, 3e-3] and {r["steps"] for r in records} == {2}
  assert {r["gdn_impl"] for r in records} == {"xla"} and {r["dtype"] for r in records} == {"bfloat16"}
  assert {r["selection"] for r in records} == {"least_test_perplexity"} and {r["best_step"] for r in records} <= {1, 2}
  assert grid.run(settings, jobs) == 0  # everything done: skipped
  assert all(set(table.PROTOCOL) <= set(r) for r in records)
  with pytest.raises(ValueError, match="transformer jobs run with dtype=bfloat16, this run has dtype=float32"):
    grid.run(dataclasses.replace(settings, dtype="float32"), jobs)  # not skipped as done under other settings


def test_population_sizes_and_steps_as_the_grid_schedules():
  settings = grid.Settings(results="")  # at most 256 slots and 2^20 tokens per step
  assert [grid.population_size(settings, jobs, length) for jobs, length in ((216, 128), (300, 64), (32, 1024))] == [
      216, 256, 32]
  # Longest first, each to the slot free first: 5 | 4, then 3 after the 4 (7), then 3 after the 5 (8).
  assert grid.population_steps([3, 5, 3, 4], 2) == 8
  assert grid.population_steps([3, 5], 4) == 5  # more slots than jobs: the longest job


class _ScriptedEvaluations(Population):
  """A population whose test evaluations return `script[k]` at the k-th call ({metric: value} for every slot) and
  log each call's due slots with their steps and epochs (`keep_best`)."""
  script: list = []
  log: list = []

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.evaluate = self._scripted
    keep_best = self.keep_best
    self.keep_best = lambda slots, metrics, index: (
        self.log.append([(int(slots.step[i]), int(slots.per_epoch[i])) for i in dict.fromkeys(index.tolist())])
        or keep_best(slots, metrics, index))

  def _scripted(self, slots, data, index):
    values = self.script[min(len(self.log), len(self.script) - 1)]
    return {k: jnp.full(index.shape, values[k], jnp.float32) for k in ("accuracy", "accuracy_micro", "loss",
                                                                       "perplexity")}


def _metrics(accuracy, perplexity):
  return {"accuracy": accuracy, "accuracy_micro": accuracy, "loss": np.log(perplexity), "perplexity": perplexity}


@pytest.mark.slow
def test_records_report_the_epoch_of_least_test_perplexity_and_stop_at_99_9_percent(tmp_path, monkeypatch):
  """mad-lab reports the test accuracy of its best checkpoint (least test perplexity, the first of equals) and stops
  once an epoch's test accuracy exceeds 99.9 %."""
  monkeypatch.setattr(grid, "Population", _ScriptedEvaluations)
  variant = variants.shrunk(variants.find("memorize", "baseline"), 32)  # one step an epoch
  jobs = training.jobs(["transformer"], [variant], lrs=(1e-3,), weight_decays=(0.1,))
  settings = grid.Settings(results=str(tmp_path / "best.jsonl"), protocol=training.Protocol(epochs=4), workers=1)
  monkeypatch.setattr(_ScriptedEvaluations, "log", [])
  monkeypatch.setattr(_ScriptedEvaluations, "script", [_metrics(0.5, 3.0), _metrics(0.6, 2.0), _metrics(0.7, 2.0),
                                                       _metrics(0.8, 2.5)])
  assert grid.run(settings, jobs) == 1
  (record,) = table.read(settings.results)
  assert (record["accuracy"], record["test_perplexity"], record["best_step"]) == (pytest.approx(0.6), 2.0, 2)
  assert record["final_accuracy"] == pytest.approx(0.8) and record["steps"] == 4 and not record["early_stopped"]
  monkeypatch.setattr(_ScriptedEvaluations, "log", [])
  # 0.999 itself does not stop it (Lightning compares with torch.gt); 0.9995 does.
  monkeypatch.setattr(_ScriptedEvaluations, "script", [_metrics(0.5, 3.0), _metrics(0.999, 3.5), _metrics(0.9995, 4.0)])
  assert grid.run(dataclasses.replace(settings, results=str(tmp_path / "stopped.jsonl")), jobs) == 1
  (record,) = table.read(str(tmp_path / "stopped.jsonl"))
  assert record["steps"] == 3 and record["early_stopped"] and record["final_accuracy"] == pytest.approx(0.9995)
  assert record["accuracy"] == pytest.approx(0.5) and record["best_step"] == 1  # the stop's epoch had more perplexity


@pytest.mark.slow
def test_jobs_are_evaluated_at_each_of_their_epoch_ends_and_start_in_step(tmp_path, monkeypatch):
  """Epochs of 2 and 4 steps in two slots: every evaluation falls on an epoch end of each job it is due for, each job
  is evaluated once per epoch, and the third job waits for a step where its epochs end with the others'."""
  monkeypatch.setattr(grid, "Population", _ScriptedEvaluations)
  monkeypatch.setattr(_ScriptedEvaluations, "log", [])
  monkeypatch.setattr(_ScriptedEvaluations, "script", [_metrics(0.5, 2.0)])
  memorize = variants.find("memorize", "baseline")
  two, four = variants.shrunk(memorize, 64), dataclasses.replace(variants.shrunk(memorize, 128), name="four")
  jobs = training.jobs(["transformer"], [four, two], lrs=(1e-3,), weight_decays=(0.1,))
  jobs += training.jobs(["transformer"], [two], lrs=(3e-3,), weight_decays=(0.1,))
  settings = grid.Settings(results=str(tmp_path / "results.jsonl"), protocol=training.Protocol(epochs=2),
                           workers=1, max_slots=2, compact_min_steps=None)
  assert grid.run(settings, jobs) == 3
  # Population steps 2, 4, 6, 8: the 4-step job at 4 and 8, the first 2-step job at 2 and 4, the next at 6 and 8.
  assert _ScriptedEvaluations.log == [[(2, 2)], [(4, 4), (4, 2)], [(2, 2)], [(8, 4), (4, 2)]]
  assert all(step % epoch == 0 for due in _ScriptedEvaluations.log for step, epoch in due)


def test_the_slots_due_are_evaluated_padded_to_a_power_of_two():
  assert evaluation_index([5], 8) == [5] and evaluation_index([1, 4, 6], 8) == [1, 4, 6, 1]
  assert evaluation_index(list(range(9)), 10) == list(range(9)) + [0]  # never more than the population
  for size in (1, 2, 6, 8, 10):  # the sizes a population compiles as its group starts: every one that can come
    assert {len(evaluation_index(list(range(n)), size)) for n in range(1, size + 1)} == set(evaluation_sizes(size))


def test_evaluations_forward_several_test_batches_a_step_with_the_metrics_of_one_at_a_time(monkeypatch):
  """Few slots due: a scan step of the evaluation forwards several of their test batches (up to EVALUATION_TOKENS),
  with the same per-batch metrics as one batch a step; many slots: one batch a step."""
  batches = population_module.batches_per_step
  assert batches(40, 1 * 32 * 128) == 40 and batches(40, 8 * 32 * 128) == 8 and batches(40, 64 * 32 * 128) == 1
  assert batches(40, 12 * 32 * 128) == 5 and batches(8, 2 * 32 * 32) == 8  # a divisor of the batches that fits
  variant = dataclasses.replace(VARIANT, num_test_examples=128)  # 4 test batches
  data = stack_datasets([variants.load(variant, seed=0)], 16)
  config = models.mad_config("transformer", 16)
  grouped = Population(config, False, training.Protocol(), 2)
  slots, _ = _run(grouped, data, [(8, 1e-3, jax.random.key(1)), (8, 3e-3, jax.random.key(2))], 2)
  metrics = grouped.evaluate(slots, data, jnp.arange(2))  # 2 · 32 · 16 tokens a batch: all 4 batches in one step
  monkeypatch.setattr(population_module, "EVALUATION_TOKENS", 1)  # one batch a step (traced anew: another instance)
  one_at_a_time = Population(config, False, training.Protocol(), 2).evaluate(slots, data, jnp.arange(2))
  for name, values in metrics.items():
    np.testing.assert_allclose(values, one_at_a_time[name], rtol=1e-5, err_msg=name)  # f32: another batching


def test_calls_end_at_epoch_ends_and_jobs_start_at_multiples_of_their_epoch():
  settings = grid.Settings(results="")  # steps_per_call 200
  job = lambda examples: training.Job("mesanet", variants.shrunk(variants.find("compress", "baseline"), examples),
                                      1e-3, 0.1)
  protocol = settings.protocol
  assert [grid.may_start(job(800), protocol, step) for step in (0, 25, 50, 30)] == [True, True, True, False]
  assert [grid.may_start(job(12_800), protocol, step) for step in (0, 400, 200)] == [True, True, False]
  steps, per_epoch = np.array([0, 10, 390]), np.array([400, 25, 400])
  assert grid.call_length(settings, steps, per_epoch, [0], set(), 0) == 200  # an epoch of 400: two calls
  assert grid.call_length(settings, steps, per_epoch, [0, 1], set(), 0) == 15  # the 25-step job's epoch end
  assert grid.call_length(settings, steps, per_epoch, [0, 2], set(), 0) == 10
  assert grid.call_length(settings, steps, per_epoch, [0], {400}, 390) == 10  # a free slot: a queued job's start


def test_fit_to_memory_halves_the_population_until_its_step_fits():
  assert grid.fit_to_memory(16, lambda slots: 10 * slots, 35) == 2
  assert grid.fit_to_memory(8, lambda slots: 10 * slots, 80) == 8
  with pytest.raises(ValueError, match="one slot's train step needs 5.0 GiB, more than the 1.0 GiB left"):
    grid.fit_to_memory(4, lambda slots: 5 * 2**30, 2**30)


@pytest.mark.slow
def test_train_step_bytes_grow_with_the_slots_and_the_checked_step_runs_at_any_length_without_compiling():
  compiles = _BACKEND_COMPILES
  config = models.mad_config("transformer", 16)
  three, five = (Population(config, False, training.Protocol(), slots) for slots in (3, 5))  # sizes no test caches
  assert 0 < grid.train_step_bytes(three, _data()) < grid.train_step_bytes(five, _data())
  slots = three.assign(three.init(64), jnp.ones(3, bool), total=jnp.full(3, 8), per_epoch=jnp.full(3, 2),
                       dataset=jnp.zeros(3, jnp.int32), vocab=jnp.full(3, 16), lr=jnp.full(3, 1e-3),
                       weight_decay=jnp.full(3, 0.1), keys=jax.random.split(jax.random.key(0), 3))
  before = len(compiles)
  slots, _ = three.train(slots, _data(), num_steps=2)
  slots, _ = three.train(slots, _data(), num_steps=3)  # the grid's calls end at evaluations: lengths vary
  np.testing.assert_array_equal(slots.step, [5, 5, 5])
  assert len(compiles) == before  # the step compiled for the memory check is the one that runs, whatever its length


def test_a_precompiled_population_trains_evaluates_and_keeps_the_best_without_compiling():
  compiles = _BACKEND_COMPILES
  six = Population(models.mad_config("transformer", 16), False, training.Protocol(), 6)  # a size no test caches
  six.precompile(_data(), 64)
  slots = six.assign(six.init(64), jnp.ones(6, bool), total=jnp.full(6, 8), per_epoch=jnp.full(6, 2),
                     dataset=jnp.zeros(6, jnp.int32), vocab=jnp.full(6, 16), lr=jnp.full(6, 1e-3),
                     weight_decay=jnp.full(6, 0.1), keys=jax.random.split(jax.random.key(0), 6))
  every, three_due = (jnp.asarray(evaluation_index(due, 6)) for due in ([0, 1, 2, 3, 4, 5], [1, 3, 5]))
  before = len(compiles)
  slots, _ = six.train(slots, _data(), num_steps=2)
  metrics = six.evaluate(slots, _data(), every)
  slots = six.keep_best(slots, metrics, every)
  np.testing.assert_array_equal(slots.best_perplexity, metrics["perplexity"])
  np.testing.assert_array_equal(slots.best_step, [2] * 6)
  six.keep_best(slots, six.evaluate(slots, _data(), three_due), three_due)  # 3 due: 4 evaluated, compiled too
  assert len(compiles) == before


@pytest.mark.slow
def test_grid_runs_a_population_that_fits_the_device_memory(tmp_path, capsys, monkeypatch):
  """A device whose memory holds one slot's step but not two: the group of two jobs runs in one slot."""
  monkeypatch.setattr(grid, "memory_budget", lambda fraction: 150)
  monkeypatch.setattr(grid, "train_step_bytes", lambda population, data: 100 * population.size)
  variant = variants.shrunk(variants.find("memorize", "baseline"), 32)
  jobs = training.jobs(["transformer"], [variant], lrs=(1e-3, 3e-3), weight_decays=(0.1,))
  settings = grid.Settings(results=str(tmp_path / "results.jsonl"), protocol=training.Protocol(epochs=1),
                           steps_per_call=1, workers=1)
  assert grid.run(settings, jobs) == 2
  assert "the train step of 2 slots would not fit in device memory, of 1 it does" in capsys.readouterr().out
  assert {r["slots"] for r in table.read(settings.results)} == {1}


def test_a_device_without_a_memory_limit_budgets_the_host_memory_available(monkeypatch):
  assert jax.devices()[0].memory_stats() is None  # the CPU reports no limit
  assert grid._host_memory_available() > 0  # /proc/meminfo's MemAvailable
  monkeypatch.setattr(grid, "_host_memory_available", lambda: 1000)
  assert grid.memory_budget(0.9) == 900  # a CPU run halves a population the host cannot hold, not OOM-killed
  monkeypatch.setattr(grid, "_host_memory_available", lambda: None)
  assert grid.memory_budget(0.9) is None


def test_compacted_size_is_the_power_of_two_that_holds_the_jobs_in_flight():
  assert [grid.compacted_size(n, 64) for n in (1, 2, 3, 17, 32, 33, 0)] == [1, 2, 4, 32, 32, None, None]
  assert grid.compacted_size(5, 8) is None and grid.compacted_size(2, 4) == 2 and grid.compacted_size(1, 1) is None
  # Any smaller power of two, not only half or less: 10 slots (a grid piece's) go to 8, 216 (a whole group's) to 128.
  assert grid.compacted_size(8, 10) == 8 and grid.compacted_size(9, 10) is None and grid.compacted_size(100, 216) == 128


def test_shrink_sizes_are_every_size_the_population_can_shrink_to_largest_first():
  assert grid.shrink_sizes(3, 10) == [4, 2, 1] and grid.shrink_sizes(9, 10) == [8, 4, 2, 1]
  assert grid.shrink_sizes(40, 64) == [32, 16, 8, 4, 2, 1] and grid.shrink_sizes(2, 4) == [2, 1]
  assert grid.shrink_sizes(1, 1) == []
  for size in (1, 5, 10, 64):
    for in_flight in range(1, size + 1):
      reachable, frontier = set(), [(in_flight, size)]
      while frontier:  # shrink, then shrink again with fewer jobs in flight, as the grid does
        jobs, current = frontier.pop()
        for left in range(1, jobs + 1):
          if (smaller := grid.compacted_size(left, current)) and smaller not in reachable:
            reachable.add(smaller)
            frontier.append((left, smaller))
      assert reachable <= set(grid.shrink_sizes(in_flight, size)), (in_flight, size)


def _compiler(done: bool):
  """The grid's background compiler, its futures' done() made deterministic: it waits for the compile (done=True:
  a shrink happens at its first chance) or says not yet (done=False: the compile never seems to finish)."""
  class Compiler(concurrent.futures.ThreadPoolExecutor):
    def submit(self, *args, **kwargs):
      future = super().submit(*args, **kwargs)
      future.done = (lambda: future.exception() is None or True) if done else (lambda: False)
      return future
  return Compiler


@pytest.mark.slow
def test_grid_shrinks_a_population_and_trains_its_jobs_as_before(tmp_path, capsys, monkeypatch):
  """Two short and two long jobs in 4 slots: once the short ones finish (and nothing is queued) the long ones go on
  in a population of 2, compiled in the background as soon as the queue emptied, with the results of a run that
  never shrinks (f32: another batching of the same math); a shrink whose compiles are not done waits for nothing:
  the jobs train on at their size."""
  precompiled, precompile = [], Population.precompile
  monkeypatch.setattr(Population, "precompile", lambda self, *args: (
      precompiled.append((self.size, threading.current_thread() is threading.main_thread())), precompile(self, *args)))
  monkeypatch.setattr(grid.concurrent.futures, "ThreadPoolExecutor", _compiler(done=True))
  memorize = variants.find("memorize", "baseline")
  short, long = variants.shrunk(memorize, 32), dataclasses.replace(variants.shrunk(memorize, 96), name="long")
  jobs = training.jobs(["transformer"], [short, long], lrs=(1e-3, 3e-3), weight_decays=(0.1,))
  settings = grid.Settings(results=str(tmp_path / "shrunk.jsonl"), protocol=training.Protocol(epochs=2),
                           steps_per_call=1, workers=1, compact_min_steps=1, dtype="float32")
  assert [j.steps(settings.protocol) for j in jobs] == [2, 2, 6, 6]
  assert grid.run(settings, jobs) == 4
  notes = capsys.readouterr().out
  assert "transformer.lm.L32: 2 jobs in flight, the population shrinks to 2 slots" in notes
  assert "2/4 done (+2)" in notes and "min left" in notes  # the two long jobs' 4 steps to go, at the rate seen
  assert precompiled == [(2, False), (1, False)]  # every size it could shrink to, off the main thread
  monkeypatch.setattr(grid.concurrent.futures, "ThreadPoolExecutor", _compiler(done=False))
  kept = dataclasses.replace(settings, results=str(tmp_path / "kept.jsonl"))
  assert grid.run(kept, jobs) == 4
  assert "shrinks" not in capsys.readouterr().out
  by_key = lambda path: {(r["variant"], r["lr"]): r for r in table.read(path)}
  shrunk_runs, kept_runs = by_key(settings.results), by_key(kept.results)
  assert {k: r["slots"] for k, r in shrunk_runs.items()} == {("baseline", 1e-3): 4, ("baseline", 3e-3): 4,
                                                            ("long", 1e-3): 2, ("long", 3e-3): 2}
  assert {r["slots"] for r in kept_runs.values()} == {4}
  for k, r in shrunk_runs.items():
    assert r["steps"] == kept_runs[k]["steps"]
    np.testing.assert_allclose([r["test_loss"], r["train_loss"]], [kept_runs[k]["test_loss"],
                                                                   kept_runs[k]["train_loss"]], rtol=2e-5)


@pytest.mark.slow
def test_the_next_groups_train_step_compiles_ahead_in_a_thread(tmp_path, monkeypatch):
  """Two groups: while the first trains, the second's planned population compiles its train step (and evaluations)
  in a thread, and the second group then trains that very population (whose compiled step JAX does not compile
  again)."""
  on_main = lambda: threading.current_thread() is threading.main_thread()
  monkeypatch.setattr(grid, "memory_budget", lambda fraction: None)  # no memory check: it compiles on the main thread
  compiled, started, compiled_train, init = [], [], Population.compiled_train, Population.init
  monkeypatch.setattr(Population, "compiled_train",
                      lambda self, *args: (compiled.append((id(self), on_main())), compiled_train(self, *args))[1])
  monkeypatch.setattr(Population, "init",
                      lambda self, *args, **kw: (started.append((id(self), on_main())), init(self, *args, **kw))[1])
  memorize = variants.shrunk(variants.find("memorize", "baseline"), 32)  # L 32: another group than VARIANT's L 16
  jobs = training.jobs(["transformer"], [memorize, VARIANT], lrs=(1e-3,), weight_decays=(0.1,))
  settings = grid.Settings(results=str(tmp_path / "results.jsonl"), protocol=training.Protocol(epochs=1),
                           workers=1, dtype="float32")
  assert grid.run(settings, jobs) == 2
  trained = [population for population, main in started if main]  # each group's population.init (the others: traces)
  assert len(trained) == 2 and compiled == [(trained[1], False)]


@pytest.mark.slow
def test_a_shrunk_population_saved_at_the_time_limit_resumes_beside_the_queued_jobs(tmp_path):
  variant = variants.shrunk(variants.find("memorize", "baseline"), 32)
  jobs = training.jobs(["transformer"], [variant], lrs=(1e-3, 3e-3, 5e-4), weight_decays=(0.1,))
  settings = grid.Settings(results=str(tmp_path / "results.jsonl"), protocol=training.Protocol(epochs=2),
                           state_dir=str(tmp_path / "state"), steps_per_call=1, workers=1)
  population = Population(models.mad_config("transformer", variant.vocab_size), False, settings.protocol, 4)
  slot_jobs, queue = [None] * 4, list(jobs[:2])
  slots = grid._fill(population, population.init(32), slot_jobs, [1, 3], queue, [variant], settings.seed, 0)
  slots, slot_jobs = grid._compact(slots, slot_jobs, 2)
  assert slot_jobs == jobs[:2] and np.asarray(slots.total).tolist() == [2, 2]
  group = grid.group_name(grid.group_key(jobs[0]))
  slot_state.save(settings.state_dir, group, slots, slot_jobs)
  assert grid.run(settings, jobs) == 3  # a population of 3: the two resumed and the queued one
  assert sorted((r["lr"], r["slots"], r["steps"]) for r in table.read(settings.results)) == [
      (5e-4, 3, 2), (1e-3, 3, 2), (3e-3, 3, 2)]
  assert not os.listdir(settings.state_dir)  # the group's state removed once its jobs are done


def _saved_in_flight(settings, jobs: list, slots: int):
  """Saves `slots` slots with jobs[:slots] in flight (no step taken) as the grid saves its group at a time limit."""
  variant = jobs[0].variant
  population = Population(models.mad_config("transformer", variant.vocab_size), False, settings.protocol, slots)
  slot_jobs, queue = [None] * slots, list(jobs[:slots])
  filled = grid._fill(population, population.init(variant.num_train_examples), slot_jobs, list(range(slots)), queue,
                      [variant], settings.seed, 0)
  slot_state.save(settings.state_dir, grid.group_name(grid.group_key(jobs[0])), filled, slot_jobs,
                  {"protocol": grid.protocol_settings(settings)})


@pytest.mark.slow
def test_a_group_whose_saved_slots_a_run_does_not_select_is_held_back(tmp_path):
  # Training the group without them would drop the saved slots and then overwrite or remove their save.
  variant = variants.shrunk(variants.find("memorize", "baseline"), 32)
  jobs = training.jobs(["transformer"], [variant], lrs=(1e-3, 3e-3, 5e-4), weight_decays=(0.1,))
  settings = grid.Settings(results=str(tmp_path / "results.jsonl"), protocol=training.Protocol(epochs=2),
                           state_dir=str(tmp_path / "state"), workers=1)
  _saved_in_flight(settings, jobs, 2)
  saved_files = sorted(os.listdir(settings.state_dir))
  assert grid.run(settings, jobs[2:]) == 0
  assert not os.path.exists(settings.results) and sorted(os.listdir(settings.state_dir)) == saved_files
  [note] = grid.held_back(settings, jobs[2:])
  assert note.startswith("transformer.lm.L32: 1 jobs held back: its saved slots hold 2 jobs this run does not "
                         "select (memorize baseline)")
  assert grid.plan(settings, jobs[2:]) == []
  assert grid.held_back(settings, jobs) == []
  assert grid.run(settings, jobs) == 3  # selected with them: the two resumed, the third queued
  assert not os.listdir(settings.state_dir)


@pytest.mark.slow
def test_saved_slots_of_another_vocabulary_or_seed_are_held_back_not_started_over(tmp_path, capsys):
  # The group's vocabulary is its variants' largest: selecting a larger-vocabulary variant of the group beside the
  # saved jobs changes the population's shapes, and the saved slots must wait for a run of their own selection. A
  # run of another seed (or any other recorded setting) must not resume them as its own.
  small, large = (variants.shrunk(variants.find("memorize", name), 32) for name in ("baseline", "vocab_size=512"))
  jobs = training.jobs(["transformer"], [small], lrs=(1e-3, 3e-3), weight_decays=(0.1,))
  wider = jobs + training.jobs(["transformer"], [large], lrs=(1e-3,), weight_decays=(0.1,))
  settings = grid.Settings(results=str(tmp_path / "results.jsonl"), protocol=training.Protocol(epochs=2),
                           state_dir=str(tmp_path / "state"), workers=1)
  _saved_in_flight(settings, jobs, 2)
  saved_files = sorted(os.listdir(settings.state_dir))
  assert grid.run(settings, wider) == 0
  assert not os.path.exists(settings.results) and sorted(os.listdir(settings.state_dir)) == saved_files
  assert grid.run(dataclasses.replace(settings, seed=1), jobs) == 0
  assert "its saved slots were trained with seed=0, this run has seed=1" in capsys.readouterr().out
  assert grid.plan(dataclasses.replace(settings, seed=1), jobs) == []  # a dry run shows it held back too
  assert not os.path.exists(settings.results) and sorted(os.listdir(settings.state_dir)) == saved_files
  assert grid.run(settings, jobs) == 2 and not os.listdir(settings.state_dir)
  assert grid.run(settings, wider) == 1


@pytest.mark.slow
def test_a_group_resumed_with_fewer_variants_left_keeps_its_shapes_and_each_slot_its_own_dataset(tmp_path):
  # The saving run had three variants pending, the resuming run two: a slot's saved dataset index points into the
  # saving run's list, so the resumed slot must be given its job's variant in the new one (index 1 would now be
  # `medium`'s data for `small`'s job), and the population keeps the saved vocabulary and epoch-order length (the
  # variant of the largest vocabulary and training set is done).
  large = variants.shrunk(variants.find("memorize", "vocab_size=1024"), 64)
  small, medium = (variants.shrunk(variants.find("memorize", name), 32) for name in ("baseline", "vocab_size=512"))
  done = training.jobs(["transformer"], [large], lrs=(1e-3,), weight_decays=(0.1,))
  resumed = training.jobs(["transformer"], [small, medium], lrs=(1e-3,), weight_decays=(0.1,))
  settings = grid.Settings(results=str(tmp_path / "results.jsonl"), protocol=training.Protocol(epochs=2),
                           state_dir=str(tmp_path / "state"), workers=1)
  assert grid.run(settings, done) == 1
  population = Population(models.mad_config("transformer", large.vocab_size), False, settings.protocol, 2)
  slot_jobs = [None, None]
  slots = grid._fill(population, population.init(64), slot_jobs, [0, 1], list(resumed), [large, small, medium],
                     settings.seed, 0)
  assert np.asarray(slots.dataset).tolist() == [1, 2]
  group = grid.group_name(grid.group_key(done[0]))
  slot_state.save(settings.state_dir, group, slots, slot_jobs, {"vocab": large.vocab_size, "num_examples": 64})
  saved = slot_state.load(settings.state_dir, group)
  assert grid.group_vocabulary(resumed, saved) == large.vocab_size and grid.group_vocabulary(resumed) == 512
  restored, restored_jobs = grid._restore(saved, population.init(64), [None, None], list(resumed), [small, medium])
  assert restored_jobs == resumed and np.asarray(restored.dataset).tolist() == [0, 1]
  data = stack_datasets([variants.load(v) for v in (small, medium)], 32, train_rows=64)
  assert data["train_inputs"].shape == (2, 64, 32) and np.asarray(data["num_train"]).tolist() == [32, 32]
  assert grid.held_back(settings, done + resumed) == []
  assert grid.run(settings, done + resumed) == 2  # resumed (not held back for other shapes), then finished
  assert sorted(r["variant"] for r in table.read(settings.results)) == ["baseline", "vocab_size=1024", "vocab_size=512"]
  assert not os.listdir(settings.state_dir)


class _Clock:
  """Stands in for the `time` module in mesanet_jax.mad.grid: one second passes at each reading of time(); the
  durations the grid logs (perf_counter) are real."""
  perf_counter = staticmethod(time.perf_counter)

  def __init__(self):
    self.now = 0.0

  def time(self) -> float:
    self.now += 1.0
    return self.now


@pytest.mark.slow
def test_the_time_limit_saves_the_slots_within_the_budget_and_the_rest_start_over(tmp_path, monkeypatch):
  variant = variants.shrunk(variants.find("memorize", "baseline"), 32)
  jobs = training.jobs(["transformer"], [variant], lrs=(1e-3, 3e-3, 5e-4), weight_decays=(0.1,))
  settings = grid.Settings(results=str(tmp_path / "results.jsonl"), protocol=training.Protocol(epochs=2),
                           state_dir=str(tmp_path / "state"), steps_per_call=1, workers=1,
                           max_slots=2, time_limit=2.5)
  group = grid.group_name(grid.group_key(jobs[0]))
  population = Population(models.mad_config("transformer", variant.vocab_size), False, settings.protocol, 1)
  one_slot = slot_state.slot_bytes(jax.eval_shape(lambda: population.init(32)))
  # Readings: the run's start (1 s), before the group (2 s), the group's first tick (3 s), its first time check (4 s):
  # the limit stops it with two jobs in flight and room for one.
  monkeypatch.setattr(grid, "time", _Clock())
  assert grid.run(dataclasses.replace(settings, state_budget=one_slot + 100), jobs) == 0
  monkeypatch.undo()
  saved = slot_state.load(settings.state_dir, group)
  assert saved["jobs"] == [jobs[0].key] and saved["leaves"][0].shape[0] == 1
  # The saved job resumed in the first slot, the two others queued (the longest first: equal, so in grid order).
  assert grid.run(dataclasses.replace(settings, time_limit=0), jobs) == 3
  assert [(r["lr"], r["slots"], r["steps"]) for r in table.read(settings.results)] == [
      (1e-3, 2, 2), (3e-3, 2, 2), (5e-4, 2, 2)]
  assert not os.listdir(settings.state_dir)


@pytest.mark.slow
def test_the_drain_starts_no_queued_job_near_the_time_limit(tmp_path, monkeypatch):
  """Two slots, three jobs of two steps: with the last 994 of 1,000 s drained, the first two jobs start before the
  drain (readings 1-4 s) and finish inside it; the third never starts and nothing is in flight to save."""
  variant = variants.shrunk(variants.find("memorize", "baseline"), 32)
  jobs = training.jobs(["transformer"], [variant], lrs=(1e-3, 3e-3, 5e-4), weight_decays=(0.1,))
  settings = grid.Settings(results=str(tmp_path / "results.jsonl"), protocol=training.Protocol(epochs=2),
                           state_dir=str(tmp_path / "state"), steps_per_call=1, workers=1,
                           max_slots=2, time_limit=1000, drain=994)
  monkeypatch.setattr(grid, "time", _Clock())
  assert grid.run(settings, jobs) == 2
  monkeypatch.undo()
  assert [r["lr"] for r in table.read(settings.results)] == [1e-3, 3e-3]
  assert not os.listdir(settings.state_dir)
  assert grid.run(dataclasses.replace(settings, time_limit=0), jobs) == 1  # the drained job, in a later run


def test_table_refuses_results_that_mix_settings(tmp_path):
  path = tmp_path / "results.jsonl"
  job = {"architecture": "mesanet", "task": "memorize", "variant": "baseline", "lr": 1e-3, "weight_decay": 0.1,
         "accuracy": 0.5}
  path.write_text("".join(json.dumps(r) + "\n" for r in [job, {**job, "lr": 3e-3, "dtype": "float32"}]))
  assert len(table.read(str(path))) == 2  # a record without dtype was written in f32, the default then
  with open(path, "a") as f:
    f.write(json.dumps({**job, "lr": 1e-4, "dtype": "bfloat16"}) + "\n")
  with pytest.raises(ValueError, match=r"mesanet jobs mix dtype = \"float32\" \(2 jobs\), \"bfloat16\" \(1 jobs\)"):
    table.read(str(path))


@pytest.mark.parametrize("line, problem", [('{"architecture": "mesanet", "task": "memo', "not a JSON record"),
                                           ('{"earlier": "record"}', "not a MAD grid record \\(no 'architecture'\\)"),
                                           ('[1, 2]', "not a MAD grid record")])
def test_table_names_the_line_that_is_not_a_record(tmp_path, line, problem):
  path = tmp_path / "results.jsonl"
  job = {"architecture": "mesanet", "task": "memorize", "variant": "baseline", "lr": 1e-3, "weight_decay": 0.1}
  path.write_text(json.dumps(job) + "\n\n" + line + "\n")
  with pytest.raises(ValueError, match=f"results.jsonl, line 3: {problem}"):
    table.read(str(path))


def test_table_scores_the_mad_lab_way_and_the_paper_way():
  record = lambda task, variant, lr, accuracy: {"architecture": "mesanet", "task": task, "variant": variant,
                                                "lr": lr, "weight_decay": 0.1, "accuracy": accuracy}
  records = [record("memorize", "a", 1, 0.9), record("memorize", "a", 2, 0.1),
             record("memorize", "b", 1, 0.2), record("memorize", "b", 2, 0.8),
             record("in_context_recall", "a", 1, 1.0), record("noisy_recall", "a", 1, 0.5)]
  expected = {"memorize": (["a", "b"], 2), "in_context_recall": (["a"], 1), "noisy_recall": (["a"], 1),
              "fuzzy_recall": (["a"], 1)}
  scores = table.task_scores(records, expected)
  assert scores[("mesanet", "memorize")]["madlab"] == pytest.approx((90 + 80) / 2)  # best per variant, then mean
  assert scores[("mesanet", "memorize")]["paper"] == pytest.approx((90 + 20) / 2)  # best mean over the grid
  row = table.table9(scores)["mesanet"]
  assert row["madlab"][:3] == [pytest.approx(75.0), None, pytest.approx(85.0)] and row["madlab"][5] is None
  assert "| MesaNet (ours, mad-lab score) | 75.0 | — | 85.0 |" in table.markdown(table.table9(scores))
  incomplete = table.task_scores(records[:3], expected)[("mesanet", "memorize")]
  assert incomplete["madlab"] is None and incomplete["missing"] == 1 and incomplete["partial"] == pytest.approx(55)
  # more points than --grid_points asks for: complete, never a negative count; the paper's way over full points only
  one_point = table.task_scores(records, {**expected, "memorize": (["a", "b"], 1)})[("mesanet", "memorize")]
  assert one_point["missing"] == 0 and one_point["madlab"] == pytest.approx(85)
  assert one_point["paper"] == pytest.approx(55)
  lone = table.task_scores(records[:3], {**expected, "memorize": (["a", "b"], 1)})[("mesanet", "memorize")]
  assert lone["madlab"] == pytest.approx(55) and lone["paper"] == pytest.approx(55)


def test_two_results_files_compare_per_variant_over_the_points_both_hold():
  record = lambda variant, lr, accuracy, **settings: {"architecture": "gdn", "task": "fuzzy_recall",
                                                      "variant": variant, "lr": lr, "weight_decay": 0.1,
                                                      "accuracy": accuracy, **settings}
  here = [record("baseline", 1e-3, 0.2), record("baseline", 3e-3, 0.4), record("vocab_size=32", 1e-3, 0.1)]
  there = [record("baseline", 1e-3, 0.6, residual_dtype="float32"),
           record("baseline", 3e-3, 0.3, residual_dtype="float32")]  # no vocab_size=32: not compared
  assert table.setting_differences(here, there) == {"gdn": {"residual_dtype": ("null", '"float32"')}}
  assert table.setting_differences(here, here) == {"gdn": {}}
  rows = table.comparison_markdown(here, there).splitlines()[2:]
  assert rows == ["| gdn | fuzzy_recall | baseline | 2 | 40.0 (0.003, 0.1) | 60.0 (0.001, 0.1) | +20.0 | 30.0 | 45.0 |"]


def test_seeds_of_one_grid_set_side_by_side_per_variant_over_the_points_all_hold():
  record = lambda variant, lr, accuracy, seed: {"architecture": "mesanet", "task": "fuzzy_recall",
                                                "variant": variant, "lr": lr, "weight_decay": 0.1,
                                                "accuracy": accuracy, **({"seed": seed} if seed else {})}
  runs = [[record("baseline", 1e-3, 0.2, 0), record("baseline", 3e-3, 0.8, 0), record("vocab_size=32", 3e-3, 0.5, 0)],
          [record("baseline", 1e-3, 0.3, 1), record("baseline", 3e-3, 0.1, 1)],
          [record("baseline", 1e-3, 0.5, 2), record("baseline", 3e-3, 0.2, 2)]]  # V 32 in one seed: not shown
  lines = table.replicate_markdown(runs).splitlines()
  assert lines[0].startswith("| architecture | task | variant | points | best per seed (0, 1, 2) |")
  # best 80, 30, 50: mean 53.3, sample sd 25.2; the means over the two points 50, 20, 35
  assert lines[2:] == ["| mesanet | fuzzy_recall | baseline | 2 | 80.0 (0.003, 0.1), 30.0 (0.001, 0.1), 50.0 (0.001, "
                       "0.1) | 53.3 ± 25.2 | 50.0, 20.0, 35.0 |"]
