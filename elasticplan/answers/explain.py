"""Explain a failed solve: what is short, and by how much.

`explain_failure` is its own entry point, asked after `elasticplan.solvers.solve` raised
InfeasibleError or SolverTimeoutError (the CLI does); `solve` itself only solves and
verifies. Auxiliary programs answer it, solved with HiGHS on the aggregated program (it
builds an 80-layer Llama-2-70B program in tens of milliseconds, where the plain per-shard
program takes gigabytes), within what is left of the command's time limit:
- the fastest schedule at the given buffer (objective min_latency) and with the whole
  memory as buffer -- is the target reachable at all, and with how much buffer?
- the least buffer that meets the target (min_buffer, importance floor 0), and for a
  min_buffer question the best importance reachable at the target;
- with a memory budget, first the least peak memory that meets the target and the floor
  (min_memory without the budget): is the budget what is short, and by how much?
"""

from __future__ import annotations

import time

from elasticplan.decoding import priced
from elasticplan.errors import ElasticplanError, InfeasibleError, SolverTimeoutError
from elasticplan.plans.plan import Plan, SolveStatus
from elasticplan.problem.question import Objective
from elasticplan.problem.spec import Scenario
from elasticplan.solvers import solve

BACKEND = "highs"
MIN_STEP_S = 0.05  # a sub-problem is not started with less time than this left


class _OutOfTime(Exception):
    pass


def explain_failure(scenario: Scenario, error: InfeasibleError | SolverTimeoutError, *,
                    deadline: float, threads: int) -> ElasticplanError:
    """The error to report for a failed solve of `scenario`: an InfeasibleError saying what
    is short (a proof of infeasibility, or a time-out whose target the diagnosis proves out
    of reach), else the original time-out. The diagnosis stops at `deadline`
    (time.monotonic()); if it is cut short, the message says so."""
    try:
        reason = diagnose(scenario, deadline, threads)
        note = "; no single short resource could be named"
    except _OutOfTime:
        reason = None
        note = ("; what is short could not be worked out within the time limit (raise "
                "--time-limit for an explanation)")
    if isinstance(error, InfeasibleError):
        return InfeasibleError(reason or (
            f"no plan exists for target {scenario.target_latency_ms:g} ms and buffer "
            f"{scenario.preload_budget_mb:g} MB (proven by the solver){note}"))
    # No plan and no proof: the diagnosis may still prove the target out of reach.
    if reason is not None:
        return InfeasibleError(reason)
    return error if note.startswith("; no single") else type(error)(str(error) + note)


def _describe(plan: Plan) -> str:
    counts = sorted({len(lp.shards) for lp in plan.layers})
    bits = sorted({c.bits for lp in plan.layers for c in lp.shards})
    per_layer = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    bit_text = ("no shards" if not bits else
                f"at {bits[0]} bits" if len(bits) == 1 else f"at {bits[0]}-{bits[-1]} bits")
    return (f"{per_layer} shard(s) per layer {bit_text}, "
            f"{plan.preload_bytes / 1e6:.3g} MB preloaded")


def _sub(scenario: Scenario, deadline: float, threads: int, **changes) -> Plan:
    left = deadline - time.monotonic()
    if left < MIN_STEP_S:
        raise _OutOfTime
    # A near-zero gap: "the fastest schedule is X ms" must be a proof, not an estimate.
    try:
        return solve(scenario.with_overrides(**changes), BACKEND, time_limit_s=left,
                     threads=threads, relative_gap=1e-9)
    except SolverTimeoutError:
        if deadline - time.monotonic() < MIN_STEP_S:
            raise _OutOfTime from None
        raise


def _ttft(scenario: Scenario, deadline: float, threads: int) -> str | None:
    """A decoder's time to first token, if it is what is short: every other constraint can
    be met without it. The fastest prompt pass within the buffer (the prompt pass alone,
    its rows free to be resident: a bound) says how far off it is."""
    try:
        _sub(scenario, deadline, threads, target_ttft_ms=None)
    except ElasticplanError:
        return None  # something else is short too: the rest of the diagnosis says what
    (timed,) = scenario.timed_passes
    alone = priced(scenario, timed.model)
    fastest = _sub(alone, deadline, threads, objective=Objective.MIN_LATENCY,
                   importance_floor=None)
    return (f"target_ttft_ms {timed.target_ms:g} is short: every other target and budget "
            f"can be met, but not with it; the prompt pass alone takes at least "
            f"{fastest.planned_latency_ms:.4g} ms{_approx(fastest)} within the "
            f"{scenario.preload_budget_mb:g} MB buffer; raise target_ttft_ms (to >= "
            f"{fastest.planned_latency_ms:.4g} ms at the very least), the buffer or the memory "
            f"budget")


def _proven_above(fastest: Plan, target_ms: float) -> bool:
    """Whether a min-latency plan proves that no schedule meets `target_ms`."""
    if fastest.status == SolveStatus.OPTIMAL:
        return True
    return fastest.gap is not None and fastest.planned_latency_ms * (1 - fastest.gap) > target_ms


