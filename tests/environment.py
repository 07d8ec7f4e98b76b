"""What every test process runs with: XLA flags for fast compiles, and the environment of the subprocesses tests
start (trainer runs, CLIs, launchers) with N fake CPU devices. tests/conftest.py applies XLA_FLAGS to pytest itself.

Tests compile far more than they compute (tiny shapes, many programs), and most of a compile on CPU is LLVM's
optimisation of the generated code: level 0 skips it (XLA's own HLO passes still run; no fast-math at any level),
cutting the CPU time of compile-heavy tests by ~40 % (measured on tests/models/test_scan_remat.py)."""
import os

XLA_FLAGS = "--xla_backend_optimization_level=0"


def subprocess_env(devices: int = 1, **extra: str) -> dict:
  """os.environ for a subprocess on CPU with `devices` fake devices, the test XLA flags, and `extra` variables; the
  session's compilation cache (JAX_COMPILATION_CACHE_DIR, set by conftest) is inherited."""
  count = f" --xla_force_host_platform_device_count={devices}" if devices > 1 else ""
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=XLA_FLAGS + count, **extra)
