#!/usr/bin/env bash
# Creates ./.venv from a Python >= 3.12 (JAX >= 0.11 needs it) and installs this package into it.
# Usage: bash launch/install.sh [EXTRAS]      e.g. `bash launch/install.sh test` or `bash launch/install.sh test,data`
set -euo pipefail
cd "$(dirname "$0")/.."

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
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$target"
echo "installed into .venv with $("$python" --version)${1:+, extras: $1}"
