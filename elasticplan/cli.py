"""The `elasticplan` command: solve, verify, sweep, table, lookup; shard, profile, calibrate, run.

A user mistake (bad file, bad flag value, infeasible problem) prints one line
`elasticplan: error: ...` on stderr and exits non-zero; never a traceback.
"""

from __future__ import annotations

import argparse
import csv
import sys

from elasticplan.errors import ElasticplanError, InfeasibleError, SolverTimeoutError
from elasticplan.explain import explain_failure
from elasticplan.loader import load_scenario
from elasticplan.plan import Plan
from elasticplan.report import optional, plan_table
from elasticplan.solvers import BACKENDS, DEFAULT_RELATIVE_GAP, DEFAULT_SOLVER, DEFAULT_THREADS, \
    DEFAULT_TIME_LIMIT_S, solve
from elasticplan.verify import scenario_for, verify_plan


DEFAULT_STORE = "build/shards/minilm-l6"
DEFAULT_PROFILE = "problems/models/minilm-l6.yaml"
DEFAULT_CACHE = "build/profile/minilm-l6"
DEFAULT_HEAD = "problems/models/minilm-l6.taskhead.json"
DEFAULT_CALIBRATED = "build/calibrated"
DEFAULT_RUN_THREADS = 1
DEFAULT_BASE_SCENARIO = "problems/scenarios/minilm-phone.yaml"


