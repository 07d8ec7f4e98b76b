"""Timing of device calls, one rule for every benchmark: back-to-back warm-up calls, then the median of samples, each
sample a run of back-to-back calls lasting at least SAMPLE_S, divided by its calls.

  median_ms(jitted_fn, *args, repeats=7)      # ms per call; the warm-up's first call compiles

A sample blocks only after its last call, so the host's dispatch and the wait for the result overlap the device's
work, as they do in training, and a ~2 ms call is not charged a sync gap of its own. flash-linear-attention's side
of kernel_bench times the same way with CUDA events (`sample_calls` picks the run length for both).
"""
import math
import statistics
import time

import jax

# Seconds of back-to-back calls before timing. On an H100 (12-06) the first variant timed in a process read up to
# 13 % slower than in another process of the same build; a GPU idle through the compile lowering its
# clocks is the likely cause (not verified), which seven ~2 ms calls do not undo.
WARMUP_S = 0.3
# Least seconds of one timed sample. On an H100 (12-06, twentieth session), timed as single calls, two processes read
# the same ~2 ms forward at 2.11 and 1.90 ms (and another variant's at 1.77 and 2.23), while their ~5 ms
# forward+backward agreed within 3 %; whether runs of calls remove that spread is not yet measured.
SAMPLE_S = 0.02


def warm_up(call) -> float:
  """Runs call() (which must block until done) back to back for WARMUP_S seconds, at least twice; returns the
  seconds per call of all but the first (which may compile)."""
  start, calls = time.perf_counter(), 0
  while calls < 2 or time.perf_counter() - start < WARMUP_S:
    call()
    calls += 1
    if calls == 1:
      after_first = time.perf_counter()
  return (time.perf_counter() - after_first) / (calls - 1)


def sample_calls(seconds_per_call: float) -> int:
  """Calls in one timed sample: enough to last SAMPLE_S, at least one."""
  return max(1, math.ceil(SAMPLE_S / max(seconds_per_call, 1e-9)))


def median_ms(fn, *args, repeats: int) -> float:
  """Median over `repeats` samples of the ms per call of fn(*args), after `warm_up`."""
  calls = sample_calls(warm_up(lambda: jax.block_until_ready(fn(*args))))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) * 1e3 / calls)
  return statistics.median(times)
