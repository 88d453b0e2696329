"""Fleet planning: every (device, model, question) of a fleet file solved, locally or on Ray.

A fleet file names devices and models (paths or globs) and a grid of questions; each
(device, model, question) is one task, keyed by the content hash of its scenario (device
and model as loaded), its question and the solver options. The task is solved by one
code path, `Solver.solve_batch`, wherever it runs: in this process (`workers=0`), in a
local process pool, or on a Ray cluster. Workers only compute; this process writes every
result, atomically, as it arrives:

    DIR/scenarios/DEVICE--MODEL.yaml   the scenario each plan answers (`elasticplan verify`)
    DIR/rows/KEY.json                  one result per task: a rerun skips what is done
    DIR/plans/KEY.json                 the plan (identical questions share one file)
    DIR/tables/DEVICE--MODEL.json      a plan table per pair (max_importance fleets)
    DIR/results.csv, results.parquet   every row
    DIR/report.md, report.png          the summary

A task whose worker dies is retried up to `retries` times and then recorded as failed;
an infeasible or timed-out question is a row with its explanation.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from elasticplan.answers.explain import explain_failure
from elasticplan.errors import (
    ElasticplanError,
    InfeasibleError,
    NoPlanFoundError,
    PlanFormatError,
    SolverTimeoutError,
    SpecError,
)
from elasticplan.plans.plan import Plan
from elasticplan.problem.inputs import Fields, dump_yaml, load_yaml, number
from elasticplan.problem.loader import load_scenario
from elasticplan.problem.question import BOUNDS, Objective
from elasticplan.problem.spec import Scenario
from elasticplan.solvers import BACKENDS, DEFAULT_RELATIVE_GAP, DEFAULT_SOLVER, check_options, solve

SCHEMA = "elasticplan.fleet/1"
MAX_TASKS = 1_000_000
DEFAULT_RETRIES = 2
CHUNK = 8  # tasks per submission to a worker: amortises the per-task overhead
FAILED = "failed"


# --- the fleet file --------------------------------------------------------------------------

@dataclass(frozen=True)
class Options:
    solver: str = DEFAULT_SOLVER
    time_limit_s: float = 10.0
    gap: float = DEFAULT_RELATIVE_GAP
    threads: int = 1


@dataclass(frozen=True)
class FleetQuestion:
    """One point of a fleet's grid of questions."""

    target_ms: float
    buffer_mb: float
    floor_fraction: float | None  # min_buffer: the floor as a share of the model's full importance


@dataclass(frozen=True)
class Fleet:
    name: str
    file: str
    devices: tuple[str, ...]
    models: tuple[str, ...]
    objective: Objective
    min_shards_per_layer: int
    questions: tuple[FleetQuestion, ...]
    options: Options
    retries: int
    # The devices and models a wildcard matched (not named one by one): a run leaves out
    # those that are its own outputs (a glob over the directory it writes into).
    globbed: frozenset[str] = frozenset()


def load_fleet(path: str | os.PathLike) -> Fleet:
    """Read and check a fleet file (docs/formats.md, "Fleet"); SpecError names the key."""
    file = str(path)
    f = Fields(load_yaml(path, what="fleet file"), file, "", "a fleet")
    if f.string("schema") != SCHEMA:
        raise f.err("schema", f"expected {SCHEMA!r}")
    name = f.string("name")
    base = Path(file).parent
    globbed: set[str] = set()
    devices = _paths(f, "devices", base, globbed)
    models = _paths(f, "models", base, globbed)
    q = f.mapping("questions", "{targets_ms, buffers_mb, objective, ...}")
    targets = _asked(q, "targets_ms", "target_latency_ms")
    buffers = _asked(q, "buffers_mb", "preload_budget_mb")
    objective = q.string("objective", required=False) or Objective.MAX_IMPORTANCE.value
    if objective not in (Objective.MAX_IMPORTANCE.value, Objective.MIN_BUFFER.value):
        raise q.err("objective", f"must be max_importance or min_buffer, got {objective!r}")
    floors: list[float | None] = [None]
    if objective == Objective.MIN_BUFFER.value:
        floors = [number(v, file, f"questions.floor_fractions[{i}]", minimum=0, maximum=1)
                  for i, v in enumerate(q.sequence("floor_fractions"))]
    min_shards = q.integer("min_shards_per_layer", minimum=0, required=False)
    q.done()
    s = f.mapping("solver", "{name, time_limit_s, gap, threads}") if "solver" in f.data else None
    options = Options()
    if s is not None:
        options = Options(solver=s.string("name", required=False) or DEFAULT_SOLVER,
                          time_limit_s=s.number("time_limit_s", positive=True, maximum=1e6,
                                                required=False) or options.time_limit_s,
                          gap=_or(s.number("gap", minimum=0, maximum=0.999, required=False),
                                  options.gap),
                          threads=s.integer("threads", minimum=1, maximum=256,
                                            required=False) or options.threads)
        if options.solver not in BACKENDS:
            raise s.err("name", f"must be one of {', '.join(BACKENDS)}, got {options.solver!r}")
        s.done()
    retries = _or(f.integer("retries", minimum=0, maximum=10, required=False), DEFAULT_RETRIES)
    f.free_form("description", str)
    f.done()
    questions = tuple(FleetQuestion(t, b, fl) for t in sorted(set(targets)) for b in sorted(set(buffers))
                      for fl in floors)
    n = len(devices) * len(models) * len(questions)
    if n > MAX_TASKS:
        raise SpecError(file, "questions", f"{n:,} tasks; at most {MAX_TASKS:,}")
    return Fleet(name=name, file=file, devices=devices, models=models,
                 objective=Objective(objective), questions=questions, options=options,
                 min_shards_per_layer=1 if min_shards is None else min_shards, retries=retries,
                 globbed=frozenset(globbed))


