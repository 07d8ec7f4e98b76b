#!/bin/bash
# Brings what a MAD device call returned (benchmarks/mad_plan.sh or mad_grid_piece.sh on the tracked results) into
# the checkout, after the call:
#   bash benchmarks/mad_collect.sh <the call's files_at> benchmarks/results/mad_s33/call2.log
# - results.jsonl and usage.jsonl replace the tracked ones, only where the tracked results are the start of the
#   returned ones (the grid appends records; anything else came from other results, e.g. an A/B in its own file);
# - the saved slots (the parts packed in state/state.tar.*) replace .madstate/ and are listed in
#   benchmarks/results/mad/results_state.txt, which every later piece checks its machine got (mad_grid_piece.sh:
#   STATE_LIST), so a call that forgets to carry them stops at once instead of training their jobs again; a call that
#   kept its state on the machine (RETURN_STATE=0) changes neither;
# - grid.log is kept at the path given.
# Env: TRACKED (benchmarks/results/mad), STATE (.madstate).
set -euo pipefail
FROM=${1:?"usage: mad_collect.sh <files_at of the call> <where to keep its grid.log>"}
LOG=${2:?"usage: mad_collect.sh <files_at of the call> <where to keep its grid.log>"}
TRACKED=${TRACKED:-benchmarks/results/mad}; STATE=${STATE:-.madstate}
fail() { echo "mad_collect: $*" >&2; exit 2; }
for file in grid.log results.jsonl; do [ -f "$FROM/$file" ] || fail "$FROM/$file is missing: not a piece's output"; done
outcome=$(grep -E '^state (returned|kept)' "$FROM/grid.log" | tail -n 1) \
  || fail "$FROM/grid.log says nothing of the saved state: not the log of a piece of this version"
size=$(stat -c %s "$TRACKED/results.jsonl"); before=$(wc -l < "$TRACKED/results.jsonl")
if ! head -c "$size" "$FROM/results.jsonl" | cmp -s - "$TRACKED/results.jsonl"; then
  fail "$TRACKED/results.jsonl is not the start of $FROM/results.jsonl: those results grew from other ones"
fi
parts=()
unpacked=$(mktemp -d); trap 'rm -rf "$unpacked"' EXIT
if [[ "$outcome" == "state returned: "* ]]; then
  read -r -a parts <<< "${outcome#state returned: }"
  if [ "${parts[*]}" = none ]; then parts=(); fi
  if [ "${#parts[@]}" -gt 0 ]; then
    archive=("$FROM"/state/state.tar.*)
    [ -f "${archive[0]}" ] || fail "$FROM/state/state.tar.* did not come back (grid.log lists ${#parts[@]} parts)"
    cat "${archive[@]}" | tar -x -C "$unpacked" \
      || fail "$FROM/state/state.tar.* do not make a whole archive: a piece of it did not come back"
  fi
  for part in "${parts[@]}"; do
    [ -f "$unpacked/$part" ] || fail "$part (in grid.log) did not come back in $FROM/state"
  done
fi
mkdir -p "$(dirname "$LOG")"
install -m 644 "$FROM/grid.log" "$LOG"
install -m 644 "$FROM/results.jsonl" "$TRACKED/results.jsonl"
if [ -f "$FROM/usage.jsonl" ]; then install -m 644 "$FROM/usage.jsonl" "$TRACKED/usage.jsonl"; fi
after=$(wc -l < "$TRACKED/results.jsonl")
echo "results: $after records ($((after - before)) new); log at $LOG"
if [[ "$outcome" == "state kept"* ]]; then
  echo "the call kept its state on the machine: $STATE and $TRACKED/results_state.txt left as they were"
  exit 0
fi
mkdir -p "$STATE"; rm -f "$STATE"/*.pkl
for part in "${parts[@]}"; do install -m 644 "$unpacked/$part" "$STATE/$part"; done
printf '%s\n' "${parts[@]}" | grep -v '^$' > "$TRACKED/results_state.txt" || true
echo "saved slots: ${#parts[@]} parts in $STATE ($(du -sh "$STATE" | cut -f1)), listed in $TRACKED/results_state.txt"
