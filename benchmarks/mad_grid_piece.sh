#!/bin/bash
# One resumable piece of the MAD grid (issue 18) for a device lent in short calls: trains for LIMIT seconds, saves the
# slots in flight (at most BUDGET MiB, so they can travel back), and leaves results.jsonl, usage.jsonl (each group
# run's device time), grid.log (every process's log, one after another) and state/ in $OUT: a call returns at most
# 8 files of at most 16 MiB, so a piece writes nothing else there, and state/ holds the saved parts as one tar archive
# in pieces of 15 MiB (state.tar.00, .01, ...: BUDGET=56 comes back in 4 files however the groups' parts fall).
#   ARCHS=gdn TASKS=in_context_recall bash benchmarks/mad_grid_piece.sh
# Env: ARCHS, TASKS (default: all), SLOTS (10), LIMIT (500 s), DRAIN (0 s: no queued job starts in the last DRAIN
# seconds, so fewer are in flight at the limit), BUDGET (56 MiB: what $PIECE/state holds at most after any save, every
# group's, every piece's and every process's saves together: each save takes what the others leave),
# OUT (./runs/piece_out), MESA (impl:chunk:precision; default models.FAST_MESA's), GDN_IMPL (default models.FAST_GDN's),
# EXTRA (more mesanet-mad-grid flags), PIECE (/tmp/piece: the working copy), SIDE_BY_SIDE (1: one process per
# architecture of ARCHS on the one GPU, each with an equal share of its memory: populations of ~10 slots
# leave most of a GPU idle; with two, SLOTS=5 keeps every slot savable), GPUS (1; n > 1: n processes with the same
# selection, one per GPU (CUDA_VISIBLE_DEVICES=i): each claims the next group no other
# process trains, mesanet_jax/mad/claims.py, taking an architecture's groups longest first), RETURN_STATE (1: copy
# the state to $OUT; 0: keep it in $PIECE only, with BUDGET=0 every slot in flight, for a next call on the same
# warm machine), MEM_TOTAL (the share of GPU memory the grid's processes take together: 0.9 side by side, JAX's 0.75
# alone; less leaves room for a run beside them). Keep BUDGET under a call's 64 MiB (5 pieces of 15 MiB at most).
# The first piece on a machine starts from the tracked benchmarks/results/mad/results.jsonl (RESULTS_IN) and
# usage.jsonl beside it (USAGE_IN); later pieces on the same machine continue from $PIECE. Every piece adds the slots
# saved in .madstate/ (STATE_IN) that the machine has not taken before, so .madstate may come with any call before
# the piece that runs its groups. Afterwards copy $OUT/results.jsonl and $OUT/usage.jsonl over the tracked ones and
# $OUT/state's parts to .madstate/: benchmarks/mad_collect.sh does both and lists the saved slots beside the results
# (STATE_LIST), so that a later piece refuses to start on a machine that never got them.
# Exit status: 2 when the piece refuses to start (bad settings, saved slots not carried), 1 when a grid process
# failed (results and state still handed back), else 0.
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
ARCHS=${ARCHS:-mesanet,gdn}; TASKS=${TASKS:-}; SLOTS=${SLOTS:-10}; LIMIT=${LIMIT:-500}; DRAIN=${DRAIN:-0}
BUDGET=${BUDGET:-56}
OUT=${OUT:-runs/piece_out}; PIECE=${PIECE:-/tmp/piece}; MESA=${MESA:-}; GDN_IMPL=${GDN_IMPL:-}; EXTRA=${EXTRA:-}
RESULTS_IN=${RESULTS_IN:-benchmarks/results/mad/results.jsonl}; STATE_IN=${STATE_IN:-.madstate}
USAGE_IN=${USAGE_IN:-benchmarks/results/mad/usage.jsonl}
GPUS=${GPUS:-1}
if ! [[ "$GPUS" =~ ^[1-9][0-9]*$ ]] || { [ "$GPUS" -gt 1 ] && [ "${SIDE_BY_SIDE:-0}" = 1 ]; }; then
  echo "GPUS must be a number ≥ 1, and SIDE_BY_SIDE=1 (processes sharing one GPU) takes GPUS=1; got GPUS=$GPUS" >&2
  exit 2
fi
if command -v nvidia-smi > /dev/null; then
  present=$(nvidia-smi -L | grep -c '^GPU')
  if [ "$GPUS" -gt "$present" ]; then echo "GPUS=$GPUS, but this machine has $present GPUs" >&2; exit 2; fi
fi
mkdir -p "$OUT"
if [ ! -f "$PIECE/results.jsonl" ]; then
  mkdir -p "$PIECE"
  cp "$RESULTS_IN" "$PIECE/results.jsonl"
  if [ -f "$USAGE_IN" ]; then cp "$USAGE_IN" "$PIECE/usage.jsonl"; fi
