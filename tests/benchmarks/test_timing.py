"""benchmarks/timing.py: a sample is a run of back-to-back calls lasting at least SAMPLE_S, reported per call."""
import time

import jax.numpy as jnp

from benchmarks import timing


def test_sample_calls_fill_the_sample_and_never_drop_to_zero():
  assert timing.sample_calls(timing.SAMPLE_S / 10) == 10
  assert timing.sample_calls(timing.SAMPLE_S / 2.5) == 3  # rounded up: a sample lasts at least SAMPLE_S
  assert timing.sample_calls(10 * timing.SAMPLE_S) == 1
  assert timing.sample_calls(0.0) >= 1


def test_median_ms_is_per_call_and_calls_back_to_back(monkeypatch):
  monkeypatch.setattr(timing, "WARMUP_S", 0.01)
  monkeypatch.setattr(timing, "SAMPLE_S", 0.05)
  calls = []

  def two_ms_call(x):
    calls.append(x)
    time.sleep(0.002)
    return jnp.asarray(x)

  ms = timing.median_ms(two_ms_call, 1.0, repeats=3)
  # Per call: a sleep lasts at least its time, and a sample (≥ 50 ms) would read 25 ms or more even if a loaded host
  # stretched each call to 25 ms and the sample to two calls.
  assert 2.0 <= ms < 25.0
  assert len(calls) >= 2 + 3 * 2  # the warm-up's two at least, then 3 samples of several calls
