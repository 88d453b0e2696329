#!/usr/bin/env bash
# Issue 30's done-when, as docs/results.md ("Truth on a busy machine") runs it: three times,
# with a busy loop holding core 1 throughout, `calibrate` then `solve` then
# `run --baselines --repeat 5` at 200 MB/s and 1 GB/s. calibrate runs at --max-error-pct
# 1000 so that a device it would refuse at its default is kept and measured; its report
# (out/busy/rROUND-S/calibrate.log) gives the errors and noise its default decision uses.
set -euo pipefail
cd "$(dirname "$0")/.."
B=.venv/bin/elasticplan
taskset -c 1 sh -c 'while :; do :; done' &
LOOP=$!
trap 'kill $LOOP' EXIT
for round in 1 2 3; do
  for bw in 200 1000; do
    d=out/busy/r$round-$bw
    rm -rf "$d"; mkdir -p "$d"
    echo "=== round $round, $bw MB/s, $(date +%T), load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B calibrate --storage-mb-s "$bw" --max-error-pct 1000 --out-dir "$d" > "$d/calibrate.log" 2>&1
    grep -E "Stage \|error\||noise" "$d/calibrate.log" | tail -2
    $B solve "$d/scenario.yaml" -o "$d/plan.json" > "$d/solve.log" 2>&1
    $B run "$d/plan.json" --baselines --repeat 5 --json "$d/run.json" > "$d/run.log" 2>&1
    grep -E "^latency|^(hold|load|layerwise)" "$d/run.log"
  done
done
