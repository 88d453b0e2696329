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
import contextlib
import io
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, replace
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
from elasticplan.errors import ElasticplanError, InvalidArgument, OutputError, PlanFormatError, SpecError
from elasticplan.plans.plan import Plan
from elasticplan.problem.inputs import Fields, load_json, show
from elasticplan.problem.loader import load_scenario
from elasticplan.problem.outputs import (
    Inputs,
    refuse_inputs,
    remove_debris,
    save_figure,
    write_bytes,
    write_csv,
    write_text,
)
from elasticplan.problem.question import Objective

COLUMNS = ["key", "device", "model", "target_ms", "buffer_mb", "objective", "floor_fraction",
           "solver", "gap_asked", "status", "explanation", "objective_value", "importance",
           "importance_fraction", "gap", "predicted_latency_ms", "preload_bytes",
           "resident_bytes", "predicted_memory_bytes", "shards", "solve_seconds", "attempts",
           "plan"]
SOLVED_STATUSES = ("optimal", "feasible")
STATUSES = (*SOLVED_STATUSES, "infeasible", "timeout", "no-plan", FAILED)
# A solved row's figures: (key, integer?, may be null)
FIGURES = (("objective_value", False, False), ("importance", False, False),
           ("importance_fraction", False, False), ("gap", False, True),
           ("predicted_latency_ms", False, False), ("preload_bytes", True, False),
           ("resident_bytes", True, False), ("predicted_memory_bytes", True, False),
           ("shards", True, False))
SUBDIRS = ("scenarios", "rows", "plans", "tables")  # the fleet's own folders in DIR
REPORTS = ("results.csv", "results.parquet", "report.md", "report.png")  # and its own files
MAX_ROW_BYTES = 10**6


@dataclass(frozen=True)
class Summary:
    tasks: int
    solved_now: int
    skipped: int
    by_status: dict
    seconds: float
    out: Path
    bad_rows: int = 0  # rows or plans of an earlier run that failed strict reading (solved again)


# --- pairs and tasks -----------------------------------------------------------------------

def _pairs(fleet: Fleet, out: Path) -> dict[str, tuple[str, str, Path]]:
    """pair -> (device file, model file, the pair's scenario file in DIR/scenarios)."""
    pairs, seen = {}, Counter()
    for device in fleet.devices:
        for model in fleet.models:
            base = name = f"{Path(device).stem}--{Path(model).stem}"
            while name in pairs:  # a/x.yaml and b/x.yaml; and their -2 beside a real "-2"
                seen[base] += 1
                name = f"{base}-{seen[base] + 1}"
            pairs[name] = (device, model, out / "scenarios" / f"{name}.yaml")
    return pairs


def fleet_inputs(fleet: Fleet) -> tuple[str, ...]:
    """Every file a fleet reads: no file it writes may be one of them."""
    return (fleet.file, *fleet.devices, *fleet.models)


def without_own_outputs(fleet: Fleet, out: Path) -> Fleet:
    """The fleet without the devices and models that a wildcard matched among the files
    this run writes in `out` (its results and report; anything in its folders): a glob
    over the directory it writes into finds them on a rerun. A file named one by one
    stays, and `check_outputs` refuses it."""
    owned = {_absolute(out / name) for name in REPORTS}
    folders = [_absolute(out / sub) for sub in SUBDIRS]

    def own(path: str) -> bool:
        p = _absolute(path)
        return path in fleet.globbed and (p in owned or any(d in p.parents for d in folders))

    devices = tuple(d for d in fleet.devices if not own(d))
    models = tuple(m for m in fleet.models if not own(m))
    for key, kept in (("devices", devices), ("models", models)):
        if not kept:
            raise SpecError(fleet.file, key, f"matches only this fleet's own outputs in {out}")
    return replace(fleet, devices=devices, models=models)


def _absolute(path) -> Path:
    return Path(os.path.abspath(path))  # normalised ('..' resolved by name), links kept