fi
# The saved slots of STATE_IN this machine has not taken yet (its pieces may have started before a call carried
# them), each file once: $PIECE/state_taken lists those taken, so a later call carrying the same files adds none.
mkdir -p "$PIECE/state"; touch "$PIECE/state_taken"
for saved in "$STATE_IN"/*; do
  name=$(basename "$saved")
  if [ -f "$saved" ] && ! grep -qxF "$name" "$PIECE/state_taken"; then
    cp "$saved" "$PIECE/state/$name"; chmod u+w "$PIECE/state/$name"; echo "$name" >> "$PIECE/state_taken"
  fi
done
# The saved slots that go with RESULTS_IN, listed beside it by benchmarks/mad_collect.sh: a piece on a machine that
# never got them (a call that did not carry .madstate) stops before training, or their jobs would start over.
STATE_LIST=${STATE_LIST:-${RESULTS_IN%.jsonl}_state.txt}
if [ -f "$STATE_LIST" ]; then
  missing=$(grep -vxF -f "$PIECE/state_taken" "$STATE_LIST" | grep -v '^$' | paste -sd ' ')
  if [ -n "$missing" ]; then
    echo "$STATE_LIST lists saved slots this machine never got from $STATE_IN: $missing; carry [\".madstate\"] in" \
      "the call (STATE_LIST=/dev/null lets their jobs start over)" | tee "$OUT/grid.log" >&2
    exit 2
  fi
fi
mesa_flags=()
if [ -n "$MESA" ]; then
  IFS=: read -r impl chunk precision <<< "$MESA"
  mesa_flags=(--impl="$impl" --chunk_size="$chunk" ${precision:+--matmul_precision="$precision"})
fi
echo "ARCHS=$ARCHS TASKS=$TASKS SLOTS=$SLOTS LIMIT=$LIMIT DRAIN=$DRAIN MESA=$MESA GDN_IMPL=$GDN_IMPL EXTRA=$EXTRA" \
  "SIDE_BY_SIDE=${SIDE_BY_SIDE:-0} GPUS=$GPUS" | tee "$OUT/grid.log"
mkdir -p "$PIECE/logs"; rm -f "$PIECE"/logs/*.log
grid() {  # architectures, state budget (MiB), log name, processes on the device, data workers ('': default), flags
  # shellcheck disable=SC2086  # EXTRA holds several flags
  timeout $((LIMIT + 60)) python3 -m experiments.mad_grid --results="$PIECE/results.jsonl" --state_dir="$PIECE/state" \
    --state_budget_mib="$2" --architectures="$1" ${TASKS:+--tasks="$TASKS"} --time_limit="$LIMIT" \
    --drain_seconds="$DRAIN" --max_slots="$SLOTS" --device_share="$4" ${5:+--workers="$5"} "${@:6}" \
    "${mesa_flags[@]}" ${GDN_IMPL:+--gdn_impl="$GDN_IMPL"} $EXTRA 2>&1 \
    | tr '\r' '\n' | grep --line-buffered -v -e ' it/s' -e 'tok·step/s' -e '^[[:space:]]*$' > "$PIECE/logs/$3.log"
  local rc=${PIPESTATUS[0]}
  echo "rc=$rc" >> "$PIECE/logs/$3.log"
  tail -25 "$PIECE/logs/$3.log"
  return "$rc"
}
# A grid process that exits non-zero (a crash, or killed at LIMIT + 60 s) fails the piece, after it hands back what
# there is.
failed=0; processes=()
if [ "${SIDE_BY_SIDE:-0}" = 1 ]; then
  IFS=, read -r -a archs <<< "$ARCHS"
  share=$(python3 -c "print(f'{${MEM_TOTAL:-0.9} / ${#archs[@]}:.3f}')")
  for arch in "${archs[@]}"; do
    XLA_PYTHON_CLIENT_MEM_FRACTION=$share grid "$arch" "$BUDGET" "grid_$arch" "${#archs[@]}" &
    processes+=("$!")
  done
elif [ "$GPUS" -gt 1 ]; then
  workers=$(( $(nproc) / GPUS > 1 ? $(nproc) / GPUS - 1 : 1 ))
  for ((gpu = 0; gpu < GPUS; gpu++)); do
    CUDA_VISIBLE_DEVICES=$gpu XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_TOTAL:-0.75} \
      grid "$ARCHS" "$BUDGET" "grid_gpu$gpu" 1 "$workers" --longest_first &
    processes+=("$!")
  done
else
  XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_TOTAL:-${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.75}} grid "$ARCHS" "$BUDGET" grid 1 \
    || failed=1
fi
for process in "${processes[@]}"; do wait "$process" || failed=1; done
for log in "$PIECE"/logs/*.log; do echo "=== $(basename "$log")"; cat "$log"; done >> "$OUT/grid.log"
cp "$PIECE/results.jsonl" "$OUT/results.jsonl"
if [ -f "$PIECE/usage.jsonl" ]; then cp "$PIECE/usage.jsonl" "$OUT/usage.jsonl"; fi
rm -rf "$OUT/state"
# The last line of grid.log says what state came back (benchmarks/mad_collect.sh reads it: a call returns no empty
# folder, so "none" and "kept on the machine" look alike otherwise).
if [ "${RETURN_STATE:-1}" = 1 ]; then
  mkdir -p "$OUT/state"
  parts=$(find "$PIECE/state" -maxdepth 1 -name '*.pkl' -printf '%f\n' | sort | tr '\n' ' ')  # no claims
  if [ -n "$parts" ]; then
    # shellcheck disable=SC2086  # one name a word
    tar -C "$PIECE/state" -cf - $parts | split -b 15M -d -a 2 - "$OUT/state/state.tar."
    pieces=$(find "$OUT/state" -name 'state.tar.*' | wc -l)
    if [ "$pieces" -gt 5 ]; then  # beside results.jsonl, usage.jsonl and grid.log
      echo "WARNING: the state is $pieces files of 15 MiB: a call returns at most 8, so it will not all come back" \
        | tee -a "$OUT/grid.log"
    fi
  fi
  du -sh "$OUT/state"
  echo "state returned: ${parts:-none}" >> "$OUT/grid.log"
else
  echo "state kept on the machine in $PIECE/state (RETURN_STATE=0)" >> "$OUT/grid.log"
fi
if [ "$failed" = 1 ]; then echo "a grid process exited non-zero (its rc= in $OUT/grid.log)" >&2; exit 1; fi
