"""Several command-line runs for the price of one process start: `run(cases)` starts `python -m tests.cli_runs` once,
which imports what the CLIs import (jax, flax, orbax, the trainer; ~3 s of CPU per start) and then runs each case
(`python -m <module> <flags>` on <devices> fake CPU devices) in a child forked from it, one after another, as a fresh
process would run it: its own absl flags, backend (no backend is started before the fork, so each child starts one
with its own device count), stdout, stderr and exit code."""
import json
import os
import runpy
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cases: list[tuple], cwd=ROOT, timeout: int = 300) -> list[subprocess.CompletedProcess]:
  """cases: (module, flags, devices); one CompletedProcess per case, in order."""
  from tests.environment import subprocess_env
  cases = [[module, [str(f) for f in flags], devices] for module, flags, devices in cases]
  driver = subprocess.run([sys.executable, "-m", "tests.cli_runs"], input=json.dumps(cases), cwd=cwd,
                          env=subprocess_env(1, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=timeout)
  assert driver.returncode == 0, driver.stdout[-3000:] + driver.stderr[-3000:]
  results = json.loads(driver.stdout.splitlines()[-1])
  return [subprocess.CompletedProcess([sys.executable, "-m", module, *flags], *result)
          for (module, flags, _), result in zip(cases, results)]


def _child(module: str, flags: list[str], devices: int, out: str, err: str) -> int:
  """Runs in the forked child: `python -m module *flags` with its output in the files `out` and `err`; the exit code
  Python would give it."""
  from tests.environment import XLA_FLAGS
  os.environ["XLA_FLAGS"] = XLA_FLAGS + (f" --xla_force_host_platform_device_count={devices}" if devices > 1 else "")
  for fd, path in ((1, out), (2, err)):
    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
  sys.argv = [module, *flags]  # runpy replaces argv[0] by the module's file, as `python -m` does
  try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0
  except SystemExit as e:
    if e.code is None or isinstance(e.code, int):
      return e.code or 0
    print(e.code, file=sys.stderr)
    return 1
  except BaseException:  # noqa: BLE001  uncaught: a traceback and exit code 1, as Python ends a script
    traceback.print_exc()
    return 1


def main():
  import jax  # noqa: F401  the imports every CLI starts with; no backend yet
  import mesanet_jax.eval.runs  # noqa: F401
  import mesanet_jax.train.trainer  # noqa: F401
  from jax._src import xla_bridge
  assert not xla_bridge._backends, "a backend started before the fork"
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
    for module, flags, devices in json.loads(sys.stdin.read()):
      sys.stdout.flush()
      sys.stderr.flush()
      pid = os.fork()
      if pid == 0:
        code = _child(module, flags, devices, out, err)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
      _, status = os.waitpid(pid, 0)
      results.append([os.waitstatus_to_exitcode(status), Path(out).read_text(), Path(err).read_text()])
  print(json.dumps(results))


if __name__ == "__main__":
  main()