def check_outputs(fleet: Fleet, out: Path) -> None:
    """Before anything is written: no input of the fleet is one of the files it writes
    (results, report, a pair's scenario or table) or lies in one of its folders (rows,
    plans, ...), whose files it owns; InvalidArgument naming both."""
    inputs = fleet_inputs(fleet)
    refuse_inputs(out, inputs)
    owned = [out / name for name in REPORTS]
    for pair, (_, _, file) in _pairs(fleet, out).items():
        owned += [file, out / "tables" / f"{pair}.json"]
    for path in owned:
        refuse_inputs(path, inputs, follow_links=False)
    folders = [_absolute(out / sub) for sub in SUBDIRS]
    for src in inputs:
        here = _absolute(src)
        try:
            real = Path(src).resolve()
        except (OSError, RuntimeError):
            real = here
        for folder in folders:
            try:
                real_folder = folder.resolve()
            except (OSError, RuntimeError):
                real_folder = folder
            if folder in here.parents or real_folder in real.parents:
                raise InvalidArgument(f"{src}: an input of this fleet lies in {folder}, where the "
                                      f"fleet writes its own files; choose another output "
                                      f"directory")


def prepare(fleet: Fleet, out: Path, inputs: Inputs | None = None
            ) -> tuple[dict[str, Bundle], list[Task], dict]:
    """Write each pair's scenario file, and make the bundles and the task list; remove the
    temporary files of an earlier run that was killed mid-write. `inputs`: the fleet's
    inputs, resolved once by the caller (made here if not given)."""
    check(fleet)
    check_outputs(fleet, out)
    check_pairs(fleet)
    inputs = Inputs(fleet_inputs(fleet)) if inputs is None else inputs
    for sub in SUBDIRS:
        (out / sub).mkdir(parents=True, exist_ok=True)
    for d in (out, *(out / sub for sub in SUBDIRS)):
        remove_debris(d, keep=inputs)
    bundles, tasks, meta = {}, [], {}
    for pair, (device, model, file) in _pairs(fleet, out).items():
        data = pair_scenario(fleet, device, model)
        write_text(file, scenario_text({**data, "device": os.path.relpath(device, file.parent),
                                        "model": os.path.relpath(model, file.parent)}),
                   inputs=inputs, follow_links=False)
        scenario = load_scenario(file)
        bundles[pair] = Bundle(pair, scenario_text(data), Path(device).read_text(encoding="utf-8"),
                               Path(model).read_text(encoding="utf-8"))
        meta[pair] = {"device": scenario.device.name, "model": scenario.model.name, "file": file,
                      "sha256": scenario.content_hash, "name": scenario.name}
        tasks += [Task(task_key(scenario.content_hash, q, fleet.objective, fleet.options), pair, q)
                  for q in fleet.questions]
    return bundles, tasks, meta


def check_pairs(fleet: Fleet) -> None:
    """Before anything is written: each device and model with each other, as the pair's
    scenario poses them (loaded from a scratch copy that names the files by absolute path,
    so that an error names the device or model file itself); an error of the pair's own
    keys (min_shards_per_layer, the first question's target) names the fleet file and the
    pair."""
    with tempfile.TemporaryDirectory(prefix="elasticplan-fleet-check-") as tmp:
        for pair, (device, model, _) in _pairs(fleet, Path(tmp)).items():
            file = Path(tmp) / f"{pair}.yaml"
            data = pair_scenario(fleet, device, model)
            file.write_text(scenario_text({**data, "device": str(Path(device).resolve()),
                                           "model": str(Path(model).resolve())}),
                            encoding="utf-8")
            try:
                load_scenario(file)
            except SpecError as e:
                if e.file != str(file):
                    raise
                raise SpecError(fleet.file, e.key_path, f"{e.message} (for device {device} "
                                                        f"with model {model})") from None


def done_rows(out: Path, fleet: Fleet, tasks: list[Task], meta: dict
              ) -> tuple[dict[str, dict], list[str]]:
    """Rows already on disk for these tasks, read as strictly as any input (`read_row`), and
    what was wrong with each one that is not done: a bad row or plan is solved again, and
    so is a failed row (without a message: it is retried as documented)."""
    rows, bad = {}, []
    for t in tasks:
        path = out / "rows" / f"{t.key}.json"
        if not (path.exists() or path.is_symlink()):
            continue
        try:
            row = read_row(path, out, fleet, t, meta[t.pair])
        except ElasticplanError as e:
            bad.append(str(e))
            continue
        if row["status"] != FAILED:
            rows[t.key] = row
    return rows, bad


