"""OR-Tools CP-SAT backend: data, variables, constraints, objective, solve, read back."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

from ortools.sat.python import cp_model

from elasticplan.errors import InfeasibleError, SolverError, SolverTimeoutError
from elasticplan.plans.plan import Plan, SolveStatus, gap_to_bound
from elasticplan.problem.spec import Scenario
from elasticplan.solvers.plain import scaling
from elasticplan.solvers.plain.program import build

NAME = "cpsat"


@contextlib.contextmanager
def _stopped_by_signals(stop):
    """Ctrl-C or SIGTERM while the main thread is inside the solver (C++, where Python's
    handlers cannot run): `stop()` is called from a watcher thread woken by the signal's
    wake-up byte (signal.set_wakeup_fd), so the solve returns at once and the handler's
    exception (KeyboardInterrupt, the CLI's Terminated) follows it. Every byte is passed
    on to the wake-up fd set before (asyncio's, say); other signals do not stop it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    r, w = os.pipe()
    os.set_blocking(w, False)
    stops = {int(signal.SIGINT), int(signal.SIGTERM)}
    previous = signal.set_wakeup_fd(w, warn_on_full_buffer=False)

    def watch() -> None:
        while data := os.read(r, 64):  # empty when the solve ended and the pipe closed
            if previous >= 0:
                with contextlib.suppress(OSError):
                    os.write(previous, data)
            if stops.intersection(data):
                stop()

    watcher = threading.Thread(target=watch, name="cpsat-signal-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        try:
            signal.set_wakeup_fd(previous)
            os.close(w)
            watcher.join()
            os.close(r)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def solve_cpsat(scenario: Scenario, *, time_limit_s: float, threads: int, relative_gap: float,
                tick_ns: float = scaling.DEFAULT_TICK_NS) -> Plan:
    started = time.perf_counter()
    program = build(scenario)
    ip = scaling.to_integers(program, tick_ns)

    model = cp_model.CpModel()
    var = {name: model.new_bool_var(name) for name in program.bools}
    var.update({name: model.new_int_var(0, ip.time_horizon, name) for name in program.times})
    var.update({name: model.new_int_var(0, program.byte_horizon, name)
                for name in program.byte_vars})
    for r in ip.rows:
        expr = sum(c * var[v] for v, c in r.terms)
        model.add(expr <= r.rhs if r.sense == "<=" else expr >= r.rhs)
    # with its constant part, so that the relative gap is the objective's own
    objective = sum(c * var[v] for v, c in ip.objective) + ip.objective_offset
    model.maximize(objective) if program.maximize else model.minimize(objective)

    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = float(time_limit_s)
    solver.parameters.num_workers = max(1, int(threads))
    solver.parameters.relative_gap_limit = float(relative_gap)
    # No presolve: OR-Tools 9.15's can cut off the optimum and still report OPTIMAL
    # (google/or-tools#5293, open). Found on a 4-layer min_memory problem (tests/test_solvers.py,
    # test_cpsat_presolve_keeps_the_optimum): CP-SAT proved 562 bytes optimal where 500 is
    # feasible (HiGHS, CBC, brute force). Turning off only the step #5293 names
    # (presolve_inclusion_work_limit = 0) fixes that case, but a 6-layer min_latency problem it
    # proved in 0.02 s then ran past 60 s; without presolve it takes 0.02 s, an infeasible
    # 6-layer problem that timed out at 30 s is proven infeasible in 0.01 s, and the shipped
    # scenarios solve as fast or faster (measured 2026-12-02, OR-Tools 9.15.6755).
    solver.parameters.cp_model_presolve = False
    # OR-Tools' own SIGINT handler allocates inside the handler (it deadlocked once in
    # malloc, seen in a hostile pass); ours stops the search and Python's handler then runs
    solver.parameters.catch_sigint_signal = False
    with _stopped_by_signals(solver.stop_search):
        status = solver.solve(model)
    elapsed = time.perf_counter() - started

    if status == cp_model.INFEASIBLE:
        raise InfeasibleError("CP-SAT proved the problem infeasible")
    if status == cp_model.UNKNOWN:
        raise SolverTimeoutError(
            f"CP-SAT found no plan within the {time_limit_s:g} s time limit "
            f"(not a proof that none exists); raise --time-limit")
    if status == cp_model.MODEL_INVALID:
        raise SolverError(f"CP-SAT rejected the model: {model.validate()}")
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise SolverError(f"CP-SAT returned unexpected status {solver.status_name(status)}")

    value = solver.objective_value
    bound = solver.best_objective_bound
    gap = gap_to_bound(value, bound)
    value_of = lambda name: solver.boolean_value(var[name])  # noqa: E731
    return Plan.from_selection(
        scenario, program.selection(value_of), solver=NAME,
        status=SolveStatus.OPTIMAL if status == cp_model.OPTIMAL else SolveStatus.FEASIBLE,
        gap=gap, solve_seconds=elapsed, layout=program.layout(value_of))
