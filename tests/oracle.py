"""Brute-force enumeration: every shard dropped, or at any bitwidth streamed or preloaded."""

from __future__ import annotations

import itertools
import math

from elasticplan.costmodel import Layout, Pick, simulate
from elasticplan.decoding import timed_ok
from elasticplan.errors import InfeasibleError
from elasticplan.plans.verify import check
from elasticplan.problem.question import Objective
from elasticplan.problem.spec import Scenario
from elasticplan.solvers import solve

# The most plans (selections x layouts) `best` enumerates: ~30-60 us each in the cost
# model, so a few seconds at most. The largest brute force a property test asks for is
# 31,250 plans (memory_scenarios: 3 layers x 2 shards x 2 bitwidths, two table placements);
# a medium problem (6 layers x 3 shards x 3 bitwidths: 7^18 selections) would never return.
MAX_PLANS = 200_000


class TooLargeToEnumerate(AssertionError):
    """Brute force was asked for more than MAX_PLANS plans. The question stays undecided:
    the test fails, naming the count, rather than hang or pass."""


def layer_options(n_shards: int, n_bits: int, min_shards: int) -> int:
    """Selections of one layer: k >= min_shards of its shards run, each at one of the
    bitwidths, streamed or preloaded (all_selections' count)."""
    return sum(math.comb(n_shards, k) * (2 * n_bits) ** k
               for k in range(min_shards, n_shards + 1))


def count_plans(sc: Scenario) -> int:
    """How many plans `best` evaluates: every selection in every layout."""
    B = len(sc.model.bitwidths)
    return math.prod(layer_options(len(layer.shards), B, sc.min_shards_per_layer)
                     for layer in sc.model.layers) * len(layouts(sc))


def all_selections(sc: Scenario):
    B = len(sc.model.bitwidths)
    options_per_layer = []
    for layer in sc.model.layers:
        per_shard = [[None] + [Pick(si, b, pre) for b in range(B) for pre in (False, True)]
                     for si in range(len(layer.shards))]
        layer_options = []
        for combo in itertools.product(*per_shard):
            picks = tuple(p for p in combo if p is not None)
            if len(picks) >= sc.min_shards_per_layer:
                layer_options.append(picks)
        options_per_layer.append(layer_options)
    return itertools.product(*options_per_layer)


def layouts(sc: Scenario) -> list[Layout]:
    """Every layout a program may choose: the scenario's window; the table resident, or
    also streamed when memory is bounded and the model has one."""
    stream = [False, True] if sc.memory_bounded and sc.model.embedding_rows else [False]
    return [Layout(sc.prefetch_window, e) for e in stream]


def best(sc: Scenario, slack_ms: float = 0.0):
    """Best objective (larger is better: costs are negated) over plans meeting the target
    with `slack_ms` to spare; None if none. Refuses a problem of more than MAX_PLANS
    plans (TooLargeToEnumerate)."""
    count = count_plans(sc)
    if count > MAX_PLANS:
        raise TooLargeToEnumerate(
            f"brute force refused: {count:,} plans ({len(sc.model.layers)} layers, "
            f"{sc.model.n_shards} shards, {len(sc.model.bitwidths)} bitwidths, "
            f"{len(layouts(sc))} layouts), more than oracle.MAX_PLANS = {MAX_PLANS:,}")
    top = None
    budget = sc.memory_budget_bytes
    for sel in all_selections(sc):
        for layout in layouts(sc):
            s = simulate(sc, sel, layout=layout)
            if s.preload_bytes > sc.preload_budget_bytes:
                continue
            if budget is not None and s.memory.peak_bytes > budget:
                continue
            if sc.objective != Objective.MIN_LATENCY and \
                    s.latency_ms > sc.target_latency_ms - slack_ms:
                continue
            if sc.importance_floor is not None and s.importance < sc.importance_floor:
                continue
            if not timed_ok(sc, sel, layout, slack_ms):  # a decoder's time to first token
                continue
            value = {Objective.MAX_IMPORTANCE: s.importance,
                     Objective.MIN_BUFFER: -s.preload_bytes,
                     Objective.MIN_MEMORY: -s.memory.peak_bytes,
                     Objective.MIN_LATENCY: -s.latency_ms}[sc.objective]
            top = value if top is None else max(top, value)
    return top


def rounding_margin_ms(sc: Scenario) -> float:
    """Most that conservative integer rounding (CP-SAT ticks) or the float backends' time margin can cost."""
    from elasticplan.solvers.margins import TIME_MARGIN_MS
    from elasticplan.solvers.plain import scaling

    tick_ms = scaling.DEFAULT_TICK_NS * 1e-6
    terms = sum(2 * len(layer.shards) + 2 for layer in sc.model.layers) + 2
    return max(tick_ms * terms, TIME_MARGIN_MS) * 1.01


def importance_margin(sc: Scenario) -> float:
    """Most that conservative rounding of the importance-floor row can cost (scaling.py)."""
    from elasticplan.solvers.plain import scaling

    return (sc.model.n_shards + 1) * sc.model.max_importance / scaling.IMPORTANCE_UNITS * 1.01


def assert_matches(sc: Scenario, got, tol: float) -> None:
    """`got` (an objective, or None for infeasible) is brute force's optimum, up to plans
    whose latency is within the backends' rounding margin of the target."""
    top = best(sc)
    top_with_margin = best(sc, slack_ms=rounding_margin_ms(sc))
    if top is None:
        assert got is None
        return
    if top_with_margin is None:
        return  # only plans within the rounding margin exist: either answer is allowed
    assert got is not None
    assert top_with_margin - tol <= got <= top + tol


def assert_fastest(sc: Scenario, plan) -> None:
    """Among the plans of `plan`'s importance, brute force's fastest (every bound of the
    question kept) is no faster than `plan`, within the tie-break's gap
    (elasticplan.solvers.TIE_GAP) and the backends' rounding margin. "Of `plan`'s
    importance": at least the tie-break's floor (elasticplan.solvers.tie_floor; an
    absolute TOL let importance-0 plans in when every importance was ~6e-8)."""
    from elasticplan.solvers import TIE_GAP, tie_floor

    fastest = best(sc.with_overrides(objective=Objective.MIN_LATENCY,
                                     importance_floor=tie_floor(sc, plan.importance)))
    assert fastest is not None  # the plan itself is one
    assert plan.predicted_latency_ms <= -fastest * (1 + TIE_GAP) + rounding_margin_ms(sc)


GAP = 1e-9  # tiny problems: ask the exact backends for exact proofs
TOL = 1e-6  # importance rounding (CP-SAT's 1e9 units) and float sums


def solve_or_none(sc: Scenario, solver: str, gap: float = GAP):
    """A backend's plan, checked by the verifier; None if it proved infeasibility."""
    try:
        plan = solve(sc, solver, time_limit_s=20, threads=1, relative_gap=gap)
    except InfeasibleError:
        return None
    assert check(sc, plan)[0] == []
    return plan


def near_target(sc: Scenario) -> bool:
    """The best plan sits within rounding margin of the target (backends round differently).
    Only brute force tells, so a problem of more than MAX_PLANS plans raises
    TooLargeToEnumerate: a disagreement it was asked to excuse fails the test, naming the
    count, instead of hanging (7^18 selections did in CI)."""
    return best(sc, slack_ms=rounding_margin_ms(sc)) != best(sc)
