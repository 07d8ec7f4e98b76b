#!/usr/bin/env bash
# Runs N trainer processes on this machine, joined through jax.distributed on 127.0.0.1 (multi-host code paths on
# one machine; CPU processes use gloo collectives). Waits for all; if one fails, stops the others and exits non-zero.
# Usage: bash launch/local.sh [--dry-run] N [TRAIN FLAGS...]
#   e.g. bash launch/local.sh 2 --config=tests/train/tiny.py:text --workdir=runs/two
# Logs: <workdir>/logs/process_<i>.log. Env: PYTHON (default .venv/bin/python, else python3), PORT (default: free).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: bash launch/local.sh [--dry-run] N [TRAIN FLAGS...]" >&2; exit 2; }
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
[ $# -ge 1 ] || usage
n="$1"; shift
[[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "launch/local.sh: N must be a positive integer, got '$n'" >&2; exit 2; }

python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
workdir=runs/default  # the trainer's default
for flag in "$@"; do
  case "$flag" in
    --workdir=*) workdir="${flag#--workdir=}" ;;
    --workdir) echo "launch/local.sh: write --workdir=DIR (one argument)" >&2; exit 2 ;;
  esac
done
logdir="$workdir/logs"
port="${PORT:-}"
if [ -z "$port" ]; then
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

commands=()
for ((i = 0; i < n; i++)); do
  commands+=("$(printf '%q ' "$python" -m experiments.train "$@" --num_processes="$n" \
      --coordinator_address="127.0.0.1:$port" --process_id="$i")> $(printf '%q' "$logdir/process_$i.log") 2>&1")
done
if [ "$dry_run" = 1 ]; then
  echo "mkdir -p $(printf '%q' "$logdir")"
  for c in "${commands[@]}"; do echo "$c &"; done
  exit 0
fi

mkdir -p "$logdir"
declare -A running  # pid -> process index
for ((i = 0; i < n; i++)); do
  "$python" -m experiments.train "$@" --num_processes="$n" --coordinator_address="127.0.0.1:$port" \
      --process_id="$i" >"$logdir/process_$i.log" 2>&1 &
  running[$!]=$i
done
stop() { for pid in "${!running[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done; }
trap 'stop; wait; exit 143' TERM INT  # SIGTERM to all: they save together and exit

status=0
while [ "${#running[@]}" -gt 0 ]; do
  code=0
  wait -n -p finished "${!running[@]}" || code=$?
  i="${running[$finished]}"
  unset "running[$finished]"
  if [ "$code" != 0 ]; then
    echo "launch/local.sh: process $i exited with status $code (log: $logdir/process_$i.log)" >&2
    tail -n 20 "$logdir/process_$i.log" >&2
    [ "$status" != 0 ] || stop  # the others would wait for it forever
    status=1
  fi
done
[ "$status" != 0 ] || echo "launch/local.sh: $n processes finished; logs in $logdir"
exit "$status"
