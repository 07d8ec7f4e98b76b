"""Where a jitted call's device time goes: the kernels it launched, read from a JAX profiler trace.

`kernel_times(fn, *args)` runs fn once under `jax.profiler` and `read_trace(directory)` sums the device events of
every stream by kernel name, with the HLO instructions XLA recorded for each (`jax.profiler.ProfileData`, no
TensorBoard needed). Used by the benchmarks to tell a launch- or host-bound program (kernel time ≪ wall time) from a
kernel-bound one, and which kernels to work on; `hlo_sources.py` says what each kernel computes.
"""
import collections
import dataclasses
import glob
import os
import tempfile
import time

import jax


@dataclasses.dataclass(frozen=True)
class KernelTimes:
  """One profiled call: wall seconds; per kernel name (launches, total device seconds) and the HLO instructions its
  launches ran (the events' `hlo_op`: a library kernel such as a cuBLAS GEMM is named for itself, not its fusion)."""
  wall_s: float
  kernels: dict[str, tuple[int, float]]
  hlo_ops: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

  @property
  def device_s(self) -> float:
    return sum(seconds for _, seconds in self.kernels.values())

  @property
  def launches(self) -> int:
    return sum(count for count, _ in self.kernels.values())

  def busiest(self, top: int) -> list[tuple[str, int, float]]:
    """(name, launches, device seconds) of the `top` kernels by device time."""
    ranked = sorted(self.kernels.items(), key=lambda item: -item[1][1])
    return [(name, count, seconds) for name, (count, seconds) in ranked[:top]]

  def summary(self, per: int = 1, unit: str = "call", top: int = 12) -> str:
    """A few lines: wall and summed kernel time and launches per `unit` (the call divided by `per`), then the `top`
    kernels by device time."""
    us = lambda seconds: f"{seconds / per * 1e6:,.1f} µs"
    lines = [f"per {unit}: wall {us(self.wall_s)}, kernels {us(self.device_s)} in {self.launches / per:,.1f} launches"
             f" ({self.device_s / max(self.wall_s, 1e-12):.0%} of the wall time busy)"]
    for name, count, seconds in self.busiest(top):
      lines.append(f"  {us(seconds):>12} {count / per:8.1f}×  {name[:110]}")
    return "\n".join(lines)


def read_trace(directory: str) -> tuple[dict[str, tuple[int, float]], dict[str, tuple[str, ...]]]:
  """({kernel: (launches, device seconds)}, {kernel: its events' hlo_op values, sorted}) of the newest profile under
  `directory`: every event on a device plane's stream lines (kernels and copies; not the derived "XLA Ops" / "Steps"
  lines, which repeat them)."""
  paths = glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)
  if not paths:
    raise RuntimeError(f"the profiler wrote no .xplane.pb under {directory}")
  data = jax.profiler.ProfileData.from_file(max(paths, key=os.path.getmtime))
  kernels, hlo_ops = collections.defaultdict(lambda: [0, 0.0]), collections.defaultdict(set)
  for plane in data.planes:
    if not plane.name.startswith("/device:"):
      continue
    for line in plane.lines:
      if not line.name.startswith("Stream"):
        continue
      for event in line.events:
        kernels[event.name][0] += 1
        kernels[event.name][1] += event.duration_ns * 1e-9
        hlo_ops[event.name].update(value for name, value in event.stats if name == "hlo_op")
  return ({name: (count, seconds) for name, (count, seconds) in kernels.items()},
          {name: tuple(sorted(hlo_ops[name])) for name in kernels})


def kernel_times(fn, *args, trace_dir: str = "") -> KernelTimes:
  """Runs fn(*args) (compile it first: a compile inside the trace is counted as wall time) once under the profiler;
  the trace goes to `trace_dir` and stays there for Perfetto / TensorBoard, or to a temporary directory."""
  with tempfile.TemporaryDirectory() as temporary:
    directory = trace_dir or temporary
    jax.profiler.start_trace(directory)
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    wall = time.perf_counter() - start
    jax.profiler.stop_trace()
    return KernelTimes(wall, *read_trace(directory))
