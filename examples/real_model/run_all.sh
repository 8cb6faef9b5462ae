#!/usr/bin/env bash
# The real-model comparison, one process per (method, seed), then the merge (see distill_smollm2.py's docstring).
#
#   examples/real_model/run_all.sh [flags for every run, e.g. --steps 30 --max-completion-length 256]
#
# Resumes: a pair whose $OUT/runs/<method>_seed<S>.json exists is skipped, so the loop can be stopped and run again,
# in pieces and across sessions. Seeds are the outer loop, so a partial run has whole seeds. Runs are strictly one at
# a time (and a second run_all.sh on the same $OUT refuses to start), so no two torch processes share the machine.
# Environment: OUT (default: this directory), SEEDS (default "0 1"), METHODS (default below), PYTHON (default python).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
script="$here/distill_smollm2.py"
OUT="${OUT:-$here}"
SEEDS="${SEEDS:-0 1}"
METHODS="${METHODS:-opd opd-matched0.1 topd0.1 topd-n100 rolling0.1 popd adaptive}"
PYTHON="${PYTHON:-python}"

mkdir -p "$OUT/runs"
if command -v flock >/dev/null; then
  exec 9<"$OUT/runs"  # the lock is on the directory itself: no lock file is left behind
  flock -n 9 || { echo "another run_all.sh is running on $OUT" >&2; exit 1; }
fi

for s in $SEEDS; do
  for m in $METHODS; do
    file="$OUT/runs/${m}_seed${s}.json"
    if [[ -f "$file" ]]; then
      echo "== $m seed $s: done ($file exists), skipped"
      continue
    fi
    echo "== $m seed $s ($(date '+%H:%M:%S'))"
    "$PYTHON" "$script" --methods "$m" --seed "$s" --output-dir "$OUT" "$@"
  done
done
"$PYTHON" "$script" --merge --output-dir "$OUT"
