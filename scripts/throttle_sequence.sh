#!/usr/bin/env bash
# Issue 33's latency goal, as docs/results.md ("Kernel limits") runs it: at 200 MB/s and
# 1 GB/s, `calibrate --throttle` (the compute and the disk beneath the kernel's throttle,
# measured through it), `solve` on that device, then `run --throttle --baselines --repeat 5`
# (the plan and the three classic strategies, each predicted as the throttle runs it).
# Usage: scripts/throttle_sequence.sh STORE OUT [ROUNDS]  (root; STORE: a shard store on
# the disk to throttle, e.g. build/shards/minilm-l6 or a copy on a faster disk). calibrate
# runs at --max-error-pct 1000 so that a device it would refuse at its default is kept and
# measured; its log gives the errors its default decision uses.
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=${1:?usage: $0 STORE OUT [ROUNDS]}
OUT=${2:?usage: $0 STORE OUT [ROUNDS]}
ROUNDS=${3:-1}
B=.venv/bin/elasticplan
for round in $(seq 1 "$ROUNDS"); do
  for bw in 200 1000; do
    d=$OUT/r$round-$bw
    rm -rf "$d"; mkdir -p "$d"
    echo "=== round $round, $bw MB/s, $(date +%T), load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B calibrate --throttle --storage-mb-s "$bw" --store "$STORE" --max-error-pct 1000 \
      --out-dir "$d" > "$d/calibrate.log" 2>&1
    grep -E "^Stage \|error\||noise|^storage" "$d/calibrate.log" | tail -3 | cut -c1-400
    $B solve "$d/scenario.yaml" -o "$d/plan.json" > "$d/solve.log" 2>&1
    $B run "$d/plan.json" --throttle --baselines --repeat 5 --store "$STORE" \
      --json "$d/run.json" > "$d/run.log" 2>&1
    grep -E "^latency|^(hold|load|layerwise)|^disk" "$d/run.log"
  done
done
