#!/usr/bin/env bash
# One SLURM task of launch/gpu_slurm.sbatch: sets up jax.distributed from SLURM's variables and runs the trainer.
#   coordinator = the first host of $SLURM_JOB_NODELIST (scontrol show hostnames), port $MESANET_PORT (default 29500)
#   process count = $SLURM_NTASKS, process id = $SLURM_PROCID
#   several tasks per node: each sees one GPU, CUDA_VISIBLE_DEVICES=$SLURM_LOCALID
# Usage: bash launch/slurm_task.sh [--dry-run] [TRAIN FLAGS...]   (inside an allocation; --dry-run prints the command)
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
for var in SLURM_JOB_NODELIST SLURM_NTASKS SLURM_PROCID SLURM_LOCALID; do
  [ -n "${!var:-}" ] || { echo "launch/slurm_task.sh: \$$var is not set; run inside a SLURM job (srun)" >&2; exit 2; }
done
hosts="$(scontrol show hostnames "$SLURM_JOB_NODELIST")"  # all of it: `| head -n 1` could SIGPIPE it (pipefail)
coordinator="${hosts%%$'\n'*}"
[ -n "$coordinator" ] || { echo "launch/slurm_task.sh: scontrol gave no host for '$SLURM_JOB_NODELIST'" >&2; exit 2; }
env_vars=()
if [ "${SLURM_NTASKS_PER_NODE:-1}" != 1 ]; then env_vars+=(CUDA_VISIBLE_DEVICES="$SLURM_LOCALID"); fi
python="${PYTHON:-.venv/bin/python}"
command=(env "${env_vars[@]}" "$python" -m experiments.train "$@"
         --coordinator_address="$coordinator:${MESANET_PORT:-29500}"
         --num_processes="$SLURM_NTASKS" --process_id="$SLURM_PROCID")
if [ "$dry_run" = 1 ]; then
  printf '%q ' "${command[@]}"; echo
else
  exec "${command[@]}"
fi
