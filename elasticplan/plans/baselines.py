"""The classic strategies, as plans, so the one runtime executes and measures them the same
way as a solved plan (docs/design.md: baselines for comparison; a decoder's in
docs/decoders.md, "Baselines").

- hold-in-memory: every shard at full precision, all in the preload buffer; no reads.
- hold-in-memory-B: the same with every shard at B bits (a stored bitwidth), a decoder's
  table too; hold-in-memory-fit: the hold-in-memory-B that keeps the most importance
  (ties: the least memory) within the scenario's memory budget (its plan's solver names
  the B chosen).
- load-then-execute: every shard at full precision, streamed; compute starts after the
  last read (execution "sequential"). An encoder's only: a decoder's passes are priced
  pipelined (elasticplan.decoding), so it is refused for a decoder (load-on-demand is the
  decoder's strategy without overlap).
- load-on-demand: every shard at full precision, streamed, a decoder's table too; layer
  l's reads start only once layer l-1 has computed (prefetch window 0), so nothing
  overlaps: what a memory-mapped model without read-ahead does, reading every weight that
  is not resident when it is needed. One layer's bytes in memory at a time.
- layer-wise pipelining: every shard at full precision, streamed; layer l computes once
  its own reads are done, and layer l+1 is read while layer l computes, no further ahead
  (prefetch window 1: two layers in memory at once).
- uniform-B: every shard at B bits, streamed, pipelined with an unbounded window (a
  library caller may give another window).

A baseline answers its own question: it takes the scenario's device and model but not
its target or budget, so its plan records the scenario with the target set to the
baseline's own predicted latency and the budget to its own buffer (what it would need);
no memory budget (hold-in-memory-fit keeps the scenario's, which it meets), no time to
first token. The plan therefore verifies, and its prediction is checked like any other.
A plan's window is its own (Plan.window, 0 for load-on-demand); the question it records
asks for none, except layer-wise pipelining's 1.
"""

from __future__ import annotations

from elasticplan.costmodel import PIPELINED, SEQUENTIAL, Layout, at_quantile, every_shard, simulate
from elasticplan.errors import ElasticplanError, InfeasibleError, InvalidArgument
from elasticplan.plans.plan import Plan, SolveStatus
from elasticplan.plans.verify import verify_plan, with_plan_question
from elasticplan.problem.question import Objective
from elasticplan.problem.spec import FULL_PRECISION_BITS, Scenario

HOLD_IN_MEMORY = "hold-in-memory"
LOAD_THEN_EXECUTE = "load-then-execute"
LOAD_ON_DEMAND = "load-on-demand"
LAYERWISE = "layerwise-pipelining"
# `run --baselines` runs these beside an encoder's plan (unchanged: the classic three).
STRATEGIES = (HOLD_IN_MEMORY, LOAD_THEN_EXECUTE, LAYERWISE)
# A decoder's fp32 strategies (load-then-execute is refused for a decoder).
DECODER_STRATEGIES = (HOLD_IN_MEMORY, LOAD_ON_DEMAND, LAYERWISE)

UNIFORM = "uniform-"  # uniform-B: every shard streamed at B bits, pipelined
HOLD_AT = HOLD_IN_MEMORY + "-"  # hold-in-memory-B: every shard resident at B bits
HOLD_FIT = HOLD_AT + "fit"  # the hold-in-memory-B that fits the memory budget best
NAMES = (f"{HOLD_IN_MEMORY}, {LOAD_THEN_EXECUTE} (an encoder's), {LOAD_ON_DEMAND}, {LAYERWISE}, "
         f"{HOLD_AT}B, {HOLD_FIT} or {UNIFORM}B (B a stored bitwidth)")
_DEFAULT = object()  # baseline_plan's window: the strategy's own


def _bits(scenario: Scenario, strategy: str, prefix: str) -> int:
    """The bitwidth index of `prefix`B, refused unless the model stores B."""
    model = scenario.model
    bits = strategy[len(prefix):]
    bit = model.bit_index(int(bits)) if bits.isdigit() else None
    if bit is None:
        raise InvalidArgument(f"baseline {strategy!r}: model {model.name!r} stores "
                              f"{', '.join(map(str, model.bitwidths))} bits; choose "
                              f"{prefix}B with one of them")
    return bit


