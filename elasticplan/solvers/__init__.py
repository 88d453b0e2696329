"""Solver backends behind one signature: scenario in, verified plan out.

    solve(scenario, solver="highs", *, time_limit_s=..., threads=..., relative_gap=...)

Every plan returned here has passed the independent verifier. A proven-infeasible
problem raises InfeasibleError; a time-out without any plan raises SolverTimeoutError;
neither returns a plan. What is short, and by how much, is a separate question with its
own entry point (elasticplan.answers.explain.explain_failure), which the CLI asks.
"""

from __future__ import annotations

import dataclasses
import math
import time

from elasticplan.costmodel import at_quantile
from elasticplan.errors import (
    InfeasibleError,
    InvalidArgument,
    NoPlanFoundError,
    SolverError,
    SolverTimeoutError,
)
from elasticplan.plans.plan import Plan
from elasticplan.plans.verify import verify_plan
from elasticplan.problem.question import Objective
from elasticplan.problem.spec import Scenario
from elasticplan.solvers.aggregated.highs import solve_highs
from elasticplan.solvers.greedy import solve_greedy


def solve_cpsat(scenario: Scenario, **options) -> Plan:
    """CP-SAT on the plain program (elasticplan.solvers.plain.cpsat), imported when first
    asked for: OR-Tools' import (pandas with it) took 2.5 s of a HiGHS solve's 3.9 s
    command on the 2-core VM."""
    from elasticplan.solvers.plain.cpsat import solve_cpsat as backend

    return backend(scenario, **options)


def solve_cbc(scenario: Scenario, **options) -> Plan:
    """CBC through PuLP on the plain program (elasticplan.solvers.plain.cbc), imported when
    first asked for (PuLP's import: 0.9 s)."""
    from elasticplan.solvers.plain.cbc import solve_cbc as backend

    return backend(scenario, **options)


BACKENDS = {"cpsat": solve_cpsat, "cbc": solve_cbc, "highs": solve_highs, "greedy": solve_greedy}

# HiGHS on the aggregated program: measured 10-50x faster to a proof than CP-SAT on the
# shipped scenarios, and the only backend that plans LLM-scale models (benchmarks/).
DEFAULT_SOLVER = "highs"
DEFAULT_TIME_LIMIT_S = 30.0
DEFAULT_THREADS = 2
# Both exact backends stop once (bound - objective) / objective <= this; status "optimal"
# means proven within it (docs/programs.md, "Solver status": tighter proofs are slow today).
DEFAULT_RELATIVE_GAP = 1e-4


