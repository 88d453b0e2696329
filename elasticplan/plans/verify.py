"""The independent checker: never trusts the solver.

It reloads nothing but the scenario, recomputes the schedule from the plan's
shard choices alone (elasticplan.costmodel.simulate, a plain event replay, not
the solver's variables) and checks every constraint and every predicted figure.
"""

from __future__ import annotations

import dataclasses
import math
import os

from elasticplan.costmodel import SEQUENTIAL, Schedule, at_quantile, simulate
from elasticplan.decoding import predict, timed_latencies
from elasticplan.errors import PlanFormatError, VerificationError
from elasticplan.plans.plan import SCHEMA, Plan, objective_value
from elasticplan.problem.loader import load_scenario
from elasticplan.problem.question import Objective, window_binds
from elasticplan.problem.spec import Scenario

# Floating-point slack for re-summing the same numbers in another order; nothing else.
TIME_TOL_MS = 1e-9
REL_TOL = 1e-9


def _close(a: float, b: float, abs_tol: float) -> bool:
    return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=abs_tol)


def check(scenario: Scenario, plan: Plan) -> tuple[list[str], Schedule | None]:
    """All violations of `plan` against `scenario` (empty: the plan is valid): first what
    the plan is (its question's scenario, its shards, its layout), then, if that holds,
    the constraints and every predicted figure against the cost model's replay."""
    bad = _structure(scenario, plan)
    if bad:
        return bad, None
    s = simulate(scenario, plan.selection(scenario), plan.execution, plan.layout)
    return _constraints(scenario, plan, s) + _figures(plan, s, scenario), s


def _structure(scenario: Scenario, plan: Plan) -> list[str]:
    """Is it a plan of this scenario: schema, content hash, model, layers, shard names and
    bitwidths, shards per layer, window and embedding placement."""
    bad: list[str] = []
    model = scenario.model
    ref = plan.scenario
    if plan.schema != SCHEMA:
        bad.append(f"schema {plan.schema!r} is not {SCHEMA!r}")
    if ref.sha256 != scenario.content_hash:
        bad.append("stale plan: the scenario's device, model or settings changed since it was "
                   f"solved (hash {ref.sha256[:12]} != {scenario.content_hash[:12]})")
    if ref.model != model.name:
        bad.append(f"plan is for model {ref.model!r}, scenario has {model.name!r}")
    if len(plan.layers) != len(model.layers):
        bad.append(f"plan has {len(plan.layers)} layers, model {model.name!r} has "
                   f"{len(model.layers)}")
        return bad
    for li, lp in enumerate(plan.layers):
        if lp.index != li:
            bad.append(f"layer at position {li} has index {lp.index}")
        layer = model.layers[li]
        names = [c.name for c in lp.shards]
        for c in lp.shards:
            if layer.shard_index(c.name) is None:
                bad.append(f"layer {li}: no shard named {c.name!r}")
            if model.bit_index(c.bits) is None:
                bad.append(f"layer {li}: shard {c.name!r} at {c.bits} bits, but the model stores "
                           f"{list(model.bitwidths)}")
        if len(set(names)) != len(names):
            bad.append(f"layer {li}: a shard appears more than once")
        if lp.shards and len(lp.shards) < scenario.min_shards_per_layer or \
                not lp.shards and scenario.min_shards_per_layer > 0:
            bad.append(f"layer {li}: {len(lp.shards)} shards, fewer than min_shards_per_layer "
                       f"{scenario.min_shards_per_layer}")
    if plan.execution == SEQUENTIAL and window_binds(plan.window, len(plan.layers)):
        bad.append(f"window {plan.window}: sequential execution needs an unbounded window")
    if scenario.prefetch_window is not None and plan.window != scenario.prefetch_window:
        bad.append(f"window {plan.window} is not the scenario's prefetch_window "
                   f"{scenario.prefetch_window}")
    if plan.embeddings == "streamed" and not model.embedding_rows:
        bad.append(f"embeddings streamed, but model {model.name!r} has no embedding table")
    return bad


def _constraints(scenario: Scenario, plan: Plan, s: Schedule) -> list[str]:
    """The question's constraints on the replayed schedule `s`: the latency at the
    scenario's quantile (and the plan's claim of it), the buffer, the memory budget, the
    importance floor."""
    bad: list[str] = []
    # the latency at the scenario's quantile meets the target
    quantile = at_quantile(scenario)
    planned = s if quantile is scenario else \
        simulate(quantile, plan.selection(scenario), plan.execution, plan.layout)
    what = "latency" if quantile is scenario else \
        f"latency at quantile {scenario.latency_quantile:g}"
    if scenario.objective != Objective.MIN_LATENCY and \
            planned.latency_ms > scenario.target_latency_ms + TIME_TOL_MS:
        bad.append(f"{what} {planned.latency_ms:.6f} ms exceeds the target "
                   f"{scenario.target_latency_ms:g} ms")
    for timed, ms in timed_latencies(quantile, plan.selection(scenario), plan.layout):
        if ms > timed.target_ms + TIME_TOL_MS:
            bad.append(f"{timed.name} {ms:.6f} ms exceeds its target {timed.target_ms:g} ms")
    claimed_q = plan.quantile_latency_ms
    if (claimed_q is None) != (quantile is scenario) or claimed_q is not None and \
            not _close(claimed_q, planned.latency_ms, TIME_TOL_MS):
        bad.append(f"quantile_latency_ms {claimed_q} != {planned.latency_ms:.6f} predicted at "
                   f"latency_quantile {scenario.latency_quantile:g}" if quantile is not scenario
                   else f"quantile_latency_ms {claimed_q} given for latency_quantile 0.5")
    if s.preload_bytes > scenario.preload_budget_bytes:
        bad.append(f"preload buffer {s.preload_bytes} B exceeds the budget "
                   f"{scenario.preload_budget_bytes} B")
    budget = scenario.memory_budget_bytes
    if budget is not None and s.memory.peak_bytes > budget:
        bad.append(f"predicted peak memory {s.memory.peak_bytes} B exceeds the budget {budget} B")
    if scenario.importance_floor is not None and \
            s.importance < scenario.importance_floor * (1 - REL_TOL):
        bad.append(f"importance {s.importance:.9g} is below the floor "
                   f"{scenario.importance_floor:.9g}")
    return bad