def _strategy(scenario: Scenario, strategy: str) -> tuple[int, bool, str, int | None]:
    """(bitwidth index, preloaded, execution, window) of a named strategy."""
    model = scenario.model
    if strategy.startswith(UNIFORM):
        return _bits(scenario, strategy, UNIFORM), False, PIPELINED, None
    if strategy.startswith(HOLD_AT):
        return _bits(scenario, strategy, HOLD_AT), True, PIPELINED, None
    if strategy not in (*STRATEGIES, LOAD_ON_DEMAND):
        raise InvalidArgument(f"unknown baseline {strategy!r}; choose one of {NAMES}")
    if strategy == LOAD_THEN_EXECUTE and scenario.question.decoding:
        raise InvalidArgument(f"baseline {LOAD_THEN_EXECUTE} is an encoder's: a decoder's "
                              f"passes run pipelined, so its prediction would be a pipeline's; "
                              f"use {LOAD_ON_DEMAND} (every weight read when it is needed, "
                              f"nothing overlapped)")
    bit = model.bit_index(FULL_PRECISION_BITS)
    if bit is None:
        bit = len(model.bitwidths) - 1  # the most precise stored form
    window = {LAYERWISE: 1, LOAD_ON_DEMAND: 0}.get(strategy)
    execution = SEQUENTIAL if strategy == LOAD_THEN_EXECUTE else PIPELINED
    return bit, strategy == HOLD_IN_MEMORY, execution, window


def baseline_plan(scenario: Scenario, strategy: str, *, window=_DEFAULT) -> Plan:
    """The plan of a named strategy (the module's list) on the scenario's device and model,
    verified. Its question is its own latency (at the scenario's latency quantile) and
    preload. `window`: another prefetch window for uniform-B (default: unbounded)."""
    if strategy == HOLD_FIT:
        return hold_in_memory_fit(scenario)
    bit, preloaded, execution, own_window = _strategy(scenario, strategy)
    if window is not _DEFAULT:
        if not strategy.startswith(UNIFORM):
            raise InvalidArgument(f"baseline {strategy!r} has its own window; only "
                                  f"{UNIFORM}B takes another")
        own_window = window
    selection = every_shard(scenario.model, bit, preloaded)
    layout = Layout(window=own_window)
    return _plan(scenario, strategy, selection, execution, layout)


def _plan(scenario: Scenario, solver: str, selection, execution: str, layout: Layout,
          memory_budget_mb: float | None = None) -> Plan:
    schedule = simulate(scenario, selection, execution, layout)
    quantile = at_quantile(scenario)
    planned = schedule if quantile is scenario else \
        simulate(quantile, selection, execution, layout)  # its latency at the quantile
    try:
        # the question's window: the plan's, where a question may ask for it (0 may not)
        own = scenario.with_overrides(target_latency_ms=planned.latency_ms,
                                      preload_budget_mb=schedule.preload_bytes / 1e6,
                                      objective=Objective.MAX_IMPORTANCE, importance_floor=None,
                                      memory_budget_mb=memory_budget_mb,
                                      prefetch_window=layout.window or None,
                                      target_ttft_ms=None)
    except ElasticplanError as e:
        raise InfeasibleError(f"baseline {solver} does not fit device "
                              f"{scenario.device.name!r}: {e}") from None
    plan = Plan.from_selection(own, selection, solver=solver, status=SolveStatus.FEASIBLE,
                               gap=None, solve_seconds=0.0, execution=execution, layout=layout)
    verify_plan(own, plan)
    return plan


def hold_in_memory_fit(scenario: Scenario) -> Plan:
    """hold-in-memory-fit: of the hold-in-memory-B plans (every stored B), the one that
    keeps the most importance within the scenario's memory budget (ties: the least
    predicted peak); its solver names it (hold-in-memory-B) and its question keeps the
    budget. InvalidArgument without a budget; InfeasibleError, naming the least any B
    holds, when none fits."""
    budget = scenario.memory_budget_bytes
    if budget is None:
        raise InvalidArgument(f"baseline {HOLD_FIT}: scenario {scenario.name!r} sets no "
                              f"memory_budget_mb to fit; set one, or name {HOLD_AT}B")
    plans = [baseline_plan(scenario, f"{HOLD_AT}{b}") for b in scenario.model.bitwidths]
    fits = [p for p in plans if p.memory.peak_bytes <= budget]
    if not fits:
        least = min(plans, key=lambda p: p.memory.peak_bytes)
        raise InfeasibleError(f"baseline {HOLD_FIT}: no uniform bitwidth held in memory fits "
                              f"memory_budget_mb {scenario.memory_budget_mb:g}; the least, "
                              f"{least.solver}, holds {least.memory.peak_bytes / 1e6:.3f} MB")
    best = max(fits, key=lambda p: (p.importance, -p.memory.peak_bytes))
    return _plan(scenario, best.solver, best.selection(scenario), best.execution, best.layout,
                 scenario.memory_budget_mb)


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
