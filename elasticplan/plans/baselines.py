"""The classic strategies, as plans, so the one runtime executes and measures them the same
way as a solved plan (docs/design.md: baselines for comparison).

- hold-in-memory: every shard at full precision, all in the preload buffer; no reads.
- load-then-execute: every shard at full precision, streamed; compute starts after the
  last read (execution "sequential").
- layer-wise pipelining: every shard at full precision, streamed; layer l computes once
  its own reads are done, and layer l+1 is read while layer l computes, no further ahead
  (prefetch window 1: two layers in memory at once).

A baseline answers its own question: it takes the scenario's device and model but not
its target or budget, so its plan records the scenario with the target set to the
baseline's own predicted latency and the budget to its own buffer (what it would need).
The plan therefore verifies, and its prediction is checked like any other.
"""

from __future__ import annotations

from elasticplan.costmodel import PIPELINED, SEQUENTIAL, Layout, Pick, at_quantile, simulate
from elasticplan.errors import ElasticplanError, InfeasibleError, InvalidArgument
from elasticplan.plans.plan import Plan, SolveStatus
from elasticplan.plans.verify import verify_plan, with_plan_question
from elasticplan.problem.question import Objective
from elasticplan.problem.spec import FULL_PRECISION_BITS, Scenario

HOLD_IN_MEMORY = "hold-in-memory"
LOAD_THEN_EXECUTE = "load-then-execute"
LAYERWISE = "layerwise-pipelining"
STRATEGIES = (HOLD_IN_MEMORY, LOAD_THEN_EXECUTE, LAYERWISE)


UNIFORM = "uniform-"  # uniform-B: every shard streamed at B bits, pipelined


def baseline_plan(scenario: Scenario, strategy: str) -> Plan:
    """The plan of a classic strategy on the scenario's device and model (verified), or of
    `uniform-B`: every shard at B bits, streamed, pipelined with an unbounded window. Its
    question is its own latency (at the scenario's latency quantile) and preload."""
    model = scenario.model
    if strategy.startswith(UNIFORM):
        bits = strategy[len(UNIFORM):]
        bit = model.bit_index(int(bits)) if bits.isdigit() else None
        if bit is None:
            raise InvalidArgument(f"baseline {strategy!r}: model {model.name!r} stores "
                                  f"{', '.join(map(str, model.bitwidths))} bits; choose "
                                  f"uniform-B with one of them")
    elif strategy not in STRATEGIES:
        raise InvalidArgument(f"unknown baseline {strategy!r}; choose one of "
                              f"{', '.join(STRATEGIES)} or {UNIFORM}B (B a stored bitwidth)")
    else:
        bit = model.bit_index(FULL_PRECISION_BITS)
        if bit is None:
            bit = len(model.bitwidths) - 1  # the most precise stored form
    preloaded = strategy == HOLD_IN_MEMORY
    selection = tuple(tuple(Pick(s, bit, preloaded) for s in range(len(layer.shards)))
                      for layer in model.layers)
    execution = SEQUENTIAL if strategy == LOAD_THEN_EXECUTE else PIPELINED
    layout = Layout(window=1 if strategy == LAYERWISE else None)
    schedule = simulate(scenario, selection, execution, layout)
    quantile = at_quantile(scenario)
    planned = schedule if quantile is scenario else \
        simulate(quantile, selection, execution, layout)  # its latency at the quantile
    try:
        own = scenario.with_overrides(target_latency_ms=planned.latency_ms,
                                      preload_budget_mb=schedule.preload_bytes / 1e6,
                                      objective=Objective.MAX_IMPORTANCE, importance_floor=None,
                                      memory_budget_mb=None, prefetch_window=layout.window)
    except ElasticplanError as e:
        raise InfeasibleError(f"baseline {strategy} does not fit device "
                              f"{scenario.device.name!r}: {e}") from None
    plan = Plan.from_selection(own, selection, solver=strategy, status=SolveStatus.FEASIBLE,
                               gap=None, solve_seconds=0.0, execution=execution, layout=layout)
    verify_plan(own, plan)
    return plan


def baseline_questions(scenario: Scenario, skipped) -> list[tuple[Plan, Scenario]]:
    """Every classic strategy's plan with the question it answers (what the runtime runs
    and checks it against). A strategy that does not fit the device is left out and
    reported as skipped(strategy, error)."""
    out = []
    for strategy in STRATEGIES:
        try:
            plan = baseline_plan(scenario, strategy)
        except ElasticplanError as e:
            skipped(strategy, e)
            continue
        out.append((plan, with_plan_question(scenario, plan)))
    return out
