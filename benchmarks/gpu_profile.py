"""Where a jitted call's device time goes: the kernels it launched, read from a JAX profiler trace.

`kernel_times(fn, *args)` runs fn once under `jax.profiler` and sums the device events of every stream by kernel
name (`jax.profiler.ProfileData`, no TensorBoard needed). Used by the benchmarks to tell a launch- or host-bound
program (kernel time ≪ wall time) from a kernel-bound one, and which kernels to work on. `launches_per_step(hlo)`
counts the kernels of a compiled decode loop's body from its HLO text.
"""
import collections
import dataclasses
import glob
import os
import re
import tempfile
import time

import jax


@dataclasses.dataclass(frozen=True)
class KernelTimes:
  """One profiled call: wall seconds, and per kernel name (launches, total device seconds)."""
  wall_s: float
  kernels: dict[str, tuple[int, float]]

  @property
  def device_s(self) -> float:
    return sum(seconds for _, seconds in self.kernels.values())

  @property
  def launches(self) -> int:
    return sum(count for count, _ in self.kernels.values())

  def summary(self, per: int = 1, unit: str = "call", top: int = 12) -> str:
    """A few lines: wall and summed kernel time and launches per `unit` (the call divided by `per`), then the `top`
    kernels by device time."""
    us = lambda seconds: f"{seconds / per * 1e6:,.1f} µs"
    lines = [f"per {unit}: wall {us(self.wall_s)}, kernels {us(self.device_s)} in {self.launches / per:,.1f} launches"
             f" ({self.device_s / max(self.wall_s, 1e-12):.0%} of the wall time busy)"]
    ranked = sorted(self.kernels.items(), key=lambda item: -item[1][1])
    for name, (count, seconds) in ranked[:top]:
      lines.append(f"  {us(seconds):>12} {count / per:8.1f}×  {name[:110]}")
    return "\n".join(lines)


def kernel_times(fn, *args) -> KernelTimes:
  """Runs fn(*args) (compile it first: a compile inside the trace is counted as wall time) once under the profiler."""
  with tempfile.TemporaryDirectory() as directory:
    jax.profiler.start_trace(directory)
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    wall = time.perf_counter() - start
    jax.profiler.stop_trace()
    paths = glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)
    if not paths:
      raise RuntimeError(f"the profiler wrote no .xplane.pb under {directory}")
    data = jax.profiler.ProfileData.from_file(paths[0])
    kernels = collections.defaultdict(lambda: [0, 0.0])
    for plane in data.planes:
      if not plane.name.startswith("/device:"):
        continue
      for line in plane.lines:
        if not line.name.startswith("Stream"):  # kernels and copies; skip the derived "XLA Ops" / "Steps" lines
          continue
        for event in line.events:
          kernels[event.name][0] += 1
          kernels[event.name][1] += event.duration_ns * 1e-9
  return KernelTimes(wall, {name: (count, seconds) for name, (count, seconds) in kernels.items()})


_NOT_KERNELS = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "call", "while", "conditional",
                "after-all", "opt-barrier", "partition-id", "replica-id", "add-dependency"}


def launches_per_step(hlo: str) -> str:
  """Kernels per decode step: the instructions of the decode scan's loop body that run as kernels (descending into
  calls, e.g. command buffers), and the while loops nested in it (each a device round trip per iteration)."""
  computations, name = {}, None
  for line in hlo.splitlines():
    line = re.sub(r"/\*index=\d+\*/", "", line)  # tuple shapes of 5+ elements carry these comments
    if m := re.match(r"(?:ENTRY )?%?([\w.\-]+) .*\{$", line):
      name, computations[m.group(1)] = m.group(1), []
    elif name and (m := re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = (?:\([^=]*?\)|\S+) ([a-z][\w\-]*)\((.*)", line)):
      computations[name].append((m.group(1), m.group(2)))

  def count(computation):
    kernels, loops = 0, 0
    for opcode, rest in computations.get(computation, []):
      if opcode == "call":
        inner = count(re.search(r"to_apply=%?([\w.\-]+)", rest).group(1))
        kernels, loops = kernels + inner[0], loops + inner[1]
      elif opcode == "while":
        loops += 1
      elif opcode not in _NOT_KERNELS:
        kernels += 1
    return kernels, loops

  bodies = [re.search(r"body=%?([\w.\-]+)", rest).group(1) for c in computations.values() for op, rest in c
            if op == "while"]
  if not bodies:
    return "no loop (the scan was unrolled)"
  kernels, loops = max(count(body) for body in bodies)  # the scan: the outermost, largest body
  return f"{kernels} kernels + {loops} nested while loops"
