"""A population's slots in flight, saved at the grid's time limit in parts small enough to travel, and loaded back.

A save writes the slots as files `<group>.<save id>.<part>-of-<parts>.pkl`, each at most `part_bytes` and
self-contained (the job keys and arrays of its slots, leading axis = those slots, and the population's shapes).
With a `budget_bytes`, the state directory holds at most that many bytes of saves after this one, every group's
together: the slots furthest along are kept, as many as fit beside the other groups' saves there, and the others
dropped (their jobs start over in the next run). E.g. a call that returns at most 64 MiB of files can carry ~11 MAD
slots of ~5.3 MB (params and two Adam moments of ~440 k f32 each) to the next call or session, however many groups
(or processes sharing the directory, one save at a time) saved them. The state does not compress: lossless
compressors saved 8-15 % of a trained MesaNet population's bytes (zlib; zstd after a byte shuffle), so the parts are
plain pickles of numpy arrays.

Each part is written to a temporary name and renamed; the previous save's parts are removed only after all of the
new ones exist, and `load` reads the newest save whose parts are all there, so a run killed mid-save leaves the
previous save or the new one, never a mix.
"""
import fcntl
import os
import pickle
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

_PART = re.compile(r"(?P<group>.+)\.(?P<save>\d+)\.(?P<part>\d+)-of-(?P<parts>\d+)\.pkl(?P<tmp>\.tmp)?")
_MARGIN = 1 << 16  # bytes of a part that are not array data (pickle framing, shapes, job keys), at most


def host_array(x: jax.Array) -> np.ndarray:
  """x on the host; PRNG keys as their raw key data."""
  return np.asarray(jax.random.key_data(x)) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else np.asarray(x)


def host_shape(x) -> jax.ShapeDtypeStruct:
  """Shape and dtype of `host_array(x)`, without moving anything; x may be abstract."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.eval_shape(jax.random.key_data, x)
  return jax.ShapeDtypeStruct(x.shape, x.dtype)


def slot_bytes(slots) -> int:
  """Bytes a save takes per slot (every leaf has the slots as its leading axis); slots may be abstract."""
  leaves = [host_shape(x) for x in jax.tree.leaves(slots)]
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves) // leaves[0].shape[0]


def _all_files(state_dir: str) -> list[tuple[str, re.Match]]:
  """Every group's part files in state_dir (temporary ones included), with their parsed names."""
  if not os.path.isdir(state_dir):
    return []
  matches = [(name, _PART.fullmatch(name)) for name in os.listdir(state_dir)]
  return [(os.path.join(state_dir, name), match) for name, match in matches if match]


def _files(state_dir: str, group: str) -> list[tuple[str, re.Match]]:
  """The group's part files (temporary ones included), with their parsed names."""
  return [(path, match) for path, match in _all_files(state_dir) if match["group"] == group]


def _newest_saves(state_dir: str) -> dict[str, list[str]]:
  """{group: the part paths of its newest save whose parts are all there, in order}, from one listing."""
  saves: dict[tuple[str, int], dict[int, tuple[str, int]]] = {}
  for path, match in _all_files(state_dir):
    if not match["tmp"]:
      saves.setdefault((match["group"], int(match["save"])), {})[int(match["part"])] = (path, int(match["parts"]))
  newest: dict[str, list[str]] = {}
  for (group, _), parts in sorted(saves.items()):  # a group's saves by id, so its newest complete one wins
    if set(parts) == set(range(len(parts))) and all(count == len(parts) for _, count in parts.values()):
      newest[group] = [parts[k][0] for k in range(len(parts))]
  return newest


def save(state_dir: str, group: str, slots, slot_jobs: list, population: dict | None = None, budget_bytes: int = 0,
         part_bytes: int = 16 << 20) -> tuple[list, list]:
  """Saves the slots whose job is set (slot_jobs[i] not None), furthest along first, as many as fit in `budget_bytes`
  (0: all) beside the other groups' saves in state_dir, in parts of at most `part_bytes` (at least one slot each),
  with `population`, what the shapes of the population they belong to follow from (the grid's {"vocab",
  "num_examples"}; `load`); returns (jobs saved, jobs dropped)."""
  per_slot = slot_bytes(slots)
  steps = np.asarray(slots.step)
  in_flight = sorted((i for i, j in enumerate(slot_jobs) if j is not None), key=lambda i: (-steps[i], i))
  leaves = [host_array(x) for x in jax.tree.leaves(slots)]
  os.makedirs(state_dir, exist_ok=True)
  directory = os.open(state_dir, os.O_RDONLY)
  try:
    fcntl.flock(directory, fcntl.LOCK_EX)  # processes sharing the directory save one at a time, each within the rest
    bound = room(state_dir, group, budget_bytes)
    kept = in_flight if bound is None else in_flight[:bound // per_slot]
    per_part = max(1, (part_bytes - _MARGIN) // per_slot)
    chunks = [kept[k:k + per_part] for k in range(0, len(kept), per_part)]
    previous = _files(state_dir, group)
    save_id = max([time.time_ns()] + [int(match["save"]) + 1 for _, match in previous])
    for k, chunk in enumerate(chunks):
      path = os.path.join(state_dir, f"{group}.{save_id}.{k}-of-{len(chunks)}.pkl")
      with open(path + ".tmp", "wb") as f:
        pickle.dump({"jobs": [slot_jobs[i].key for i in chunk], "leaves": [x[chunk] for x in leaves],
                     "population": population or {}}, f)
      os.replace(path + ".tmp", path)
    for path, _ in previous:
      os.remove(path)
  finally:
    os.close(directory)  # releases the lock
  return [slot_jobs[i] for i in kept], [slot_jobs[i] for i in in_flight[len(kept):]]


def room(state_dir: str, group: str, budget_bytes: int) -> int | None:
  """Bytes a save of `group` may take within `budget_bytes` beside the newest complete saves of the other groups in
  state_dir (None: no bound, budget_bytes 0)."""
  if not budget_bytes:
    return None
  others = [path for other, paths in _newest_saves(state_dir).items() if other != group for path in paths]
  return max(budget_bytes - sum(os.path.getsize(path) for path in others), 0)


def exists(state_dir: str, group: str) -> bool:
  """Whether the group has a complete save to load."""
  return group in _newest_saves(state_dir)


def load(state_dir: str, group: str) -> dict | None:
  """The group's newest complete save: {"jobs": job keys, "leaves": arrays with the saved slots as leading axis,
  "population": `save`'s (empty for saves written before it was recorded)}, or None if there is none."""
  loaded = []
  for path in _newest_saves(state_dir).get(group, []):
    with open(path, "rb") as f:
      loaded.append(pickle.load(f))
  if not loaded:
    return None
  return {"jobs": [key for part in loaded for key in part["jobs"]],
          "leaves": [np.concatenate(xs) for xs in zip(*(part["leaves"] for part in loaded))],
          "population": loaded[0].get("population", {})}


def remove(state_dir: str, group: str):
  """Removes every save of the group (its jobs are done), incomplete ones too."""
  for path, _ in _files(state_dir, group):
    os.remove(path)
