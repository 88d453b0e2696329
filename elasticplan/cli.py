"""The `elasticplan` command. The planner's own verbs: solve, baseline, verify, sweep, table,
lookup and fleet.

Other packages add commands through the entry-point group `elasticplan.commands`: each
entry is a function `register(subparsers)` that adds its sub-commands, each with a
`handler`. The runtime registers shard, profile, scenario, calibrate, evaluate and run that
way (runtime.commands), so the planner imports nothing of it.

The question's flags (--target-ms, --buffer-mb, --memory-mb, --floor, --window,
--latency-quantile) take their ranges and messages from the question's one table
(elasticplan.problem.question.BOUNDS), as scenario files and plans do.

A user mistake (bad file, bad flag value, infeasible problem) prints one line
`elasticplan: error: ...` on stderr and exits with the code documented in docs/cli.md;
never a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from importlib.metadata import entry_points

from tqdm import tqdm

from elasticplan.answers.explain import explain_failure
from elasticplan.answers.table import IMPLIED_INFEASIBLE, INFEASIBLE, REUSED, PlanTable, build_table, proven_gap
from elasticplan.errors import (
    ElasticplanError,
    InfeasibleError,
    InvalidArgument,
    PlanFormatError,
    SolverTimeoutError,
    SpecError,
)
from elasticplan.plans.baselines import NAMES as BASELINE_NAMES
from elasticplan.plans.baselines import baseline_plan
from elasticplan.plans.plan import Plan
from elasticplan.plans.report import optional, plan_table
from elasticplan.plans.verify import scenario_for, verify_plan, with_plan_question
from elasticplan.problem.loader import load_scenario
from elasticplan.problem.outputs import refuse_inputs, write_csv
from elasticplan.problem.question import BOUNDS, PUBLIC_OBJECTIVES, Objective
from elasticplan.solvers import (
    AUTO_WINDOW,
    BACKENDS,
    DEFAULT_RELATIVE_GAP,
    DEFAULT_SOLVER,
    DEFAULT_THREADS,
    DEFAULT_TIME_LIMIT_S,
    solve,
    solve_any_window,
)

MAX_AXIS_POINTS = 10_000
MIN_SOLVE_S = 0.01  # what a solve gets when loading took the whole time limit
DEFAULT_MAX_POINTS = 10_000  # a table or sweep grid larger than this needs --max-points


def _float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def number_list(text: str) -> list[float]:
    """'A:B:STEP' inclusive, or a single value, or 'a,b,c'; finite numbers only."""
    try:
        if "," in text:
            return [_float(v) for v in text.split(",")]
        parts = [_float(v) for v in text.split(":")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected A:B:STEP or a,b,c of finite numbers, "
                                         f"got {text!r}") from None
    if len(parts) == 1:
        return parts
    if len(parts) != 3 or parts[2] <= 0 or parts[1] < parts[0]:
        raise argparse.ArgumentTypeError(f"expected A:B:STEP with A <= B and STEP > 0, got {text!r}")
    start, stop, step = parts
    span = (stop - start) / step
    if not span < MAX_AXIS_POINTS:
        raise argparse.ArgumentTypeError(f"{text!r} has more than {MAX_AXIS_POINTS} points")
    n = int(span + 1e-9) + 1
    return [round(start + i * step, 9) for i in range(n)]


def positive(text: str) -> float:
    """A finite number > 0 (an argparse type)."""
    v = _float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def out_file(text: str) -> str:
    """An output file's path (an argparse type): not empty, not ending in a separator (a
    directory's name, which a write would otherwise take as a file's)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path: name the file to write")
    if text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text!r} names a directory (it ends in '/'): name "
                                         f"the file to write")
    return text


