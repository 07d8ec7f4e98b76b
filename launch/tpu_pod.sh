#!/usr/bin/env bash
# Cloud TPU VM slices through `gcloud compute tpus tpu-vm`: create or reuse a slice, copy this checkout to every
# worker, install with the `tpu` extra, start the same trainer command on all workers, fetch logs, stop, delete.
# UNTESTED against real TPUs (no gcloud here); the --dry-run output is what tests/launch checks.
#
# Usage: bash launch/tpu_pod.sh [--dry-run] --name=NAME --zone=ZONE [--type=TYPE] [--version=V] [--project=P] [--spot]
#            COMMAND [TRAIN FLAGS...]
# COMMAND: up       create the slice (or reuse it if it exists), then sync and install
#          sync     copy the checkout's files (tracked and untracked, not ignored) to ~/mesanet on every worker
#          install  Python 3.12 if missing, then `bash launch/install.sh tpu` on every worker
#          run      start `python -m experiments.train --distributed_auto TRAIN FLAGS` on every worker in the
#                   background; worker logs: ~/mesanet/logs/train-<hostname>.log
#          logs     copy the worker logs to runs/tpu-logs/NAME/
#          stop     SIGTERM the trainer on every worker: they save a checkpoint together and exit
#          delete   delete the slice
# Defaults: NAME, ZONE, TYPE from $TPU_NAME, $TPU_ZONE, $TPU_TYPE; the runtime version from the type's generation.
# The --workdir must be storage all workers share at the same path (orbax writes one checkpoint from all hosts).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  echo "usage: bash launch/tpu_pod.sh [--dry-run] --name=NAME --zone=ZONE [--type=TYPE] [--version=V] [--project=P]" \
       "[--spot] up|sync|install|run|logs|stop|delete [TRAIN FLAGS...]" >&2
  exit 2
}
fail() { echo "launch/tpu_pod.sh: $*" >&2; exit 2; }

dry_run=0 name="${TPU_NAME:-}" zone="${TPU_ZONE:-}" type="${TPU_TYPE:-}" version="" project="" spot=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --type=*) type="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --spot) spot=1 ;;
    -*) fail "unknown option '$1' (before the command)" ;;
    *) break ;;
  esac
  shift
done
[ $# -ge 1 ] || usage
command="$1"; shift
[ -n "$name" ] || fail "no slice name: pass --name=NAME or set TPU_NAME"
[ -n "$zone" ] || fail "no zone: pass --zone=ZONE or set TPU_ZONE"
if [ "$command" != run ] && [ $# -gt 0 ]; then fail "'$command' takes no train flags, got: $*"; fi

gcloud_args=(--zone="$zone")
[ -z "$project" ] || gcloud_args+=(--project="$project")
remote=mesanet  # the checkout on each worker, relative to the home directory

# Shell-quotes its arguments, single quotes only where needed: `quote a "b c"` prints a 'b c'.
quote() {
  local out=() a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}
# Prints the command (--dry-run) or runs it.
do_() {
  if [ "$dry_run" = 1 ]; then quote "$@"; else "$@"; fi
}
tpu() { do_ gcloud compute tpus tpu-vm "$@"; }
on_all() { tpu ssh "$name" --worker=all "${gcloud_args[@]}" --command="$1"; }

create() {
  [ -n "$type" ] || fail "creating needs the accelerator type: pass --type=TYPE (e.g. v4-32, v5litepod-16, v5p-32)"
  if [ -z "$version" ]; then
    case "$type" in
      v4-*) version=tpu-ubuntu2204-base ;;
      v5litepod-*) version=v2-alpha-tpuv5-lite ;;
      v5p-*) version=v2-alpha-tpuv5 ;;
      *) fail "no default runtime version for type '$type': pass --version=V" ;;
    esac
  fi
  local extra=()
  [ "$spot" = 0 ] || extra+=(--spot)
  if [ "$dry_run" = 1 ]; then echo "# if the describe fails (no such slice):"; fi
  if [ "$dry_run" = 1 ] || ! gcloud compute tpus tpu-vm describe "$name" "${gcloud_args[@]}" >/dev/null 2>&1; then
    [ "$dry_run" = 0 ] || tpu describe "$name" "${gcloud_args[@]}"
    tpu create "$name" "${gcloud_args[@]}" --accelerator-type="$type" --version="$version" "${extra[@]}"
  else
    echo "launch/tpu_pod.sh: reusing the existing slice $name"
  fi
}

sync() {
  local archive=/tmp/mesanet-code.tar.gz
  if [ "$dry_run" = 1 ]; then
    echo "git ls-files -z --cached --others --exclude-standard | tar czf $archive --null -T -"
  else
    git ls-files -z --cached --others --exclude-standard | tar czf "$archive" --null -T -
  fi
  tpu scp "$archive" "$name:mesanet-code.tar.gz" --worker=all "${gcloud_args[@]}"
  on_all "mkdir -p $remote && tar xzf mesanet-code.tar.gz -C $remote"
}

install() {
  on_all "command -v python3.12 >/dev/null || (sudo add-apt-repository -y ppa:deadsnakes/ppa && sudo apt-get update -q \
&& sudo apt-get install -y -q python3.12 python3.12-venv) && cd $remote && bash launch/install.sh tpu"
}

run() {
  local train
  train="$(quote .venv/bin/python -m experiments.train --distributed_auto "$@")"
  on_all "cd $remote && mkdir -p logs && { nohup $train > logs/train-\$(hostname).log 2>&1 < /dev/null & \
echo \$! > logs/train.pid; }"
}

case "$command" in
  up) create; sync; install ;;
  sync) sync ;;
  install) install ;;
  run) run "$@" ;;
  logs) do_ mkdir -p "runs/tpu-logs/$name"
        tpu scp "$name:$remote/logs/train-*.log" "runs/tpu-logs/$name/" --worker=all "${gcloud_args[@]}" ;;
  stop) on_all "kill -TERM \$(cat $remote/logs/train.pid)" ;;
  delete) tpu delete "$name" "${gcloud_args[@]}" --quiet ;;
  *) fail "unknown command '$command' (up, sync, install, run, logs, stop, delete)" ;;
esac
