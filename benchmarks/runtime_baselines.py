"""The classic strategies and the planned ones, on the real runtime, side by side.

MiniLM-L6 on this machine's calibrated device with storage emulated at each bandwidth
(default 200 MB/s and 1 GB/s; benchmarks/common.calibrated_scenario). The question: the
target is --fraction (default 0.5) of the calibrated default target (every shard at 8
bits, streamed), tight enough that the plans must drop and quantise shards; the buffer is
2 MB. Six plans run through the one executor and the one measurement
(runtime/measurement/measure.py: a discarded warm-up, then --repeat cold runs on test-split queries,
median): hold-in-memory, load-then-execute, layer-wise pipelining (window 1)
(elasticplan/plans/baselines.py), the greedy plan, the exact plan (HiGHS), and the exact plan
within a --memory-mb budget (window chosen by the solver).

Per plan: predicted and measured latency, the prediction's error bar (the 95 % interval
from the device's measured spread: the plan's latency with every stage at its 0.975
quantile, relative to the median; elasticplan.costmodel.at_quantile) and whether the
measured median lies within it, measured vs the target (a solved plan is
planned up to the target, so run-to-run noise puts it on either side), the preload
buffer, the working set (IO ring + scratch, predicted), the peak memory measured by the
executor's accounting and by the process (runtime.measurement.memprobe), and the submodel's fidelity
and accuracy on the 1,000 test tweets (runtime/profiling/submodel.py).

    python -m benchmarks.runtime_baselines [--bandwidths 200,1000] [--memory-mb 10]
                                           [--repeat 9] [--out-dir D]

Writes runtime_baselines.csv.
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import (
    EXACT,
    GREEDY,
    HEAD,
    calibrated_scenario,
    out_path,
    relative,
    runtime_inputs,
    start,
    write_csv,
)
from elasticplan.cli import number_list
from elasticplan.costmodel import at_quantile, simulate
from elasticplan.errors import ElasticplanError
from elasticplan.plans.baselines import baseline_questions
from elasticplan.solvers import solve, solve_any_window
from runtime.measurement.measure import measure_plan
from runtime.profiling.submodel import TestSplit

MODULE = "benchmarks.runtime_baselines"
COLUMNS = ["bandwidth_mb_s", "target_ms", "strategy", "execution", "predicted_ms",
           "measured_ms", "error", "error_bar", "within_bar", "vs_target", "preload_mb", "working_peak_mb",
           "predicted_peak_mb", "peak_mb", "process_peak_mb", "resident_model_mb", "streamed_mb",
           "fidelity", "accuracy", "runtime_fidelity", "runs_ms"]


def plans_for(sc, time_limit_s: float, gap: float, memory_mb: float | None = None):
    """(label, plan, the scenario it answers) for the strategies, the solved ones last."""
    skipped = lambda strategy, e: print(f"# {strategy}: not run: {e}")  # noqa: E731
    out = [(b.solver, b, question) for b, question in baseline_questions(sc, skipped)]
    for label, solver in (("greedy", GREEDY), ("exact (highs)", EXACT)):
        try:
            plan = solve(sc, solver, time_limit_s=time_limit_s, relative_gap=gap)
        except ElasticplanError as e:
            print(f"# {label}: no plan: {e}")
            continue
        out.append((label, plan, sc))
    if memory_mb is not None:
        label = f"exact, {memory_mb:g} MB"
        try:
            plan, question = solve_any_window(sc.with_overrides(memory_budget_mb=memory_mb),
                                              EXACT, time_limit_s=time_limit_s,
                                              relative_gap=gap)
            out.append((label, plan, question))
        except ElasticplanError as e:
            print(f"# {label}: no plan: {e}")
    return out


def error_bar(plan, question, quantile: float = 0.975) -> float:
    """The prediction's relative error bar: the plan's latency on the device stretched to
    `quantile` of its measured spread, over the median prediction, less 1 (0 without a
    measured spread)."""
    if question.device.spread is None:
        return 0.0
    stretched = at_quantile(question.with_overrides(latency_quantile=quantile))
    high = simulate(stretched, plan.selection(question), plan.execution, plan.layout)
    return high.latency_ms / plan.predicted_latency_ms - 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    ap.add_argument("--bandwidths", type=number_list, default="200,1000",
                    help="emulated storage, MB/s")
    ap.add_argument("--fraction", type=float, default=0.5,
                    help="the target, as a fraction of the calibrated default target")
    ap.add_argument("--buffer", type=float, default=2.0, help="preload budget, MB")
    ap.add_argument("--memory-mb", type=float, default=10.0,
                    help="memory budget of the last exact plan, MB")
    ap.add_argument("--repeat", type=int, default=9, help="measured runs per plan")
    ap.add_argument("--gap", type=float, default=1e-4, help="relative gap the exact solve proves")
    ap.add_argument("--time-limit", type=float, default=10.0, help="per solve, s")
    ap.add_argument("--out-dir", help="default out/bench")
    a = ap.parse_args(argv)
    if a.repeat < 1:
        ap.error("--repeat must be at least 1")
    start(MODULE, argv)
    t0 = time.monotonic()
    store, reference, queries = runtime_inputs(a.repeat)
    evaluator = TestSplit(store, HEAD)
    rows = []
    for bw in a.bandwidths:
        sc, default = calibrated_scenario(bw, store=store, queries=queries)
        target = round(default * a.fraction, 1)
        sc = sc.with_overrides(target_latency_ms=target, preload_budget_mb=a.buffer)
        print(f"# {bw:g} MB/s: target {target:g} ms ({a.fraction:g} x {default:g}), buffer "
              f"{a.buffer:g} MB; {a.repeat} cold runs per plan after a warm-up, median")
        print(f"{'strategy':<22} {'predicted':>9} {'measured':>8} {'error':>7} {'bar':>6} "
              f"{'vs target':>9} "
              f"{'preload MB':>10} {'working MB':>10} {'peak MB':>7} {'process':>7} {'fidelity':>8} "
              f"{'accuracy':>8}")
        resident = None
        for label, plan, question in plans_for(sc, a.time_limit, a.gap, a.memory_mb):
            r = measure_plan(plan, question, store, repeats=a.repeat, emulate=True,
                             queries=queries, reference=reference, head=None)
            q = evaluator.plan(plan)
            m = r.memory
            resident = m.resident_bytes
            bar = error_bar(plan, question)
            row = {"bandwidth_mb_s": bw, "target_ms": target, "strategy": label,
                   "execution": plan.execution, "predicted_ms": r.predicted_latency_ms,
                   "measured_ms": r.measured_latency_ms, "error": r.relative_error,
                   "error_bar": bar, "within_bar": abs(r.relative_error) <= bar,
                   "vs_target": relative(r.measured_latency_ms, target),
                   "preload_mb": m.preload_bytes / 1e6,
                   "working_peak_mb": m.predicted["working_peak_bytes"] / 1e6,
                   "predicted_peak_mb": m.predicted_peak_bytes / 1e6,
                   "peak_mb": m.measured_peak_bytes / 1e6,
                   "process_peak_mb": m.measured_process_peak_bytes / 1e6,
                   "resident_model_mb": resident / 1e6,
                   "streamed_mb": r.streamed_bytes / 1e6, "fidelity": q.fidelity,
                   "accuracy": q.accuracy, "runtime_fidelity": r.fidelity,
                   "runs_ms": " ".join(f"{v:g}" for v in r.measured_runs_ms)}
            rows.append(row)
            print(f"{label:<22} {row['predicted_ms']:>9.2f} {row['measured_ms']:>8.2f} "
                  f"{row['error']:>+7.1%} {bar:>6.1%}{' ' if row['within_bar'] else '!'}"
                  f"{row['vs_target']:>+9.1%} "
                  f"{row['preload_mb']:>10.2f} {row['working_peak_mb']:>10.2f} "
                  f"{row['peak_mb']:>7.2f} {row['process_peak_mb']:>7.2f} "
                  f"{row['fidelity']:>8.4f} {row['accuracy']:>8.3f}",
                  flush=True)
        if resident is not None:
            print("# peak MB: resident + preload + ring + scratch + activations, as the "
                  "executor holds them; process: VmHWM above a baseline (runtime.measurement.memprobe)")
    write_csv(out_path("runtime_baselines.csv", a.out_dir), rows, COLUMNS)
    print(f"# {time.monotonic() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