def _or(value, default):
    return default if value is None else value


def _asked(q: Fields, key: str, field: str) -> list[float]:
    """A list of values of a question's field, each in the field's range (the question's
    one table, elasticplan.problem.question.BOUNDS)."""
    out = []
    for i, v in enumerate(q.sequence(key)):
        why = BOUNDS[field].problem(v)
        if why is not None:
            raise q.err(f"{key}[{i}]", why)
        out.append(float(v))
    return out


def _paths(f: Fields, key: str, base: Path, globbed: set[str]) -> tuple[str, ...]:
    out: list[str] = []
    for i, pattern in enumerate(f.sequence(key)):
        if not isinstance(pattern, str) or not pattern.strip():
            raise f.err(f"{key}[{i}]", "expected a path or glob (a string)")
        # files only: a glob over a directory that holds a fleet's output also matches its
        # folders (rows/, plans/...), which are no device or model
        matches = sorted(m for m in glob.glob(str(base / pattern)) if os.path.isfile(m))
        if not matches:
            raise f.err(f"{key}[{i}]", f"{pattern!r} matches no file (relative to {base})")
        if glob.has_magic(pattern):
            globbed.update(matches)
        out += [m for m in matches if m not in out]
    return tuple(out)


# --- tasks ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Bundle:
    """Everything a worker needs to load one (device, model) scenario, as text."""

    pair: str  # DEVICE--MODEL
    scenario: str
    device: str
    model: str


@dataclass(frozen=True)
class Task:
    key: str
    pair: str
    question: FleetQuestion
    attempt: int = 1


def pair_scenario(fleet: Fleet, device: str, model: str) -> dict:
    """The base scenario of a pair (the first question; every task overrides it)."""
    return {"name": f"{Path(device).stem}--{Path(model).stem}",
            "description": f"fleet {fleet.name}: {Path(device).name} x {Path(model).name}",
            "device": "device.yaml", "model": "model.yaml",
            "target_latency_ms": fleet.questions[0].target_ms,
            "preload_budget_mb": 0.0, "min_shards_per_layer": fleet.min_shards_per_layer}


