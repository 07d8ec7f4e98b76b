"""Every console script of the installed package loads outside the checkout: its module and the modules it imports
resolve through the installed names (`mesanet_experiments`), not through the checkout's `experiments/` on sys.path."""
import json
import subprocess
import sys

from tests.environment import subprocess_env

# Each script is loaded in a forked child of its own (their absl flags share one registry per process); the heavy
# libraries are imported once before the forks.
_LOAD_ALL = """
import json, os, sys, traceback
from importlib.metadata import distribution
import jax, flax, optax, orbax.checkpoint
loaded = []
for script in [e for e in distribution("mesanet-jax").entry_points if e.group == "console_scripts"]:
  child = os.fork()
  if child == 0:
    try:
      script.load()
    except BaseException:
      traceback.print_exc()
      os._exit(1)
    os._exit(0)
  _, status = os.waitpid(child, 0)
  if os.waitstatus_to_exitcode(status) != 0:
    sys.exit(f"{script.name} ({script.value}) does not load")
  loaded.append(script.name)
print(json.dumps(sorted(loaded)))
"""


def test_every_console_script_loads_outside_the_checkout(tmp_path):
  env = subprocess_env()
  env.pop("PYTHONPATH", None)
  result = subprocess.run([sys.executable, "-c", _LOAD_ALL], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout) == ["mesanet-eval", "mesanet-export", "mesanet-generate", "mesanet-mad-grid",
                                       "mesanet-mad-table", "mesanet-prepare", "mesanet-train"]