def asked(field: str):
    """An argparse type for a question field: a number (a whole one for integer fields) in
    the field's range, checked by the question's one table (elasticplan.problem.question.
    BOUNDS), with its message."""
    bound = BOUNDS[field]

    def parse(text: str):
        if bound.integer:
            try:
                v = int(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        else:
            v = _float(text)
        why = bound.problem(v)
        if why is not None:
            raise argparse.ArgumentTypeError(why)
        return v
    return parse


target_ms = asked("target_latency_ms")  # a latency target (an argparse type)
buffer_mb = asked("preload_budget_mb")  # a preload buffer
memory_mb = asked("memory_budget_mb")  # a memory budget
quantile_arg = asked("latency_quantile")  # a latency quantile


def whole(lo: int, hi: int):
    """An argparse type: an integer in [lo, hi]."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}], got {text}")
        return v
    return parse


def real(lo: float, hi: float, *, open_low: bool = False):
    """An argparse type: a finite number in [lo, hi] (or (lo, hi] with open_low)."""
    def parse(text: str) -> float:
        v = _float(text)
        if not ((lo < v) if open_low else (lo <= v)) or v > hi:
            raise argparse.ArgumentTypeError(
                f"must be in {'(' if open_low else '['}{lo:g}, {hi:g}], got {text}")
        return v
    return parse


MAX_THREADS = 256
MAX_TIME_LIMIT_S = 1e6


def gap(text: str) -> float:
    """A relative gap in [0, 1) (an argparse type)."""
    v = _float(text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return v


def _solver_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--solver", choices=sorted(BACKENDS), default=DEFAULT_SOLVER,
                   help=f"default {DEFAULT_SOLVER}")
    p.add_argument("--time-limit", type=real(0, MAX_TIME_LIMIT_S, open_low=True),
                   default=DEFAULT_TIME_LIMIT_S, metavar="S",
                   help=f"seconds for the whole command's solving, explanations included "
                        f"(default {DEFAULT_TIME_LIMIT_S:g}; per point for sweep and table)")
    p.add_argument("--threads", type=whole(1, MAX_THREADS), default=DEFAULT_THREADS)
    p.add_argument("--gap", type=gap, default=DEFAULT_RELATIVE_GAP,
                   help=f"relative gap at which a solve counts as optimal, in [0, 1) "
                        f"(default {DEFAULT_RELATIVE_GAP:g})")


def _grid_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-points", type=whole(1, 10**7), default=DEFAULT_MAX_POINTS, metavar="N",
                   help=f"refuse a grid of more points than this (default {DEFAULT_MAX_POINTS})")


COMMAND_GROUP = "elasticplan.commands"
# Exit codes besides each error class's own (elasticplan.errors; docs/cli.md).
EXIT_BUG = 1
EXIT_IO = 11
EXIT_MEMORY = 12
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process it ended


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C raises KeyboardInterrupt, so that every
    clean-up an interrupt runs (temporary files removed, files closed) runs for it too."""


def _on_sigterm(owner: int):
    def handler(signum, frame):
        if os.getpid() != owner:  # a forked worker (a pool's): end as SIGTERM always did
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Terminated()
    return handler


def _plugins():
    """The `register` functions of every installed package that adds commands."""
    for ep in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        try:
            yield ep.load()
        except Exception as e:  # a broken add-on must not take the planner down with it
            print(f"elasticplan: warning: commands of {ep.value} not loaded: {e}",
                  file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elasticplan", description="Exact elastic-pipelining plans for transformer inference "
                                        "on memory-starved edge devices.")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("solve", help="solve a scenario and print the plan")
    s.set_defaults(handler=cmd_solve)
    s.add_argument("scenario")
    _solver_args(s)
    s.add_argument("--target-ms", type=target_ms, help="override target_latency_ms")
    s.add_argument("--buffer-mb", type=buffer_mb, help="override preload_budget_mb")
    s.add_argument("--memory-mb", type=memory_mb,
                   help="override memory_budget_mb: bound the predicted peak memory")
    s.add_argument("--window", type=window_arg, metavar="N|auto|unbounded",
                   help="override prefetch_window: layers IO may run ahead of compute; 'auto' "
                        "solves every window and keeps the best plan (ties: the least memory)")
    s.add_argument("--objective", choices=[o.value for o in PUBLIC_OBJECTIVES],
                   help="override objective (min_buffer and min_memory need --floor)")
    s.add_argument("--floor", type=asked("importance_floor"), help="override importance_floor")
    s.add_argument("--latency-quantile", type=quantile_arg, metavar="Q",
                   help="override latency_quantile: plan so that this quantile of the "
                        "latency meets the target (the device's measured spread; 0.5: the "
                        "median)")
    s.add_argument("--ttft-ms", type=asked("target_ttft_ms"),
                   help="override target_ttft_ms (a decoder's time to first token; "
                        "--target-ms is then the time per output token)")
    s.add_argument("--prompt-tokens", type=asked("prompt_tokens"),
                   help="override prompt_tokens (a decoder's question)")
    s.add_argument("--answer-tokens", type=asked("answer_tokens"),
                   help="override answer_tokens (a decoder's question)")
    s.add_argument("--query-tokens", type=asked("query_tokens"),
                   help="override query_tokens (an encoder's question): the most distinct "
                        "tokens a query has; a streamed embedding table is read one row per "
                        "distinct token and priced at this many (default: seq_len)")
    s.add_argument("-o", "--output", type=out_file, help="write the plan as JSON")

    b = sub.add_parser("baseline", help="write a classic strategy (hold-in-memory, load-on-demand, "
                                        "...), or uniform-B (every shard streamed at B bits), "
                                        "as a plan")
    b.set_defaults(handler=cmd_baseline)
    b.add_argument("name", help=BASELINE_NAMES)
    b.add_argument("scenario")
    b.add_argument("-o", "--output", required=True, type=out_file, help="write the plan as JSON")

    v = sub.add_parser("verify", help="check a plan file against its scenario")
    v.set_defaults(handler=cmd_verify)
    v.add_argument("plan")
    v.add_argument("--scenario", help="scenario file (default: the path the plan records)")

    w = sub.add_parser("sweep", help="solve over a range of buffers or targets")
    w.set_defaults(handler=cmd_sweep)
    w.add_argument("scenario")
    axis = w.add_mutually_exclusive_group(required=True)
    axis.add_argument("--buffer-mb", type=number_list, metavar="A:B:STEP")
    axis.add_argument("--target-ms", type=number_list, metavar="A:B:STEP")
    _solver_args(w)
    _grid_args(w)
    w.add_argument("--csv", type=out_file, help="also write the frontier as CSV")

    t = sub.add_parser("table", help="solve a grid of targets x buffers into a plan table "
                                     "(solved plans are reused wherever they fit)")
    t.set_defaults(handler=cmd_table)
    t.add_argument("scenario")
    t.add_argument("--target-ms", type=number_list, required=True, metavar="A:B:STEP")
    t.add_argument("--buffer-mb", type=number_list, required=True, metavar="A:B:STEP")
    _solver_args(t)
    _grid_args(t)
    t.add_argument("-o", "--output", required=True, type=out_file, help="write the table as JSON")

    k = sub.add_parser("lookup", help="answer a target and buffer from a plan table")
    k.set_defaults(handler=cmd_lookup)
    k.add_argument("table")
    k.add_argument("--target-ms", type=target_ms, required=True)
    k.add_argument("--buffer-mb", type=buffer_mb, required=True)
    k.add_argument("--scenario", help="scenario file (default: the path the table records)")
    k.add_argument("-o", "--output", type=out_file, help="write the plan as JSON")

    f = sub.add_parser("fleet", help="solve every device x model x question of a fleet file, "
                                     "locally or on a Ray cluster")
    f.set_defaults(handler=cmd_fleet)
    f.add_argument("fleet")
    f.add_argument("-o", "--out", required=True, metavar="DIR",
                   help="results directory (a rerun skips what is done there)")
    f.add_argument("--workers", type=whole(0, MAX_THREADS), metavar="N",
                   help="local worker processes (default: one per core; 0: this process)")
    f.add_argument("--ray", metavar="ADDRESS",
                   help="run on Ray: 'local' starts one on this machine, else a cluster address")

    for register in _plugins():
        register(sub)
    return parser


def window_arg(text: str):
    """A prefetch window: a whole number of layers in its range, 'auto' or 'unbounded'."""
    if text in (AUTO_WINDOW, UNBOUNDED_WINDOW):
        return text
    try:
        return _window(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e}; or 'auto' or 'unbounded'") from None


_window = asked("prefetch_window")
UNBOUNDED_WINDOW = "unbounded"
# The solve command's question flags: argparse dest -> the question's field.
QUESTION_FLAGS = {"target_ms": "target_latency_ms", "buffer_mb": "preload_budget_mb",
                  "memory_mb": "memory_budget_mb", "objective": "objective",
                  "floor": "importance_floor", "window": "prefetch_window",
                  "latency_quantile": "latency_quantile", "ttft_ms": "target_ttft_ms",
                  "prompt_tokens": "prompt_tokens", "answer_tokens": "answer_tokens",
                  "query_tokens": "query_tokens"}


def _question(scenario, a):
    """The scenario with the solve command's flags applied to its question (checked again):
    --window unbounded asks for no window, auto for each in turn (solve_any_window), and
    --objective max_importance drops the scenario's importance floor."""
    changes = {field: getattr(a, dest) for dest, field in QUESTION_FLAGS.items()
               if getattr(a, dest) is not None}
    if "objective" in changes:
        changes["objective"] = Objective(changes["objective"])
        if changes["objective"] == Objective.MAX_IMPORTANCE and a.floor is None:
            changes["importance_floor"] = None
    if a.window in (AUTO_WINDOW, UNBOUNDED_WINDOW):
        changes["prefetch_window"] = None if a.window == UNBOUNDED_WINDOW else \
            scenario.prefetch_window
    try:
        return scenario.with_overrides(**changes)
    except SpecError as e:  # a value a flag gave: said of the flag, with the scenario's file
        flag = next((f"--{dest.replace('_', '-')}" for dest, field in QUESTION_FLAGS.items()
                     if getattr(a, dest) is not None and e.key_path == field), None)
        if flag is None:
            raise
        value = getattr(a, flag[2:].replace("-", "_"))
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        raise InvalidArgument(f"{flag} {shown}: {e.message} (asked of {e.file})") from None


def cmd_solve(a) -> int:
    deadline = time.monotonic() + a.time_limit  # the whole command: load, solve, explain
    scenario = _question(load_scenario(a.scenario), a)
    if a.output:
        refuse_inputs(a.output, scenario.files)
    try:
        limit = max(MIN_SOLVE_S, deadline - time.monotonic())
        if a.window == AUTO_WINDOW:
            plan, scenario = solve_any_window(scenario, a.solver, threads=a.threads,
                                              relative_gap=a.gap, time_limit_s=limit)
        else:
            plan = solve(scenario, a.solver, threads=a.threads, relative_gap=a.gap,
                         time_limit_s=limit)
    except (InfeasibleError, SolverTimeoutError) as failed:
        raise explain_failure(scenario, failed, deadline=deadline, threads=a.threads) from failed
    print(plan_table(scenario, plan))
    if a.output:
        plan.save(a.output, inputs=scenario.files)
        print(f"plan written to {a.output}")
    return 0


def cmd_baseline(a) -> int:
    """A strategy's plan on the scenario's device and model; its question is its own
    latency and preload (so it verifies, runs and evaluates like any plan)."""
    scenario = load_scenario(a.scenario)
    refuse_inputs(a.output, scenario.files)
    plan = baseline_plan(scenario, a.name)
    print(plan_table(with_plan_question(scenario, plan), plan))
    plan.save(a.output, inputs=scenario.files)
    print(f"plan written to {a.output}")
    return 0


def cmd_verify(a) -> int:
    plan = Plan.load(a.plan)
    scenario = scenario_for(plan, a.scenario)
    schedule = verify_plan(scenario, plan)
    at = "" if plan.quantile_latency_ms is None else \
        f" at quantile {scenario.latency_quantile:g} (median {schedule.latency_ms:.3f} ms)"
    print(f"{a.plan}: OK ({plan.solver}, {plan.status.value}): latency "
          f"{plan.planned_latency_ms:.3f} ms{at} <= {scenario.target_latency_ms:g} ms, buffer "
          f"{schedule.preload_bytes / 1e6:.3f} MB <= {scenario.preload_budget_mb:g} MB, "
          f"importance {schedule.importance:.6g}, {plan.n_shards} shards; every predicted "
          f"time matches the simulation")
    return 0


def _check_grid(n_points: int, limit: int) -> None:
    if n_points > limit:
        raise InvalidArgument(f"the grid has {n_points:,} points, more than --max-points "
                              f"{limit:,}; narrow the ranges or raise --max-points")


def _build(base, targets, buffers, a):
    """A plan table over the grid, with a progress bar on stderr (points, solves, ETA)."""
    n = len(set(targets)) * len(set(buffers))
    _check_grid(n, a.max_points)
    with tqdm(total=n, unit="point", desc=f"{base.name}", file=sys.stderr,
              disable=None, dynamic_ncols=True) as bar:
        def log(i, j, cell) -> None:
            bar.update(1)
            if cell.status not in (REUSED, IMPLIED_INFEASIBLE):
                bar.set_postfix_str(f"last: {cell.status}", refresh=False)
        return build_table(base, targets, buffers, solver=a.solver, time_limit_s=a.time_limit,
                           threads=a.threads, relative_gap=a.gap, log=log)


def cmd_sweep(a) -> int:
    base = load_scenario(a.scenario)
    if a.csv:
        refuse_inputs(a.csv, base.files)
    if a.buffer_mb:
        param = "buffer_mb"
        targets, buffers = [base.target_latency_ms], a.buffer_mb
    else:
        param = "target_ms"
        targets, buffers = a.target_ms, [base.preload_budget_mb]
    table = _build(base, targets, buffers, a)
    print(f"{param:>10}  {'status':>18}  {'importance':>10}  {'latency ms':>10}  "
          f"{'used MB':>9}  {'gap':>8}  {'solve s':>7}")
    rows = []
    for i, T in enumerate(table.targets_ms):
        for j, B in enumerate(table.buffers_mb):
            cell = table.cells[i][j]
            value = B if param == "buffer_mb" else T
            # status: the plan's (optimal/feasible) or why there is none; source: solved
            # here, or reused from a larger point's plan (elasticplan.answers.table)
            row = {param: value, "solver": a.solver, "status": cell.status, "source": cell.status}
            plan = table.plan_of(cell)
            if plan is not None:
                row["status"] = plan.status.value
                row.update(importance=plan.importance, latency_ms=plan.predicted_latency_ms,
                           used_mb=plan.preload_bytes / 1e6, gap=proven_gap(plan, cell.bound),
                           solve_seconds=plan.solve_seconds if cell.status == "solved" else None)
            rows.append(row)
            print(f"{value:>10g}  {row['status'] + ' (' + row['source'] + ')':>18}  "
                  f"{optional(row.get('importance'), '.6g'):>10}  "
                  f"{optional(row.get('latency_ms'), '.3f'):>10}  "
                  f"{optional(row.get('used_mb'), '.3f'):>9}  "
                  f"{optional(row.get('gap'), '.1e'):>8}  "
                  f"{optional(row.get('solve_seconds'), '.2f'):>7}")
    print(_saved_line(table))
    loosest = table.cells[-1][-1]
    if loosest.status == INFEASIBLE:  # no point has a plan: say what is short at the loosest
        question = base.with_overrides(target_latency_ms=table.targets_ms[-1],
                                       preload_budget_mb=table.buffers_mb[-1])
        why = explain_failure(question, InfeasibleError("no plan at any point"),
                              deadline=time.monotonic() + a.time_limit, threads=a.threads)
        print(f"no point has a plan; at the loosest ({param} "
              f"{table.buffers_mb[-1] if param == 'buffer_mb' else table.targets_ms[-1]:g}): "
              f"{why}")
    if a.csv:
        fields = [param, "solver", "status", "source", "importance", "latency_ms", "used_mb",
                  "gap", "solve_seconds"]
        write_csv(a.csv, rows, fields, inputs=base.files)
        print(f"frontier written to {a.csv}")
    return 0


def _saved_line(table) -> str:
    n = Counter(c.status for row in table.cells for c in row)
    return (f"{table.solves} solve(s) for {table.n_cells} point(s): {n[REUSED]} answered by a "
            f"solved plan that fits, {n[IMPLIED_INFEASIBLE]} by inherited infeasibility "
            f"({table.n_cells - table.solves} saved); {table.build_seconds:.2f} s")


def cmd_table(a) -> int:
    base = load_scenario(a.scenario)
    refuse_inputs(a.output, base.files)
    table = _build(base, a.target_ms, a.buffer_mb, a)
    gaps = [proven_gap(table.plan_of(c), c.bound) for row in table.cells for c in row]
    worst = max((g for g in gaps if g is not None), default=None)
    print(f"table {base.name}: {len(table.targets_ms)} targets x {len(table.buffers_mb)} buffers, "
          f"{len(table.plans)} distinct plans, largest proven gap {optional(worst, '.1e')}")
    print(_saved_line(table))
    table.save(a.output, inputs=base.files)
    print(f"table written to {a.output}")
    return 0


def cmd_lookup(a) -> int:
    table = PlanTable.load(a.table)
    scenario_path = a.scenario or table.scenario_path
    if scenario_path is None:
        raise InvalidArgument(f"{a.table}: the table names no scenario file; pass --scenario")
    base = load_scenario(scenario_path)
    inputs = (a.table, *base.files)
    if a.output:
        refuse_inputs(a.output, inputs)
    if base.content_hash != table.scenario_sha256:
        raise PlanFormatError(f"{a.table}: stale table: the scenario's device, model or "
                              f"settings changed since it was built (hash "
                              f"{table.scenario_sha256[:12]} != {base.content_hash[:12]})")
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
    # The answer is a plan like any other: verified at the question asked, never trusted.
    verify_plan(base.with_overrides(target_latency_ms=a.target_ms, preload_budget_mb=a.buffer_mb,
                                    min_shards_per_layer=p.scenario.question.min_shards_per_layer), p)
    bound = "unknown (beyond the grid)" if found.bound is None else \
        f"{found.bound:.6g} (gap {found.gap:.1e})"
    print(f"{where}: importance {p.importance:.6g}, latency {p.predicted_latency_ms:.3f} ms, "
          f"buffer {p.preload_bytes / 1e6:.3f} MB, {p.n_shards} shards; proven bound {bound}; "
          f"looked up in {found.seconds * 1e6:.1f} us, verified")
    if a.output:
        p.save(a.output, inputs=inputs)
        print(f"plan written to {a.output}")
    return 0


def cmd_fleet(a) -> int:
    from elasticplan.answers.fleet import load_fleet
    from elasticplan.answers.fleet_run import run_fleet, summary_line

    fleet = load_fleet(a.fleet)
    refuse_inputs(a.out, (a.fleet, *fleet.devices, *fleet.models))
    summary = run_fleet(fleet, a.out, workers=a.workers, ray_address=a.ray)
    print(summary_line(summary))
    return 0


def stopped(message: str) -> None:
    """Say on stderr, on a line of its own, why the command stopped: a progress bar the
    signal cut off mid-line (it came while tqdm drew the bar, before a `with` could close
    it, so no newline ended it) is ended first."""
    if any(not getattr(bar, "disable", True) for bar in list(getattr(tqdm, "_instances", ()))):
        sys.stderr.write("\n")
    print(message, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """The command line; SIGTERM is handled as Ctrl-C is (exit 143) while it runs."""
    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm(os.getpid()))
    try:
        return _main(argv)
    except Terminated:  # before the command started (while the parser was built)
        stopped("elasticplan: terminated (SIGTERM)")
        return EXIT_TERMINATED
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ElasticplanError as e:
        print(f"elasticplan: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # an I/O error the command did not expect (disk, permissions)
        print(f"elasticplan: error: {e.filename or 'I/O'}: {e.strerror or e}", file=sys.stderr)
        return EXIT_IO
    except MemoryError:
        print("elasticplan: error: out of memory; the problem is larger than this machine can "
              "hold (docs/formats.md, 'Limits and ranges')", file=sys.stderr)
        return EXIT_MEMORY
    except Terminated:
        stopped("elasticplan: terminated (SIGTERM)")
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        stopped("elasticplan: interrupted")
        return EXIT_INTERRUPTED
    except Exception as e:  # a bug: say so, keep the traceback for the report
        fd, where = tempfile.mkstemp(prefix="elasticplan-bug-", suffix=".txt")
        with os.fdopen(fd, "w") as fh:
            fh.write(f"argv: {sys.argv!r}\n{traceback.format_exc()}")
        print(f"elasticplan: internal error (a bug, not your input's fault): "
              f"{type(e).__name__}: {e}; please report it with the command line and the "
              f"traceback in {where}", file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
