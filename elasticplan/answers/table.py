"""Plan tables: the frontier over a grid of targets and buffers, solved once, looked up in
microseconds (re-planning on the device when the target or the buffer changes).

Two facts about `max_importance` make most of a grid free:
- **Reuse.** A plan solved at (T, B) with latency t <= T and buffer b <= B is feasible at
  every (T', B') with t <= T' <= T and b <= B' <= B, whose feasible set is a subset of
  (T, B)'s. So its value is within the solve's gap of the optimum there too, and the
  solve's bound is a bound there. Cells are visited from the largest (T, B) down, and a
  cell that a solved plan already fits is answered without a solve.
- **Infeasibility is inherited.** If (T, B) has no plan, no smaller (T', B') has one.
Every cell keeps the smallest proven bound of the solved cells that contain it, so its
gap is real.

Lookup of an arbitrary (T, B) between grid points: the cell at the grid's (T_i <= T,
B_j <= B) holds a plan that is feasible at (T, B); the cell just above (T_{i+1}, B_{j+1})
bounds the optimum at (T, B). Beyond the grid's top corner no bound is known (None).
"""

from __future__ import annotations

import bisect
import json
import os
import time
from dataclasses import dataclass

from elasticplan.errors import InfeasibleError, InvalidArgument, NoPlanFoundError, PlanFormatError, SolverTimeoutError
from elasticplan.plans.plan import Plan, gap_to_bound, read_json
from elasticplan.problem.inputs import Fields, fail, number, show
from elasticplan.problem.limits import bytes_of_mb
from elasticplan.problem.outputs import write_text
from elasticplan.problem.question import Objective
from elasticplan.problem.spec import Scenario
from elasticplan.solvers import solve as solve_one

SCHEMA = "elasticplan.table/1"
SOLVED, REUSED, INFEASIBLE, IMPLIED_INFEASIBLE, TIMEOUT, NO_PLAN = (
    "solved", "reused", "infeasible", "implied-infeasible", "timeout", "no-plan")
STATUSES = (SOLVED, REUSED, INFEASIBLE, IMPLIED_INFEASIBLE, TIMEOUT, NO_PLAN)


@dataclass(frozen=True)
class Cell:
    status: str  # one of STATUSES
    plan: int | None  # index into PlanTable.plans
    bound: float | None  # proven upper bound on the optimum at this cell


@dataclass(frozen=True)
class Lookup:
    plan: Plan | None  # feasible at the queried (T, B); None: none known
    bound: float | None  # proven upper bound on the optimum at (T, B); None: unknown
    cell: tuple[int, int] | None  # grid indices of the plan's cell
    seconds: float  # time the lookup took

    @property
    def gap(self) -> float | None:
        return proven_gap(self.plan, self.bound)


def proven_gap(plan: Plan | None, bound: float | None) -> float | None:
    """How far `plan` may be from the optimum that `bound` caps (None: unknown)."""
    if plan is None or bound is None:
        return None
    return gap_to_bound(plan.objective, bound)