def check_options(solver: str, time_limit_s: float, threads: int, relative_gap: float) -> None:
    """Raise InvalidArgument for options no backend can honour."""
    if solver not in BACKENDS:
        raise InvalidArgument(f"unknown solver {solver!r}; choose one of {', '.join(BACKENDS)}")
    if not (isinstance(time_limit_s, (int, float)) and math.isfinite(time_limit_s)
            and time_limit_s > 0):
        raise InvalidArgument(f"time limit must be a finite number of seconds > 0, "
                              f"got {time_limit_s!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InvalidArgument(f"threads must be an integer >= 1, got {threads!r}")
    if not (isinstance(relative_gap, (int, float)) and 0 <= relative_gap < 1):
        raise InvalidArgument(f"relative gap must be a number in [0, 1), got {relative_gap!r}")


def solve(scenario: Scenario, solver: str = DEFAULT_SOLVER, *,
          time_limit_s: float = DEFAULT_TIME_LIMIT_S, threads: int = DEFAULT_THREADS,
          relative_gap: float = DEFAULT_RELATIVE_GAP) -> Plan:
    check_options(solver, time_limit_s, threads, relative_gap)
    # A latency quantile above the median is planned on the device stretched to it; the
    # plan is then lowered on the scenario itself (median times, the quantile beside them).
    planning = at_quantile(scenario)
    deadline = time.monotonic() + time_limit_s
    plan = BACKENDS[solver](planning, time_limit_s=time_limit_s, threads=threads,
                            relative_gap=relative_gap)
    if solver in TIE_BREAKING and planning.objective == Objective.MAX_IMPORTANCE:
        plan = fastest_at(planning, plan, solver, deadline=deadline, threads=threads,
                          relative_gap=relative_gap)
    if planning is not scenario:
        plan = Plan.from_selection(scenario, plan.selection(scenario), solver=plan.solver,
                                   status=plan.status, gap=plan.gap,
                                   solve_seconds=plan.solve_seconds, execution=plan.execution,
                                   layout=plan.layout)
    verify_plan(scenario, plan)
    return plan


# The exact backends break max_importance's ties: among plans of the importance found, the
# fastest (fastest_at). Greedy, the STI-like baseline, keeps its own choice.
TIE_BREAKING = ("highs", "cpsat", "cbc")
# The second solve's floor sits (shards + 2) x this x the largest shard importance below
# the first plan's importance, so that plan meets it in every backend's arithmetic: CP-SAT
# rounds each shard's importance down to units of 1e-9 of the largest
# (plain.scaling.IMPORTANCE_UNITS), the float backends keep 1e-12 of it to spare.
TIE_SLACK = 1e-9
# The second solve stops within this relative gap of the fastest: on SmolLM2's 48 MB
# question (30 layers) it took 0.7-0.8 s at 1e-2 and 9-10 s at 1e-4, for 0.3 % of latency.
TIE_GAP = 1e-2
# ... and within this share of the first solve's time (at least TIE_MIN_S): the fastest
# plan is a courtesy, not worth a long wait (an unbounded window took minutes to 1e-2;
# SmolLM2's phone question finds none faster and spent 2.8 s more at a share of 1).
TIE_SHARE = 0.5
TIE_MIN_S = 0.5
TIE_LEAST_S = 0.05  # not started with less time left than this


def tie_floor(scenario: Scenario, importance: float) -> float:
    """The importance floor of the tie-break's second solve after a plan of `importance`:
    that, less TIE_SLACK per shard (and two) of the largest shard importance."""
    model = scenario.model
    return max(0.0, importance - (model.n_shards + 2) * TIE_SLACK * model.max_importance)


def fastest_at(scenario: Scenario, plan: Plan, solver: str, *, deadline: float, threads: int,
               relative_gap: float) -> Plan:
    """The fastest plan whose importance is at least `plan`'s (within TIE_GAP of the
    fastest, or `relative_gap` if wider): a second, min_latency solve with `plan`'s
    importance as its floor (tie_floor), in the time left before `deadline`
    (time.monotonic()). A max_importance objective is flat across every plan of the best
    importance, so a solver stops at whichever it meets first, often one that fills the
    latency target (SmolLM2 at 48 MB and 1 GB/s was planned at 109.7 ms per token against
    a 157 ms target where the same importance runs in 93). The importance proof stands for
    the plan returned: its importance is at least the first's, so its gap to the bound is
    no wider; status and gap are the first solve's, solve_seconds both (the second's
    whether or not it found a faster plan). The second solve has TIE_SHARE of the first's
    time (at least TIE_MIN_S); `plan` itself is returned when it is already the fastest,
    or when the second solve gives nothing faster in time."""
    left = min(deadline - time.monotonic(), max(TIE_MIN_S, TIE_SHARE * plan.solve_seconds))
    if left < TIE_LEAST_S:
        return plan
    floor = tie_floor(scenario, plan.importance)
    # HiGHS starts from the plan it improves on, so it has a plan whenever it stops.
    start = {"start": (plan.selection(scenario), plan.layout)} if solver == "highs" else {}
    began = time.monotonic()
    try:
        fast = BACKENDS[solver](
            scenario.with_overrides(objective=Objective.MIN_LATENCY, importance_floor=floor),
            time_limit_s=left, threads=threads, relative_gap=max(relative_gap, TIE_GAP),
            **start)
    except (InfeasibleError, NoPlanFoundError, SolverTimeoutError, SolverError):
        fast = None  # the first plan stands: it is proven, the second only a courtesy
    seconds = plan.solve_seconds + time.monotonic() - began  # both solves, whatever came
    if fast is None or fast.predicted_latency_ms >= plan.predicted_latency_ms or \
            fast.importance < floor:
        return dataclasses.replace(plan, solve_seconds=seconds)
    return Plan.from_selection(scenario, fast.selection(scenario), solver=plan.solver,
                               status=plan.status, gap=plan.gap, solve_seconds=seconds,
                               execution=fast.execution, layout=fast.layout)


AUTO_WINDOW = "auto"


def solve_any_window(scenario: Scenario, solver: str = DEFAULT_SOLVER, *,
                     time_limit_s: float = DEFAULT_TIME_LIMIT_S, threads: int = DEFAULT_THREADS,
                     relative_gap: float = DEFAULT_RELATIVE_GAP) -> tuple[Plan, Scenario]:
    """The window chosen by the solver: every prefetch window from 1 layer to unbounded is
    solved (each with an even share of the time left) and the best plan kept; ties go to
    the plan with the least predicted peak memory, then the shallower window. Returns the plan and the
    question it answers (the scenario with that window). Infeasible only if every window
    is; a time-out on one window is reported if no window gave a plan."""
    L = len(scenario.model.layers)
    deadline = time.monotonic() + time_limit_s
    found, failures = [], []
    windows = [*range(1, L), None]
    for i, window in enumerate(windows):
        question = scenario.with_overrides(prefetch_window=window)
        share = (deadline - time.monotonic()) / (len(windows) - i)  # the rest, evenly
        try:
            plan = solve(question, solver, threads=threads, relative_gap=relative_gap,
                         time_limit_s=max(0.1, share))
        except (InfeasibleError, NoPlanFoundError, SolverTimeoutError) as e:
            failures.append(e)
            continue
        found.append((plan, question))
    if not found:
        timeouts = [e for e in failures if not isinstance(e, InfeasibleError)]
        raise timeouts[0] if timeouts else failures[-1]
    sign = 1 if scenario.objective == Objective.MAX_IMPORTANCE else -1
    return max(found, key=lambda pq: (round(sign * pq[0].objective, 12),
                                      -pq[0].memory.peak_bytes,
                                      -(pq[0].window or L)))
