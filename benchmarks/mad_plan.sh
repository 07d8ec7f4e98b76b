#!/bin/bash
# Several MAD grid pieces (benchmarks/mad_grid_piece.sh) one after another in one device call, in the order given:
# the grid itself orders its groups (saved slots first, then by architecture and cost), so a plan is how a session
# says "finish this group, then start that one". PLAN lists the pieces, space-separated, each
# ARCHS:TASKS:VARIANTS:SLOTS[:DRAIN] (TASKS or VARIANTS empty for all of them; DRAIN, when given, that piece's own
# in place of the env's: e.g. a piece whose jobs must finish inside the call before one that saves its slots), e.g.
#   PLAN="transformer:fuzzy_recall:seq_len=1024:32 mesanet:fuzzy_recall:vocab_size=64,vocab_size=128:16" \
#     END=560 OUT=$OUT bash benchmarks/mad_plan.sh
# Each piece gets the time left until END seconds after this script started (one with under 60 s left is skipped,
# one with nothing left to train exits at once), so the same plan serves every call of a chain on a warm machine:
# later calls skip through the finished pieces. A piece that refuses to start (rc 2: e.g. the saved slots its results
# list were not carried) stops the plan, which then exits 2; one that fails (a grid process exited non-zero) is noted
# and the plan goes on, then exits 1. Every other setting of mad_grid_piece.sh (BUDGET, DRAIN, RETURN_STATE, PIECE,
# EXTRA, GPUS, ...) applies to each piece: with GPUS=n a piece's groups train n at a time.
# $OUT/grid.log holds every piece's log, one after another; $OUT/state (RETURN_STATE=1) packs every group's saved
# slots in $PIECE/state, not only the last piece's.
set -uo pipefail
PLAN=${PLAN:?"PLAN must list the pieces: ARCHS:TASKS:VARIANTS:SLOTS[:DRAIN] ..."}; END=${END:-560}
OUT=${OUT:-runs/piece_out}
for piece in $PLAN; do  # every entry checked before any piece runs
  IFS=: read -r archs tasks variants slots drain extra <<< "$piece"
  if [ -z "$archs" ] || ! [[ "$slots" =~ ^[0-9]+$ ]] || ! [[ "$drain" =~ ^[0-9]*$ ]] || [ -n "$extra" ]; then
    echo "PLAN entry $piece must be ARCHS:TASKS:VARIANTS:SLOTS[:DRAIN] (SLOTS, DRAIN numbers of slots, seconds)" >&2
    exit 2
  fi
done
mkdir -p "$OUT"
plan_log=$(mktemp)
number=0
for piece in $PLAN; do
  number=$((number + 1))
  IFS=: read -r archs tasks variants slots drain <<< "$piece"
  left=$((END - SECONDS))
  if [ "$left" -lt 60 ]; then echo "=== piece $number ($piece) skipped: $left s left" | tee -a "$plan_log"; continue; fi
  echo "=== piece $number ($piece) from $SECONDS s" | tee -a "$plan_log"
  LIMIT=$left ARCHS=$archs TASKS=$tasks SLOTS=$slots DRAIN=${drain:-${DRAIN:-}} OUT=$OUT \
    EXTRA="${EXTRA:-} ${variants:+--variants=$variants}" bash benchmarks/mad_grid_piece.sh | tail -n 14
  status=${PIPESTATUS[0]}
  cat "$OUT/grid.log" >> "$plan_log"
  if [ "$status" = 2 ]; then
    refused=1; echo "=== plan stopped: piece $number refused to start" | tee -a "$plan_log"; break
  elif [ "$status" != 0 ]; then
    failed=1; echo "=== piece $number failed (rc $status)" | tee -a "$plan_log"
  fi
done
if [ "${refused:-0}" = 0 ]; then echo "=== plan done at $SECONDS s" | tee -a "$plan_log"; fi
chmod 644 "$plan_log"; mv "$plan_log" "$OUT/grid.log"
exit $(( ${refused:-0} ? 2 : ${failed:-0} ))