def read_row(path: Path, out: Path, fleet: Fleet, task: Task, meta: dict) -> dict:
    """A row of an earlier run, checked as any input is: every key of its type and range,
    no unknown keys, the task's own question, a known status, the figures a solved row
    has and an unsolved one lacks; a solved row's plan is `plans/KEY.json` (nothing
    outside DIR is read), read strictly, for this scenario and question, with the row's
    figures. SpecError or PlanFormatError naming the file."""
    file = str(path)
    if path.is_symlink():
        raise SpecError(file, "", "is a link; a fleet's rows are its own files")
    f = Fields(load_json(path, what="fleet result row", limit=MAX_ROW_BYTES, error=SpecError),
               file, "", "a fleet result row")
    if f.string("key") != task.key:
        raise f.err("key", f"expected {task.key} (the file's task), got {show(f.data['key'])}")
    for k, want in _describe(fleet, task, meta).items():
        if k == "plan":
            continue
        got = f.raw(k, required=want is not None)
        same = got is None if want is None else \
            (isinstance(got, str) and got == want) if isinstance(want, str) else \
            (not isinstance(got, (bool, str)) and isinstance(got, (int, float)) and got == want)
        if not same:
            raise f.err(k, f"expected {show(want)} (this task's), got {show(got)}")
    status = f.string("status")
    if status not in STATUSES:
        raise f.err("status", f"expected one of {', '.join(STATUSES)}, got {show(status)}")
    explanation = f.raw("explanation", required=False)
    if explanation is not None and not isinstance(explanation, str):
        raise f.err("explanation", f"expected a string, got {show(explanation)}")
    f.integer("attempts", minimum=1, maximum=100)
    solved = status in SOLVED_STATUSES
    f.number("solve_seconds", minimum=0, required=solved)
    figures = {}
    for k, whole, nullable in FIGURES:
        if not solved:
            if f.raw(k, required=False) is not None:
                raise f.err(k, f"a {status} row has no {k}")
            continue
        read = f.integer if whole else f.number
        figures[k] = read(k, minimum=0, required=not nullable)
    plan_path = f.raw("plan", required=False)
    expected = f"plans/{task.key}.json"
    if not solved and plan_path is not None:
        raise f.err("plan", f"a {status} row has no plan, got {show(plan_path)}")
    if solved and plan_path != expected:
        raise f.err("plan", f"expected {expected!r} (a fleet's plans are its own files), got "
                            f"{show(plan_path)}")
    f.done()
    if solved:
        _check_plan(out / expected, f, task, meta, status, figures)
    return f.data


def _check_plan(path: Path, f: Fields, task: Task, meta: dict, status: str,
                figures: dict) -> None:
    if path.is_symlink():
        raise PlanFormatError(f"{path}: is a link; a fleet's plans are its own files")
    plan = Plan.load(path)
    q = plan.scenario.question
    where = f"{path}: the plan of {f.file}"
    if plan.scenario.sha256 != meta["sha256"]:
        raise PlanFormatError(f"{where} answers another scenario (sha256 "
                              f"{plan.scenario.sha256[:12]}..., this pair's is "
                              f"{meta['sha256'][:12]}...)")
    if (q.target_latency_ms, q.preload_budget_mb) != (task.question.target_ms,
                                                       task.question.buffer_mb):
        raise PlanFormatError(f"{where} answers target {q.target_latency_ms:g} ms, buffer "
                              f"{q.preload_budget_mb:g} MB, not this row's")
    if plan.status.value != status or plan.objective != figures["objective_value"]:
        raise PlanFormatError(f"{where} does not match the row (status {plan.status.value}, "
                              f"objective {plan.objective:g})")


# --- executors -----------------------------------------------------------------------------

def _chunks(tasks: list[Task], workers: int = 1) -> list[list[Task]]:
    """Chunks of CHUNK tasks, which amortise the cost of a submission, except the last
    CHUNK x workers tasks, which go one by one: solve times differ by 100x, and a last
    chunk of slow solves would keep one worker busy while the others idle."""
    tail = min(len(tasks), CHUNK * max(1, workers))
    head = len(tasks) - tail  # the last chunk of the head stops at the tail: each task once
    return [tasks[i:min(i + CHUNK, head)] for i in range(0, head, CHUNK)] + \
        [[t] for t in tasks[head:]]


