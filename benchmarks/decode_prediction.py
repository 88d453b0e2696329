"""Decoding prediction truth: does a decoder plan's predicted time to first token, time per
output token and memory hold when it generates?

For each emulated bandwidth (default 200 MB/s and 1 GB/s): this machine's device
calibrated on the decoder (benchmarks/common.calibrated_decoder_scenario:
runtime/decode_calibrate.py) and a grid of SmolLM2 questions on it (the phone scenario's
64-token prompt and 64-token answer): per-token targets at --factors times hold-in-memory's
predicted per-token latency x --memory-mb budgets ("none": unbounded), each solved exactly
(HiGHS, the scenario's window). Questions no plan answers are skipped (said). Every plan's
executor is then opened (all at once, so a change in the machine's speed falls on every
plan alike) and answers the same held-out prompt (test-split tweets, 64 tokens) with
--new-tokens tokens, greedy, once per round for --rounds rounds after a discarded
warm-up. Per plan, predicted (elasticplan.decoding.answer_schedules: the plan's passes at
the positions the answer took) vs measured (its median over the rounds):

- ttft: the prompt pass, start to its token (the time to first token);
- token: the decode step, start to its token (median over the steps);
- io / compute / head: the decode step's reads (the IO channel's busy time), its layers'
  compute and the LM head's, each in % of the predicted step;
- memory: the plan's predicted peak against the executor's exact accounting, and against
  the process's own peak above its baseline (runtime/measurement/generate.py: a throwaway
  answer of the same plan first, then VmHWM over VmRSS), one more answer per plan alone.

It reports the median and 95th percentile of the absolute relative errors, per bandwidth
and overall, with a scatter plot (predicted vs measured ttft and token), and beside them
the plans' common per-token shift and each plan's distance from it (`shift`).

    python -m benchmarks.decode_prediction [--bandwidths 200,1000] [--factors 1.25,1.5,2,3]
                                           [--memory-mb none,32,48,64] [--new-tokens 12]
                                           [--rounds 3] [--busy-core N] [--quick]
                                           [--scenario problems/scenarios/smollm2-phone.yaml]

(--scenario: the decoder's question and, through its profile, its store; e.g. the group
store's smollm2-phone-group.yaml.)

Writes decode_prediction.csv and decode_prediction.png.
"""

from __future__ import annotations

import argparse
import itertools
import statistics

from benchmarks.common import (
    EXACT,
    SMOLLM2_PHONE,
    busy_core,
    calibrated_decoder_scenario,
    out_path,
    percentile,
    pyplot,
    relative,
    save_figure,
    start,
    write_csv,
)
from elasticplan.cli import number_list
from elasticplan.costmodel import Layout, every_shard
from elasticplan.decoding import answer_schedules, predict
from elasticplan.errors import ElasticplanError
from elasticplan.solvers import solve

MODULE = "benchmarks.decode_prediction"
UNBOUNDED_PRELOAD_MB = 1000.0  # a question without a memory budget may hold the whole model
FIELDS = ["bandwidth_mb_s", "factor", "memory_mb", "target_ms", "window", "table",
          "parts_streamed", "predicted_ttft_ms", "measured_ttft_ms", "ttft_err",
          "predicted_token_ms", "measured_token_ms", "token_err", "io_err_pct",
          "compute_err_pct", "head_err_pct", "predicted_peak_mb", "executor_peak_mb",
          "executor_err", "process_peak_mb", "process_err"]


def questions(sc, factors, budgets, log=print) -> list[tuple]:
    """(factor, budget, plan, question) for every question of the grid a plan answers."""
    model = sc.model
    full = model.bit_index(32)
    hold = every_shard(model, full, True)
    per_token = predict(sc, hold, Layout()).last_token_ms
    out = []
    for factor, budget in itertools.product(factors, budgets):
        try:
            q = sc.with_overrides(target_latency_ms=round(factor * per_token, 3),
                                  memory_budget_mb=budget,
                                  preload_budget_mb=budget if budget is not None
                                  else UNBOUNDED_PRELOAD_MB)
            plan = solve(q, EXACT, time_limit_s=20.0)
        except ElasticplanError as e:
            log(f"# skipped: {factor:g}x hold-in-memory ({factor * per_token:.1f} ms), "
                f"memory {budget}: {str(e).splitlines()[0][:160]}")
            continue
        out.append((factor, budget, plan, q))
    return out


