"""Trains a model: `mesanet-train` or `python -m experiments.train`.

    mesanet-train                                            # the embedded default (tiny MesaNet, English bytes)
    mesanet-train --config=experiments/configs/mqar.py --config.optim.lr=1e-3 --workdir=runs/mqar
    mesanet-train --config=experiments/configs/lm.py:mesanet,small,15b --config.data.path=corpus/

Multi-process: pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I (or set JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID), or --distributed_auto where JAX detects the cluster itself (Cloud TPU pod slices:
launch/tpu_pod.sh); each process reads only its shard of the data.
"""
import os
import signal
import sys

from mesanet_jax.train.sigterm import SigtermFlag

SIGTERM = SigtermFlag()  # first, before the slow imports: a SIGTERM during setup ends the run cleanly (exit 0)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from . import cli  # noqa: E402


def _flag_error(e: Exception) -> str:
  """One line for what ml_collections raises on a bad --config or --config.* flag."""
  if isinstance(e, (AttributeError, KeyError)):  # an override of a key the config does not have
    while e.args and isinstance(e.args[0], Exception):  # AttributeError(KeyError("'key'\nDid you mean ...?"))
      e = e.args[0]
    name, *hint = str(e.args[0] if e.args else e).split("\n")
    name = name.strip("\"'\\")
    given = [a.split("=")[0] for a in sys.argv[1:] if a.startswith("--config.") and
             f".{name}." in a.split("=")[0] + "."]
    key = given[0][len("--config."):] if given else name
    return (f"unknown config key {key!r}{' (' + hint[0].strip() + ')' if hint else ''}; the schema is "
            f"mesanet_jax/train/config.py")
  if isinstance(e, OSError):  # the --config file could not be loaded
    return f"cannot load --config: {[line for line in str(e).splitlines() if line.strip()][-1].strip()}"
  return f"bad --config override: {e}"  # ml_collections: a value of the wrong type


def _fail(message: str):
  print(f"mesanet-train: error: {message}", file=sys.stderr)
  sys.exit(2)


DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")
try:  # the default config is loaded (and --config.* overrides are typed) here, at definition
  _CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "experiment config file (path[:arg])")
except (AttributeError, KeyError, OSError, TypeError, ValueError) as error:
  _fail(_flag_error(error))
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "checkpoints, metrics.jsonl, TensorBoard events, loss.png")
_COORDINATOR = flags.DEFINE_string("coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS", ""),
                                   "host:port of process 0 for jax.distributed (multi-process runs)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", int(os.environ.get("JAX_NUM_PROCESSES", "1")),
                                      "number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", int(os.environ.get("JAX_PROCESS_ID", "0")), "this process")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR", "<workdir>/compilation_cache"),
    "JAX's persistent compilation cache, so a resumed run skips compiling its steps again (the 434M model's train "
    "step takes minutes to compile on a GPU); default: $JAX_COMPILATION_CACHE_DIR if set, else "
    "<workdir>/compilation_cache; '<workdir>' is replaced by --workdir; '' turns it off")
_DISTRIBUTED_AUTO = flags.DEFINE_bool("distributed_auto", False,
                                      "call jax.distributed.initialize() without arguments: JAX detects the "
                                      "coordinator, process count and id (Cloud TPU pod slices)")


def main(argv):
  cli.start(argv)
  import jax  # after flag parsing, so XLA_FLAGS / JAX_PLATFORMS from the environment apply
  if "JAX_THREEFRY_GPU_KERNEL_LOWERING" not in os.environ:
    # GPU: XLA inlines every threefry call of the parameter init, and its compile time grows faster than linearly
    # with the number of parameters (measured on an H200: the 146M model's init did not compile within 2 minutes;
    # with the kernel, the 434M model's whole train state initialises in ~20 s). No effect on CPU/TPU.
    jax.config.update("jax_threefry_gpu_kernel_lowering", True)
  cli.use_compilation_cache(_COMPILATION_CACHE.value.replace("<workdir>", os.path.abspath(_WORKDIR.value)))
  try:
    config = _CONFIG.value
    config.train  # a config file that failed to load raises on first use
  except OSError as e:
    _fail(_flag_error(e))
  multi_process = _DISTRIBUTED_AUTO.value or _NUM_PROCESSES.value > 1
  if multi_process:
    SIGTERM.restore()  # several processes: jax.distributed's preemption notifier takes SIGTERM
  if _DISTRIBUTED_AUTO.value:
    jax.distributed.initialize()
  elif _NUM_PROCESSES.value > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives; GPUs/TPUs ignore it
    jax.distributed.initialize(_COORDINATOR.value or None, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from mesanet_jax.train.config import ConfigError
  from mesanet_jax.train.trainer import train_and_evaluate
  logging.info("config:\n%s", config)
  with cli.one_line_errors("mesanet-train", ConfigError):
    train_and_evaluate(config, _WORKDIR.value, sigterm=None if multi_process else SIGTERM)
  # Everything is saved: a SIGTERM while the interpreter shuts down (which puts back the default handler of a Python
  # one, not of SIG_IGN) changes nothing, and must not turn exit 0 into death by signal.
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _parse_flags(argv):
  """absl's parser, but a bad flag or --config override is one line on stderr and exit code 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e))
  except (AttributeError, KeyError, OSError, TypeError, ValueError) as e:
    _fail(_flag_error(e))


def run():
  """Console-script entry point."""
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
