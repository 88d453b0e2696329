"""The memory/accuracy frontier in real memory: the least peak memory each accuracy costs.

MiniLM on this machine's calibrated device with storage emulated at --bandwidth (default
1 GB/s; benchmarks/common.calibrated_scenario). Hold-in-memory and layer-wise pipelining
run first, through the same runtime, for their measured latency and peak. The targets are
--factors times hold-in-memory's measured latency. At each target the importance runs
from the least that any plan holds (min_shards_per_layer 1: one shard per layer) to the
most any plan reaches (max importance, no memory bound); between them --points importance
floors, and at each floor the exact min_memory plan, its window chosen by the solver
(solve_any_window); and, at each --memory-mb budget, the max-importance plan within it
(window chosen likewise). Every plan then
- runs on the 1,000 held-out test tweets, for its real fidelity and accuracy
  (runtime/profiling/submodel.py);
- runs through the runtime (runtime/measurement/measure.py) for its measured latency and peak memory:
  the executor's accounting and the process's own peak (runtime.measurement.memprobe).

It closes with the goal of the memory-true-plans work: the least measured peak (the
executor's, and the process's own) of a plan whose test accuracy is within --accuracy-drop
of fp32 and whose measured latency is within --latency-factor of hold-in-memory's measured
latency in the same run.

A streamed embedding table is read one row per distinct token of a query; the questions
are priced at --query-tokens rows (default: the most distinct tokens of any tweet of the
training split at seq_len, so that every query of that kind meets its plan; `seq_len`:
every position its own row, the bound for any text).

    python -m benchmarks.frontier [--bandwidth 1000] [--factors 1.25,1.4] [--points 5]
                                  [--memory-mb 6,9,12,16,24,32] [--scheme uniform|dict]
                                  [--query-tokens N|train|seq_len]

`--scheme dict` runs it on the dictionary store and its profile (`make shards`).
Writes frontier.csv and frontier.png (frontier-dict.* for the dictionary store).
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import (
    EXACT,
    SCHEMES,
    calibrated_scenario,
    out_path,
    pyplot,
    runtime_inputs,
    save_figure,
    start,
    write_csv,
)
from elasticplan.cli import number_list
from elasticplan.errors import ElasticplanError
from elasticplan.plans.baselines import HOLD_IN_MEMORY, LAYERWISE, baseline_plan
from elasticplan.plans.report import optional
from elasticplan.plans.verify import with_plan_question
from elasticplan.problem.question import Objective
from elasticplan.solvers import solve, solve_any_window
from runtime.measurement.measure import measure_plan
from runtime.profiling.submodel import TestSplit
from runtime.schemes import DEFAULT_NAME

MODULE = "benchmarks.frontier"
# Floors are set a hair below the importance a max-importance solve reached, so that a
# floor is never above what is reachable only because of the solver's own float tolerance.
FLOOR_SLACK = 1e-6


def measured_row(label, target, plan, question, store, queries, reference, evaluator,
                 repeat) -> dict:
    q = evaluator.plan(plan)
    r = measure_plan(plan, question, store, repeats=repeat, emulate=True, queries=queries,
                     reference=reference, head=None)
    m = r.memory
    return {"strategy": label, "target_ms": target, "floor": question.importance_floor,
            "importance": plan.importance, "status": plan.status.value, "gap": plan.gap,
            "solve_s": plan.solve_seconds, "shards": plan.n_shards,
            "window": plan.window or "unbounded", "embeddings": plan.embeddings,
            "predicted_peak_mb": m.predicted_peak_bytes / 1e6,
            "measured_peak_mb": m.measured_peak_bytes / 1e6,
            "process_peak_mb": m.measured_process_peak_bytes / 1e6,
            "predicted_ms": r.predicted_latency_ms, "measured_ms": r.measured_latency_ms,
            "fidelity": q.fidelity, "accuracy": q.accuracy}


def print_row(row: dict) -> None:
    print(f"{row['strategy']:<20} {optional(row['target_ms'], '>9.1f'):>9} "
          f"{optional(row['floor'], '.4f'):>8} {row['importance']:>10.4f} {row['status']:<8} "
          f"{str(row['window']):>9} {row['embeddings']:<8} {row['predicted_peak_mb']:>9.3f} "
          f"{row['measured_peak_mb']:>9.3f} {row['process_peak_mb']:>9.3f} "
          f"{row['predicted_ms']:>8.2f} {row['measured_ms']:>8.2f} {row['accuracy']:>8.3f}",
          flush=True)


def frontier(base, target: float, points: int, a, inputs) -> list[dict]:
    """min_memory plans at `points` floors between the least and the most importance."""
    top = solve(base.with_overrides(target_latency_ms=target), EXACT,
                time_limit_s=a.time_limit, relative_gap=a.gap)
    least = solve_any_window(base.with_overrides(
        target_latency_ms=target, objective=Objective.MIN_MEMORY, importance_floor=0.0),
        EXACT, time_limit_s=a.time_limit, relative_gap=a.gap)[0]
    lo, hi = least.importance, top.importance
    questions = []
    for k in range(points):
        floor = (lo + (hi - lo) * k / (points - 1)) * (1 - FLOOR_SLACK)
        questions.append(("min_memory", f"floor {floor:.5f}", base.with_overrides(
            target_latency_ms=target, objective=Objective.MIN_MEMORY, importance_floor=floor)))
    for mb in a.memory_mb:
        questions.append((f"max_importance {mb:g}MB", f"{mb:g} MB", base.with_overrides(
            target_latency_ms=target, memory_budget_mb=mb)))
    rows = []
    for label, what, sc in questions:
        try:
            plan, question = solve_any_window(sc, EXACT, time_limit_s=a.time_limit,
                                              relative_gap=a.gap)
        except ElasticplanError as e:
            print(f"# target {target:g} ms, {what}: no plan ({type(e).__name__}: {e})")
            continue
        row = measured_row(label, target, plan, question, *inputs, a.repeat)
        rows.append(row)
        print_row(row)
    return rows


def query_tokens(choice: str, store, base, ap) -> int | None:
    """--query-tokens: a number, the training split's most distinct tokens, or None
    (seq_len). Says what the test split's queries read beside it."""
    from runtime.measurement.measure import distinct_tokens
    from runtime.sources.task import load_splits

    seq_len = base.model.seq_len
    splits = load_splits()
    test = max(distinct_tokens(store, list(splits.test.texts), seq_len))
    if choice == "seq_len":
        n = None
    elif choice == "train":
        n = max(distinct_tokens(store, list(splits.train.texts), seq_len))
    elif choice.isdigit() and 1 <= int(choice) <= seq_len:
        n = int(choice)
    else:
        ap.error(f"--query-tokens must be a number in [1, {seq_len}], 'train' or 'seq_len', "
                 f"got {choice!r}")
    print(f"# a streamed table is priced at {n or seq_len} rows per query (--query-tokens "
          f"{choice}); the test split's tweets have at most {test} distinct tokens at seq_len "
          f"{seq_len}")
    return n