def _sequential(fid, bundles, fleet, tasks, on_result) -> None:
    for chunk in _chunks(tasks):
        for row, plan in solve_chunk(fid, lambda: bundles, fleet.objective, fleet.options, chunk):
            on_result(row, plan)


_POOL_BUNDLES: dict[str, Bundle] = {}


def _pool_init(bundles: dict[str, Bundle]) -> None:
    _POOL_BUNDLES.clear()
    _POOL_BUNDLES.update(bundles)


@contextlib.contextmanager
def _sigterm_deferred():
    """A SIGTERM that arrives while a pool starts its workers is acted on (its handler
    called: cli's raises Terminated) once the pool has recorded them all: landing between
    a worker's start and the pool's record of it, it left a worker that nobody stopped.
    (Masking the signal does not do: another thread, tqdm's monitor, would take it.)"""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread runs signal handlers
        return
    caught = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: caught.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if caught and callable(previous):
            previous(signal.SIGTERM, caught[0])
        elif caught and previous == signal.SIG_DFL:
            os.kill(os.getpid(), signal.SIGTERM)


def _pool_chunk(fid, objective, options, chunk):
    return solve_chunk(fid, lambda: _POOL_BUNDLES, objective, options, chunk)


def _pool(fid, bundles, fleet, tasks, workers, on_result, on_failed) -> None:
    """A process pool; a worker that dies breaks the pool, so the chunks that were in flight
    are counted as one attempt more and resubmitted to a new pool."""
    pending = _chunks(tasks, workers)
    ctx = multiprocessing.get_context("spawn")  # no inherited threads or solver state
    while pending:
        pool = None
        try:
            with _sigterm_deferred():  # submit starts the workers
                pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                              initializer=_pool_init, initargs=(bundles,))
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
                except Exception as e:  # the chunk itself failed (not its questions): no retry
                    for t in chunk:
                        on_failed(t, f"the worker could not run it: {type(e).__name__}: {e}")
                    continue
                for row, plan in results:
                    on_result(row, plan)
        except BaseException:
            # SIGTERM (cli.Terminated), Ctrl-C or an error here: the workers are stopped now,
            # not left solving (a SIGTERM reaches this process only), so they and the
            # resource tracker they share end with this process
            if pool is not None:
                _stop(pool)
            raise
        pool.shutdown(wait=True)


def _stop(pool: cf.ProcessPoolExecutor) -> None:
    """Kill a pool's worker processes and shut it down without waiting for their chunks."""
    workers = list((getattr(pool, "_processes", None) or {}).values())
    for w in workers:
        if w.is_alive():
            w.kill()
    pool.shutdown(wait=False, cancel_futures=True)
    for w in workers:
        w.join(timeout=10)


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


RAY_CONNECT_S = 10.0  # how long a cluster's address may take to accept a connection
RAY_ADDRESS_HELP = ("'local' (start Ray here), HOST:PORT (a cluster's GCS address, as `ray start "
                    "--head` prints it) or ray://HOST:PORT (Ray Client)")


def parse_ray_address(address: str) -> tuple[str, str, int] | None:
    """--ray's address checked before Ray sees it: None for 'local', else (scheme, host,
    port); InvalidArgument (exit 2) for anything else."""
    if address == "local":
        return None
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "", address
    host, colon, port = rest.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if scheme not in ("", "ray") or not colon or not host or not port.isdigit() \
            or not 0 < int(port) < 65536 or any(c.isspace() or c in "/?#@" for c in host):
        raise InvalidArgument(f"--ray {address!r}: expected {RAY_ADDRESS_HELP}")
    return scheme, host, int(port)


def _reach(address: str, host: str, port: int) -> None:
    """OutputError (exit 11) unless something accepts a connection at host:port within
    RAY_CONNECT_S: Ray itself would wait minutes for a cluster that is not there."""
    import socket

    try:
        socket.create_connection((host, port), timeout=RAY_CONNECT_S).close()
    except OSError as e:
        why = "no answer" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise OutputError(f"--ray {address}: cannot reach a Ray cluster at {host}:{port} "
                          f"({why}, within {RAY_CONNECT_S:g} s); is `ray start --head` running "
                          f"there?") from None


