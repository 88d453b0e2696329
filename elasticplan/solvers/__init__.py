"""Solver backends behind one signature: scenario in, verified plan out.

    solve(scenario, solver="highs", *, time_limit_s=..., threads=..., relative_gap=...)

Every plan returned here has passed the independent verifier. A proven-infeasible
problem raises InfeasibleError with an explanation of what is short and by how much;
a time-out without any plan raises SolverTimeoutError; neither returns a plan.
"""

from __future__ import annotations

from elasticplan.errors import ElasticplanError, InfeasibleError, SolverTimeoutError
from elasticplan.plan import Plan
from elasticplan.solvers.cbc import solve_cbc
from elasticplan.solvers.cpsat import solve_cpsat
from elasticplan.solvers.greedy import solve_greedy
from elasticplan.solvers.highs import solve_highs
from elasticplan.spec import Scenario
from elasticplan.verify import verify_plan

BACKENDS = {"cpsat": solve_cpsat, "cbc": solve_cbc, "highs": solve_highs, "greedy": solve_greedy}

# HiGHS on the aggregated program: measured 10-50x faster to a proof than CP-SAT on the
# shipped scenarios, and the only backend that plans LLM-scale models (benchmarks/).
DEFAULT_SOLVER = "highs"
DEFAULT_TIME_LIMIT_S = 30.0
DEFAULT_THREADS = 2
# Both exact backends stop once (bound - objective) / objective <= this; status "optimal"
# means proven within it (see README, "Solver status": tighter proofs are slow today).
DEFAULT_RELATIVE_GAP = 1e-4


def solve(scenario: Scenario, solver: str = DEFAULT_SOLVER, *, time_limit_s: float = DEFAULT_TIME_LIMIT_S,
          threads: int = DEFAULT_THREADS, relative_gap: float = DEFAULT_RELATIVE_GAP,
          hint_greedy: bool = False, explain: bool = True) -> Plan:
    if solver not in BACKENDS:
        raise ElasticplanError(f"unknown solver {solver!r}; choose one of {', '.join(BACKENDS)}")
    if not time_limit_s > 0:
        raise ElasticplanError(f"time limit must be > 0 s, got {time_limit_s:g}")
    hint = None
    if hint_greedy and solver in ("cpsat", "highs"):
        try:
            hint = solve_greedy(scenario).selection(scenario)
        except ElasticplanError:
            hint = None
    try:
        plan = BACKENDS[solver](scenario, time_limit_s=time_limit_s, threads=threads,
                                relative_gap=relative_gap, hint=hint)
    except InfeasibleError as proof:
        if not explain:
            raise
        from elasticplan.explain import explain_infeasible

        # CBC, whichever backend proved it: it settles these small min-max and min-buffer
        # sub-problems in ~0.1 s where CP-SAT's bound stalls (measured; README).
        raise InfeasibleError(explain_infeasible(scenario, "cbc", time_limit_s, threads)) \
            from proof
    except SolverTimeoutError as timeout:
        if not explain:
            raise
        from elasticplan.explain import diagnose

        # No plan and no proof: the cheap diagnosis may still prove the target out of reach.
        reason = diagnose(scenario, "cbc", time_limit_s, threads)
        if reason is not None:
            raise InfeasibleError(reason) from timeout
        raise
    verify_plan(scenario, plan)
    return plan