def plot(rows, baselines, goal, path, command) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.6))
    colours = ["tab:red", "tab:blue", "tab:green", "tab:purple", "tab:brown"]
    targets = sorted({r["target_ms"] for r in rows})
    for t, colour in zip(targets, colours):
        pts = sorted((r for r in rows if r["target_ms"] == t), key=lambda r: r["measured_peak_mb"])
        ax.plot([r["measured_peak_mb"] for r in pts], [r["accuracy"] for r in pts], "o-",
                color=colour, markersize=4, label=f"exact plans, target {t:.1f} ms")
    for b, marker, dy in zip(baselines, ("k*", "kD"), (-32, -62)):
        ax.plot([b["measured_peak_mb"]], [b["accuracy"]], marker, markersize=10)
        ax.annotate(f"{b['strategy']}\n{b['measured_peak_mb']:.1f} MB, {b['measured_ms']:.1f} ms",
                    (b["measured_peak_mb"], b["accuracy"]), textcoords="offset points",
                    xytext=(-120, dy), fontsize=7, arrowprops={"arrowstyle": "-", "lw": 0.5})
    if goal is not None:
        ax.axhline(goal, color="grey", lw=0.8, ls="--", label="fp32 accuracy - 0.5 point")
    ax.set_xscale("log")
    ax.set_xlabel("measured peak memory (MB, executor accounting; log scale)")
    ax.set_ylabel("test accuracy (1,000 tweets)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("MiniLM-L6, storage emulated: accuracy against measured peak memory",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    save_figure(fig, path, command)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    ap.add_argument("--bandwidth", type=float, default=1000.0, help="emulated storage, MB/s")
    ap.add_argument("--factors", type=number_list, default="1.25,1.4",
                    help="targets, as multiples of hold-in-memory's measured latency")
    ap.add_argument("--points", type=int, default=5, help="floors per target (>= 2)")
    ap.add_argument("--memory-mb", type=number_list, default="6,9,12,16,24,32",
                    help="memory budgets of the max-importance plans, MB")
    ap.add_argument("--repeat", type=int, default=5, help="measured runs per plan")
    ap.add_argument("--accuracy-drop", type=float, default=0.005)
    ap.add_argument("--latency-factor", type=float, default=1.5)
    ap.add_argument("--gap", type=float, default=1e-4, help="relative gap each solve proves")
    ap.add_argument("--time-limit", type=float, default=20.0, help="per question, s")
    ap.add_argument("--scheme", choices=sorted(SCHEMES), default=DEFAULT_NAME,
                    help="the store and profile: uniform (default) or dict")
    ap.add_argument("--query-tokens", default="train",
                    help="rows a streamed table is priced at per query: N, 'train' (the most "
                         "distinct tokens of a training tweet) or 'seq_len'")
    ap.add_argument("--out-dir", help="default out/bench")
    a = ap.parse_args(argv)
    if a.points < 2:
        ap.error("--points must be at least 2")
    command = start(MODULE, argv)
    t0 = time.monotonic()
    store, reference, queries = runtime_inputs(a.repeat, a.scheme)
    base, _ = calibrated_scenario(a.bandwidth, store=store, queries=queries, scheme=a.scheme)
    base = base.with_overrides(query_tokens=query_tokens(a.query_tokens, store, base, ap))
    evaluator = TestSplit(store, SCHEMES[a.scheme][2])
    inputs = (store, queries, reference, evaluator)
    print(f"{'strategy':<20} {'target ms':>9} {'floor':>8} {'importance':>10} {'status':<8} "
          f"{'window':>9} {'table':<8} {'peak pred':>9} {'measured':>9} {'process':>9} "
          f"{'pred ms':>8} {'meas ms':>8} {'accuracy':>8}")
    baselines = []
    for strategy in (HOLD_IN_MEMORY, LAYERWISE):
        plan = baseline_plan(base, strategy)
        row = measured_row(strategy, None, plan, with_plan_question(base, plan), *inputs,
                           a.repeat)
        baselines.append(row)
        print_row(row)
    hold = baselines[0]
    rows = []
    for f in a.factors:
        rows += frontier(base, round(f * hold["measured_ms"], 1), a.points, a, inputs)
    goal_accuracy = hold["accuracy"] - a.accuracy_drop
    good = [r for r in rows if r["accuracy"] >= goal_accuracy
            and r["measured_ms"] <= a.latency_factor * hold["measured_ms"]]
    by_process = min(good, key=lambda r: r["process_peak_mb"], default=None)
    print(f"# goal: accuracy >= {goal_accuracy:.3f} (fp32 {hold['accuracy']:.3f} - "
          f"{a.accuracy_drop:g}) at measured latency <= {a.latency_factor:g} x hold-in-memory's "
          f"{hold['measured_ms']:.2f} ms = {a.latency_factor * hold['measured_ms']:.2f} ms")
    if good:
        best = min(good, key=lambda r: r["measured_peak_mb"])
        print(f"# least measured peak meeting it: {best['measured_peak_mb']:.3f} MB (process "
              f"{best['process_peak_mb']:.3f} MB; predicted {best['predicted_peak_mb']:.3f} MB), "
              f"accuracy {best['accuracy']:.3f}, {best['measured_ms']:.2f} ms, window "
              f"{best['window']}, embeddings {best['embeddings']}; hold-in-memory "
              f"{hold['measured_peak_mb']:.3f} MB ({hold['measured_peak_mb'] / best['measured_peak_mb']:.1f}x)")
        print(f"# least process peak meeting it: {by_process['process_peak_mb']:.3f} MB "
              f"(executor {by_process['measured_peak_mb']:.3f} MB, predicted "
              f"{by_process['predicted_peak_mb']:.3f} MB), accuracy {by_process['accuracy']:.3f}, "
              f"{by_process['measured_ms']:.2f} ms")
    else:
        print("# no plan met it")
    all_rows = baselines + rows
    name = "frontier" if a.scheme == DEFAULT_NAME else f"frontier-{a.scheme}"
    write_csv(out_path(f"{name}.csv", a.out_dir), all_rows, list(all_rows[0]))
    plot(rows, baselines, goal_accuracy, out_path(f"{name}.png", a.out_dir), command)
    print(f"# {evaluator.evaluations} submodels evaluated; {time.monotonic() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