def measure(plans, store, prompt: list[int], new_tokens: int, rounds: int,
            warm_reads: bool = False) -> list[list]:
    """Every plan's answers ((plan, its question, the device whose storage is emulated)),
    rounds interleaved, its executor open throughout (`warm_reads`: DecodeExecutor's)."""
    from runtime.decoding import DecodeExecutor
    from runtime.measurement.generate import picks_of

    executors = []
    try:
        for plan, question, device in plans:
            picks, table = picks_of(plan)
            ex = DecodeExecutor(store, picks, table, context=question.context_tokens,
                                window=plan.window, device=device,
                                prompt_tokens=question.prompt_tokens, warm_reads=warm_reads)
            executors.append(ex)
            ex.generate(prompt, 2, eos_id=None)  # warm-up, discarded
        runs: list[list] = [[] for _ in plans]
        for r in range(rounds):
            for ex, out in zip(executors, runs):
                out.append(ex.generate(prompt, new_tokens, eos_id=None))
            print(f"# round {r + 1}/{rounds} done", flush=True)
        return runs
    finally:
        for ex in executors:
            ex.close()


def row(bandwidth, factor, budget, plan, q, runs, process_bytes) -> dict:
    from runtime.measurement.generate import pass_stages

    prompt = runs[0].prompt_tokens
    positions = [p.position for p in runs[0].passes[1:]]
    first, steps = answer_schedules(q, plan.selection(q), plan.layout, prompt, positions)
    ttft = statistics.median(r.ttft_ms for r in runs)
    by_run = [[pass_stages(s, m) for s, m in zip(steps, r.passes[1:])] for r in runs]
    measured = {k: statistics.median(statistics.median(getattr(st, k).measured_ms for st in sts)
                                     for sts in by_run) for k in ("total", "io", "compute", "head")}
    predicted = {k: statistics.median(getattr(st, k).predicted_ms for st in by_run[0])
                 for k in ("total", "io", "compute", "head")}
    token, predicted_token = measured["total"], predicted["total"]
    peak = plan.memory.peak_bytes
    executor = max(r.memory.allocated_bytes for r in runs)
    pct = lambda m, p: round(100 * (m - p) / predicted_token, 2)  # noqa: E731
    *_, table = plan.layers
    return {"bandwidth_mb_s": bandwidth, "factor": factor,
            "memory_mb": "none" if budget is None else budget,
            "target_ms": q.target_latency_ms, "window": plan.window,
            "table": f"{table.shards[0].bits}b {'held' if table.shards[0].preloaded else 'streamed'}",
            "parts_streamed": sum(not c.preloaded for lp in plan.layers for c in lp.shards),
            "predicted_ttft_ms": round(first.latency_ms, 3), "measured_ttft_ms": round(ttft, 3),
            "ttft_err": round(relative(ttft, first.latency_ms), 4),
            "predicted_token_ms": round(predicted_token, 3), "measured_token_ms": round(token, 3),
            "token_err": round(relative(token, predicted_token), 4),
            **{f"{k}_err_pct": pct(measured[k], predicted[k]) for k in ("io", "compute", "head")},
            "predicted_peak_mb": round(peak / 1e6, 3), "executor_peak_mb": round(executor / 1e6, 3),
            "executor_err": round(relative(executor, peak), 5),
            "process_peak_mb": round(process_bytes / 1e6, 3),
            "process_err": round(relative(process_bytes, peak), 4)}


def process_peak(plan, q, store, prompt) -> int:
    """The process's peak above its baseline while the plan answers (generate's measure)."""
    from runtime.measurement.generate import generate

    _, report = generate(plan, "plan", q, store, prompt, max_new_tokens=4, emulate=True,
                         threads=1, compare=False)
    return report.process_above_baseline_bytes


def summary(rows: list[dict], label: str) -> str:
    def stat(key, scale=100.0):
        v = [abs(r[key]) * scale for r in rows]
        return f"{statistics.median(v):.1f} / {percentile(v, 95):.1f} %"
    return (f"{label}: {len(rows)} plans; |error| median / p95: time to first token "
            f"{stat('ttft_err')}, per-token {stat('token_err')}, per-token stages (in % of "
            f"the step) io {stat('io_err_pct', 1)}, compute {stat('compute_err_pct', 1)}, head "
            f"{stat('head_err_pct', 1)}; memory: executor - predicted at most "
            f"{max(r['executor_err'] for r in rows) * 100:+.3f} %, process median "
            f"{statistics.median(r['process_err'] for r in rows) * 100:+.1f} %, max "
            f"{max(r['process_err'] for r in rows) * 100:+.1f} %; {shift(rows)}")


