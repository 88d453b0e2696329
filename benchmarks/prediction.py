"""Prediction truth: does a solved plan's predicted pipeline hold when it runs?

For each emulated bandwidth (default 200 MB/s and 1 GB/s), this machine's calibrated
device (benchmarks/common.calibrated_scenario) and a grid of MiniLM questions: --fractions
of the calibrated default target x --buffers. Each question is solved exactly (HiGHS) and
the plan runs through the runtime (runtime/measurement/measure.py: a discarded warm-up, then --repeat
cold runs on test-split queries; the median run's timeline). Per plan it compares, predicted
vs measured:

- total: the latency (median run);
- IO stage: the time the IO thread spends reading, summed over layers (io_end - io_start);
- compute stage: the time the compute thread spends in layers, summed (compute_end -
  compute_start);
- embed/pool stage: the embedding (from the query's arrival, so a streamed table's row
  reads are in it) and the pooling, against the rows' reads + embed_ms + pool_ms;
- memory: the predicted peak against the executor's exact accounting (runtime/measurement/measure.py)
  and against the process's own peak above a baseline (runtime.measurement.memprobe, a fresh process).

Questions also carry --memory-mb budgets ("none": unbounded); a bounded question lets the
solver choose the prefetch window (solve_any_window) and where the embedding table lives.
It reports the median and 95th percentile of the absolute relative error, per bandwidth
and overall, with a scatter plot of latency, IO and compute.

Each question is also solved at --quantile (default 0.95: `latency_quantile`, planned on
the device stretched by its measured spread) and run the same way; the benchmark reports
the share of all measured runs that meet their target, for the median plans and for the
quantile plans, and the importance the quantile plans give up against the median ones.
The error statistics are over the median plans.

    python -m benchmarks.prediction [--bandwidths 200,1000] [--fractions ...] [--buffers ...]
                                    [--memory-mb none,10,16] [--quantile 0.95|none]
                                    [--busy-core N]

With --busy-core N a busy loop pinned to core N (another process) runs throughout, the
calibration included (delete build/bench/calibrated-* first, or the devices of a quiet
run are reused): the same grid on a busy machine.

Writes prediction.csv and prediction.png.
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np

from benchmarks.common import (
    EXACT,
    busy_core,
    calibrated_scenario,
    out_path,
    percentile,
    pyplot,
    relative,
    runtime_inputs,
    save_figure,
    start,
    write_csv,
)
from elasticplan.cli import number_list, quantile_arg
from elasticplan.costmodel import embedding_read_ms
from elasticplan.errors import CalibrationError, ElasticplanError
from elasticplan.plans.report import optional
from elasticplan.solvers import solve, solve_any_window
from runtime.measurement.measure import measure_plan
from runtime.measurement.report import LayerReport, RunReport

MODULE = "benchmarks.prediction"


def memory_list(text: str) -> list[float | None]:
    """'none,10,16' -> [None, 10.0, 16.0] (an argparse type)."""
    out = []
    for part in text.split(","):
        out.append(None if part.strip() == "none" else number_list(part)[0])
    return out
METRICS = ("total", "io", "compute", "embed_pool")
MEMORY_METRICS = ("memory", "process")
COLUMNS = ["bandwidth_mb_s", "target_ms", "buffer_mb", "status", "gap", "shards", "reads",
           "streamed_mb", "predicted_ms", "measured_ms", "error", "io_predicted_ms",
           "io_measured_ms", "io_error", "compute_predicted_ms", "compute_measured_ms",
           "compute_error", "embed_pool_predicted_ms", "embed_pool_measured_ms",
           "embed_pool_error", "latency_quantile", "quantile_ms", "importance",
           "runs_within_target", "memory_budget_mb", "window", "embeddings", "predicted_peak_mb",
           "measured_peak_mb", "memory_error", "process_peak_mb", "process_error", "fidelity",
           "runs_ms"]


def stage_ms(layers: list[LayerReport], side: str, stage: str) -> float:
    """Σ over layers of a stage's busy time, from a report's layers ('predicted'/'measured')."""
    return sum(getattr(getattr(lay, side), f"{stage}_end_ms")
               - getattr(getattr(lay, side), f"{stage}_start_ms") for lay in layers)


def row_of(bw: float, plan, r: RunReport, scenario) -> dict:
    lays = r.layers
    io_p, io_m = stage_ms(lays, "predicted", "io"), stage_ms(lays, "measured", "io")
    cp_p, cp_m = stage_ms(lays, "predicted", "compute"), stage_ms(lays, "measured", "compute")
    d = scenario.device
    rows_ms = embedding_read_ms(d, scenario.model, r.median_run_rows) \
        if plan.embeddings == "streamed" else 0.0
    ep_p = rows_ms + d.embed_ms + d.pool_ms
    ep_m = (r.embed_ms[1] - r.embed_ms[0]) + (r.pool_ms[1] - r.pool_ms[0])
    sc = plan.scenario.question  # what the plan answers (its target, budgets, quantile)
    return {"bandwidth_mb_s": bw, "target_ms": sc.target_latency_ms,
            "buffer_mb": sc.preload_budget_mb, "status": plan.status.value, "gap": plan.gap,
            "shards": plan.n_shards, "reads": r.reads_per_run,
            "streamed_mb": r.streamed_bytes / 1e6,
            "predicted_ms": r.predicted_latency_ms, "measured_ms": r.measured_latency_ms,
            "error": r.relative_error, "io_predicted_ms": io_p, "io_measured_ms": io_m,
            "io_error": relative(io_m, io_p), "compute_predicted_ms": cp_p,
            "compute_measured_ms": cp_m, "compute_error": relative(cp_m, cp_p),
            "embed_pool_predicted_ms": ep_p, "embed_pool_measured_ms": ep_m,
            "embed_pool_error": relative(ep_m, ep_p),
            "latency_quantile": sc.latency_quantile, "quantile_ms": plan.quantile_latency_ms,
            "importance": plan.importance,
            "runs_within_target": sum(v <= sc.target_latency_ms for v in r.measured_runs_ms),
            "memory_budget_mb": sc.memory_budget_mb, "window": plan.window or "unbounded",
            "embeddings": plan.embeddings,
            "predicted_peak_mb": r.memory.predicted_peak_bytes / 1e6,
            "measured_peak_mb": r.memory.measured_peak_bytes / 1e6,
            "memory_error": r.memory.relative_error,
            "process_peak_mb": r.memory.measured_process_peak_bytes / 1e6,
            "process_error": r.memory.process_relative_error,
            "fidelity": r.fidelity,
            "runs_ms": " ".join(f"{v:g}" for v in r.measured_runs_ms)}


def targets_met(rows: list[dict], repeats: int) -> list[str]:
    """Per latency quantile planned: the share of measured runs that met their target, and
    for the quantile plans the importance given up against the median plan of the same
    question (both solved)."""
    out = []
    by_question = {}
    for r in rows:
        key = (r["bandwidth_mb_s"], r["target_ms"], r["buffer_mb"], r["memory_budget_mb"])
        by_question.setdefault(key, {})[r["latency_quantile"]] = r
    for q in sorted({r["latency_quantile"] for r in rows}):
        sel = [r for r in rows if r["latency_quantile"] == q]
        met = sum(r["runs_within_target"] for r in sel)
        line = (f"# planned at latency_quantile {q:g}: {met} of {repeats * len(sel)} measured "
                f"runs ({met / (repeats * len(sel)):.1%}) met their target, {len(sel)} plans")
        if q != 0.5:
            pairs = [(g[0.5]["importance"], g[q]["importance"]) for g in by_question.values()
                     if 0.5 in g and q in g and g[0.5]["importance"] > 0]
            lost = [1 - b / a for a, b in pairs]
            if lost:
                line += (f"; importance given up against the median plans: mean {np.mean(lost):.2%}"
                         f", max {max(lost):.2%} ({len(pairs)} questions)")
        out.append(line)
    return out


def quantile_or_none(text: str) -> float | None:
    """'none' or a latency quantile in [0.5, 0.999] (an argparse type)."""
    return None if text.strip() == "none" else quantile_arg(text)


def error_key(metric: str) -> str:
    return "error" if metric == "total" else f"{metric}_error"


def summary(rows: list[dict]) -> list[dict]:
    """Median and p95 of |relative error| per bandwidth (and 'all') and metric."""
    out = []
    rows = [r for r in rows if r["latency_quantile"] == 0.5]
    groups = sorted({r["bandwidth_mb_s"] for r in rows})
    for g in groups + ["all"]:
        sel = [r for r in rows if g == "all" or r["bandwidth_mb_s"] == g]
        for m in METRICS + MEMORY_METRICS:
            errs = [abs(r[error_key(m)]) for r in sel]
            out.append({"bandwidth": g, "metric": m, "plans": len(sel),
                        "median_abs_error": percentile(errs, 50),
                        "p95_abs_error": percentile(errs, 95), "max_abs_error": max(errs),
                        "mean_signed_error": sum(r[error_key(m)] for r in sel) / len(sel)})
    return out


def plot(rows: list[dict], stats: list[dict], path, command) -> None:
    plt = pyplot()
    rows = [r for r in rows if r["latency_quantile"] == 0.5]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.4))
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    labels = {"total": "latency (total)", "io": "IO stage (Σ layer reads)",
              "compute": "compute stage (Σ layer compute)",
              "embed_pool": "embedding (from arrival) + pooling"}
    keys = {"total": ("predicted_ms", "measured_ms"),
            "io": ("io_predicted_ms", "io_measured_ms"),
            "compute": ("compute_predicted_ms", "compute_measured_ms"),
            "embed_pool": ("embed_pool_predicted_ms", "embed_pool_measured_ms")}
    bws = sorted({r["bandwidth_mb_s"] for r in rows})
    for ax, m in zip(axes, METRICS):
        kp, km = keys[m]
        hi = max(max(r[kp], r[km]) for r in rows) * 1.05
        lo = min(min(r[kp], r[km]) for r in rows) * 0.9
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        ax.fill_between([lo, hi], [0.9 * lo, 0.9 * hi], [1.1 * lo, 1.1 * hi], color="grey",
                        alpha=0.15, label="±10 %")
        for bw, colour in zip(bws, colours):
            sel = [r for r in rows if r["bandwidth_mb_s"] == bw]
            st = next(s for s in stats if s["bandwidth"] == bw and s["metric"] == m)
            ax.scatter([r[kp] for r in sel], [r[km] for r in sel], s=14, color=colour,
                       label=f"{bw:g} MB/s: median {st['median_abs_error']:.1%}, "
                             f"p95 {st['p95_abs_error']:.1%}")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel("predicted (ms)")
        ax.set_ylabel("measured (ms)")
        ax.set_title(labels[m], fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"MiniLM-L6 plans on this machine (emulated storage): predicted vs measured, "
                 f"{len(rows)} plans", fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    save_figure(fig, path, command)


def measure_grid(a, store, reference, queries) -> list[dict]:
    """Every (bandwidth, question, quantile) of the grid: solved, run, one row each."""
    rows = []
    for bw in a.bandwidths:
        try:
            sc0, default = calibrated_scenario(bw, store=store, queries=queries)
        except CalibrationError as e:  # a spread no device may carry: nothing to predict with
            print(f"# {bw:g} MB/s: calibration refused, no plans measured: {e}")
            continue
        print(f"{'MB/s':>5} {'target':>6} {'buf MB':>6} {'q':>4} {'status':<8} {'shards':>6} "
              f"{'predicted':>9} {'measured':>8} {'error':>7} {'IO pred':>7} {'IO meas':>7} "
              f"{'IO err':>7} {'comp pred':>9} {'comp meas':>9} {'comp err':>8} {'emb err':>7} "
              f"{'met':>5} {'mem MB':>6} "
              f"{'window':>9} {'table':<8} {'peak pred':>8} {'meas':>8} {'err':>7} "
              f"{'process':>8} {'err':>7}")
        quantiles = [0.5] + ([a.quantile] if a.quantile is not None else [])
        for frac, buf, mem in itertools.product(a.fractions, a.buffers, a.memory_mb):
            for q in quantiles:
                sc = sc0.with_overrides(target_latency_ms=round(default * frac, 1),
                                        preload_budget_mb=buf, memory_budget_mb=mem,
                                        latency_quantile=q)
                try:
                    if mem is None:
                        plan = solve(sc, EXACT, time_limit_s=a.time_limit, relative_gap=a.gap)
                    else:
                        plan, sc = solve_any_window(sc, EXACT, time_limit_s=a.time_limit,
                                                    relative_gap=a.gap)
                except ElasticplanError as e:
                    print(f"# target {sc.target_latency_ms:g} ms, {buf:g} MB buffer, memory "
                          f"{mem}, quantile {q:g}: no plan: {e}")
                    continue
                r = measure_plan(plan, sc, store, repeats=a.repeat, emulate=True,
                                 queries=queries, reference=reference, head=None)
                row = row_of(bw, plan, r, sc)
                rows.append(row)
                print(f"{bw:>5g} {row['target_ms']:>6.1f} {buf:>6g} {q:>4g} {row['status']:<8} "
                      f"{row['shards']:>6} {row['predicted_ms']:>9.2f} {row['measured_ms']:>8.2f} "
                      f"{row['error']:>+7.1%} {row['io_predicted_ms']:>7.2f} "
                      f"{row['io_measured_ms']:>7.2f} {row['io_error']:>+7.1%} "
                      f"{row['compute_predicted_ms']:>9.2f} {row['compute_measured_ms']:>9.2f} "
                      f"{row['compute_error']:>+8.1%} {row['embed_pool_error']:>+7.1%} "
                      f"{row['runs_within_target']:>2}/{a.repeat:<2} {optional(mem, 'g'):>6} "
                      f"{str(row['window']):>9} {row['embeddings']:<8} "
                      f"{row['predicted_peak_mb']:>8.3f} {row['measured_peak_mb']:>8.3f} "
                      f"{row['memory_error']:>+7.2%} {row['process_peak_mb']:>8.3f} "
                      f"{row['process_error']:>+7.1%}", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    ap.add_argument("--bandwidths", type=number_list, default="200,1000",
                    help="emulated storage, MB/s")
    ap.add_argument("--fractions", type=number_list, default="0.5,0.6,0.7,0.8,0.9,1.0",
                    help="targets, as fractions of the calibrated default target")
    ap.add_argument("--buffers", type=number_list, default="0,2", help="preload budgets, MB")
    ap.add_argument("--memory-mb", type=memory_list, default="none,10,16",
                    help="memory budgets, MB ('none': unbounded)")
    ap.add_argument("--quantile", type=quantile_or_none, default=0.95,
                    help="also plan each question at this latency_quantile ('none': only "
                         "the median)")
    ap.add_argument("--repeat", type=int, default=5, help="measured runs per plan")
    ap.add_argument("--gap", type=float, default=1e-4, help="relative gap each solve proves")
    ap.add_argument("--time-limit", type=float, default=5.0, help="per solve, s")
    ap.add_argument("--out-dir", help="default out/bench")
    ap.add_argument("--busy-core", type=int, metavar="N",
                    help="keep core N busy throughout (a pinned busy loop in another process; "
                         "calibration included): predictions on a busy machine")
    a = ap.parse_args(argv)
    if a.repeat < 1:
        ap.error("--repeat must be at least 1")
    command = start(MODULE, argv)
    t0 = time.monotonic()
    store, reference, queries = runtime_inputs(a.repeat)
    with busy_core(a.busy_core):
        rows = measure_grid(a, store, reference, queries)
    if not rows:
        print("# no plan was solved; nothing to report")
        return 1
    stats = summary(rows)
    print()
    print(f"{'bandwidth':>9} {'metric':<8} {'plans':>5} {'median |err|':>12} {'p95 |err|':>9} "
          f"{'max |err|':>9} {'mean err':>8}")
    for s in stats:
        bw = s["bandwidth"] if s["bandwidth"] == "all" else f"{s['bandwidth']:g}"
        print(f"{bw:>9} {s['metric']:<8} {s['plans']:>5} {s['median_abs_error']:>12.1%} "
              f"{s['p95_abs_error']:>9.1%} {s['max_abs_error']:>9.1%} "
              f"{s['mean_signed_error']:>+8.1%}")
    median_rows = [r for r in rows if r["latency_quantile"] == 0.5]
    held = sum(r["measured_peak_mb"] <= r["predicted_peak_mb"] for r in median_rows)
    print(f"# memory: measured (executor) <= predicted for {held} of {len(median_rows)} plans")
    for line in targets_met(rows, a.repeat):
        print(line)
    write_csv(out_path("prediction.csv", a.out_dir), rows, COLUMNS)
    write_csv(out_path("prediction_summary.csv", a.out_dir), stats, list(stats[0]))
    plot(rows, stats, out_path("prediction.png", a.out_dir), command)
    print(f"# {time.monotonic() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
