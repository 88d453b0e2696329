"""Running a fleet (elasticplan.answers.fleet): executors, the result files, plan tables, the report.

Executors, all running `fleet.solve_chunk` on chunks of tasks:
- `workers=0`: in this process, one chunk after another (the reference);
- a local process pool of `workers` processes (the default; started in about a second,
  measured against a local Ray in benchmarks/fleet.py);
- Ray: `ray_address="local"` starts a Ray instance on this machine, any other address
  joins an existing cluster. Ray retries a chunk whose worker died (`max_retries`).
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import json
import multiprocessing
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from elasticplan.answers.fleet import (
    CHUNK,
    FAILED,
    Bundle,
    Fleet,
    Task,
    _fleet_id,
    check,
    pair_scenario,
    scenario_text,
    solve_chunk,
    task_key,
    write_plan,
)
from elasticplan.answers.table import INFEASIBLE, NO_PLAN, SOLVED, TIMEOUT, Cell, PlanTable
from elasticplan.errors import InvalidArgument, SpecError
from elasticplan.plans.plan import Plan
from elasticplan.problem.inputs import load_json
from elasticplan.problem.loader import load_scenario
from elasticplan.problem.outputs import save_figure, write_bytes, write_csv, write_text
from elasticplan.problem.question import Objective

COLUMNS = ["key", "device", "model", "target_ms", "buffer_mb", "objective", "floor_fraction",
           "solver", "gap_asked", "status", "explanation", "objective_value", "importance",
           "importance_fraction", "gap", "predicted_latency_ms", "preload_bytes",
           "resident_bytes", "predicted_memory_bytes", "shards", "solve_seconds", "attempts",
           "plan"]


@dataclass(frozen=True)
class Summary:
    tasks: int
    solved_now: int
    skipped: int
    by_status: dict
    seconds: float
    out: Path


# --- pairs and tasks -----------------------------------------------------------------------

def _pairs(fleet: Fleet, out: Path) -> dict[str, tuple[str, str, Path]]:
    """pair -> (device file, model file, the pair's scenario file in DIR/scenarios)."""
    pairs, seen = {}, Counter()
    for device in fleet.devices:
        for model in fleet.models:
            name = f"{Path(device).stem}--{Path(model).stem}"
            seen[name] += 1
            if seen[name] > 1:
                name += f"-{seen[name]}"
            pairs[name] = (device, model, out / "scenarios" / f"{name}.yaml")
    return pairs


def prepare(fleet: Fleet, out: Path) -> tuple[dict[str, Bundle], list[Task], dict]:
    """Write each pair's scenario file, and make the bundles and the task list."""
    check(fleet)
    for sub in ("scenarios", "rows", "plans", "tables"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    bundles, tasks, meta = {}, [], {}
    for pair, (device, model, file) in _pairs(fleet, out).items():
        data = pair_scenario(fleet, device, model)
        write_text(file, scenario_text({**data, "device": os.path.relpath(device, file.parent),
                                        "model": os.path.relpath(model, file.parent)}),
                   inputs=(fleet.file, device, model))
        scenario = load_scenario(file)
        bundles[pair] = Bundle(pair, scenario_text(data), Path(device).read_text(encoding="utf-8"),
                               Path(model).read_text(encoding="utf-8"))
        meta[pair] = {"device": scenario.device.name, "model": scenario.model.name, "file": file}
        tasks += [Task(task_key(scenario.content_hash, q, fleet.objective, fleet.options), pair, q)
                  for q in fleet.questions]
    return bundles, tasks, meta


def done_rows(out: Path, tasks: list[Task]) -> dict[str, dict]:
    """Rows already on disk for these tasks (a failed row is not done: it is retried)."""
    rows = {}
    for t in tasks:
        path = out / "rows" / f"{t.key}.json"
        if path.is_file():
            try:
                row = load_json(path, what="fleet result row", limit=10**6, error=SpecError)
            except SpecError:
                continue  # unreadable: solve again
            plan = row.get("plan") if isinstance(row, dict) else None
            if plan is not None and not (isinstance(plan, str) and (out / plan).is_file()):
                continue  # its plan file is gone: solve again
            if isinstance(row, dict) and row.get("status") not in (None, FAILED):
                rows[t.key] = row
    return rows


# --- executors -----------------------------------------------------------------------------

def _chunks(tasks: list[Task], workers: int = 1) -> list[list[Task]]:
    """Chunks of CHUNK tasks, which amortise the cost of a submission, except the last
    CHUNK x workers tasks, which go one by one: solve times differ by 100x, and a last
    chunk of slow solves would keep one worker busy while the others idle."""
    tail = min(len(tasks), CHUNK * max(1, workers))
    head = len(tasks) - tail
    return [tasks[i:i + CHUNK] for i in range(0, head, CHUNK)] + [[t] for t in tasks[head:]]


def _sequential(fid, bundles, fleet, tasks, on_result) -> None:
    for chunk in _chunks(tasks):
        for row, plan in solve_chunk(fid, lambda: bundles, fleet.objective, fleet.options, chunk):
            on_result(row, plan)


_POOL_BUNDLES: dict[str, Bundle] = {}


def _pool_init(bundles: dict[str, Bundle]) -> None:
    _POOL_BUNDLES.clear()
    _POOL_BUNDLES.update(bundles)


def _pool_chunk(fid, objective, options, chunk):
    return solve_chunk(fid, lambda: _POOL_BUNDLES, objective, options, chunk)


def _pool(fid, bundles, fleet, tasks, workers, on_result, on_failed) -> None:
    """A process pool; a worker that dies breaks the pool, so the chunks that were in flight
    are counted as one attempt more and resubmitted to a new pool."""
    pending = _chunks(tasks, workers)
    ctx = multiprocessing.get_context("spawn")  # no inherited threads or solver state
    while pending:
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_pool_init,
                                    initargs=(bundles,)) as pool:
            futures = {pool.submit(_pool_chunk, fid, fleet.objective, fleet.options, c): c
                       for c in pending}
            pending = []
            for fut in cf.as_completed(futures):
                chunk = futures[fut]
                try:
                    results = fut.result()
                except cf.process.BrokenProcessPool as e:
                    pending += _retry(chunk, fleet.retries, f"worker died: {e}", on_failed)
                    continue
                for row, plan in results:
                    on_result(row, plan)


def _retry(chunk: list[Task], retries: int, reason: str, on_failed) -> list[list[Task]]:
    again = [Task(t.key, t.pair, t.question, t.attempt + 1) for t in chunk
             if t.attempt <= retries]
    for t in chunk:
        if t.attempt > retries:
            on_failed(t, f"{reason} (after {t.attempt} attempts)")
    return [again] if again else []


def _ray_chunk(fid, refs, objective, options, chunk):
    import ray

    return solve_chunk(fid, lambda: ray.get(refs[0]), objective, options, chunk)


def _ray(fid, bundles, fleet, tasks, workers, address, on_result, on_failed) -> None:
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        if address == "local":
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    try:
        remote = ray.remote(max_retries=fleet.retries, num_cpus=1)(_ray_chunk)
        refs = [ray.put(bundles)]
        futures = {remote.remote(fid, refs, fleet.objective, fleet.options, c): c
                   for c in _chunks(tasks, workers)}
        waiting = list(futures)
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            chunk = futures[ready[0]]
            try:
                results = ray.get(ready[0])
            except ray.exceptions.RayError as e:
                for t in chunk:
                    on_failed(t, f"Ray task failed after {fleet.retries + 1} attempts: "
                                 f"{type(e).__name__}")
                continue
            for row, plan in results:
                on_result(row, plan)
    finally:
        if started_here:
            ray.shutdown()


# --- the run -------------------------------------------------------------------------------

def run_fleet(fleet: Fleet, out: str | os.PathLike, *, workers: int | None = None,
              ray_address: str | None = None, progress: bool = True) -> Summary:
    """Solve every task not done yet, write every result as it arrives, then the tables,
    CSV, Parquet and report."""
    started = time.monotonic()
    out = Path(out)
    if ray_address is not None and workers == 0:
        raise InvalidArgument("--workers 0 means this process, without Ray; give Ray 1 or more")
    bundles, tasks, meta = prepare(fleet, out)
    by_key = {t.key: t for t in tasks}
    rows = done_rows(out, tasks)
    todo = [t for t in tasks if t.key not in rows]
    workers = (os.cpu_count() or 1) if workers is None else workers
    fid = _fleet_id(bundles, fleet.objective, fleet.options)
    bar = tqdm(total=len(todo), unit="solve", desc=fleet.name, disable=not progress or not todo,
               dynamic_ncols=True)
    failures = Counter()

    def on_result(row: dict, plan_json: str | None) -> None:
        t = by_key[row["key"]]
        row = {**_describe(fleet, t, meta[t.pair]), **row}
        if plan_json is not None:
            write_plan(out / "plans" / f"{t.key}.json", plan_json, meta[t.pair]["file"])
            row["plan"] = f"plans/{t.key}.json"
        write_text(out / "rows" / f"{t.key}.json", json.dumps(row, indent=1) + "\n")
        rows[t.key] = row
        failures[row["status"]] += row["status"] in (FAILED, "timeout")
        bar.update(1)
        bar.set_postfix_str(f"failed {failures[FAILED]}, timed out {failures['timeout']}",
                            refresh=False)

    def on_failed(t: Task, reason: str) -> None:
        on_result({"key": t.key, "status": FAILED, "explanation": reason, "attempts": t.attempt},
                  None)

    try:
        if not todo:
            pass
        elif ray_address is not None:
            _ray(fid, bundles, fleet, todo, workers, ray_address, on_result, on_failed)
        elif workers == 0:
            _sequential(fid, bundles, fleet, todo, on_result)
        else:
            _pool(fid, bundles, fleet, todo, workers, on_result, on_failed)
    finally:
        bar.close()
    ordered = [rows[t.key] for t in tasks if t.key in rows]
    write_results(out, ordered)
    if fleet.objective == Objective.MAX_IMPORTANCE:
        write_tables(out, fleet, tasks, rows, meta)
    write_report(out, fleet, ordered)
    return Summary(tasks=len(tasks), solved_now=len(todo), skipped=len(tasks) - len(todo),
                   by_status=dict(Counter(r["status"] for r in ordered)),
                   seconds=time.monotonic() - started, out=out)


def _describe(fleet: Fleet, t: Task, meta: dict) -> dict:
    q = t.question
    return {"device": meta["device"], "model": meta["model"], "target_ms": q.target_ms,
            "buffer_mb": q.buffer_mb, "objective": fleet.objective.value,
            "floor_fraction": q.floor_fraction, "solver": fleet.options.solver,
            "gap_asked": fleet.options.gap, "plan": None}


# --- results -------------------------------------------------------------------------------

def write_results(out: Path, rows: list[dict]) -> None:
    write_csv(out / "results.csv", rows, COLUMNS)
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows],
                                 schema=_schema(pa))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(out / "results.parquet", buf.getvalue())


