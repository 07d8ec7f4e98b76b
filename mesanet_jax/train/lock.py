"""One trainer per workdir: `<workdir>/trainer.lock`, held with `fcntl.flock` for the whole run.

The file records who holds it (user, host, pid, start time). flock is released by the kernel when its holder dies
(SIGKILL included), so a lock file left behind by a dead trainer is taken over (with a message naming the old
holder), while a live one is refused. On a clean exit the file is removed. NFS ≥ v4 maps flock onto its own locks,
so a workdir shared by several hosts is covered too. Only the trainer locks; mesanet-eval / -export / -generate
only read (config.json is replaced atomically, orbax publishes a checkpoint by renaming its finished directory).
"""
import fcntl
import getpass
import json
import os
import socket
import time

LOCK_FILE = "trainer.lock"


class WorkdirBusy(ValueError):
  """Another live process holds the workdir's lock."""


def _describe(path: str) -> str:
  try:
    with open(path) as f:
      owner = json.load(f)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(owner["start_time"]))
    return f"pid {owner['pid']} on {owner['host']} (user {owner['user']}, started {started})"
  except (OSError, ValueError, KeyError, TypeError):
    return "an unknown process (unreadable lock file)"


class WorkdirLock:
  """Takes `<workdir>/trainer.lock` or raises WorkdirBusy; `release()` (or leaving a `with` block) gives it back
  and removes the file."""

  def __init__(self, workdir: str, say=print):
    self.path = os.path.join(workdir, LOCK_FILE)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        raise WorkdirBusy(f"{os.path.dirname(self.path)} is in use by another trainer: {_describe(self.path)}; "
                          f"wait for it or use another --workdir") from None
      try:  # the holder we waited on may have removed the file after we opened it: lock the file at the path
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    if os.fstat(fd).st_size:
      say(f"taking over the stale lock of {_describe(self.path)}, which is no longer running")
    owner = {"user": getpass.getuser(), "host": socket.gethostname(), "pid": os.getpid(), "start_time": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(owner).encode() + b"\n", 0)
    self.fd = fd

  def __enter__(self):
    return self

  def __exit__(self, *_):
    self.release()

  def release(self) -> None:
    if self.fd is None:
      return
    os.unlink(self.path)  # before unlocking: a waiting trainer then re-opens the path and finds its own file
    fcntl.flock(self.fd, fcntl.LOCK_UN)
    os.close(self.fd)
    self.fd = None