def number_list(text: str) -> list[float]:
    """'A:B:STEP' inclusive, or a single value, or 'a,b,c'."""
    try:
        if "," in text:
            return [float(v) for v in text.split(",")]
        parts = [float(v) for v in text.split(":")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A:B:STEP or a,b,c, got {text!r}") from None
    if len(parts) == 1:
        return parts
    if len(parts) != 3 or parts[2] <= 0 or parts[1] < parts[0]:
        raise argparse.ArgumentTypeError(f"expected A:B:STEP with A <= B and STEP > 0, got {text!r}")
    start, stop, step = parts
    n = int((stop - start) / step + 1e-9) + 1
    if n > 10_000:
        raise argparse.ArgumentTypeError(f"{text!r} has {n} points; at most 10000")
    return [round(start + i * step, 9) for i in range(n)]


def _number(text: str, *, zero_ok: bool) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (v >= 0 if zero_ok else v > 0):
        raise argparse.ArgumentTypeError(f"must be {'>=' if zero_ok else '>'} 0, got {text}")
    return v


def _positive(text: str) -> float:
    return _number(text, zero_ok=False)


def _non_negative(text: str) -> float:
    return _number(text, zero_ok=True)


def _solver_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--solver", choices=sorted(BACKENDS), default=DEFAULT_SOLVER,
                   help=f"default {DEFAULT_SOLVER}")
    p.add_argument("--time-limit", type=_positive, default=DEFAULT_TIME_LIMIT_S, metavar="S",
                   help=f"seconds per solve (default {DEFAULT_TIME_LIMIT_S:g})")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    p.add_argument("--gap", type=float, default=DEFAULT_RELATIVE_GAP,
                   help=f"relative gap at which a solve counts as optimal "
                        f"(default {DEFAULT_RELATIVE_GAP:g})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elasticplan", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("solve", help="solve a scenario and print the plan")
    s.add_argument("scenario")
    _solver_args(s)
    s.add_argument("--target-ms", type=_positive, help="override target_latency_ms")
    s.add_argument("--buffer-mb", type=float, help="override preload_budget_mb")
    s.add_argument("-o", "--output", help="write the plan as JSON")

    v = sub.add_parser("verify", help="check a plan file against its scenario")
    v.add_argument("plan")
    v.add_argument("--scenario", help="scenario file (default: the path the plan records)")

    w = sub.add_parser("sweep", help="solve over a range of buffers or targets")
    w.add_argument("scenario")
    axis = w.add_mutually_exclusive_group(required=True)
    axis.add_argument("--buffer-mb", type=number_list, metavar="A:B:STEP")
    axis.add_argument("--target-ms", type=number_list, metavar="A:B:STEP")
    _solver_args(w)
    w.add_argument("--csv", help="also write the frontier as CSV")

    t = sub.add_parser("table", help="solve a grid of targets x buffers into a plan table "
                                     "(solved plans are reused wherever they fit)")
    t.add_argument("scenario")
    t.add_argument("--target-ms", type=number_list, required=True, metavar="A:B:STEP")
    t.add_argument("--buffer-mb", type=number_list, required=True, metavar="A:B:STEP")
    _solver_args(t)
    t.add_argument("-o", "--output", required=True, help="write the table as JSON")

    k = sub.add_parser("lookup", help="answer a target and buffer from a plan table")
    k.add_argument("table")
    k.add_argument("--target-ms", type=_positive, required=True)
    k.add_argument("--buffer-mb", type=_non_negative, required=True)
    k.add_argument("-o", "--output", help="write the plan as JSON")

    h = sub.add_parser("shard", help="build the MiniLM shard store (idempotent, resumable)")
    h.add_argument("--out", default=DEFAULT_STORE, help=f"store directory (default {DEFAULT_STORE})")
    h.add_argument("--force", action="store_true", help="rewrite every file")

    p = sub.add_parser("profile", help="measure shard importance on the real model and write "
                                       "the model profile (minutes; resumable)")
    p.add_argument("--store", default=DEFAULT_STORE, help=f"default {DEFAULT_STORE}")
    p.add_argument("--out", default=DEFAULT_PROFILE, help=f"profile YAML (default {DEFAULT_PROFILE})")
    p.add_argument("--cache", default=DEFAULT_CACHE, help=f"measurement cache (default {DEFAULT_CACHE})")
    p.add_argument("--head", default=DEFAULT_HEAD, help=f"task head JSON (default {DEFAULT_HEAD})")
    p.add_argument("--metric", choices=("fidelity", "logloss"), default="fidelity",
                   help="what importance measures (default fidelity: cosine to fp32)")

    c = sub.add_parser("calibrate", help="measure this machine's compute in the pipelined "
                                         "runtime; write a device spec and a scenario on it")
    c.add_argument("--store", default=DEFAULT_STORE, help=f"default {DEFAULT_STORE}")
    c.add_argument("--scenario", default=DEFAULT_BASE_SCENARIO,
                   help=f"whose model and question to pose on this machine "
                        f"(default {DEFAULT_BASE_SCENARIO})")
    c.add_argument("--storage-mb-s", type=_positive, metavar="X",
                   help="emulated storage bandwidth; omitted: measure this machine's disk")
    c.add_argument("--storage-latency-us", type=_non_negative, default=100.0, metavar="U",
                   help="emulated per-read latency (default 100)")
    c.add_argument("--target-ms", type=_positive,
                   help="the scenario's target (default: every shard at 8 bits, streamed)")
    c.add_argument("--plans", type=int, default=16, help="random calibration plans (default 16)")
    c.add_argument("--repeats", type=int, default=3, help="measured runs per plan (default 3)")
    c.add_argument("--threads", type=int, default=DEFAULT_RUN_THREADS,
                   help=f"torch threads (default {DEFAULT_RUN_THREADS}); use the same for run")
    c.add_argument("--out-dir", default=DEFAULT_CALIBRATED,
                   help=f"writes device.yaml and scenario.yaml here (default {DEFAULT_CALIBRATED})")

    r = sub.add_parser("run", help="execute a plan on the real model; measured vs predicted")
    r.add_argument("plan")
    r.add_argument("--scenario", help="scenario file (default: the path the plan records)")
    r.add_argument("--store", default=DEFAULT_STORE, help=f"default {DEFAULT_STORE}")
    r.add_argument("--head", default=DEFAULT_HEAD, help=f"task head (default {DEFAULT_HEAD})")
    r.add_argument("--repeat", type=int, default=5, metavar="N",
                   help="measured runs, after one discarded warm-up (default 5)")
    r.add_argument("--tolerance", type=_positive, default=0.10, metavar="F",
                   help="relative tolerance on the total latency (default 0.10)")
    r.add_argument("--enforce", action="store_true",
                   help="exit 10 when the median latency is outside the tolerance")
    r.add_argument("--no-emulate", action="store_true",
                   help="read at this machine's real disk speed instead of the device's")
    r.add_argument("--baselines", action="store_true",
                   help="also run hold-in-memory, load-then-execute and layer-wise pipelining "
                        "on the same device and model, in the same run")
    r.add_argument("--threads", type=int, default=DEFAULT_RUN_THREADS,
                   help=f"torch threads (default {DEFAULT_RUN_THREADS}, as calibrated)")
    r.add_argument("--json", metavar="FILE", help="write the report as JSON")
    r.add_argument("--gantt", metavar="PNG", help="draw predicted and measured pipelines")
    return parser


def _overrides(target_ms, buffer_mb) -> dict:
    out = {}
    if target_ms is not None:
        out["target_latency_ms"] = target_ms
    if buffer_mb is not None:
        out["preload_budget_mb"] = buffer_mb
    return out


def cmd_solve(a) -> int:
    scenario = load_scenario(a.scenario)
    scenario = scenario.with_overrides(**_overrides(a.target_ms, a.buffer_mb))
    try:
        plan = solve(scenario, a.solver, time_limit_s=a.time_limit, threads=a.threads,
                     relative_gap=a.gap)
    except (InfeasibleError, SolverTimeoutError) as failed:
        raise explain_failure(scenario, failed, time_limit_s=a.time_limit,
                              threads=a.threads) from failed
    print(plan_table(scenario, plan))
    if a.output:
        plan.save(a.output)
        print(f"plan written to {a.output}")
    return 0


def cmd_verify(a) -> int:
    plan = Plan.load(a.plan)
    scenario = scenario_for(plan, a.scenario)
    schedule = verify_plan(scenario, plan)
    print(f"{a.plan}: OK ({plan.solver}, {plan.status.value}): latency "
          f"{schedule.latency_ms:.3f} ms <= {scenario.target_latency_ms:g} ms, buffer "
          f"{schedule.preload_bytes / 1e6:.3f} MB <= {scenario.preload_budget_mb:g} MB, "
          f"importance {schedule.importance:.6g}, {plan.n_shards} shards; every predicted "
          f"time matches the simulation")
    return 0


def cmd_sweep(a) -> int:
    from elasticplan.table import build_table, proven_gap

    base = load_scenario(a.scenario)
    if a.buffer_mb:
        param = "buffer_mb"
        targets, buffers = [base.target_latency_ms], a.buffer_mb
    else:
        param = "target_ms"
        targets, buffers = a.target_ms, [base.preload_budget_mb]
    print(f"{param:>10}  {'status':>18}  {'importance':>10}  {'latency ms':>10}  "
          f"{'used MB':>9}  {'gap':>8}  {'solve s':>7}")
    table = build_table(base, targets, buffers, solver=a.solver, time_limit_s=a.time_limit,
                        threads=a.threads, relative_gap=a.gap)
    rows = []
    for i, T in enumerate(table.targets_ms):
        for j, B in enumerate(table.buffers_mb):
            cell = table.cells[i][j]
            value = B if param == "buffer_mb" else T
            # status: the plan's (optimal/feasible) or why there is none; source: solved
            # here, or reused from a larger point's plan (elasticplan.table)
            row = {param: value, "solver": a.solver, "status": cell.status, "source": cell.status}
            plan = table.plan_of(cell)
            if plan is not None:
                row["status"] = plan.status.value
                gap = proven_gap(plan, cell.bound)
                row.update(importance=plan.importance, latency_ms=plan.predicted_latency_ms,
                           used_mb=plan.preload_bytes / 1e6, gap=gap,
                           solve_seconds=plan.solve_seconds if cell.status == "solved" else None)
            rows.append(row)
            print(f"{value:>10g}  {row['status'] + ' (' + row['source'] + ')':>18}  "
                  f"{optional(row.get('importance'), '.6g'):>10}  "
                  f"{optional(row.get('latency_ms'), '.3f'):>10}  "
                  f"{optional(row.get('used_mb'), '.3f'):>9}  "
                  f"{optional(row.get('gap'), '.1e'):>8}  "
                  f"{optional(row.get('solve_seconds'), '.2f'):>7}")
    print(_saved_line(table))
    if a.csv:
        fields = [param, "solver", "status", "source", "importance", "latency_ms", "used_mb",
                  "gap", "solve_seconds"]
        with open(a.csv, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(rows)
        print(f"frontier written to {a.csv}")
    return 0


def _saved_line(table) -> str:
    from collections import Counter

    from elasticplan.table import IMPLIED_INFEASIBLE, REUSED

    n = Counter(c.status for row in table.cells for c in row)
    return (f"{table.solves} solve(s) for {table.n_cells} point(s): {n[REUSED]} answered by a "
            f"solved plan that fits, {n[IMPLIED_INFEASIBLE]} by inherited infeasibility "
            f"({table.n_cells - table.solves} saved); {table.build_seconds:.2f} s")


def cmd_table(a) -> int:
    from elasticplan.table import build_table, proven_gap

    base = load_scenario(a.scenario)
    table = build_table(base, a.target_ms, a.buffer_mb, solver=a.solver,
                        time_limit_s=a.time_limit, threads=a.threads, relative_gap=a.gap)
    gaps = [proven_gap(table.plan_of(c), c.bound) for row in table.cells for c in row]
    worst = max((g for g in gaps if g is not None), default=None)
    print(f"table {base.name}: {len(table.targets_ms)} targets x {len(table.buffers_mb)} buffers, "
          f"{len(table.plans)} distinct plans, largest proven gap {optional(worst, '.1e')}")
    print(_saved_line(table))
    table.save(a.output)
    print(f"table written to {a.output}")
    return 0


def cmd_lookup(a) -> int:
    from elasticplan.table import PlanTable

    table = PlanTable.load(a.table)
    found = table.lookup(a.target_ms, a.buffer_mb)
    where = f"target {a.target_ms:g} ms, buffer {a.buffer_mb:g} MB"
    if found.plan is None:
        raise InfeasibleError(
            f"{a.table}: no plan for {where}: "
            + ("below the table's grid (targets from "
               f"{table.targets_ms[0]:g} ms, buffers from {table.buffers_mb[0]:g} MB)"
               if found.cell is None else
               f"the grid cell at or below it is {table.cells[found.cell[0]][found.cell[1]].status}"))
    p = found.plan
    bound = "unknown (beyond the grid)" if found.bound is None else \
        f"{found.bound:.6g} (gap {found.gap:.1e})"
    print(f"{where}: importance {p.importance:.6g}, latency {p.predicted_latency_ms:.3f} ms, "
          f"buffer {p.preload_bytes / 1e6:.3f} MB, {p.n_shards} shards; proven bound {bound}; "
          f"looked up in {found.seconds * 1e6:.1f} us")
    if a.output:
        p.save(a.output)
        print(f"plan written to {a.output}")
    return 0


def cmd_shard(a) -> int:
    import time

    from runtime.store import build_store

    t0 = time.monotonic()
    report = build_store(a.out, force=a.force, log=lambda s: print(s, file=sys.stderr))
    print(f"{report.path}: {len(report.written)} file(s) written, {len(report.kept)} kept "
          f"(checksums match), {report.total_bytes / 1e6:.1f} MB in all, "
          f"{time.monotonic() - t0:.1f} s")
    return 0


def cmd_profile(a) -> int:
    from runtime.profile import profile_model

    profile_model(a.store, a.out, cache_dir=a.cache, head_path=a.head, metric=a.metric)
    return 0


def _set_threads(n: int) -> None:
    import torch

    if n < 1:
        raise ElasticplanError(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)


def cmd_calibrate(a) -> int:
    from pathlib import Path

    from runtime.calibrate import calibrate, write_calibration
    from runtime.measure import query_batches
    from runtime.store import ShardStore

    if a.plans < 2 or a.repeats < 1:
        raise ElasticplanError("--plans must be >= 2 and --repeats >= 1")
    _set_threads(a.threads)
    base = load_scenario(a.scenario)
    store = ShardStore(a.store)
    queries = query_batches(store, base.model.seq_len, a.repeats)
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    device, fit, facts = calibrate(store, base, bandwidth_mb_s=a.storage_mb_s,
                                   latency_us=a.storage_latency_us, plans=a.plans,
                                   repeats=a.repeats, queries=queries, log=log)
    device_path, scenario_path, target = write_calibration(Path(a.out_dir), base, device, fit,
                                                           facts, a.target_ms)
    print(f"compute: layer_overhead_ms {device.layer_overhead_ms:g}, gflops {device.gflops:g}, "
          f"dequant_gb_s {device.dequant_gb_s:g} (fit over {fit.samples} layer runs: R^2 "
          f"{fit.r2:.3f}, mean abs error {fit.mae_ms:.3f} ms)")
    print(f"storage: {facts['storage']}")
    print(f"wrote {device_path} and {scenario_path} (target {target:g} ms, buffer "
          f"{base.preload_budget_mb:g} MB)")
    return 0


def cmd_run(a) -> int:
    import json

    from elasticplan.baselines import baseline_questions
    from elasticplan.errors import ToleranceError
    from runtime.measure import (Reference, format_comparison, format_report, gantt,
                                 measure_plan, query_batches)
    from runtime.executor import check_model
    from runtime.store import ShardStore
    from runtime.task import TaskHead

    if a.repeat < 1:
        raise ElasticplanError(f"--repeat must be >= 1, got {a.repeat}")
    plan = Plan.load(a.plan)
    scenario = scenario_for(plan, a.scenario)
    verify_plan(scenario, plan)  # stale or invalid plans stop here, before any compute
    store = ShardStore(a.store)
    check_model(plan, store)
    _set_threads(a.threads)
    head = TaskHead.load(a.head)
    queries = query_batches(store, scenario.model.seq_len, a.repeat)
    reference = Reference(store)
    common = dict(repeats=a.repeat, emulate=not a.no_emulate, queries=queries,
                  reference=reference, head=head, tolerance=a.tolerance)
    report = measure_plan(plan, scenario, store, plan_path=a.plan, **common)
    print(format_report(report))
    reports = [report]
    if a.baselines:
        skipped = lambda strategy, e: print(f"{strategy}: not run: {e}")  # noqa: E731
        for b, question in baseline_questions(scenario, skipped):
            reports.append(measure_plan(b, question, store, **common))
        print()
        print(format_comparison(reports))
    if a.json:
        data = dict(report)
        if a.baselines:
            data["baselines"] = reports[1:]
        with open(a.json, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)
        print(f"report written to {a.json}")
    if a.gantt:
        gantt(reports, a.gantt)
        print(f"pipelines drawn to {a.gantt}")
    if a.enforce and not report["within_tolerance"]:
        raise ToleranceError(f"measured {report['measured_latency_ms']:.2f} ms vs predicted "
                             f"{report['predicted_latency_ms']:.2f} ms "
                             f"({report['relative_error']:+.1%}) is outside "
                             f"±{a.tolerance:.0%}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"solve": cmd_solve, "verify": cmd_verify, "sweep": cmd_sweep, "table": cmd_table,
               "lookup": cmd_lookup,
               "shard": cmd_shard, "profile": cmd_profile, "calibrate": cmd_calibrate,
               "run": cmd_run}[args.command]
    try:
        return handler(args)
    except ElasticplanError as e:
        print(f"elasticplan: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # e.g. -o into a missing directory
        print(f"elasticplan: error: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("elasticplan: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