@dataclass(frozen=True)
class PlanTable:
    scenario_path: str | None
    scenario_sha256: str
    scenario_name: str
    solver: str
    relative_gap: float
    targets_ms: tuple[float, ...]  # increasing
    buffers_mb: tuple[float, ...]  # increasing
    cells: tuple[tuple[Cell, ...], ...]  # [target index][buffer index]
    plans: tuple[Plan, ...]
    solves: int
    build_seconds: float

    @property
    def n_cells(self) -> int:
        return len(self.targets_ms) * len(self.buffers_mb)

    def plan_of(self, cell: Cell) -> Plan | None:
        return None if cell.plan is None else self.plans[cell.plan]

    def lookup(self, target_ms: float, buffer_mb: float) -> Lookup:
        started = time.perf_counter()
        i = bisect.bisect_right(self.targets_ms, target_ms) - 1
        j = bisect.bisect_right(self.buffers_mb, buffer_mb) - 1
        if i < 0 or j < 0:  # below the grid: nothing solved that fits
            return Lookup(None, None, None, time.perf_counter() - started)
        cell = self.cells[i][j]
        ui = i if self.targets_ms[i] == target_ms else i + 1
        uj = j if self.buffers_mb[j] == buffer_mb else j + 1
        bound = None
        if ui < len(self.targets_ms) and uj < len(self.buffers_mb):
            upper = self.cells[ui][uj]
            bound = 0.0 if upper.status in (INFEASIBLE, IMPLIED_INFEASIBLE) else upper.bound
        return Lookup(self.plan_of(cell), bound, (i, j), time.perf_counter() - started)

    # --- JSON ----------------------------------------------------------------------

    def save(self, path: str | os.PathLike, *, inputs=(), follow_links: bool = True) -> None:
        """Write the table atomically; refuses to write onto any of `inputs`."""
        scenario_path = None if self.scenario_path is None else os.path.relpath(
            os.path.abspath(self.scenario_path), os.path.dirname(os.path.abspath(path)))
        data = {
            "schema": SCHEMA,
            "scenario": {"path": scenario_path, "sha256": self.scenario_sha256,
                         "name": self.scenario_name},
            "solver": self.solver, "relative_gap": self.relative_gap,
            "targets_ms": list(self.targets_ms), "buffers_mb": list(self.buffers_mb),
            "solves": self.solves, "build_seconds": self.build_seconds,
            "cells": [[{"status": c.status, "plan": c.plan, "bound": c.bound} for c in row]
                      for row in self.cells],
            "plans": [p.to_dict(path) for p in self.plans],
        }
        write_text(path, json.dumps(data, indent=None, allow_nan=False) + "\n",
                   inputs=inputs, follow_links=follow_links)

    @staticmethod
    def load(path: str | os.PathLike) -> "PlanTable":
        """Read a table strictly (as plans are read) and check its shape and its bounds."""
        file = str(path)
        f = Fields(read_json(path, "plan table"), file, "", "a plan table", PlanFormatError)
        schema = f.string("schema")
        if schema != SCHEMA:
            raise f.err("schema", f"expected {SCHEMA!r}, got {show(schema)}")
        ref = f.mapping("scenario", "{path, sha256, name}")
        scenario_path = ref.string("path", required=False)
        if scenario_path is not None and not os.path.isabs(scenario_path):
            scenario_path = os.path.normpath(os.path.join(os.path.dirname(file), scenario_path))
        sha, name = ref.string("sha256"), ref.string("name")
        ref.done()
        axes = {k: tuple(number(v, file, f"{k}[{n}]", minimum=0, error=PlanFormatError)
                         for n, v in enumerate(f.sequence(k)))
                for k in ("targets_ms", "buffers_mb")}
        raw_plans = f.sequence("plans", allow_empty=True)
        plans = tuple(Plan.from_dict(p, file, f"plans[{k}]").relative_to(file)
                      for k, p in enumerate(raw_plans))
        cells = []
        for i, row in enumerate(f.sequence("cells")):
            if not isinstance(row, list):
                raise fail(PlanFormatError, file, f"cells[{i}]", f"expected a list, got {show(row)}")
            out = []
            for j, c in enumerate(row):
                cf = Fields(c, file, f"cells[{i}][{j}]", "a cell", PlanFormatError)
                out.append(Cell(cf.string("status"),
                                cf.integer("plan", minimum=0, required=False),
                                cf.number("bound", minimum=0, required=False)))
                cf.done()
            cells.append(tuple(out))
        table = PlanTable(scenario_path, sha, name, f.string("solver"),
                          f.number("relative_gap", minimum=0, maximum=1),
                          axes["targets_ms"], axes["buffers_mb"], tuple(cells), plans,
                          f.integer("solves", minimum=0), f.number("build_seconds", minimum=0))
        f.done()
        _check_shape(table, file)
        return table


def _check_shape(t: PlanTable, file: str) -> None:
    for name, axis in (("targets_ms", t.targets_ms), ("buffers_mb", t.buffers_mb)):
        if not axis or any(b <= a for a, b in zip(axis, axis[1:])):
            raise PlanFormatError(f"{file}: {name}: expected a non-empty increasing list")
    if len(t.cells) != len(t.targets_ms) or any(len(r) != len(t.buffers_mb) for r in t.cells):
        raise PlanFormatError(f"{file}: cells: expected {len(t.targets_ms)} rows of "
                              f"{len(t.buffers_mb)} cells")
    for i, row in enumerate(t.cells):
        for j, c in enumerate(row):
            if c.status not in STATUSES:
                raise PlanFormatError(f"{file}: cells[{i}][{j}].status: {c.status!r} is not one "
                                      f"of {list(STATUSES)}")
            if c.plan is not None and not 0 <= c.plan < len(t.plans):
                raise PlanFormatError(f"{file}: cells[{i}][{j}].plan: no plan {c.plan}")
            if (c.plan is not None) != (c.status in (SOLVED, REUSED)):
                raise PlanFormatError(f"{file}: cells[{i}][{j}]: a {c.status} cell "
                                      f"{'has no' if c.plan is None else 'cannot have a'} plan")
            plan = t.plan_of(c)
            if plan is not None and c.bound is not None and \
                    c.bound < plan.objective * (1 - 1e-9) - 1e-12:
                raise PlanFormatError(f"{file}: cells[{i}][{j}].bound: {c.bound:.9g} is below "
                                      f"its own plan's objective {plan.objective:.9g}; not a "
                                      f"bound")
    # a plan that meets a tighter target meets this cell's question with the same buffer:
    # an infeasible cell above a planned one in its buffer's column is a table tampered
    # with (along the buffer axis a fleet's table may hold a buffer the device cannot, its
    # question refused as infeasible, beside a smaller one that has a plan)
    for j in range(len(t.buffers_mb)):
        planned = None
        for i, row in enumerate(t.cells):
            c = row[j]
            if c.plan is not None and planned is None:
                planned = i
            elif c.status in (INFEASIBLE, IMPLIED_INFEASIBLE) and planned is not None:
                raise PlanFormatError(f"{file}: cells[{i}][{j}]: {c.status}, but cells[{planned}]"
                                      f"[{j}] (a tighter target, the same buffer) holds a plan; "
                                      f"not a table `elasticplan table` or `fleet` wrote")


