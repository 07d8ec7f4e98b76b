"""Saved slots: parts within their size, the slots furthest along kept within a budget shared by every group's saves,
the population's shapes kept, the newest complete save loaded (a save cut short leaves the previous one), one
group's files never another's; a saved group trains first (and the dry run's plan lists it first)."""
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import pickle

import jax
import numpy as np

from mesanet_jax.mad import grid, slot_state, training, variants
from mesanet_jax.mad.population import Slots

VARIANT = variants.Variant("in_context_recall", "tiny", 0, vocab_size=16, seq_len=16, num_train_examples=64,
                           num_test_examples=32)
PARAM_BYTES = 3 * 1000 * 4  # per slot: params and two Adam moments of 1,000 f32 each


def _slots(steps: list[int], offset: float = 0.0) -> Slots:
  """Slots of numpy arrays (what a save reads) with one PRNG key per slot; slot i's params hold i + offset."""
  n = len(steps)
  values = np.arange(n, dtype=np.float32)[:, None] + offset
  params = {"w": np.broadcast_to(values, (n, 1000)).copy()}
  opt_state = ({"mu": params["w"] * 2}, {"nu": params["w"] * 3})
  ints = lambda v: np.full(n, v, np.int32)
  return Slots(params, opt_state, np.asarray(steps, np.int32), ints(100), ints(2), ints(0), ints(16),
               np.full(n, 1e-3, np.float32), np.full(n, 0.1, np.float32), np.ones(n, bool),
               np.zeros((n, 64), np.int32), jax.random.split(jax.random.key(0), n),
               np.full(n, np.inf, np.float32), *(np.zeros(n, np.float32) for _ in range(3)), ints(0))


def _jobs(n: int) -> list:
  return [training.Job("mesanet", VARIANT, lr, 0.1) for lr in (3e-3, 1e-3, 5e-4, 1e-4)[:n]]


def test_every_slot_in_flight_saved_in_parts_and_loaded_back(tmp_path):
  slots, jobs = _slots([5, 7, 0, 6]), _jobs(4)
  per_slot = slot_state.slot_bytes(slots)
  assert PARAM_BYTES < per_slot < PARAM_BYTES + 64 * 4 + 100  # + the epoch order and a few scalars
  part_bytes = 2 * per_slot + (1 << 16)  # two slots a part
  kept, dropped = slot_state.save(str(tmp_path), "mesanet.lm.L16", slots, [jobs[0], None, jobs[2], jobs[3]],
                                  part_bytes=part_bytes)
  assert kept == [jobs[3], jobs[0], jobs[2]] and dropped == []  # steps 6, 5, 0: furthest along first
  files = sorted(os.listdir(tmp_path))
  assert len(files) == 2 and all(os.path.getsize(tmp_path / f) <= part_bytes for f in files)
  saved = slot_state.load(str(tmp_path), "mesanet.lm.L16")
  assert saved["jobs"] == [j.key for j in kept]
  for x, y in zip(saved["leaves"], jax.tree.leaves(slots)):
    np.testing.assert_array_equal(x, slot_state.host_array(y)[[3, 0, 2]])
  assert slot_state.load(str(tmp_path), "mesanet.lm.L1") is None  # another group's name: a prefix of this one
  slot_state.remove(str(tmp_path), "mesanet.lm.L1")
  assert len(os.listdir(tmp_path)) == 2
  slot_state.remove(str(tmp_path), "mesanet.lm.L16")
  assert os.listdir(tmp_path) == []


def test_a_budget_keeps_the_slots_furthest_along(tmp_path):
  slots, jobs = _slots([5, 7, 1, 6]), _jobs(4)
  budget = 2 * slot_state.slot_bytes(slots) + 100
  kept, dropped = slot_state.save(str(tmp_path), "g", slots, jobs, budget_bytes=budget)
  assert kept == [jobs[1], jobs[3]] and dropped == [jobs[0], jobs[2]]
  np.testing.assert_array_equal(slot_state.load(str(tmp_path), "g")["leaves"][0][:, 0], [1, 3])  # slots 1 and 3
  assert slot_state.save(str(tmp_path), "g", slots, jobs, budget_bytes=100) == ([], [jobs[1], jobs[3], jobs[0],
                                                                                      jobs[2]])
  assert slot_state.load(str(tmp_path), "g") is None  # nothing fit: the previous save is gone too