def _schema(pa):
    types = {"target_ms": pa.float64(), "buffer_mb": pa.float64(),
             "floor_fraction": pa.float64(), "gap_asked": pa.float64(),
             "objective_value": pa.float64(), "importance": pa.float64(),
             "importance_fraction": pa.float64(), "gap": pa.float64(),
             "predicted_latency_ms": pa.float64(), "preload_bytes": pa.int64(),
             "resident_bytes": pa.int64(), "predicted_memory_bytes": pa.int64(),
             "shards": pa.int64(), "solve_seconds": pa.float64(), "attempts": pa.int64()}
    return pa.schema([(c, types.get(c, pa.string())) for c in COLUMNS])


def write_tables(out: Path, fleet: Fleet, tasks: list[Task], rows: dict, meta: dict) -> None:
    """Per pair, the grid of targets x buffers as a plan table (each cell solved by its own
    task: status, plan, and the bound objective x (1 + gap))."""
    status_of = {"optimal": SOLVED, "feasible": SOLVED, "infeasible": INFEASIBLE,
                 "timeout": TIMEOUT, "no-plan": NO_PLAN, FAILED: TIMEOUT}
    targets = tuple(sorted({q.target_ms for q in fleet.questions}))
    buffers = tuple(sorted({q.buffer_mb for q in fleet.questions}))
    for pair, m in meta.items():
        own = {(t.question.target_ms, t.question.buffer_mb): rows.get(t.key)
               for t in tasks if t.pair == pair}
        plans, cells = [], []
        for T in targets:
            line = []
            for B in buffers:
                row = own.get((T, B))
                if row is None:
                    line.append(Cell(TIMEOUT, None, None))
                    continue
                status = status_of[row["status"]]
                plan = None
                if status == SOLVED:
                    plans.append(Plan.load(out / row["plan"]))
                    plan = len(plans) - 1
                gap = row.get("gap")
                bound = row["objective_value"] * (1 + gap) if plan is not None and gap is not None \
                    else None
                line.append(Cell(status, plan, bound))
            cells.append(tuple(line))
        scenario = load_scenario(m["file"])
        table = PlanTable(str(m["file"]), scenario.content_hash, scenario.name,
                          fleet.options.solver, fleet.options.gap, targets, buffers,
                          tuple(cells), tuple(plans),
                          solves=sum(1 for r in own.values() if r is not None),
                          build_seconds=sum(r.get("solve_seconds") or 0 for r in own.values() if r))
        table.save(out / "tables" / f"{pair}.json")


