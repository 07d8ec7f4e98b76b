"""Which grid process trains a group: a claim file per group in the shared state directory.

Several `mesanet-mad-grid` processes may share one results file and state directory (one per GPU of a host, or on
several hosts over a shared file system), each given the same or overlapping selections. Before training a group a
process claims it: it creates `<state_dir>/<group>.claim` (exclusively, so one of two racing processes wins), holding
its host and pid. The others skip that group while its holder lives. A claim whose holder is gone (same host, no such
pid) is stale: it is renamed aside (one taker wins the rename) and taken. A holder on another host cannot be checked
from here, so its claim counts as live: if that process is gone, remove the file.
"""
import json
import os
import socket


def path(state_dir: str, group: str) -> str:
  """The group's claim file."""
  return os.path.join(state_dir, f"{group}.claim")


def holder(state_dir: str, group: str) -> dict | None:
  """The claim's {"host", "pid"}, or None where the group is unclaimed (an unreadable claim: {} — being written)."""
  try:
    with open(path(state_dir, group)) as f:
      return json.loads(f.read() or "{}")
  except FileNotFoundError:
    return None
  except json.JSONDecodeError:
    return {}


def _ours(claim: dict) -> bool:
  return claim.get("host") == socket.gethostname() and claim.get("pid") == os.getpid()


def _alive(claim: dict) -> bool:
  if claim.get("host") != socket.gethostname():
    return True  # cannot be checked from this host (or is still being written)
  try:
    os.kill(int(claim["pid"]), 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def take(state_dir: str, group: str) -> bool:
  """Claims the group for this process; False if a live process holds it."""
  os.makedirs(state_dir, exist_ok=True)
  claim_path = path(state_dir, group)
  for _ in range(2):
    try:
      fd = os.open(claim_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      current = holder(state_dir, group)
      if current is None:
        continue  # released meanwhile
      if _ours(current):
        return True
      if _alive(current):
        return False
      aside = f"{claim_path}.stale.{os.getpid()}"
      try:  # stale: renamed aside by exactly one taker
        os.replace(claim_path, aside)
      except FileNotFoundError:
        return False  # another process took it over first
      with open(aside) as f:
        moved = f.read()
      if moved != json.dumps(current):  # a taker's fresh claim, not the stale one: put it back
        try:
          os.link(aside, claim_path)
        except FileExistsError:
          pass  # taken again meanwhile
        os.remove(aside)
        return False
      os.remove(aside)
      continue
    with os.fdopen(fd, "w") as f:
      f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    return True
  return False


def release(state_dir: str, group: str) -> None:
  """Removes this process's claim on the group (nothing if another holds it)."""
  current = holder(state_dir, group)
  if current and _ours(current):
    os.remove(path(state_dir, group))
