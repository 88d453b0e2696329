"""Decoding: a decoder's question as the passes the cost model prices (docs/decoders.md,
"Planning decoding").

A decoder answers a prompt of P tokens with A tokens. The prompt pass (prefill) runs the
P tokens through every layer at once and ends with the LM head for the last position: it
gives the first answer token (time to first token). Each of the A - 1 decode steps after
it runs one token through every layer, attending over the KV cache, and ends with the LM
head. Every pass is the encoder's pipeline over the layers (elasticplan.costmodel): the
resident (preloaded) shards are held for the whole answer; a streamed shard is read
again, through the IO ring and the prefetch window, in every pass, because it does not
stay. The decoder's tied embedding / LM-head table is one more planned part: a last
pseudo-layer with one shard, the profile's `head` (its bitwidth; held, or read again in
every pass after the last layer's reads).

So a decoder's question is planned on one model, the *step model*: the last decode step
(the slowest, since attention grows with the position), whose latency must meet
target_latency_ms: a promise for every output token. Its shards' flops are one token's:
a shard's per-token flops (the profile's), plus for a KV group attention over the
positions the step attends (4 q_per_kv head_dim flops per position: scores and the
weighted sum). A KV group holds its part of the KV cache, 2 head_dim x (P + A) x kv_bits/8
bytes per layer, whether its weights are held or streamed (Shard.kept_bytes). The *prefill
model* is the same with the prompt's flops (P tokens; attention over P(P+1)/2 position
pairs) and, when the table is streamed, the prompt's embedding rows read first (one read
per token, priced at the fp32 row's size: at most a row's bytes / bandwidth too long).
Both are sums of non-negative coefficients on the same choices, so every program keeps
its form; the time to first token is predicted (and checked by the runtime) from the
prefill model.

Positions: prefill computes positions 0..P-1; decode step j (1..A-1) computes position
P + j - 1 and attends P + j positions; the last attends P + A - 1. The KV cache is sized
for the whole context, P + A positions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from elasticplan.costmodel import Layout, Schedule, simulate
from elasticplan.problem.question import Question
from elasticplan.problem.spec import (
    DecodePass,
    ModelProfile,
    Scenario,
    TimedPass,
    head_layer,
    pass_model,
    with_table_rows,
)

# --- the passes' predictions -----------------------------------------------------------

MEAN_STEPS = 1024  # the mean over the answer is taken over at most this many decode steps


@dataclass(frozen=True)
class DecodeTimes:
    """A decoder plan's predicted times (ms): the prompt pass (time to first token), the
    last decode step (what target_latency_ms bounds), the mean step over the answer; and
    the KV cache it holds (bytes)."""

    ttft_ms: float
    last_token_ms: float
    mean_token_ms: float
    kv_cache_bytes: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def pass_scenario(scenario: Scenario, p: DecodePass) -> Scenario:
    """`scenario` (a decoder's question) as the cost model prices pass `p`."""
    return priced(scenario, pass_model(scenario.source_model, scenario.question, p))


def priced(scenario: Scenario, model: ModelProfile) -> Scenario:
    """A scenario that prices `model` (a pass's) on `scenario`'s device and window: the
    question's target and budgets dropped (a pass is priced, not asked)."""
    q = scenario.question
    return Scenario(name=f"{scenario.name}:{model.decode_pass}", device=scenario.device,
                    model=model,
                    question=Question(target_latency_ms=q.target_latency_ms,
                                      preload_budget_mb=q.preload_budget_mb,
                                      prefetch_window=q.prefetch_window))


def table_streamed(scenario: Scenario, selection) -> bool:
    """Does a decoder's selection stream its table (the last layer's one part)?"""
    return any(not pk.preloaded for pk in selection[head_layer(scenario.model)])


def timed_schedules(scenario: Scenario, selection, layout: Layout) -> list[Schedule]:
    """The schedule of each of the scenario's timed passes (Scenario.timed_passes): its
    rows read first when the table is streamed."""
    if not scenario.timed_passes:
        return []
    rows = Layout(layout.window, table_streamed(scenario, selection))
    return [simulate(priced(scenario, table_rows(t.model, selection)), selection, layout=rows)
            for t in scenario.timed_passes]


def table_rows(model: ModelProfile, selection) -> ModelProfile:
    """A decoder pass's model with its embedding rows read as the selection's table
    (its bitwidth) stores them (spec.with_table_rows)."""
    (pick,) = selection[head_layer(model)]
    return with_table_rows(model, pick.bit)


def timed_latencies(scenario: Scenario, selection, layout: Layout
                    ) -> list[tuple[TimedPass, float]]:
    """Each of the scenario's timed passes with the latency the cost model predicts."""
    return [(t, s.latency_ms) for t, s in
            zip(scenario.timed_passes, timed_schedules(scenario, selection, layout))]


def timed_ok(scenario: Scenario, selection, layout: Layout, slack_ms: float = 0.0) -> bool:
    """Every timed pass meets its target (with `slack_ms` to spare)."""
    return all(ms <= t.target_ms - slack_ms
               for t, ms in timed_latencies(scenario, selection, layout))


def predict(scenario: Scenario, selection, layout: Layout) -> DecodeTimes:
    """The times of a decoder's plan (its selection over the step model's layers, the
    table last), pass by pass (answer_schedules): the question's prompt pass and its
    decode steps (at most MEAN_STEPS of them, evenly spaced, the last included)."""
    q = scenario.question
    if not q.decoding:
        raise ValueError(f"scenario {scenario.name!r} is not a decoder's question")
    steps = list(range(1, q.answer_tokens))
    if len(steps) > MEAN_STEPS:
        stride = len(steps) / MEAN_STEPS
        steps = sorted({steps[int(i * stride)] for i in range(MEAN_STEPS)} | {steps[-1]})
    # decode step j computes position P + j - 1 (step_pass)
    first, times = answer_schedules(scenario, selection, layout, q.prompt_tokens,
                                    [q.prompt_tokens + j - 1 for j in steps])
    kv = sum(scenario.model.layers[li].shards[pk.shard].kept_bytes
             for li, picks in enumerate(selection) for pk in picks)
    return DecodeTimes(ttft_ms=first.latency_ms, last_token_ms=times[-1].latency_ms,
                       mean_token_ms=sum(t.latency_ms for t in times) / len(times),
                       kv_cache_bytes=kv)


def answer_schedules(scenario: Scenario, selection, layout: Layout, prompt: int,
                     positions: list[int]) -> tuple[Schedule, list[Schedule]]:
    """The cost model's schedules of a decoder plan's passes for an actual answer: the
    prompt pass over `prompt` tokens (its rows read first when the table is streamed) and
    a decode step at each of `positions` (the position it computes, attending one more).
    The runtime's report compares each measured pass with these."""
    q = scenario.question
    first = DecodePass("prefill", prompt, prompt * (prompt + 1) // 2, prompt)
    prefill = simulate(priced(scenario, table_rows(pass_model(scenario.source_model, q, first),
                                                   selection)),
                       selection, layout=Layout(layout.window, table_streamed(scenario, selection)))
    steps = [simulate(priced(scenario, pass_model(scenario.source_model, q,
                                                  DecodePass(f"step@{p}", 1, p + 1, 0))),
                      selection, layout=Layout(layout.window)) for p in positions]
    return prefill, steps
