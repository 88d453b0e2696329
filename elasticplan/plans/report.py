"""Human-readable text for plans (the CLI's tables). No logic beyond formatting."""

from __future__ import annotations

from collections import Counter

from elasticplan.plans.plan import Plan
from elasticplan.problem.spec import Scenario


def optional(value, spec: str) -> str:
    """format(value, spec), or '-' for a value that is not there (None)."""
    return "-" if value is None else format(value, spec)


def bits_summary(plan_layer) -> str:
    counts = Counter(c.bits for c in plan_layer.shards)
    return " ".join(f"{n}x{b}b" for b, n in sorted(counts.items())) or "-"


def plan_table(scenario: Scenario, plan: Plan) -> str:
    model, device = scenario.model, scenario.device
    best = sum(max(s.importance) for layer in model.layers for s in layer.shards)
    lines = [
        f"scenario {scenario.name}: {model.name} on {device.name}, target "
        f"{scenario.target_latency_ms:g} ms"
        + (" per output token" if scenario.question.decoding else "")
        + f", buffer {scenario.preload_budget_mb:g} MB, "
        f"objective {scenario.objective.value}"
        + (f" (floor {scenario.importance_floor:g})" if scenario.importance_floor is not None
           else ""),
        f"{'layer':>5}  {'kept':>7}  {'preloaded':>9}  {'io ms (start-end)':>19}  "
        f"{'compute ms (start-end)':>22}  bits",
    ]
    for lp, layer in zip(plan.layers, model.layers):
        pre = sum(c.preloaded for c in lp.shards)
        lines.append(
            f"{lp.index:>5}  {len(lp.shards):>3}/{len(layer.shards):<3}  {pre:>9}  "
            f"{lp.io_start_ms:>8.2f}-{lp.io_end_ms:<10.2f}  "
            f"{lp.compute_start_ms:>8.2f}-{lp.compute_end_ms:<13.2f}  {bits_summary(lp)}")
    gap = "n/a (heuristic)" if plan.gap is None else f"{plan.gap:.2g}"
    lines += [
        f"importance {plan.importance:.6g} of {best:.6g} possible; latency "
        f"{plan.predicted_latency_ms:.3f} ms" + (
            f" (median), {plan.quantile_latency_ms:.3f} ms at quantile "
            f"{scenario.latency_quantile:g}" if plan.quantile_latency_ms is not None else "")
        + f" (target {scenario.target_latency_ms:g}); buffer "
        f"{plan.preload_bytes / 1e6:.3f} MB (budget {scenario.preload_budget_mb:g}); streamed "
        f"{plan.streamed_bytes / 1e6:.3f} MB; {plan.n_shards}/{model.n_shards} shards",
        f"solver {plan.solver}: {plan.status.value}, gap {gap}, {plan.solve_seconds:.2f} s",
    ]
    if plan.memory is not None:
        m = plan.memory
        budget = scenario.memory_budget_mb
        lines.insert(-1, (
            f"memory {m.peak_bytes / 1e6:.3f} MB peak" +
            (f" (budget {budget:g})" if budget is not None else "") +
            f" = resident {m.resident_bytes / 1e6:.3f} + preload {m.preload_bytes / 1e6:.3f} "
            f"+ working {m.working_peak_bytes / 1e6:.3f} + activations "
            f"{m.activation_bytes / 1e6:.3f}"
            + (f" + KV cache {m.kept_bytes / 1e6:.3f}" if m.kept_bytes else "")
            + f"; window {'unbounded' if plan.window is None else plan.window}, "
            + (f"embeddings {plan.embeddings}" + (
                f" (priced at {scenario.model.query_row_reads} rows per query: one per "
                f"distinct token)" if plan.embeddings == "streamed" else "")
               if plan.decoding is None else
               f"table ({_table(plan)})")))
    if plan.decoding is not None:
        d = plan.decoding
        lines.insert(-1, (
            f"decoding {scenario.prompt_tokens} + {scenario.answer_tokens} tokens: time to "
            f"first token {d.ttft_ms:.3f} ms; per output token {d.last_token_ms:.3f} ms at the "
            f"last (target {scenario.target_latency_ms:g}), {d.mean_token_ms:.3f} ms on "
            f"average; next-token KL to the full model {best - plan.importance:.4g} nats "
            f"(the importance left out, if it adds up; `evaluate` measures it)"))
    return "\n".join(lines)


def _table(plan: Plan) -> str:
    """A decoder plan's table (its last layer): bitwidth, held or streamed."""
    (choice,) = plan.layers[-1].shards
    return f"{choice.bits} bits, {'resident' if choice.preloaded else 'streamed every token'}"