def shift(rows: list[dict]) -> str:
    """The plans' common shift per token (the signed median error) and how far each plan
    sits from it: plans measured in the same rounds share the machine's speed, so a large
    shift with a small spread about it is the machine moved since its calibration (the
    VM drifts by 10-30 % within an hour here), not a plan mispredicted."""
    signed = [r["token_err"] * 100 for r in rows]
    mid = statistics.median(signed)
    about = [abs(v - mid) for v in signed]
    return (f"per-token shift {mid:+.1f} %, |error - shift| median / p95 "
            f"{statistics.median(about):.1f} / {percentile(about, 95):.1f} %")


def plot(rows: list[dict], path, command: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    for ax, key, title in ((axes[0], "ttft", "time to first token"),
                           (axes[1], "token", "time per output token")):
        for bw in sorted({r["bandwidth_mb_s"] for r in rows}):
            pts = [(r[f"predicted_{key}_ms"], r[f"measured_{key}_ms"]) for r in rows
                   if r["bandwidth_mb_s"] == bw]
            ax.scatter(*zip(*pts), s=14, label=f"{bw:g} MB/s")
        lo = min(min(r[f"predicted_{key}_ms"], r[f"measured_{key}_ms"]) for r in rows)
        hi = max(max(r[f"predicted_{key}_ms"], r[f"measured_{key}_ms"]) for r in rows)
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="measured = predicted")
        ax.set(xscale="log", yscale="log", xlabel="predicted ms", ylabel="measured ms",
               title=title)
        ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M decoder plans: predicted vs measured (median of rounds)")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    save_figure(fig, path, command)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    p.add_argument("--bandwidths", type=number_list, default=[200.0, 1000.0])
    p.add_argument("--factors", type=number_list, default=[1.25, 1.5, 2.0, 3.0])
    p.add_argument("--memory-mb", default="none,32,48,64",
                   help="memory budgets, comma-separated, 'none' for unbounded")
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--plans", type=int, default=16, help="calibration plans")
    p.add_argument("--busy-core", type=int, default=None)
    p.add_argument("--scenario", default=str(SMOLLM2_PHONE),
                   help="the decoder's scenario (its profile names the store)")
    p.add_argument("--quick", action="store_true",
                   help="one bandwidth, two questions, one round: a smoke test")
    p.add_argument("--out-dir")
    a = p.parse_args(argv)
    command = start(MODULE, argv)
    budgets = [None if b.strip() == "none" else float(b) for b in a.memory_mb.split(",")]
    if a.quick:
        a.bandwidths, a.factors, budgets, a.rounds, a.new_tokens, a.plans = [1000.0], [2.0], \
            [None, 64.0], 1, 3, 7
    from benchmarks.decode_baselines import decoder_store
    from elasticplan.problem.loader import load_scenario
    from runtime.decode_calibrate import calibration_prompt

    store = decoder_store(load_scenario(a.scenario), None)
    rows: list[dict] = []
    with busy_core(a.busy_core):
        for bw in a.bandwidths:
            sc = calibrated_decoder_scenario(bw, store=store, base=a.scenario, plans=a.plans,
                                             budget_s=20.0 if a.quick else 60.0)
            prompt = calibration_prompt(store, sc.question.prompt_tokens, split="test")
            cases = questions(sc, a.factors, budgets)
            if not cases:
                continue
            runs = measure([(plan, q.question, q.device) for _, _, plan, q in cases], store,
                           prompt, a.new_tokens, a.rounds)
            for (factor, budget, plan, q), r in zip(cases, runs):
                rows.append(row(bw, factor, budget, plan, q, r,
                                process_peak(plan, q, store, prompt)))
            print("# " + summary([r for r in rows if r["bandwidth_mb_s"] == bw], f"{bw:g} MB/s"))
    if not rows:
        raise SystemExit("no question of the grid has a plan")
    path = out_path("decode_prediction.csv", a.out_dir)
    write_csv(path, rows, FIELDS)
    print("# " + summary(rows, "all"))
    plot(rows, path.with_suffix(".png"), command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
