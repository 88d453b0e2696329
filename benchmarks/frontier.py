"""The memory/accuracy frontier: how much preload buffer each level of importance costs.

MiniLM on the phone (problems/scenarios/minilm-phone.yaml: UFS 3.1 storage, 1.2 GB/s), at
three targets. At each target the importance runs from what no buffer allows (max
importance, buffer 0) to what any buffer allows (max importance, the device's whole
memory less the resident weights); between them, --points importance floors, and at each
floor the exact min_buffer plan (the least preload buffer that reaches the floor within
the target). Every frontier plan's submodel runs on the 1,000 held-out test tweets, for
its real fidelity and accuracy (runtime/submodel.py). Hold-in-memory (the whole fp32 model
resident, 42.5 MB of layer weights) is marked for scale, with its predicted latency.

Near the top of the frontier min_buffer is the harder program: a solve may end at its time
limit with a feasible plan (its gap is in the row), or with none; then the max-importance
plan, which reaches the floor, stands in, and its row says source=max_importance (its
buffer bounds the least one from above).

    python -m benchmarks.frontier [--targets 12,17,25] [--points 8] [--out-dir D]

Writes frontier.csv and frontier.png.
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import EXACT, HEAD, MINILM_PHONE, STORE, out_path, pyplot, save_figure, start, write_csv
from elasticplan.baselines import HOLD_IN_MEMORY, baseline_plan
from elasticplan.cli import number_list
from elasticplan.errors import ElasticplanError, SolverTimeoutError
from elasticplan.loader import load_scenario
from elasticplan.report import optional
from elasticplan.solvers import solve
from elasticplan.spec import Objective
from runtime.store import ShardStore
from runtime.submodel import TestSplit

MODULE = "benchmarks.frontier"
# Floors are set a hair below the importance a max-importance solve reached, so that a
# floor is never above what is reachable only because of the solver's own float tolerance.
FLOOR_SLACK = 1e-6


def frontier(base, target: float, points: int, gap: float, time_limit_s: float,
             evaluator: TestSplit) -> list[dict]:
    cap_mb = base.memory_cap_bytes / 1e6
    ends = {}
    for buf in (0.0, cap_mb):
        sc = base.with_overrides(target_latency_ms=target, preload_budget_mb=buf)
        ends[buf] = solve(sc, EXACT, time_limit_s=time_limit_s, relative_gap=gap)
    lo, hi = ends[0.0].importance, ends[cap_mb].importance
    rows = []
    for k in range(points):
        floor = (lo + (hi - lo) * k / (points - 1)) * (1 - FLOOR_SLACK)
        sc = base.with_overrides(target_latency_ms=target, preload_budget_mb=cap_mb,
                                 objective=Objective.MIN_BUFFER, importance_floor=floor)
        source = "min_buffer"
        try:
            plan = solve(sc, EXACT, time_limit_s=time_limit_s, relative_gap=gap)
        except SolverTimeoutError as e:
            if ends[cap_mb].importance < floor:
                print(f"# target {target:g} ms, floor {floor:.5f}: no plan ({e})")
                continue
            # The max-importance plan meets the floor; its buffer bounds the least one from
            # above. Said so in the row (source) and in the output.
            print(f"# target {target:g} ms, floor {floor:.5f}: min_buffer found no plan in "
                  f"{time_limit_s:g} s; the max-importance plan stands in (its buffer is an "
                  f"upper bound on the least)")
            plan, source = ends[cap_mb], "max_importance"
        except ElasticplanError as e:
            print(f"# target {target:g} ms, floor {floor:.5f}: no plan ({type(e).__name__}: {e})")
            continue
        q = evaluator.plan(plan)
        row = {"target_ms": target, "floor": floor, "buffer_mb": plan.preload_bytes / 1e6,
               "importance": plan.importance, "status": plan.status.value, "gap": plan.gap,
               "solve_s": plan.solve_seconds, "shards": plan.n_shards,
               "preloaded": sum(c.preloaded for lp in plan.layers for c in lp.shards),
               "predicted_ms": plan.predicted_latency_ms, "fidelity": q.fidelity,
               "accuracy": q.accuracy, "source": source}
        rows.append(row)
        print(f"{target:>9g} {floor:>8.4f} {row['buffer_mb']:>9.3f} {row['importance']:>10.4f} "
              f"{row['status']:<8} {optional(row['gap'], '.1e'):>8} {row['solve_s']:>7.2f} "
              f"{row['shards']:>6} {row['preloaded']:>9} {row['fidelity']:>8.4f} "
              f"{row['accuracy']:>8.3f} {source}", flush=True)
    return rows


def plot(rows, targets, hold, hold_q, path, command) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    colours = ["tab:red", "tab:blue", "tab:green", "tab:purple", "tab:brown"]
    for t, colour in zip(targets, colours):
        pts = sorted((r for r in rows if r["target_ms"] == t), key=lambda r: r["buffer_mb"])
        x = [r["buffer_mb"] for r in pts]
        axes[0].step(x, [r["importance"] for r in pts], where="post", color=colour,
                     marker="o", markersize=4, label=f"target {t:g} ms")
        axes[1].plot(x, [r["accuracy"] for r in pts], "o-", color=colour,
                     label=f"target {t:g} ms: accuracy")
        axes[1].plot(x, [r["fidelity"] for r in pts], "s--", color=colour, alpha=0.5,
                     markersize=3, label=f"target {t:g} ms: fidelity")
    hold_mb = hold.preload_bytes / 1e6
    axes[0].plot([hold_mb], [hold.importance], "k*", markersize=12)
    axes[0].annotate(f"hold-in-memory\n{hold_mb:.1f} MB, {hold.predicted_latency_ms:.1f} ms",
                     (hold_mb, hold.importance), textcoords="offset points", xytext=(-95, -28),
                     fontsize=7)
    axes[1].plot([hold_mb], [hold_q.accuracy], "k*", markersize=12)
    axes[1].annotate(f"hold-in-memory (fp32)\naccuracy {hold_q.accuracy:.3f}",
                     (hold_mb, hold_q.accuracy), textcoords="offset points", xytext=(-95, -28),
                     fontsize=7)
    axes[0].set_ylabel("planned importance (profile)")
    axes[1].set_ylabel("test split (1,000 tweets)")
    for ax in axes:
        ax.set_xlabel("preload buffer (MB), least for the importance (min_buffer)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    axes[1].legend(fontsize=6, loc="lower right")
    fig.suptitle("MiniLM-L6 on the phone (UFS 3.1): memory/accuracy frontier", fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    save_figure(fig, path, command)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    ap.add_argument("--targets", type=number_list, default="12,17,25", help="ms")
    ap.add_argument("--points", type=int, default=8, help="floors per target (>= 2)")
    ap.add_argument("--gap", type=float, default=1e-4, help="relative gap each solve proves")
    ap.add_argument("--time-limit", type=float, default=20.0, help="per solve, s")
    ap.add_argument("--out-dir", help="default out/bench")
    a = ap.parse_args(argv)
    if a.points < 2:
        ap.error("--points must be at least 2")
    command = start(MODULE, argv)
    t0 = time.monotonic()
    base = load_scenario(MINILM_PHONE)
    evaluator = TestSplit(ShardStore(STORE), HEAD)
    hold = baseline_plan(base, HOLD_IN_MEMORY)
    hold_q = evaluator.plan(hold)
    print(f"# {base.device.name}: {base.device.bandwidth_mb_s:g} MB/s; hold-in-memory holds "
          f"{hold.preload_bytes / 1e6:.3f} MB, predicted {hold.predicted_latency_ms:.2f} ms, "
          f"accuracy {hold_q.accuracy:.3f}; buffers up to {base.memory_cap_bytes / 1e6:.1f} MB "
          f"(memory {base.device.memory_mb:g} MB less resident weights)")
    print(f"{'target ms':>9} {'floor':>8} {'buffer MB':>9} {'importance':>10} {'status':<8} "
          f"{'gap':>8} {'solve s':>7} {'shards':>6} {'preloaded':>9} {'fidelity':>8} "
          f"{'accuracy':>8} source")
    rows = []
    for t in a.targets:
        rows += frontier(base, t, a.points, a.gap, a.time_limit, evaluator)
    write_csv(out_path("frontier.csv", a.out_dir), rows, list(rows[0]) if rows else ["target_ms"])
    plot(rows, a.targets, hold, hold_q, out_path("frontier.png", a.out_dir), command)
    print(f"# {evaluator.evaluations} submodels evaluated; {time.monotonic() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
