"""Solver speed, side by side in one run: per problem-zoo instance and backend, the model
build time, the solve time (median of --repeats), status, gap, and the objective relative
to the best proven bound of any backend on that instance. Then the frontiers: min_buffer
and min_memory at --frontier-floors importance floors x 3 targets, for BERT-base and
MiniLM, each point solved to a proven 1e-4 and 1e-6 by the default path (row generation)
and to 1e-4 by the whole aggregated program (`highs-whole`, the path before it), with
per-frontier totals.

    python -m benchmarks.solver_speed [--time-limit 20] [--repeats 5] [--frontier-floors 8]
                                      [--only NAME] [--out-dir D]

Instances: every shipped scenario at its own question, plus targets that force shards to
be dropped (the hard, knapsack-like regime), plus memory questions (a memory budget with
a prefetch window, and min_memory at an importance floor: the programs' memory rows and
time variables). Backends: greedy (STI), CP-SAT and CBC on the
plain per-shard program, HiGHS on the aggregated program at the gaps the solver-speed
goals name (1e-6, 1e-3, 1e-2). A solve that reaches the time limit is run once, not
--repeats times. The plain program is not built above formulation.PLAIN_MAX_BOOLS booleans (its dense
latency rows grow as layers^2 x shards; the row says so).
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks.common import ROOT, header, out_path, write_csv
from elasticplan.errors import ElasticplanError
from elasticplan.plans.report import optional
from elasticplan.plans.verify import verify_plan
from elasticplan.problem.loader import load_scenario
from elasticplan.problem.question import Objective
from elasticplan.solvers import solve
from elasticplan.solvers.aggregated import highs
from elasticplan.solvers.aggregated import program as aggregated
from elasticplan.solvers.plain import program as formulation

MODULE = "benchmarks.solver_speed"
WHOLE = "highs-whole"  # HiGHS on the whole aggregated program: no row generation

HARD = {"bert-base-phone": 140.0, "minilm-phone": 17.0, "distilbert-sbc": 450.0}
RUNS = [("greedy", None), ("cpsat", 1e-6), ("cbc", 1e-6), ("highs", 1e-6), ("highs", 1e-4),
        ("highs", 1e-3), ("highs", 1e-2), (WHOLE, 1e-6), (WHOLE, 1e-4)]


# Frontier points: (scenario, targets); floors run from where the objective first costs
# anything (min_buffer: the most importance with no buffer; min_memory: none) to a hair
# below the most importance reachable at the target.
FRONTIERS = {"bert-base": ("bert-base-phone-min-buffer", (185.0, 195.0, 205.0)),
             "minilm": ("minilm-phone", (17.0, 21.0, 25.0))}
FRONTIER_OBJECTIVES = (Objective.MIN_BUFFER, Objective.MIN_MEMORY)
FRONTIER_RUNS = [("highs", 1e-4), ("highs", 1e-6), (WHOLE, 1e-4)]


# name -> (memory budget MB, prefetch window); and min_memory at an importance floor
MEMORY = {"minilm-phone": (9.0, 1), "bert-base-phone": (110.0, 1)}
MIN_MEMORY = {"minilm-phone": 1.2}


def instances():
    for path in sorted((ROOT / "problems" / "scenarios").glob("*.yaml")):
        sc = load_scenario(path)
        yield sc.name, sc
        if sc.name in HARD:
            yield f"{sc.name}@{HARD[sc.name]:g}ms", sc.with_overrides(
                target_latency_ms=HARD[sc.name])
        if sc.name in MEMORY:
            mb, window = MEMORY[sc.name]
            yield f"{sc.name}+{mb:g}MB/w{window}", sc.with_overrides(
                memory_budget_mb=mb, prefetch_window=window)
        if sc.name in MIN_MEMORY:
            yield f"{sc.name}:min_memory", sc.with_overrides(
                objective=Objective.MIN_MEMORY, importance_floor=MIN_MEMORY[sc.name])


def run(sc, solver: str, gap: float, time_limit: float, threads: int):
    """A verified plan from `solver` (WHOLE: HiGHS without row generation)."""
    if solver != WHOLE:
        return solve(sc, solver, time_limit_s=time_limit, threads=threads, relative_gap=gap)
    plan = highs.solve_highs(sc, time_limit_s=time_limit, threads=threads, relative_gap=gap,
                             row_generation=False)
    verify_plan(sc, plan)
    return plan


def frontier_points(name: str, objective: Objective, floors: int, time_limit: float):
    """(label, question) per frontier point."""
    scenario, targets = FRONTIERS[name]
    base = load_scenario(ROOT / "problems" / "scenarios" / f"{scenario}.yaml").with_overrides(
        objective=Objective.MAX_IMPORTANCE, importance_floor=None)
    for target in targets:
        at = base.with_overrides(target_latency_ms=target)
        top = solve(at, time_limit_s=time_limit, relative_gap=1e-6).importance
        lo = solve(at.with_overrides(preload_budget_mb=0), time_limit_s=time_limit,
                   relative_gap=1e-6).importance if objective == Objective.MIN_BUFFER else 0.0
        for k in range(floors):
            floor = float(f"{(lo + (top - lo) * (k + 1) / floors) * (1 - 1e-6):.9g}")
            yield (f"{name}:{objective.value}@{target:g}/{floor:.6f}",
                   at.with_overrides(objective=objective, importance_floor=floor))


def frontiers(a, rows: list[dict]) -> None:
    """Every frontier point by every FRONTIER_RUNS path, then per frontier and path: the
    points proven within the gap asked, the total and the longest solve time."""
    print(f"\n{'frontier point':<44} {'solver':<11} {'gap asked':>9} {'solve ms':>9} "
          f"{'status':<9} {'gap':>8} {'objective':>12}")
    summary = []
    for name in FRONTIERS:
        if a.only and a.only not in name:
            continue
        for objective in FRONTIER_OBJECTIVES:
            times: dict = {key: [] for key in FRONTIER_RUNS}
            proven: dict = {key: 0 for key in FRONTIER_RUNS}
            for label, sc in frontier_points(name, objective, a.frontier_floors, a.time_limit):
                for solver, gap in FRONTIER_RUNS:
                    row = {"instance": label, "size": size(sc), "solver": solver,
                           "gap_asked": gap, "bools": formulation.n_bools(sc)}
                    t = time.perf_counter()
                    try:
                        plan = run(sc, solver, gap, a.time_limit, a.threads)
                        row.update(solve_ms=(time.perf_counter() - t) * 1e3, runs=1,
                                   status=plan.status.value, gap=plan.gap,
                                   objective=plan.objective)
                        proven[(solver, gap)] += plan.status.value == "optimal" and \
                            plan.gap <= gap
                    except ElasticplanError as e:
                        row.update(solve_ms=(time.perf_counter() - t) * 1e3,
                                   status=type(e).__name__)
                    times[(solver, gap)].append(row["solve_ms"])
                    rows.append(row)
                    print(f"{label:<44} {solver:<11} {gap:>9.0e} {row['solve_ms']:>9.1f} "
                          f"{row['status']:<9} {optional(row.get('gap'), '.1e'):>8} "
                          f"{optional(row.get('objective'), '.6g'):>12}", flush=True)
            for (solver, gap), ms in times.items():
                summary.append(f"{name + ':' + objective.value:<22} {solver:<11} {gap:>9.0e} "
                               f"{proven[(solver, gap)]:>3}/{len(ms):<3} proven "
                               f"{sum(ms) / 1e3:>8.1f} s in all, longest {max(ms) / 1e3:.2f} s")
    print("\nfrontier                 solver      gap asked  points proven within it, time")
    print("\n".join(summary))


def size(sc) -> str:
    m = sc.model
    shards = max(len(layer.shards) for layer in m.layers)
    return f"{len(m.layers)}x{shards}x{len(m.bitwidths)}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    ap.add_argument("--time-limit", type=float, default=20.0, help="per solve, s")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", help="run only instances whose name contains this")
    ap.add_argument("--frontier-floors", type=int, default=8,
                    help="importance floors per target on each frontier (0: no frontiers)")
    ap.add_argument("--out-dir", help="default out/bench")
    a = ap.parse_args(argv)
    if a.repeats < 1:
        ap.error("--repeats must be at least 1")
    print(header(MODULE, argv, solver_threads=a.threads))
    head = (f"{'instance':<28} {'size':>9} {'solver':<11} {'gap asked':>9} {'build ms':>9} "
            f"{'solve ms':>9} {'status':<9} {'gap':>8} {'vs bound':>9}")
    print(head)
    rows = []
    for name, sc in instances():
        if a.only and a.only not in name:
            continue
        results = []
        n_bools = formulation.n_bools(sc)
        for solver, gap in RUNS:
            row = {"instance": name, "size": size(sc), "solver": solver,
                   "gap_asked": gap, "bools": n_bools}
            build = formulation.build if solver in ("cpsat", "cbc") else \
                highs.build if solver == "highs" else aggregated.build
            if solver in ("cpsat", "cbc") and n_bools > formulation.PLAIN_MAX_BOOLS:
                row["status"] = f"not built: {n_bools} booleans > {formulation.PLAIN_MAX_BOOLS}"
                results.append(row)
                continue
            if solver != "greedy":
                t = time.perf_counter()
                build(sc)
                row["build_ms"] = (time.perf_counter() - t) * 1e3
            times, plan = [], None
            for _ in range(a.repeats):
                try:
                    plan = run(sc, solver, gap if gap is not None else 1e-4, a.time_limit,
                               a.threads)
                except ElasticplanError as e:
                    row["status"] = f"{type(e).__name__}"
                    break
                times.append(plan.solve_seconds * 1e3)
                if plan.solve_seconds >= 0.9 * a.time_limit:
                    break  # at the limit: once is enough
            if plan is not None and times:
                row.update(solve_ms=statistics.median(times), runs=len(times),
                           status=plan.status.value, gap=plan.gap, objective=plan.objective)
            results.append(row)
        bounds = [r["objective"] * (1 + r["gap"]) for r in results
                  if r.get("gap") is not None and "objective" in r]
        best_bound = min(bounds) if bounds else None
        for r in results:
            if best_bound and "objective" in r:
                r["vs_bound"] = r["objective"] / best_bound
            rows.append(r)
            print(f"{r['instance']:<28} {r['size']:>9} {r['solver']:<11} "
                  f"{optional(r.get('gap_asked'), '.0e'):>9} "
                  f"{optional(r.get('build_ms'), '.1f'):>9} "
                  f"{optional(r.get('solve_ms'), '.1f'):>9} {r.get('status', ''):<9} "
                  f"{optional(r.get('gap'), '.1e'):>8} {optional(r.get('vs_bound'), '.6f'):>9}",
                  flush=True)
    if a.frontier_floors > 0:
        frontiers(a, rows)
    fields = ["instance", "size", "bools", "solver", "gap_asked", "build_ms", "solve_ms", "runs",
              "status", "gap", "objective", "vs_bound"]
    write_csv(out_path("solver_speed.csv", a.out_dir), rows, fields)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
