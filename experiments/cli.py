"""What every command-line entry point shares: no stray arguments, quiet library logs, one-line errors (exit 2), and
JAX's persistent compilation cache for the long-running ones."""
import contextlib
import os
import sys

from absl import app, flags, logging


def start(argv) -> None:
  """Rejects positional arguments; logs at WARNING unless --verbosity is given (orbax logs every save at INFO)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


@contextlib.contextmanager
def one_line_errors(program: str, errors: type[Exception] | tuple[type[Exception], ...] = (ValueError, OSError)):
  """Turns `errors` raised inside into `<program>: error: <message>` on stderr and exit code 2 (an OSError, such
  as an unwritable --out, names its path)."""
  try:
    yield
  except errors as e:
    print(f"{program}: error: {e}", file=sys.stderr)
    sys.exit(2)


def use_compilation_cache(path: str) -> None:
  """JAX's persistent compilation cache in `path` ('': none): a rerun or resumed run (a trainer resumed from its
  checkpoint, the next piece of a MAD grid on the same machine) loads its compiled programs instead of compiling them
  again. Call after flag parsing and before the first compile."""
  if path:
    import jax
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(path))