def build_table(scenario: Scenario, targets_ms, buffers_mb, *, solver: str,
                time_limit_s: float, threads: int, relative_gap: float,
                log=None) -> PlanTable:
    """Solve the grid from the largest (target, buffer) down, reusing and inheriting as the
    module docstring says; `log(i, j, cell)` reports progress. The greedy heuristic proves
    no bound and no infeasibility, so with it every cell is solved (a plain sweep)."""
    if scenario.objective != Objective.MAX_IMPORTANCE:
        raise InvalidArgument(f"plan tables answer max_importance questions; the scenario "
                              f"asks {scenario.objective.value}")

    def solve(question: Scenario) -> Plan:
        return solve_one(question, solver, time_limit_s=time_limit_s, threads=threads,
                         relative_gap=relative_gap)

    started = time.perf_counter()
    targets = tuple(sorted(set(float(t) for t in targets_ms)))
    buffers = tuple(sorted(set(float(b) for b in buffers_mb)))
    cells: dict[tuple[int, int], Cell] = {}
    plans: list[Plan] = []
    solved: list[tuple[int, int]] = []  # cells solved here, with a plan and a bound
    infeasible: list[tuple[int, int]] = []
    solves = 0
    for i in range(len(targets) - 1, -1, -1):
        for j in range(len(buffers) - 1, -1, -1):
            T, B = targets[i], buffers[j]
            budget = bytes_of_mb(B)
            if any(i <= a and j <= b for a, b in infeasible):
                cell = Cell(IMPLIED_INFEASIBLE, None, None)
            else:
                containing = [(a, b) for a, b in solved if a >= i and b >= j]
                bound = min((cells[c].bound for c in containing), default=None)
                fits = [cells[c].plan for c in containing
                        if plans[cells[c].plan].planned_latency_ms <= T
                        and plans[cells[c].plan].preload_bytes <= budget]
                if fits:
                    best = max(fits, key=lambda k: plans[k].objective)
                    cell = Cell(REUSED, best, bound)
                else:
                    solves += 1
                    try:
                        plan = solve(scenario.with_overrides(target_latency_ms=T,
                                                             preload_budget_mb=B))
                    except InfeasibleError:
                        infeasible.append((i, j))
                        cell = Cell(INFEASIBLE, None, None)
                    except SolverTimeoutError:
                        cell = Cell(TIMEOUT, None, bound)
                    except NoPlanFoundError:
                        cell = Cell(NO_PLAN, None, bound)
                    else:
                        own = plan.objective * (1 + plan.gap) if plan.gap is not None else None
                        bounds = [v for v in (own, bound) if v is not None]
                        plans.append(plan)
                        cell = Cell(SOLVED, len(plans) - 1, min(bounds) if bounds else None)
                        if cell.bound is not None:
                            solved.append((i, j))
            cells[i, j] = cell
            if log is not None:
                log(i, j, cell)
    return PlanTable(
        scenario_path=scenario.source, scenario_sha256=scenario.content_hash,
        scenario_name=scenario.name, solver=solver, relative_gap=relative_gap,
        targets_ms=targets, buffers_mb=buffers,
        cells=tuple(tuple(cells[i, j] for j in range(len(buffers))) for i in range(len(targets))),
        plans=tuple(plans), solves=solves, build_seconds=time.perf_counter() - started)
