"""Wall-clock timing of device calls, one rule for every benchmark: back-to-back warm-up calls, then the median.

  median_ms(jitted_fn, *args, repeats=7)      # ms; the warm-up's first call compiles
"""
import statistics
import time

import jax

# Seconds of back-to-back calls before timing. On an H100 (12-06) the first variant timed in a process read up to
# 13 % slower than in another process of the same build; a GPU idle through the compile lowering its
# clocks is the likely cause (not verified), which seven ~2 ms calls do not undo.
WARMUP_S = 0.3


def warm_up(call):
  """Runs call() (which must block until done) back to back for WARMUP_S seconds, at least twice."""
  start, calls = time.perf_counter(), 0
  while calls < 2 or time.perf_counter() - start < WARMUP_S:
    call()
    calls += 1


def median_ms(fn, *args, repeats: int) -> float:
  """Median wall time of fn(*args) in ms over `repeats` calls, after `warm_up`."""
  warm_up(lambda: jax.block_until_ready(fn(*args)))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)
