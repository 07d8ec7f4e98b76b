#!/usr/bin/env bash
# Creates ./.venv from a Python >= 3.12 (JAX >= 0.11 needs it) and installs this package into it.
# Usage: bash launch/install.sh [EXTRAS]      e.g. `bash launch/install.sh test` or `bash launch/install.sh test,data`
set -euo pipefail
cd "$(dirname "$0")/.."

# uv (itself from PyPI) installs the same pinned packages in ~25 s where pip takes ~65 s (2 cores); byte-compiled up
# front, as pip does, for machines that set PYTHONDONTWRITEBYTECODE. pip does it where uv cannot be had or fails, or
# with MESANET_INSTALLER=pip (uv does not read pip.conf: a package mirror set only there needs pip).
installer="${MESANET_INSTALLER:-uv}"
if [ "$installer" != uv ] && [ "$installer" != pip ]; then
  echo "launch/install.sh: MESANET_INSTALLER must be uv or pip, got '$installer'" >&2
  exit 2
fi

python=""
for candidate in /root/.pyenv/versions/3.12.1/bin/python3 python3.12 python3.13 python3; do
  if command -v "$candidate" >/dev/null 2>&1 \
      && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
    python="$candidate"
    break
  fi
done
if [ -z "$python" ]; then
  echo "launch/install.sh: no Python >= 3.12 found (tried /root/.pyenv/versions/3.12.1/bin/python3, python3.12," \
       "python3.13, python3); JAX >= 0.11 needs Python >= 3.12." >&2
  exit 1
fi

"$python" -m venv .venv
target="."
if [ -n "${1:-}" ]; then target=".[$1]"; fi
if [ "$installer" = uv ] && ! { .venv/bin/python -m pip install --quiet --disable-pip-version-check uv \
    && .venv/bin/uv pip install --quiet --python .venv/bin/python --compile-bytecode -e "$target"; }; then
  echo "launch/install.sh: uv failed; installing with pip" >&2
  installer=pip
fi
if [ "$installer" = pip ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$target"
fi
echo "installed into .venv with $("$python" --version) by $installer${1:+, extras: $1}"