def _approx(plan: Plan) -> str:
    return "" if plan.status == SolveStatus.OPTIMAL else ", best found, not proven"


def diagnose(scenario: Scenario, deadline: float, threads: int) -> str | None:
    """An explanation if the target or the importance floor is provably out of reach, else
    None; _OutOfTime if the deadline (time.monotonic()) comes first."""
    if scenario.question.target_ttft_ms is not None:
        reason = _ttft(scenario, deadline, threads)
        if reason is not None:
            return reason
        scenario = scenario.with_overrides(target_ttft_ms=None)
    T = scenario.target_latency_ms
    M = scenario.preload_budget_mb
    cap_mb = scenario.memory_cap_bytes / 1e6
    if scenario.memory_budget_mb is not None:
        floor = scenario.importance_floor or 0.0
        try:
            least = _sub(scenario, deadline, threads, objective=Objective.MIN_MEMORY,
                         importance_floor=floor, memory_budget_mb=None)
        except ElasticplanError:
            least = None  # out of reach even without the budget: explain that below
        if least is not None and least.status == SolveStatus.OPTIMAL and \
                least.memory.peak_bytes > scenario.memory_budget_bytes:
            m = least.memory
            return (f"memory_budget_mb {scenario.memory_budget_mb:g} is short: at target {T:g} "
                    f"ms" + (f" and importance floor {floor:.6g}" if floor else "") +
                    f" the plan that holds the least needs at least {m.peak_bytes / 1e6:.4g} MB "
                    f"(resident {m.resident_bytes / 1e6:.4g}, preload "
                    f"{m.preload_bytes / 1e6:.4g}, working {m.working_peak_bytes / 1e6:.4g}, "
                    f"activations {m.activation_bytes / 1e6:.4g}"
                    + (f", KV cache {m.kept_bytes / 1e6:.4g}" if m.kept_bytes else "")
                    + f"; embeddings {least.embeddings}); raise the memory budget to >= "
                    f"{m.peak_bytes / 1e6:.4g} MB, or the target")
        scenario = scenario.with_overrides(memory_budget_mb=None)
    try:
        fastest = _sub(scenario, deadline, threads,
                       objective=Objective.MIN_LATENCY, importance_floor=None)
        fastest_cap = _sub(scenario, deadline, threads,
                           objective=Objective.MIN_LATENCY, importance_floor=None,
                           preload_budget_mb=cap_mb)
    except ElasticplanError:
        return None
    # Only a proof puts the target out of reach: the fastest schedule proven optimal, or
    # the solver's own lower bound on it (its objective less the gap it reports) above the
    # target (HiGHS stops at its absolute gap, 1e-6, which for a schedule of a tenth of a
    # millisecond is above the 1e-9 relative gap asked for, so the plan comes back
    # "feasible" with its bound still well above the target).
    if fastest.planned_latency_ms > T and _proven_above(fastest, T):
        head = (f"target {T:g} ms is below the fastest possible schedule "
                f"({fastest.planned_latency_ms:.4g} ms{_approx(fastest)} with "
                f"{_describe(fastest)}, buffer {M:g} MB); raise the target to >= "
                f"{fastest.planned_latency_ms:.4g} ms")
        if fastest_cap.planned_latency_ms > T:
            return (head + f"; no buffer helps: even with all {cap_mb:.4g} MB of free memory as "
                    f"buffer the fastest is {fastest_cap.planned_latency_ms:.4g} ms "
                    f"(compute-bound)")
        need = _sub(scenario, deadline, threads, objective=Objective.MIN_BUFFER,
                    importance_floor=0.0, preload_budget_mb=cap_mb)
        return head + f", or the buffer to >= {need.preload_bytes / 1e6:.4g} MB{_approx(need)}"

    # The target is reachable; for min_buffer the importance floor must be what is short.
    if scenario.objective == Objective.MIN_BUFFER:
        best = _sub(scenario, deadline, threads,
                    objective=Objective.MAX_IMPORTANCE, importance_floor=None)
        best_cap = _sub(scenario, deadline, threads,
                        objective=Objective.MAX_IMPORTANCE, importance_floor=None,
                        preload_budget_mb=cap_mb)
        text = (f"importance_floor {scenario.importance_floor:.6g} is above the best importance "
                f"reachable at {T:g} ms within the {M:g} MB budget ({best.importance:.6g}"
                f"{_approx(best)}); lower the floor to <= {best.importance:.6g}")
        if best.status != SolveStatus.OPTIMAL or best.importance >= scenario.importance_floor:
            return None
        if best_cap.importance >= scenario.importance_floor:
            need = _sub(scenario, deadline, threads, preload_budget_mb=cap_mb)
            text += (f", or raise the buffer budget to >= {need.preload_bytes / 1e6:.4g} MB"
                     f"{_approx(need)}")
        else:
            text += f" (even all {cap_mb:.4g} MB of free memory reaches only {best_cap.importance:.6g})"
        return text
    return None
