"""PuLP + CBC backend: the same rows, in floating point.

PuLP maps CBC's "stopped on time with a solution" to LpStatusOptimal; the real
distinction is in `sol_status`, which is what this backend reads. CBC's best
bound is not exposed by PuLP, so it is read from CBC's own log.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import pulp

from elasticplan.errors import InfeasibleError, SolverError, SolverTimeoutError
from elasticplan.plans.plan import Plan, SolveStatus, gap_to_bound
from elasticplan.problem.spec import Scenario
from elasticplan.solvers.margins import TINY_IMPORTANCE, float_margins
from elasticplan.solvers.plain.program import Unit, build

NAME = "cbc"


def solve_cbc(scenario: Scenario, *, time_limit_s: float, threads: int,
              relative_gap: float) -> Plan:
    started = time.perf_counter()
    program = build(scenario)

    cbc_path = _cbc_binary()
    prob = pulp.LpProblem("elasticplan", pulp.LpMaximize if program.maximize else pulp.LpMinimize)
    var = {name: prob.add_variable(_safe(name), cat=pulp.LpBinary) for name in program.bools}
    var.update({name: prob.add_variable(_safe(name), 0, program.time_horizon_ms)
                for name in program.times})
    var.update({name: prob.add_variable(_safe(name), 0, program.byte_horizon)
                for name in program.byte_vars})
    margins = float_margins(scenario)
    for r in program.rows:
        k = margins.importance_scale if r.unit == Unit.IMPORTANCE else 1.0
        expr = pulp.lpSum(k * c * var[v] for v, c in r.terms)
        rhs = r.rhs
        if r.unit == Unit.TIME_MS and r.sense == "<=":
            rhs = margins.latency_rhs(rhs)
        elif r.unit == Unit.IMPORTANCE and r.sense == ">=":
            rhs = margins.floor_rhs(rhs)
        else:
            rhs = k * rhs
        prob += (expr <= rhs) if r.sense == "<=" else (expr >= rhs), _safe(r.label)
    # CBC prints its final bound with ~3 decimals; scaling the objective to ~1e6 makes that
    # line precise enough to compute a real gap. Feasibility is unaffected.
    # (at least TINY_IMPORTANCE: 1e6 over a subnormal coefficient overflows to infinity)
    top = max(max((abs(c) for _, c in program.objective), default=1.0) or 1.0, TINY_IMPORTANCE)
    obj_scale = 10.0 ** round(math.log10(1e6 / top))
    # The objective's constant (min_memory's fixed terms) as a variable fixed at 1: a
    # constant of the expression never reaches CBC's model, so its bound and its relative
    # gap (the stopping rule) would be on the variable part alone, which can be negative.
    constant = prob.add_variable("objective_constant", 1, 1) if program.objective_offset \
        else 0.0
    prob += pulp.lpSum(obj_scale * c * var[v] for v, c in program.objective) \
        + obj_scale * program.objective_offset * constant

    with tempfile.TemporaryDirectory(prefix="elasticplan-cbc-") as tmp:
        log_path = os.path.join(tmp, "cbc.log")
        cmd = pulp.COIN_CMD(path=cbc_path, msg=False, timeLimit=float(time_limit_s),
                            gapRel=relative_gap, threads=max(1, int(threads)), logPath=log_path)
        prob.solve(cmd)
        log = Path(log_path).read_text(encoding="utf-8", errors="replace") \
            if os.path.exists(log_path) else ""
    elapsed = time.perf_counter() - started

    if prob.status == pulp.LpStatusInfeasible:
        raise InfeasibleError("CBC proved the problem infeasible")
    if prob.sol_status == pulp.LpSolutionNoSolutionFound or prob.status == pulp.LpStatusNotSolved:
        raise SolverTimeoutError(
            f"CBC found no plan within the {time_limit_s:g} s time limit "
            f"(not a proof that none exists); raise --time-limit")
    if prob.sol_status == pulp.LpSolutionOptimal:
        status = SolveStatus.OPTIMAL
    elif prob.sol_status == pulp.LpSolutionIntegerFeasible:
        status = SolveStatus.FEASIBLE
    else:
        raise SolverError(f"CBC returned status {pulp.LpStatus.get(prob.status)} / "
                          f"solution status {pulp.LpSolution.get(prob.sol_status)}")

    value = pulp.value(prob.objective) or 0.0
    gap = _gap_from_log(log, value, status, program.maximize)
    value_of = lambda name: var[name].varValue or 0.0  # noqa: E731
    return Plan.from_selection(scenario, program.selection(value_of), solver=NAME,
                               status=status, gap=gap, solve_seconds=elapsed,
                               layout=program.layout(value_of))


def _cbc_binary() -> str:
    """The CBC executable: the one PuLP 3.3 bundles, else `cbc` on PATH."""
    from pulp.apis import coin_api

    bundled = getattr(coin_api, "pulp_cbc_path", None)
    if bundled and os.path.isfile(bundled) and os.access(bundled, os.X_OK):
        return bundled
    found = shutil.which("cbc")
    if found:
        return found
    raise SolverError("no CBC executable found (PuLP's bundled one is missing and `cbc` is not "
                      "on PATH); reinstall with `make test` or use --solver highs")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def _gap_from_log(log: str, value: float, status: SolveStatus, maximize: bool) -> float | None:
    """Relative gap from CBC's final report ("Upper bound:" when maximising, "Lower bound:"
    when minimising; CBC stops as "optimal" once within the requested gap, so an optimal
    run reports that bound's gap too); 0 when it proved optimality without stating a
    bound; None when a feasible run stated none."""
    label = "Upper bound" if maximize else "Lower bound"
    m = re.search(rf"^{label}:\s*([-+0-9.eE]+)", log, re.MULTILINE)
    if not m:
        return 0.0 if status == SolveStatus.OPTIMAL else None
    bound = float(m.group(1))
    return gap_to_bound(value, bound)
