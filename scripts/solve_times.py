#!/usr/bin/env python3
"""Solve every shipped scenario with every backend, side by side, and print a table.

    .venv/bin/python scripts/solve_times.py [--time-limit 60]
"""

import argparse
import datetime
import platform
import time
from pathlib import Path

from elasticplan.errors import ElasticplanError
from elasticplan.loader import load_scenario
from elasticplan.solvers import solve

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--time-limit", type=float, default=60.0)
    args = ap.parse_args()
    print(f"# scripts/solve_times.py --time-limit {args.time_limit:g}; {platform.node()}, "
          f"{platform.processor() or platform.machine()}, {datetime.date.today()}")
    print(f"{'scenario':<28} {'solver':<7} {'status':<9} {'gap':>8} {'importance':>10} "
          f"{'vs greedy':>9} {'latency ms':>10} {'buffer MB':>9} {'solve s':>8}")
    for path in sorted((ROOT / "problems" / "scenarios").glob("*.yaml")):
        sc = load_scenario(path)
        greedy = None
        for solver in ("greedy", "cpsat", "cbc"):
            t = time.perf_counter()
            try:
                plan = solve(sc, solver, time_limit_s=args.time_limit)
            except ElasticplanError as e:
                print(f"{sc.name:<28} {solver:<7} {type(e).__name__}: {e}"[:160])
                continue
            wall = time.perf_counter() - t
            greedy = plan if solver == "greedy" else greedy
            ratio = f"{plan.importance / greedy.importance:.4f}" if greedy else "-"
            gap = "-" if plan.gap is None else f"{plan.gap:.1e}"
            print(f"{sc.name:<28} {solver:<7} {plan.status.value:<9} {gap:>8} "
                  f"{plan.importance:>10.6f} {ratio:>9} {plan.predicted_latency_ms:>10.3f} "
                  f"{plan.preload_bytes / 1e6:>9.3f} {wall:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
