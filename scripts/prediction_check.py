"""Does a plan's predicted latency hold when it runs? Side by side, in one process:

for each emulated storage bandwidth: calibrate this machine (elasticplan calibrate), solve
MiniLM plans over a grid of targets and buffers with CP-SAT, run each (and the three
baselines) through the runtime, and print predicted vs measured with the relative error.

    .venv/bin/python scripts/prediction_check.py [--bandwidths 200,400] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from elasticplan.baselines import STRATEGIES, baseline_plan
from elasticplan.errors import ElasticplanError
from elasticplan.loader import load_scenario
from elasticplan.solvers import solve
from elasticplan.verify import with_plan_question
from runtime.calibrate import calibrate, write_calibration
from runtime.measure import Reference, measure_plan, query_batches
from runtime.store import ShardStore

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bandwidths", default="200,400", help="MB/s, comma-separated")
    p.add_argument("--fractions", default="0.6,0.7,0.8,0.9,1.0,1.2",
                   help="targets as fractions of the calibrated default target")
    p.add_argument("--buffers", default="0,2", help="preload budgets, MB")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--time-limit", type=float, default=5.0)
    p.add_argument("--store", default=str(ROOT / "build/shards/minilm-l6"))
    p.add_argument("--json", help="write every report")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    store = ShardStore(a.store)
    base = load_scenario(ROOT / "problems/scenarios/minilm-phone.yaml")
    queries = query_batches(store, base.model.seq_len, a.repeat)
    reference = Reference(store)
    rows, reports = [], []
    print(f"# scripts/prediction_check.py; {platform.node()}, {time.strftime('%Y-%m-%d')}, "
          f"torch threads {a.threads}, {a.repeat} runs per plan after a warm-up")
    print(f"{'MB/s':>5} {'plan':<22} {'target':>7} {'buf MB':>6} {'predicted':>9} "
          f"{'measured':>9} {'error':>7} {'fidelity':>8}")
    for bw in [float(x) for x in a.bandwidths.split(",")]:
        out_dir = ROOT / "build" / f"calibrated-{bw:g}"
        device, fit, facts = calibrate(store, base, bandwidth_mb_s=bw, latency_us=100.0,
                                       queries=queries, log=lambda s: None)
        _, scen_path, default_target = write_calibration(out_dir, base, device, fit, facts, None)
        print(f"# {bw:g} MB/s: calibrated gflops {device.gflops:g}, layer_overhead_ms "
              f"{device.layer_overhead_ms:g}, dequant_gb_s {device.dequant_gb_s:g} (R^2 "
              f"{fit.r2:.3f}); default target {default_target:g} ms")
        sc0 = load_scenario(scen_path)
        plans = []
        for frac in [float(x) for x in a.fractions.split(",")]:
            for buf in [float(x) for x in a.buffers.split(",")]:
                sc = sc0.with_overrides(target_latency_ms=round(default_target * frac, 1),
                                        preload_budget_mb=buf)
                try:
                    plans.append((sc, solve(sc, "cpsat", time_limit_s=a.time_limit)))
                except ElasticplanError as e:
                    print(f"# target {sc.target_latency_ms:g} ms, {buf:g} MB: {e}")
        for strategy in STRATEGIES:
            b = baseline_plan(sc0, strategy)
            plans.append((with_plan_question(sc0, b), b))
        for sc, plan in plans:
            r = measure_plan(plan, sc, store, repeats=a.repeat, emulate=True, queries=queries,
                             reference=reference, head=None)
            r["bandwidth_mb_s"] = bw
            reports.append(r)
            rows.append((bw, plan.solver, r["relative_error"]))
            print(f"{bw:>5g} {plan.solver:<22} {plan.scenario.target_latency_ms:>7.1f} "
                  f"{plan.scenario.preload_budget_mb:>6.2f} {r['predicted_latency_ms']:>9.2f} "
                  f"{r['measured_latency_ms']:>9.2f} {r['relative_error']:>+7.1%} "
                  f"{r['fidelity']:>8.4f}", flush=True)
    for bw in sorted({r[0] for r in rows}):
        solved = [abs(e) for b, s, e in rows if b == bw and s not in STRATEGIES]
        if solved:
            print(f"# {bw:g} MB/s, {len(solved)} solved plans: mean |error| "
                  f"{statistics.fmean(solved):.1%}, max {max(solved):.1%}")
    if a.json:
        Path(a.json).write_text(json.dumps(reports, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
