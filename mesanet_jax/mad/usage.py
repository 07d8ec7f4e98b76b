"""The MAD grid's device time: one JSONL line per group run (`record`: its wall time from the group's start to its
stop, data waits, compiles and evaluations included, divided by the processes that shared the device), the hours
per architecture so far (`summary`), and what the jobs not yet run would take at the rates measured so far
(`projection`).

A projection scales each job left by the share of its steps that the finished jobs of its architecture and task
ran before early stopping (of its task over all architectures where its own has none yet; all its steps where
neither has a finished job), and costs it at its architecture's device seconds per member-token (a member-step of
one slot times the sequence length: a population's step costs about its tokens).
"""
import collections
import json
import os
import time

import jax


def record(path: str, *, group: str, architecture: str, length: int, seconds: float, member_steps: int,
           jobs_finished: int, slots: int, device_share: int = 1) -> None:
  """Appends one group run's device time to the JSONL at `path` (created with its directory)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  line = {"group": group, "architecture": architecture, "length": length, "seconds": seconds,
          "device_seconds": seconds / device_share, "device_share": device_share, "member_steps": member_steps,
          "member_tokens": member_steps * length, "jobs_finished": jobs_finished, "slots": slots,
          "device": jax.devices()[0].device_kind, "finished_at": time.time()}
  with open(path, "a") as f:
    f.write(json.dumps(line) + "\n")


def read(path: str) -> list[dict]:
  """The recorded group runs ([] where there is no file yet)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def summary(rows: list[dict]) -> dict:
  """{architecture: {"device_hours", "member_tokens", "jobs_finished", "runs", "devices"}} of the recorded runs."""
  totals = collections.defaultdict(lambda: {"device_hours": 0.0, "member_tokens": 0, "jobs_finished": 0, "runs": 0,
                                            "devices": set()})
  for row in rows:
    total = totals[row["architecture"]]
    total["device_hours"] += row["device_seconds"] / 3600
    total["member_tokens"] += row["member_tokens"]
    total["jobs_finished"] += row["jobs_finished"]
    total["runs"] += 1
    total["devices"].add(row["device"])
  return {arch: {**t, "devices": sorted(t["devices"])} for arch, t in totals.items()}


def step_shares(records: list[dict]) -> tuple[dict, dict]:
  """({(architecture, task): share}, {task: share}): the finished jobs' steps over their no-early-stop steps."""
  by_arch, by_task = collections.defaultdict(lambda: [0, 0]), collections.defaultdict(lambda: [0, 0])
  for r in records:
    for sums in (by_arch[(r["architecture"], r["task"])], by_task[r["task"]]):
      sums[0] += r["steps"]
      sums[1] += r["total_steps"]
  share = lambda sums: {key: ran / total for key, (ran, total) in sums.items() if total}
  return share(by_arch), share(by_task)


def projection(rows: list[dict], records: list[dict], jobs_left: list, protocol) -> dict:
  """{architecture: {"jobs_left", "member_tokens", "device_hours"}} for `jobs_left` (training.Job) at the rates of
  the recorded runs; device_hours is None for an architecture with no recorded run."""
  by_arch, by_task = step_shares(records)
  rate = {arch: t["device_hours"] / t["member_tokens"] for arch, t in summary(rows).items() if t["member_tokens"]}
  left = collections.defaultdict(lambda: {"jobs_left": 0, "member_tokens": 0.0})
  for job in jobs_left:
    share = by_arch.get((job.architecture, job.variant.task), by_task.get(job.variant.task, 1.0))
    entry = left[job.architecture]
    entry["jobs_left"] += 1
    entry["member_tokens"] += share * job.steps(protocol) * job.variant.seq_len
  return {arch: {**entry, "device_hours": entry["member_tokens"] * rate[arch] if arch in rate else None}
          for arch, entry in left.items()}