def _figures(plan: Plan, s: Schedule, scenario: Scenario) -> list[str]:
    """Every figure the plan predicts is the cost model's: times per layer, latency, bytes,
    importance, memory by term, the objective."""
    bad: list[str] = []
    ref = plan.scenario
    for lp, layer in zip(plan.layers, scenario.model.layers):
        for c in lp.shards:
            si = layer.shard_index(c.name)
            pieces = 1 if c.preloaded or si is None else layer.shards[si].pieces
            if c.pieces != pieces:
                bad.append(f"layer {lp.index}: {c.name} read in {c.pieces} pieces; the model "
                           f"streams it in {pieces}")
    for li, (lp, t) in enumerate(zip(plan.layers, s.layers)):
        for field in ("io_start_ms", "io_end_ms", "compute_start_ms", "compute_end_ms"):
            claimed, actual = getattr(lp, field), getattr(t, field)
            if not _close(claimed, actual, TIME_TOL_MS):
                bad.append(f"layer {li}: predicted {field} {claimed:.6f} != simulated {actual:.6f}")
    if not _close(plan.predicted_latency_ms, s.latency_ms, TIME_TOL_MS):
        bad.append(f"predicted_latency_ms {plan.predicted_latency_ms:.6f} != simulated "
                   f"{s.latency_ms:.6f}")
    if plan.preload_bytes != s.preload_bytes:
        bad.append(f"preload_bytes {plan.preload_bytes} != {s.preload_bytes} of the chosen shards")
    if plan.streamed_bytes != s.streamed_bytes:
        bad.append(f"streamed_bytes {plan.streamed_bytes} != {s.streamed_bytes} of the chosen shards")
    if not _close(plan.importance, s.importance, 1e-12):
        bad.append(f"importance {plan.importance:.9g} != {s.importance:.9g} of the chosen shards")
    if plan.memory is not None:
        for field, actual in s.memory.to_dict().items():
            claimed = plan.memory.to_dict().get(field, 0)  # kept_bytes: written when > 0
            if claimed != actual:
                bad.append(f"memory.{field} {claimed} != {actual} predicted for the chosen "
                           f"shards and layout")
    if ref.question.decoding:
        bad += _decoding(plan, scenario)
    elif plan.decoding is not None:
        bad.append("`decoding` times in a plan for an encoder's question")
    objective = ref.question.objective
    if not _close(plan.objective, objective_value(objective, s), 1e-12):
        bad.append(f"objective {plan.objective:.9g} does not match its {objective.value} value")
    return bad


def _decoding(plan: Plan, scenario: Scenario) -> list[str]:
    """A decoder plan's pass times and KV cache, replayed pass by pass."""
    if plan.decoding is None:
        return ["a decoder's plan without its `decoding` times"]
    actual = predict(scenario, plan.selection(scenario), plan.layout)
    bad = []
    for field, value in actual.to_dict().items():
        claimed = getattr(plan.decoding, field)
        if not _close(claimed, value, 0 if field == "kv_cache_bytes" else TIME_TOL_MS):
            bad.append(f"decoding.{field} {claimed} != {value} predicted for the chosen shards")
    return bad


def verify_plan(scenario: Scenario, plan: Plan) -> Schedule:
    """Raise VerificationError listing every violation; return the simulated schedule."""
    bad, schedule = check(scenario, plan)
    if bad:
        raise VerificationError(bad)
    return schedule


def scenario_for(plan: Plan, scenario_path: str | os.PathLike | None = None) -> Scenario:
    """Reload the scenario a plan answers, with the plan's recorded question applied."""
    path = scenario_path or plan.scenario.path
    if path is None:
        raise PlanFormatError("the plan names no scenario file; pass one with --scenario")
    return with_plan_question(load_scenario(path), plan)


def with_plan_question(base: Scenario, plan: Plan) -> Scenario:
    """The scenario with the question the plan recorded (target, budget, objective...):
    e.g. a baseline plan's own target and buffer. Checked against the scenario's device
    and model again (SpecError)."""
    return dataclasses.replace(base, question=plan.scenario.question)
