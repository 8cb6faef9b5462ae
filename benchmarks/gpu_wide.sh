#!/usr/bin/env bash
# Wide rolling on a GPU: one training step of OPD, rolling and TOPD at the cost model's pair (Qwen2.5-1.5B student,
# Qwen2.5-7B teacher shapes, random weights, bf16, HF `generate`), L = 1024, rho = 0.1, B prompts per step:
#   full @ B (OPD), rolling_0.1 @ B slots, and at B / rho = 10 B: rolling_0.1 (both caches), rolling_0.1_uncached,
#   truncated_0.1 (TOPD).
# One fresh process per row, one after the other; each writes $OUT_DIR/<config>_b<batch>.json (bench_step.py's format).
#   benchmarks/gpu_wide.sh OUT_DIR [B] [L] [PRESET]        # defaults: 8 1024 qwen2.5-1.5b-7b
# Then `python3 benchmarks/gpu_wide_table.py OUT_DIR` prints the table. On the CPU the same path runs with e.g. `benchmarks/gpu_wide.sh /tmp/w 2 20 tiny` (a smoke test).
set -uo pipefail
out="${1:?usage: gpu_wide.sh OUT_DIR [B] [L] [PRESET]}"
b="${2:-8}"; L="${3:-1024}"; preset="${4:-qwen2.5-1.5b-7b}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mkdir -p "$out"
wide=$((b * 10))
status=0
for row in "full $b 2" "rolling_0.1 $b 2" "rolling_0.1 $wide 2" "truncated_0.1 $wide 2" "rolling_0.1_uncached $wide 2"; do
  set -- $row
  echo "== $1 batch $2 ($(date +%H:%M:%S))"
  python3 "$here/bench_step.py" --preset "$preset" --configs "$1" --batch-size "$2" --max-completion-length "$L" \
    --warmup 1 --steps "$3" --out "$out/${1}_b${2}.json" || status=1
done
exit $status
