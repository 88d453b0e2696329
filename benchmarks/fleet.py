"""Fleet throughput: the same >= 1,000 solves sequentially, on a local process pool with 1
and 2 workers, and on a local Ray with 2 workers; solves per second, the speed-up over
sequential, and the per-task overhead (wall time per solve beyond the solver's own time);
then an estimate of a 100,000-solve fleet on N nodes from the measured per-solve times.

    python -m benchmarks.fleet [--targets ...] [--buffers ...] [--skip-ray]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.common import out_path, start, write_csv
from elasticplan.answers.fleet import load_fleet
from elasticplan.answers.fleet_run import run_fleet
from elasticplan.cli import number_list

MODULE = "benchmarks.fleet"
ROOT = Path(__file__).resolve().parent.parent
MODELS = ("minilm-l6", "distilbert", "bert-base", "bert-large")
COLUMNS = ["executor", "workers", "solves", "wall_s", "solves_per_s", "speedup",
           "solver_s_total", "overhead_ms_per_solve", "overhead_vs_sequential_ms"]


def fleet_file(d: Path, targets, buffers, time_limit: float, gap: float) -> Path:
    f = d / "bench-fleet.yaml"
    f.write_text(yaml.safe_dump({
        "schema": "elasticplan.fleet/1", "name": "bench",
        "devices": [str(ROOT / "problems" / "devices" / "*.yaml")],
        "models": [str(ROOT / "problems" / "models" / f"{m}.yaml") for m in MODELS],
        "questions": {"targets_ms": list(targets), "buffers_mb": list(buffers)},
        "solver": {"name": "highs", "time_limit_s": time_limit, "gap": gap}}))
    return f


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    ap.add_argument("--targets", type=number_list, default="25,50,75,100,150,200,400",
                    help="ms")
    ap.add_argument("--buffers", type=number_list, default="0,2,8", help="MB")
    ap.add_argument("--time-limit", type=float, default=5.0)
    ap.add_argument("--gap", type=float, default=1e-2)
    ap.add_argument("--skip-ray", action="store_true")
    a = ap.parse_args(argv)
    start(MODULE, argv if argv is not None else sys.argv[1:])
    runs = [("sequential", 0, None), ("process pool", 1, None), ("process pool", 2, None)]
    if not a.skip_ray:
        runs.append(("ray (local)", 2, "local"))
    rows, base = [], None
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        fleet = load_fleet(fleet_file(Path(tmp), a.targets, a.buffers, a.time_limit, a.gap))
        solve_times = None
        for executor, workers, ray in runs:
            out = Path(tmp) / f"{executor}-{workers}".replace(" ", "_")
            s = run_fleet(fleet, out, workers=workers, ray_address=ray, progress=False)
            solver_s = sum(float(r.get("solve_seconds") or 0)
                           for r in (json.loads(p.read_text())
                                     for p in (out / "rows").glob("*.json")))
            if solve_times is None:
                solve_times = [float(json.loads(p.read_text()).get("solve_seconds") or 0)
                               for p in (out / "rows").glob("*.json")]
            base = base or s.seconds
            per_worker = s.seconds * max(1, workers)
            rows.append({"executor": executor, "workers": workers or 1, "solves": s.solved_now,
                         "wall_s": s.seconds, "solves_per_s": s.solved_now / s.seconds,
                         "speedup": base / s.seconds,
                         "solver_s_total": solver_s,
                         # beyond the solver: loading, writing rows and plans, the report
                         "overhead_ms_per_solve": 1e3 * (per_worker - solver_s) / s.solved_now,
                         # what distributing costs: worker time beyond the sequential run's
                         "overhead_vs_sequential_ms": 1e3 * (per_worker - base) / s.solved_now})
            print(f"{executor:<14} workers {workers or 1}: {s.solved_now} solves in "
                  f"{s.seconds:6.1f} s = {rows[-1]['solves_per_s']:6.1f}/s, "
                  f"speed-up {rows[-1]['speedup']:.2f}x, overhead beyond the solver "
                  f"{rows[-1]['overhead_ms_per_solve']:+.1f} ms, beyond sequential "
                  f"{rows[-1]['overhead_vs_sequential_ms']:+.1f} ms per solve", flush=True)
            shutil.rmtree(out)
    write_csv(out_path("fleet.csv"), rows, COLUMNS)
    mean = statistics.fmean(solve_times)
    p95 = sorted(solve_times)[int(0.95 * (len(solve_times) - 1))]
    print(f"per-solve time (sequential): mean {mean * 1e3:.0f} ms, p95 {p95 * 1e3:.0f} ms")
    speedup = max(r["speedup"] / r["workers"] for r in rows if r["workers"] > 1) \
        if any(r["workers"] > 1 for r in rows) else 1.0
    for nodes, cores in ((1, 2), (10, 16), (100, 16)):
        ideal = 100_000 * mean / (nodes * cores)
        print(f"estimate: 100,000 solves on {nodes} node(s) x {cores} cores: "
              f"{ideal / 60:.1f} min at the mean per-solve time with perfect scaling, "
              f"{ideal / speedup / 60:.1f} min at the per-worker efficiency measured here "
              f"({speedup:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