def task_key(content_hash: str, q: FleetQuestion, objective: Objective, options: Options) -> str:
    text = json.dumps({"scenario": content_hash, "question": asdict(q),
                       "objective": objective.value, "options": asdict(options)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


# --- the one solve code path -----------------------------------------------------------------

def full_importance(model) -> float:
    """The model's importance with every shard at its most important bitwidth."""
    return sum(max(s.importance) for layer in model.layers for s in layer.shards)


class Solver:
    """Solves tasks of one fleet; each process (this one, a pool worker, a Ray worker) keeps
    one, with the pairs' scenarios loaded once."""

    def __init__(self, bundles: dict[str, Bundle], objective: Objective, options: Options):
        self.bundles, self.objective, self.options = bundles, objective, options
        self._scenarios: dict[str, Scenario] = {}
        self._dir = tempfile.TemporaryDirectory(prefix="elasticplan-fleet-")

    def close(self) -> None:
        self._dir.cleanup()

    def scenario(self, pair: str) -> Scenario:
        if pair not in self._scenarios:
            b = self.bundles[pair]
            d = Path(self._dir.name) / pair
            d.mkdir(exist_ok=True)
            for name, text in (("device.yaml", b.device), ("model.yaml", b.model),
                               ("scenario.yaml", b.scenario)):
                (d / name).write_text(text, encoding="utf-8")
            self._scenarios[pair] = load_scenario(d / "scenario.yaml")
        return self._scenarios[pair]

    def question(self, task: Task) -> Scenario:
        base = self.scenario(task.pair)
        q = task.question
        floor = None
        if q.floor_fraction is not None:
            floor = q.floor_fraction * full_importance(base.model)
        return base.with_overrides(target_latency_ms=q.target_ms, preload_budget_mb=q.buffer_mb,
                                   objective=self.objective, importance_floor=floor)

    def solve(self, task: Task) -> tuple[dict, str | None]:
        """(row, plan JSON or None) for one task; user-level failures are rows."""
        o = self.options
        started = time.monotonic()
        row = {"key": task.key, "attempts": task.attempt}

        def unsolved(status: str, why: Exception | str) -> tuple[dict, None]:
            return {**row, "status": status, "explanation": str(why),
                    "solve_seconds": time.monotonic() - started}, None

        try:
            sc = self.question(task)
        except SpecError as e:  # e.g. a buffer larger than the device's memory allows
            # said of the question, not of this worker's scratch copy of the scenario
            return unsolved("infeasible", f"{e.key_path}: {e.message}" if e.key_path
                            else e.message)
        try:
            plan = solve(sc, o.solver, time_limit_s=o.time_limit_s, threads=o.threads,
                         relative_gap=o.gap)
        except (InfeasibleError, SolverTimeoutError) as e:
            try:
                explained = explain_failure(sc, e, deadline=started + o.time_limit_s,
                                            threads=o.threads)
            except ElasticplanError as inner:
                explained = inner
            return unsolved("infeasible" if isinstance(explained, InfeasibleError) else "timeout",
                            explained)
        except NoPlanFoundError as e:
            return unsolved("no-plan", e)
        except ElasticplanError as e:
            return unsolved(FAILED, e)
        full = full_importance(sc.model) or 1.0
        row.update(status=plan.status.value, explanation="", objective_value=plan.objective,
                   importance=plan.importance, importance_fraction=plan.importance / full,
                   gap=plan.gap, predicted_latency_ms=plan.predicted_latency_ms,
                   preload_bytes=plan.preload_bytes, resident_bytes=plan.memory.resident_bytes,
                   predicted_memory_bytes=plan.memory.peak_bytes,
                   shards=plan.n_shards, solve_seconds=plan.solve_seconds)
        return row, plan.to_json()  # strict JSON: a non-finite figure raises here

    def solve_batch(self, tasks: list[Task]) -> list[tuple[dict, str | None]]:
        return [self._solve_or_fail(t) for t in tasks]

    def _solve_or_fail(self, task: Task) -> tuple[dict, str | None]:
        """`solve`, with a bug in one task (any other exception) a failed row of that task:
        the chunk's other tasks and the fleet go on."""
        started = time.monotonic()
        try:
            return self.solve(task)
        except Exception as e:
            return {"key": task.key, "attempts": task.attempt, "status": FAILED,
                    "explanation": f"internal error (a bug, not the question's fault; please "
                                   f"report it): {type(e).__name__}: {e}",
                    "solve_seconds": time.monotonic() - started}, None


# Per process: the solver of the fleet being run (pool and Ray workers reuse it across
# chunks, so each pair's scenario is parsed once per process).
_SOLVERS: dict[str, Solver] = {}


def _fleet_id(bundles: dict[str, Bundle], objective: Objective, options: Options) -> str:
    text = json.dumps({"bundles": sorted(b.pair + hashlib.sha256(
        (b.scenario + b.device + b.model).encode()).hexdigest() for b in bundles.values()),
        "objective": objective.value, "options": asdict(options)})
    return hashlib.sha256(text.encode()).hexdigest()


def solver_for(fleet_id: str, make) -> Solver:
    if fleet_id not in _SOLVERS:
        for old in _SOLVERS.values():  # another fleet's: its files go now, not when collected
            old.close()
        _SOLVERS.clear()
        _SOLVERS[fleet_id] = make()
    return _SOLVERS[fleet_id]


def solve_chunk(fleet_id: str, get_bundles, objective: Objective, options: Options,
                tasks: list[Task]) -> list[tuple[dict, str | None]]:
    """The task every executor runs: a chunk of tasks on this process's Solver."""
    solver = solver_for(fleet_id, lambda: Solver(get_bundles(), objective, options))
    return solver.solve_batch(tasks)


def check(fleet: Fleet) -> None:
    o = fleet.options
    check_options(o.solver, o.time_limit_s, o.threads, o.gap)


def write_plan(out: Path, plan_json: str, scenario_file: Path, *, inputs=()) -> Plan:
    """Write a worker's plan, read as strictly as any plan (PlanFormatError), with its
    scenario path pointing at the fleet's scenario file; a link at `out` is replaced, not
    followed. Returns the plan as written."""
    try:
        data = json.loads(plan_json, parse_constant=_refuse_constant)
    except ValueError as e:
        raise PlanFormatError(f"<worker plan>: not strict JSON: {e}") from None
    plan = Plan.from_dict(data, "<worker plan>")
    plan = replace(plan, scenario=replace(plan.scenario, path=str(scenario_file)))
    plan.save(out, inputs=inputs, follow_links=False)
    return plan


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def scenario_text(data: dict) -> str:
    return dump_yaml(data, sort_keys=False)