def test_a_budget_bounds_every_groups_saves_together_and_a_save_keeps_its_population_shapes(tmp_path):
  # A device call returns the whole state directory: one group's save takes only the room the others leave.
  slots, jobs, state = _slots([5, 7, 1, 6]), _jobs(4), str(tmp_path)
  per_slot = slot_state.slot_bytes(slots)
  assert slot_state.save(state, "a.lm.L16", _slots([3, 4]), _jobs(2), {"vocab": 16})[1] == []
  a_bytes = sum(os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path))
  budget = a_bytes + 2 * per_slot + 1000  # room for two slots of "b" (and a part's framing)
  assert slot_state.room(state, "b.lm.L16", budget) == budget - a_bytes
  kept, dropped = slot_state.save(state, "b.lm.L16", slots, jobs, {"vocab": 32, "num_examples": 64}, budget)
  assert kept == [jobs[1], jobs[3]] and dropped == [jobs[0], jobs[2]]
  assert slot_state.load(state, "a.lm.L16")["population"] == {"vocab": 16}
  assert slot_state.load(state, "b.lm.L16")["population"] == {"vocab": 32, "num_examples": 64}
  # A group's own previous save is replaced, so it does not count against it; "b"'s does.
  assert len(slot_state.save(state, "a.lm.L16", slots, jobs, budget_bytes=budget)[0]) == 2
  assert slot_state.save(state, "c.lm.L16", slots, jobs, budget_bytes=budget)[0] == []  # no room left: none saved
  assert slot_state.room(state, "c.lm.L16", 0) is None and len(slot_state.save(state, "c.lm.L16", slots, jobs)[0]) == 4


def _save_four_slots(state_dir: str, group: str, budget: int) -> int:
  """In another process: saves four slots of `group` within `budget`; returns how many were kept."""
  return len(slot_state.save(state_dir, group, _slots([1, 2, 3, 4]), _jobs(4), budget_bytes=budget)[0])


def test_processes_saving_at_once_share_the_budget(tmp_path):
  # One grid process per GPU, all stopped by the same time limit: their saves take turns, each within what is left.
  budget = 5 * slot_state.slot_bytes(_slots([1])) + 4000  # five slots in all (and the parts' framing)
  with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
    kept = list(pool.map(_save_four_slots, [str(tmp_path)] * 2, ["a.lm.L16", "b.lm.L16"], [budget] * 2))
  assert sorted(kept) == [1, 4]
  assert sum(os.path.getsize(tmp_path / name) for name in os.listdir(tmp_path)) <= budget


def test_a_save_written_before_the_population_was_recorded_loads_with_an_empty_one(tmp_path):
  slot_state.save(str(tmp_path), "g", _slots([1]), _jobs(1), {"vocab": 16})
  [name] = os.listdir(tmp_path)
  with open(tmp_path / name, "rb") as f:
    part = pickle.load(f)
  del part["population"]
  with open(tmp_path / name, "wb") as f:
    pickle.dump(part, f)
  assert slot_state.load(str(tmp_path), "g")["population"] == {}