def write_report(out: Path, fleet: Fleet, rows: list[dict]) -> None:
    """report.md and report.png: per model and device, the best importance reachable at
    each target (over the buffers), and why a target cannot be met."""
    targets = sorted({r["target_ms"] for r in rows})
    models = sorted({r["model"] for r in rows})
    devices = sorted({r["device"] for r in rows})
    best: dict[tuple, float | None] = {}
    why: dict[tuple, str] = {}
    for r in rows:
        k = (r["model"], r["device"], r["target_ms"])
        if r.get("importance_fraction") is not None:
            best[k] = max(best.get(k) or 0.0, r["importance_fraction"])
        else:
            best.setdefault(k, None)
            why.setdefault(k, f"{r['status']}: {r.get('explanation', '')}")
    counts = Counter(r["status"] for r in rows)
    lines = [f"# Fleet {fleet.name}", "",
             f"{len(rows)} questions: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
             + f". Solver {fleet.options.solver}, gap {fleet.options.gap:g}, "
               f"{fleet.options.time_limit_s:g} s per solve. Cells: the best share of the model's "
               f"full importance reachable at the target (over the buffers "
               f"{sorted({r['buffer_mb'] for r in rows})} MB); '-' where no plan meets it.", ""]
    for model in models:
        lines += [f"## {model}", "", "| device | " + " | ".join(f"{t:g} ms" for t in targets) + " |",
                  "|---|" + "---|" * len(targets)]
        for d in devices:
            cells = [("-" if best.get((model, d, t)) is None else f"{best[(model, d, t)]:.3f}")
                     for t in targets]
            lines.append(f"| {d} | " + " | ".join(cells) + " |")
        lines.append("")
    unmet = sorted(k for k, v in best.items() if v is None)
    if unmet:
        lines += ["## Where the target cannot be met, and why", ""]
        for k in unmet:
            lines.append(f"- {k[1]}, {k[0]}, {k[2]:g} ms: {why.get(k, '')}")
        lines.append("")
    lines.append("![best importance per target](report.png)")
    write_text(out / "report.md", "\n".join(lines) + "\n")
    _plot(out, models, devices, targets, best)


def _plot(out: Path, models, devices, targets, best) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        for d in devices:
            ys = [best.get((model, d, t)) for t in targets]
            ax.plot(targets, [float("nan") if y is None else y for y in ys], "o-", label=d,
                    markersize=3)
            miss = [t for t, y in zip(targets, ys) if y is None]
            ax.plot(miss, [0.0] * len(miss), "x", color="grey")
        ax.set_xscale("log")
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("target ms (x: cannot be met)")
        ax.set_ylabel("best share of full importance")
        ax.set_ylim(-0.05, 1.05)
    axes[0, -1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    try:
        save_figure(fig, out / "report.png")
    finally:
        plt.close(fig)


def summary_line(s: Summary) -> str:
    return (f"{s.tasks} questions: {s.solved_now} solved now, {s.skipped} done before; "
            + ", ".join(f"{n} {k}" for k, n in sorted(s.by_status.items()))
            + f"; {s.seconds:.1f} s; results in {s.out}")

