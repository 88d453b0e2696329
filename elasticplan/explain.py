"""Explain a failed solve: what is short, and by how much.

`explain_failure` is its own entry point, asked after `elasticplan.solvers.solve` raised
InfeasibleError or SolverTimeoutError (the CLI does); `solve` itself only solves and
verifies. Auxiliary programs, solved with CBC (it settles these small min-max and
min-buffer sub-problems in ~0.1 s where CP-SAT's bound stalls), answer it:
- the fastest schedule at the given buffer (objective min_latency) and with the whole
  memory as buffer -- is the target reachable at all, and with how much buffer?
- the least buffer that meets the target (min_buffer, importance floor 0), and for a
  min_buffer question the best importance reachable at the target.
"""

from __future__ import annotations

from elasticplan.errors import ElasticplanError, InfeasibleError, SolverTimeoutError
from elasticplan.plan import Plan, SolveStatus
from elasticplan.solvers import solve
from elasticplan.spec import Objective, Scenario

BACKEND = "cbc"


def explain_failure(scenario: Scenario, error: InfeasibleError | SolverTimeoutError, *,
                    time_limit_s: float, threads: int) -> ElasticplanError:
    """The error to report for a failed solve of `scenario`: an InfeasibleError saying what
    is short (a proof of infeasibility, or a time-out whose target the diagnosis proves out
    of reach), else the original time-out."""
    reason = diagnose(scenario, time_limit_s, threads)
    if isinstance(error, InfeasibleError):
        return InfeasibleError(reason or (
            f"no plan exists for target {scenario.target_latency_ms:g} ms and buffer "
            f"{scenario.preload_budget_mb:g} MB (proven by the solver); no single short "
            f"resource could be named"))
    # No plan and no proof: the diagnosis may still prove the target out of reach.
    return error if reason is None else InfeasibleError(reason)


def _describe(plan: Plan) -> str:
    counts = sorted({len(lp.shards) for lp in plan.layers})
    bits = sorted({c.bits for lp in plan.layers for c in lp.shards})
    per_layer = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    bit_text = ("no shards" if not bits else
                f"at {bits[0]} bits" if len(bits) == 1 else f"at {bits[0]}-{bits[-1]} bits")
    return (f"{per_layer} shard(s) per layer {bit_text}, "
            f"{plan.preload_bytes / 1e6:.3g} MB preloaded")


def _sub(scenario: Scenario, time_limit_s: float, threads: int, **changes) -> Plan:
    # A near-zero gap: "the fastest schedule is X ms" must be a proof, not an estimate.
    return solve(scenario.with_overrides(**changes), BACKEND, time_limit_s=time_limit_s,
                 threads=threads, relative_gap=1e-9)


def _approx(plan: Plan) -> str:
    return "" if plan.status == SolveStatus.OPTIMAL else ", best found, not proven"


def diagnose(scenario: Scenario, time_limit_s: float, threads: int) -> str | None:
    """An explanation if the target or the importance floor is provably out of reach, else None."""
    T = scenario.target_latency_ms
    M = scenario.preload_budget_mb
    cap_mb = scenario.memory_cap_bytes / 1e6
    try:
        fastest = _sub(scenario, time_limit_s, threads,
                       objective=Objective.MIN_LATENCY, importance_floor=None)
        fastest_cap = _sub(scenario, time_limit_s, threads,
                           objective=Objective.MIN_LATENCY, importance_floor=None,
                           preload_budget_mb=cap_mb)
    except ElasticplanError:
        return None
    # Only a proven-fastest schedule proves the target out of reach.
    if fastest.predicted_latency_ms > T and fastest.status == SolveStatus.OPTIMAL:
        head = (f"target {T:g} ms is below the fastest possible schedule "
                f"({fastest.predicted_latency_ms:.4g} ms{_approx(fastest)} with "
                f"{_describe(fastest)}, buffer {M:g} MB); raise the target to >= "
                f"{fastest.predicted_latency_ms:.4g} ms")
        if fastest_cap.predicted_latency_ms > T:
            return (head + f"; no buffer helps: even with all {cap_mb:.4g} MB of free memory as "
                    f"buffer the fastest is {fastest_cap.predicted_latency_ms:.4g} ms "
                    f"(compute-bound)")
        need = _sub(scenario, time_limit_s, threads, objective=Objective.MIN_BUFFER,
                    importance_floor=0.0, preload_budget_mb=cap_mb)
        return head + f", or the buffer to >= {need.preload_bytes / 1e6:.4g} MB{_approx(need)}"

    # The target is reachable; for min_buffer the importance floor must be what is short.
    if scenario.objective == Objective.MIN_BUFFER:
        best = _sub(scenario, time_limit_s, threads,
                    objective=Objective.MAX_IMPORTANCE, importance_floor=None)
        best_cap = _sub(scenario, time_limit_s, threads,
                        objective=Objective.MAX_IMPORTANCE, importance_floor=None,
                        preload_budget_mb=cap_mb)
        text = (f"importance_floor {scenario.importance_floor:.6g} is above the best importance "
                f"reachable at {T:g} ms within the {M:g} MB budget ({best.importance:.6g}"
                f"{_approx(best)}); lower the floor to <= {best.importance:.6g}")
        if best.status != SolveStatus.OPTIMAL or best.importance >= scenario.importance_floor:
            return None
        if best_cap.importance >= scenario.importance_floor:
            need = _sub(scenario, time_limit_s, threads, preload_budget_mb=cap_mb)
            text += (f", or raise the buffer budget to >= {need.preload_bytes / 1e6:.4g} MB"
                     f"{_approx(need)}")
        else:
            text += f" (even all {cap_mb:.4g} MB of free memory reaches only {best_cap.importance:.6g})"
        return text
    return None