def _ray_init(address: str, workers: int) -> bool:
    """ray.init for 'local' or a checked, reachable address, unless Ray is running in this
    process already; True if it started it here. One line (exit 11) when Ray cannot join."""
    import ray

    if ray.is_initialized():
        return False
    where = parse_ray_address(address)
    if where is None:
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        return True
    scheme, host, port = where
    _reach(address, host, port)
    # one attempt at the cluster's GCS (about 40 s when what answers is not one), not ~20
    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "1")
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except Exception as e:  # Ray's own: a version mismatch, Ray Client not installed, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise OutputError(f"--ray {address}: cannot join the Ray cluster: {first[:300]}") from None
    return True


def _ray(fid, bundles, fleet, tasks, workers, on_result, on_failed) -> None:
    """The tasks on the Ray instance this process has joined (`_ray_init`)."""
    import ray

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


# --- the run -------------------------------------------------------------------------------

MAX_WARNINGS = 3  # bad rows named one by one; the rest counted


def _warn(message: str) -> None:
    print(f"elasticplan: warning: {message}", file=sys.stderr)


def run_fleet(fleet: Fleet, out: str | os.PathLike, *, workers: int | None = None,
              ray_address: str | None = None, progress: bool = True, warn=_warn) -> Summary:
    """Solve every task not done yet, write every result as it arrives, then the tables,
    CSV, Parquet and report. A row or plan of an earlier run that does not read back
    strictly is named (`warn`) and its task solved again; a task that fails, for any
    reason, is a failed row and never ends the run."""
    started = time.monotonic()
    out = Path(out)
    if ray_address is not None:
        if workers == 0:
            raise InvalidArgument("--workers 0 means this process, without Ray; give Ray 1 or more")
        parse_ray_address(ray_address)  # before anything is written
    fleet = without_own_outputs(fleet, out)
    inputs = Inputs(fleet_inputs(fleet))  # resolved once: each solve writes two files
    bundles, tasks, meta = prepare(fleet, out, inputs)
    by_key = {t.key: t for t in tasks}
    rows, bad = done_rows(out, fleet, tasks, meta)
    for message in bad[:MAX_WARNINGS]:
        warn(f"{message}; solving its task again")
    if len(bad) > MAX_WARNINGS:
        warn(f"and {len(bad) - MAX_WARNINGS} more bad rows or plans in {out / 'rows'}; solving "
             f"their tasks again")
    todo = [t for t in tasks if t.key not in rows]
    workers = (os.cpu_count() or 1) if workers is None else workers
    fid = _fleet_id(bundles, fleet.objective, fleet.options)
    # Ray started or joined here (and shut down at the end), before the progress bar: an
    # address where no cluster answers is one line
    ray_here = ray_address is not None and bool(todo) and _ray_init(ray_address, workers)
    bar = tqdm(total=len(todo), unit="solve", desc=fleet.name, disable=not progress or not todo,
               dynamic_ncols=True)
    failures = Counter()
    written = {}  # the plans this run wrote, by task key: the tables reuse them

    def on_result(row: dict, plan_json: str | None) -> None:
        t = by_key[row["key"]]
        row = {**_describe(fleet, t, meta[t.pair]), **row}
        if plan_json is not None:
            try:
                plan = write_plan(out / "plans" / f"{t.key}.json", plan_json,
                                  meta[t.pair]["file"], inputs=inputs)
                if fleet.objective == Objective.MAX_IMPORTANCE:  # only the tables reuse it
                    written[t.key] = plan
                row["plan"] = f"plans/{t.key}.json"
            except OutputError:
                raise  # the disk, not the task: every later write would fail alike
            except (ElasticplanError, ValueError) as e:  # this task's plan only
                row = {**_describe(fleet, t, meta[t.pair]), "key": t.key, "status": FAILED,
                       "explanation": f"its plan could not be written: {e}",
                       "attempts": row.get("attempts", t.attempt),
                       "solve_seconds": row.get("solve_seconds")}
        write_text(out / "rows" / f"{t.key}.json", json.dumps(row, indent=1, allow_nan=False) + "\n",
                   inputs=inputs, follow_links=False)
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
            _ray(fid, bundles, fleet, todo, workers, on_result, on_failed)
        elif workers == 0:
            _sequential(fid, bundles, fleet, todo, on_result)
        else:
            _pool(fid, bundles, fleet, todo, workers, on_result, on_failed)
    finally:
        bar.close()
        if ray_here:
            import ray

            ray.shutdown()
    ordered = [rows[t.key] for t in tasks if t.key in rows]
    write_results(out, ordered, inputs=inputs)
    if fleet.objective == Objective.MAX_IMPORTANCE:
        write_tables(out, fleet, tasks, rows, meta, inputs=inputs, written=written)
    write_report(out, fleet, ordered, inputs=inputs)
    return Summary(tasks=len(tasks), solved_now=len(todo), skipped=len(tasks) - len(todo),
                   by_status=dict(Counter(r["status"] for r in ordered)),
                   seconds=time.monotonic() - started, out=out, bad_rows=len(bad))