def test_the_newest_complete_save_is_loaded(tmp_path):
  jobs = _jobs(4)
  slot_state.save(str(tmp_path), "g", _slots([1, 1, 1, 1]), jobs)
  part_bytes = slot_state.slot_bytes(_slots([1])) + (1 << 16)  # one slot a part
  slot_state.save(str(tmp_path), "g", _slots([2, 2, 2, 2], offset=10), jobs, part_bytes=part_bytes)
  files = sorted(os.listdir(tmp_path))
  assert len(files) == 4  # the first save's file removed once the second's four exist
  np.testing.assert_array_equal(slot_state.load(str(tmp_path), "g")["leaves"][0][:, 0], [10, 11, 12, 13])
  # A save cut short after two of its parts: the earlier complete save stands; a part still being written is ignored.
  newer = int(files[0].split(".")[1]) + 1
  for k in range(2):
    os.link(tmp_path / files[k], tmp_path / f"g.{newer}.{k}-of-4.pkl")
  os.link(tmp_path / files[2], tmp_path / f"g.{newer}.2-of-4.pkl.tmp")
  np.testing.assert_array_equal(slot_state.load(str(tmp_path), "g")["leaves"][0][:, 0], [10, 11, 12, 13])
  slot_state.save(str(tmp_path), "g", _slots([3], offset=20), jobs[:1])  # the next save removes every older file
  assert len(os.listdir(tmp_path)) == 1
  assert slot_state.load(str(tmp_path), "g")["leaves"][0][:, 0].tolist() == [20]


def test_parts_of_a_save_with_a_part_missing_are_not_loaded(tmp_path):
  part_bytes = slot_state.slot_bytes(_slots([1])) + (1 << 16)
  slot_state.save(str(tmp_path), "g", _slots([1, 1]), _jobs(2), part_bytes=part_bytes)
  os.remove(tmp_path / sorted(os.listdir(tmp_path))[1])
  assert slot_state.load(str(tmp_path), "g") is None


def test_slot_bytes_is_what_a_save_writes(tmp_path):
  slots = _slots([1, 2, 3])
  slot_state.save(str(tmp_path), "g", slots, _jobs(3))
  written = sum(os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path))
  assert 3 * slot_state.slot_bytes(slots) <= written <= 3 * slot_state.slot_bytes(slots) + (1 << 16)


def test_a_saved_group_trains_first_then_by_architecture_and_cost(tmp_path):
  jobs = training.jobs(["mesanet", "gdn"], [variants.find("memorize", "baseline"), variants.find("compress",
                                                                                                  "baseline")])
  groups = {}
  for job in jobs:
    groups.setdefault(grid.group_key(job), []).append(job)
  settings = grid.Settings(results="", state_dir=str(tmp_path))
  names = lambda: [grid.group_name(k) for k in grid.group_order(settings, groups, ["gdn", "mesanet"])]
  assert names() == ["gdn.lm.L32", "gdn.autoencoder.L32", "mesanet.lm.L32", "mesanet.autoencoder.L32"]
  slot_state.save(str(tmp_path), "mesanet.autoencoder.L32", _slots([3]), _jobs(1))
  assert names() == ["mesanet.autoencoder.L32", "gdn.lm.L32", "gdn.autoencoder.L32", "mesanet.lm.L32"]
  settings = dataclasses.replace(settings, longest_first=True)  # for processes sharing the groups (one per GPU)
  assert names() == ["mesanet.autoencoder.L32", "gdn.autoencoder.L32", "gdn.lm.L32", "mesanet.lm.L32"]


def test_the_dry_run_plan_lists_the_groups_in_training_order(tmp_path):
  chosen = [variants.find("memorize", "baseline"), variants.find("compress", "baseline")]
  jobs = training.jobs(["mesanet"], chosen, lrs=(1e-3, 3e-3), weight_decays=(0.1,))
  results = tmp_path / "results.jsonl"
  settings = grid.Settings(results=str(results), state_dir=str(tmp_path / "state"), max_slots=4)
  results.write_text(json.dumps({"architecture": "mesanet", "task": "memorize", "variant": "baseline", "lr": 1e-3,
                                 "weight_decay": 0.1, "accuracy": 0.5, **grid.protocol_settings(settings)}) + "\n")
  compress = [j for j in jobs if j.variant.task == "compress"]
  slot_state.save(settings.state_dir, "mesanet.autoencoder.L32", _slots([3]), compress[:1])
  assert grid.plan(settings, jobs) == [
      {"group": "mesanet.autoencoder.L32", "jobs": 2, "longest": 80_000, "slots": 2, "population_steps": 80_000,
       "saved": 1},
      {"group": "mesanet.lm.L32", "jobs": 1, "longest": 1_600, "slots": 1, "population_steps": 1_600, "saved": 0}]
