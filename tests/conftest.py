"""Shared test setup: the `x64` fixture, the test XLA flags (tests/environment.py), and one persistent compilation
cache per test session, shared by the pytest processes (xdist workers inherit the environment) and the subprocesses
they start, so that a program several tests compile (a trainer's step, a model's forward) compiles once. The `slow`
marker is registered in pytest.ini."""
import os
import shutil
import tempfile

from tests.environment import XLA_FLAGS

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_FLAGS}".strip()  # before any backend starts

import jax  # noqa: E402
import pytest  # noqa: E402

_CACHE = "JAX_COMPILATION_CACHE_DIR"
_OWN_CACHE = _CACHE not in os.environ  # this process made it (the xdist controller or a plain run): it removes it
if _OWN_CACHE:
  os.environ[_CACHE] = tempfile.mkdtemp(prefix="mesanet-tests-jax-cache-")
jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE])


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(os.environ[_CACHE], ignore_errors=True)


@pytest.fixture
def x64():
  """Runs a test with 64-bit floats enabled, for ground-truth comparisons at tight tolerances."""
  with jax.enable_x64(True):
    yield


def pytest_collection_modifyitems(items):
  """Slow tests first (a stable sort). An xdist worker is handed its next tests a few ahead of time, and pytest.ini's
  loadgroup puts xdist_group-ed modules first; long tests at the end of the queue would leave one worker idle while the
  other runs them, short ones there let both workers finish together."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