def _describe(fleet: Fleet, t: Task, meta: dict) -> dict:
    q = t.question
    return {"device": meta["device"], "model": meta["model"], "target_ms": q.target_ms,
            "buffer_mb": q.buffer_mb, "objective": fleet.objective.value,
            "floor_fraction": q.floor_fraction, "solver": fleet.options.solver,
            "gap_asked": fleet.options.gap, "plan": None}


# --- results -------------------------------------------------------------------------------

def write_results(out: Path, rows: list[dict], *, inputs=()) -> None:
    write_csv(out / "results.csv", rows, COLUMNS, inputs=inputs, follow_links=False)
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows],
                                 schema=_schema(pa))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(out / "results.parquet", buf.getvalue(), inputs=inputs, follow_links=False)


def _schema(pa):
    types = {"target_ms": pa.float64(), "buffer_mb": pa.float64(),
             "floor_fraction": pa.float64(), "gap_asked": pa.float64(),
             "objective_value": pa.float64(), "importance": pa.float64(),
             "importance_fraction": pa.float64(), "gap": pa.float64(),
             "predicted_latency_ms": pa.float64(), "preload_bytes": pa.int64(),
             "resident_bytes": pa.int64(), "predicted_memory_bytes": pa.int64(),
             "shards": pa.int64(), "solve_seconds": pa.float64(), "attempts": pa.int64()}
    return pa.schema([(c, types.get(c, pa.string())) for c in COLUMNS])


def write_tables(out: Path, fleet: Fleet, tasks: list[Task], rows: dict, meta: dict, *,
                 inputs=(), written: dict | None = None) -> None:
    """Per pair, the grid of targets x buffers as a plan table (each cell solved by its own
    task: status, plan, and the bound objective x (1 + gap)). A plan this run wrote is
    taken from `written` (by task key); one of an earlier run is read from its file."""
    written = written or {}
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
                    kept = written.pop(row["key"], None)  # freed once its table is written
                    plans.append(Plan.load(out / row["plan"]) if kept is None else kept)
                    plan = len(plans) - 1
                gap = row.get("gap")
                bound = row["objective_value"] * (1 + gap) if plan is not None and gap is not None \
                    else None
                line.append(Cell(status, plan, bound))
            cells.append(tuple(line))
        # the scenario as prepare loaded it (loading it again cost ~0.6 s per Llama-2-70B pair)
        table = PlanTable(str(m["file"]), m["sha256"], m["name"],
                          fleet.options.solver, fleet.options.gap, targets, buffers,
                          tuple(cells), tuple(plans),
                          solves=sum(1 for r in own.values() if r is not None),
                          build_seconds=sum(r.get("solve_seconds") or 0 for r in own.values() if r))
        table.save(out / "tables" / f"{pair}.json", inputs=inputs, follow_links=False)


def write_report(out: Path, fleet: Fleet, rows: list[dict], *, inputs=()) -> None:
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
    write_text(out / "report.md", "\n".join(lines) + "\n", inputs=inputs, follow_links=False)
    _plot(out, models, devices, targets, best, inputs)


def _plot(out: Path, models, devices, targets, best, inputs=()) -> None:
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
        save_figure(fig, out / "report.png", inputs=inputs, follow_links=False)
    finally:
        plt.close(fig)


def summary_line(s: Summary) -> str:
    bad = f" ({s.bad_rows} bad rows or plans of an earlier run among them)" if s.bad_rows else ""
    return (f"{s.tasks} questions: {s.solved_now} solved now{bad}, {s.skipped} done before; "
            + ", ".join(f"{n} {k}" for k, n in sorted(s.by_status.items()))
            + f"; {s.seconds:.1f} s; results in {s.out}")

