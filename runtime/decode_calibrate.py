"""`elasticplan calibrate --scenario <a decoder's scenario>`: this machine's compute for a
decoder, measured inside the decode executor, written as a device (docs/decoders.md,
"Calibrating a decoder").

The encoder's calibration (runtime/calibrate.py) fits the device's layer model over
designed plans run through the encoder's executor. A decoder runs two kinds of pass: the
prompt pass (P tokens through every layer: matrix products, bound by flops) and the
decode step (one token: matrix-vector products, bound by reading each weight once). One
layer model covers both when every bitwidth has a per-weight term, fp32 included:

    layer_ms = layer_overhead_ms + sum over its shards of (shard_overhead_ms
               + flops / gflops + weights x ns_per_weight[bits]
               + stored MB x stream_ms_per_mb, streamed only)
               + MB read beside it x contention_ms_per_mb
               + reads made beside it x contention_ms_per_read

where a shard's flops are the pass's (its per-token flops x the pass's tokens, plus for a
KV group attention over the pass's attended positions: elasticplan.problem.spec.pass_model)
and the per-weight term, paid once per pass whatever its tokens, is the weights' pass
through memory (for a quantised shard, its dequantisation too). The prompt pass separates
the per-flop term from the per-weight one (its flops grow with the prompt, its weights do
not); the decode steps pin the per-weight terms. The device gives the fp32 term as
`dequant_ns_per_weight[32]` (elasticplan.costmodel.shard_compute_ms). The LM head is one
more layer of one shard (the table: vocab x hidden weights at its bitwidth, one position's
flops), as the planner prices it.

Calibration runs the designed plans of runtime/calibrate.design over the decoder's step
model (its layers and the table; subsets at every bitwidth, hold-in-memory, mixed), each
answering the same prompt (the calibration tweets, P tokens: the question's prompt length)
with DECODE_STEPS decode steps, interleaved in rounds (runtime/calibrate.measure_rounds)
until every term is tight or the budget is spent. A sample is one (plan, pass kind, layer):
the median over the rounds (and, for a decode step, over its steps) of the layer's
measured compute; the fit (scipy.optimize.nnls) weighs each sample by 1 / its pass's
latency, so that the decode step's small layers count as much, for their pass, as the
prompt pass's. The compute thread's wake-up is measured as for encoders; the pass starts
with its input row (embed_ms: the decode step's one-row lookup, median) and ends with the
LM head's token (pool_ms 0).

Each plan's passes are then predicted out of sample (the fit of the other plans) by the
planner's own pass model (elasticplan.decoding.answer_schedules), and the stages compared
as `generate` compares them: time to first token, the decode step's latency, and the
decode step's IO and compute (layers and head), each plan's median run in % of its
predicted pass latency, median and p95 over plans. A device whose stages miss by more
than --max-error-pct is refused (exit 9), as for encoders.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np

from elasticplan.costmodel import Layout
from elasticplan.decoding import answer_schedules, table_streamed
from elasticplan.errors import CalibrationError
from elasticplan.problem.limits import MAX_SPREAD, MAX_TARGET_MS
from elasticplan.problem.spec import (
    DecodePass,
    Device,
    Scenario,
    Spread,
    pass_model,
)
from runtime.calibrate import (
    NOISE_FACTOR,
    Calibration,
    Fit,
    Sample,
    beside_features,
    designed_plans,
    device_of,
    fit_compute,
    machine_memory_mb,
    measure_rounds,
    median_term,
    refusal,
    run_to_run,
    storage_of,
    this_machine,
    wake_gaps,
    wide_stages,
)
from runtime.decode_layers import vector_computed
from runtime.decoding import DecodeExecutor, GenerateResult, PassTrace
from runtime.executor import concurrent
from runtime.measurement.generate import pass_stages, picks_of
from runtime.store import ShardStore

DECODE_STEPS = 8  # decode steps measured per run, after the prompt pass
STAGES = ("ttft", "token", "io", "compute")


def calibration_prompt(store: ShardStore, tokens: int, split: str = "calibration") -> list[int]:
    """`tokens` token ids of the calibration tweets (runtime/sources/task.py), joined by
    newlines: the prompt every calibration run answers (`split` "test": the held-out
    tweets', for benchmarks)."""
    from runtime.sources.task import load_splits

    text, ids = "", []
    tok = store.text_tokenizer()
    for t in getattr(load_splits(), split).texts:
        text += t + "\n"
        ids = tok.encode(text).ids
        if len(ids) >= tokens:
            return ids[:tokens]
    raise CalibrationError(f"the {split} tweets make {len(ids)} tokens, fewer than the "
                           f"{tokens} of the question's prompt")


def kernel_bits(store, bitwidths: tuple[int, ...]) -> tuple[int, ...]:
    """The bitwidths at which the decode executor multiplies every variant the store holds
    (its shards' two blocks, the table) by one vector with its scheme's kernel, from the
    stored bytes (runtime.decode_layers.vector_computed): their
    one-vector cost per weight is a term of its own (Device.vector_ns_per_weight); at any
    other bitwidth a shard is decoded first in every pass."""
    out = []
    for b in bitwidths:
        variants = [v for (_, _, bits), v in store.index.variants.items() if bits == b]
        if variants and all(vector_computed(v) for v in variants):
            out.append(b)
    return tuple(out)


def _layer_ms(trace: PassTrace, l: int) -> float:
    t = trace.head if l == len(trace.layers) else trace.layers[l]
    return t.compute_ms


def decode_samples(scenario: Scenario, designed: list, runs_of: list[list[GenerateResult]],
                   vector_bits: tuple[int, ...] = ()) -> tuple[list[Sample], np.ndarray]:
    """One sample per (plan, pass kind, layer that runs, the table last): its features in
    that pass's model and the median of its measured compute; and each sample's weight
    in the fit (1 / the plan's median latency of that kind of pass). Weights at
    `vector_bits` multiplied by one vector (Shard.vector) are the sample's vector_weights:
    the runtime's kernel computes them (`kernel_bits`)."""
    source, q = scenario.source_model, scenario.question
    bitwidths = scenario.model.bitwidths
    samples, weights = [], []
    for i, ((_, sel, _), runs) in enumerate(zip(designed, runs_of)):
        prompt = runs[0].prompt_tokens
        steps = [s for r in runs for s in r.passes[1:]]
        position = int(np.median([s.position for s in steps]))
        kinds = (([r.passes[0] for r in runs],
                  DecodePass("prefill", prompt, prompt * (prompt + 1) // 2, prompt)),
                 (steps, DecodePass("step", 1, position + 1, 0)))
        for traces, p in kinds:
            model = pass_model(source, q, p)
            latency = float(np.median([t.latency_ms for t in traces]))
            for l, picks in enumerate(sel):
                if not picks:
                    continue
                shards = model.layers[l].shards
                by_bits: dict[int, int] = {}
                vector: dict[int, int] = {}  # (Shard.vector: one position, and the head)
                for pk in picks:
                    b, s = bitwidths[pk.bit], shards[pk.shard]
                    into = vector if s.vector and b in vector_bits else by_bits
                    into[b] = into.get(b, 0) + s.weights
                samples.append(Sample(
                    layer=l, shards=len(picks), flops=sum(shards[pk.shard].flops for pk in picks),
                    weights=by_bits, vector_weights=vector, plan=i,
                    ms=float(np.median([_layer_ms(t, l) for t in traces])),
                    streamed_mb=sum(shards[pk.shard].bytes[pk.bit] for pk in picks
                                    if not pk.preloaded) / 1e6,
                    **beside_features([concurrent([*t.layers, t.head], l) for t in traces])))
                weights.append(1.0 / latency)
    return samples, np.array(weights)


def decode_stage_errors(scenario: Scenario, held_out: list
                        ) -> tuple[Spread, dict[str, tuple[float, float]]]:
    """Each plan's runs against the passes the cost model predicts on the device given
    beside it ((device, selection, runs)): per stage, the |error| of the plan's median run
    in % of its predicted pass latency (time to first token: the prompt pass; token: the
    decode step; io and compute: the decode step's reads and its layers' and head's
    compute), median and p95 over plans; and the spread (rms of log measured / predicted)
    of IO and compute over every pass."""
    off: dict[str, list[float]] = {k: [] for k in STAGES}
    logs: dict[str, list[float]] = {"io": [], "compute": []}
    for device, sel, runs in held_out:
        sc = scenario.with_overrides(device=device)
        prompt = runs[0].prompt_tokens
        positions = [p.position for p in runs[0].passes[1:]]
        first, steps = answer_schedules(sc, sel, Layout(None), prompt, positions)
        for r in runs:
            for st in (pass_stages(s, m) for s, m in zip([first, *steps], r.passes)):
                for k, stage in (("io", st.io), ("compute", st.work)):
                    if stage.predicted_ms > 0 and stage.measured_ms > 0:
                        logs[k].append(float(np.log(stage.measured_ms / stage.predicted_ms)))
        ttft = float(np.median([r.passes[0].latency_ms for r in runs]))
        off["ttft"].append(100 * abs(ttft - first.latency_ms) / first.latency_ms)
        by_run = [[pass_stages(s, m) for s, m in zip(steps, r.passes[1:])] for r in runs]
        step_pred = float(np.median([st.total.predicted_ms for st in by_run[0]]))
        for k, stage in (("token", lambda st: st.total), ("io", lambda st: st.io),
                         ("compute", lambda st: st.work)):
            measured = np.median([np.median([stage(st).measured_ms for st in sts])
                                  for sts in by_run])
            predicted = np.median([stage(st).predicted_ms for st in by_run[0]])
            off[k].append(100 * abs(float(measured) - float(predicted)) / step_pred)
    rms = {k: float(np.sqrt(np.mean(np.square(v)))) if v else 0.0 for k, v in logs.items()}
    errors = {k: (float(np.median(v)), float(np.percentile(v, 95))) if v else (0.0, 0.0)
              for k, v in off.items()}
    runs = sum(len(r) * len(r[0].passes) for _, _, r in held_out)
    return Spread(io=round(rms["io"], 5), compute=round(rms["compute"], 5), runs=runs), errors


def calibrate_decoder(store: ShardStore, base: Scenario, *, bandwidth_mb_s: float | None,
                      latency_us: float, plans: int, repeats: int, budget_s: float,
                      max_error_pct: float, seed: int = 0, steps: int = DECODE_STEPS,
                      warm_reads: bool = False,
                      log: Callable[[str], None] = lambda s: None) -> Calibration:
    """Measure a decoder on this machine (module docstring); return the calibrated device,
    the fit and the facts for the file header, or refuse (CalibrationError) as
    runtime/calibrate.calibrate does. `warm_reads`: the runs' emulated storage read from
    the page cache (DecodeExecutor's), for a device faster than this machine's disk."""
    import torch

    q = base.question
    if not q.decoding:
        raise ValueError(f"scenario {base.name!r} is not a decoder's question")
    if warm_reads and bandwidth_mb_s is None:
        raise ValueError("warm reads need emulated storage (--storage-mb-s): this machine's "
                         "own disk is measured and read cold")
    bandwidth_mb_s, latency_us, storage, emulate = storage_of(store, bandwidth_mb_s, latency_us,
                                                              warm_reads)
    memory_mb = machine_memory_mb()
    model = base.model  # the step model: the layers, then the table
    if any(s.weights is None for layer in model.layers for s in layer.shards):
        raise CalibrationError(f"{base.source}: model {model.name!r} does not give its shards' "
                               f"weights; regenerate the profile")
    draft = Device(name="draft", bandwidth_mb_s=bandwidth_mb_s, latency_us=latency_us,
                   gflops=1.0, layer_overhead_ms=0.0, dequant_gb_s=1.0, memory_mb=memory_mb)
    scenario = base.with_overrides(device=draft, target_latency_ms=MAX_TARGET_MS,
                                   target_ttft_ms=None, memory_budget_mb=None,
                                   preload_budget_mb=0.0, prefetch_window=None,
                                   answer_tokens=steps + 1, importance_floor=None)
    prompt = calibration_prompt(store, q.prompt_tokens)
    vector_bits = kernel_bits(store, model.bitwidths)
    designed, groups = designed_plans(scenario, plans, seed, memory_mb, held_bits=vector_bits)
    context = scenario.question.context_tokens

    def open_plan(i: int) -> DecodeExecutor:
        picks, table = picks_of(designed[i][2])
        ex = DecodeExecutor(store, picks, table, context=context, window=None,
                            device=draft if emulate else None, prompt_tokens=len(prompt),
                            warm_reads=warm_reads)
        try:
            ex.generate(prompt, steps + 1, eos_id=None)  # warm-up, discarded
        except BaseException:
            ex.close()
            raise
        return ex

    def fit_of(runs_of: list[list]) -> tuple[Fit, list[Sample]]:
        samples, w = decode_samples(scenario, designed, runs_of, vector_bits)
        return fit_compute(samples, model.bitwidths, w, vector_bits), samples

    began = time.monotonic()
    runs_of, rounds, fit, why = measure_rounds(
        len(designed), open_plan=open_plan,
        run_once=lambda ex, r: ex.generate(prompt, steps + 1, eos_id=None),
        fit_of=fit_of, repeats=repeats, budget_s=budget_s, groups=groups, log=log)
    for i, (name, _, plan) in enumerate(designed):
        ttft = np.median([r.ttft_ms for r in runs_of[i]])
        step = np.median([np.median(r.step_ms) for r in runs_of[i]])
        log(f"calibration plan {i + 1}/{len(designed)} ({name}): {plan.n_shards} parts, "
            f"median first token {ttft:.1f} ms, decode step {step:.1f} ms")
    # The decode step's input row (one row; the prompt pass's P rows cost about as little),
    # from the plans whose table is resident (a streamed table's row is copied in the head).
    fit.embed_ms, fit.stderr.embed_ms = median_term(
        [p.embed_ms[1] - p.embed_ms[0] for (_, sel, _), runs in zip(designed, runs_of)
         if not table_streamed(scenario, sel) for r in runs for p in r.passes[1:]])
    fit.pool_ms = fit.stderr.pool_ms = 0.0  # a pass ends with the head's token
    # the wake-ups over every pass's layers and streamed table
    fit.wake_ms, fit.stderr.wake_ms = median_term(
        [g for runs in runs_of for r in runs for p in r.passes
         for g in wake_gaps([*p.layers, p.head], p.embed_ms[1])])
    base_device = this_machine(bandwidth_mb_s, latency_us, memory_mb)
    # Out of sample: each plan's passes predicted by the fit of the other plans (a
    # bitwidth only the left-out plan ran keeps the full fit's cost).
    samples, w = decode_samples(scenario, designed, runs_of, vector_bits)
    held_out = []
    for i, (_, sel, _) in enumerate(designed):
        rest = [k for k, smp in enumerate(samples) if smp.plan != i]
        bits, vector = (tuple(b for b in model.bitwidths if any(getattr(samples[k], kind).get(b)
                                                                for k in rest))
                        for kind in ("weights", "vector_weights"))
        other = fit_compute([samples[k] for k in rest], bits, w[rest], vector)
        other.dequant_ns = {**fit.dequant_ns, **other.dequant_ns}
        other.vector_ns = {**fit.vector_ns, **other.vector_ns}
        other.embed_ms, other.pool_ms, other.wake_ms = fit.embed_ms, fit.pool_ms, fit.wake_ms
        held_out.append((device_of(other, base_device), sel, runs_of[i]))
    spread, errors = decode_stage_errors(scenario, held_out)
    noise = run_to_run([[p for r in runs for p in r.passes[1:]] for runs in runs_of])
    device = dataclasses.replace(device_of(fit, base_device), spread=spread,
                                 contention_share=0.0)  # no timed replay of a decoder
    facts = {"storage": storage, "plans": plans, "repeats": rounds, "min_repeats": repeats,
             "stopped": why, "seconds": round(time.monotonic() - began, 1),
             "interleaved": len(groups) == 1, "noise_pct": noise, "emulated": emulate,
             "warm_reads": warm_reads,
             "threads": torch.get_num_threads(), "seq_len": len(prompt),
             "decode_steps": steps}
    cal = Calibration(device, fit, facts, errors)
    wide = wide_stages(errors, max_error_pct)
    if wide or noise > NOISE_FACTOR * max_error_pct or \
            max(spread.io, spread.compute) > MAX_SPREAD:
        raise CalibrationError(refusal(cal, wide, max_error_pct))
    return cal
