"""What every test process runs with: XLA flags for fast compiles, and the environment of the subprocesses tests
start (trainer runs, CLIs, launchers) with N fake CPU devices. tests/conftest.py applies XLA_FLAGS to pytest itself.

Tests compile far more than they compute (tiny shapes, many programs), and most of a compile on CPU is LLVM's
optimisation of the generated code: level 0 skips it (XLA's own HLO passes still run; no fast-math at any level),
cutting the CPU time of compile-heavy tests by ~40 % (measured on tests/models/test_scan_remat.py)."""
import os

XLA_FLAGS = "--xla_backend_optimization_level=0"


# Subprocesses cache every program that took over 0.1 s to compile, not only those over jax's default 1 s: the test
# subprocesses are mostly trainer and CLI runs of the same tiny configs, whose init, step and eval programs each
# compile in under a second and would otherwise compile again in every run (a repeated tiny trainer run: 6.5 s ->
# 4.8 s). The pytest processes keep the default: their many one-off eager ops would only fill the cache.
SUBPROCESS_CACHE_MIN_COMPILE_SECS = "0.1"


def subprocess_env(devices: int = 1, **extra: str) -> dict:
  """os.environ for a subprocess on CPU with `devices` fake devices, the test XLA flags, and `extra` variables; the
  session's compilation cache (JAX_COMPILATION_CACHE_DIR, set by conftest) is inherited, with a lower threshold."""
  count = f" --xla_force_host_platform_device_count={devices}" if devices > 1 else ""
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=XLA_FLAGS + count,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=SUBPROCESS_CACHE_MIN_COMPILE_SECS, **extra)
