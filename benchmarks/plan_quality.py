"""Plan quality: the exact plan against STI's greedy plan, side by side in one run.

1. Every shipped scenario at its own question (and the drop-forcing targets of the solver
   benchmark): the objective of the exact plan (HiGHS, proven within --gap) and of greedy,
   and their ratio.
2. MiniLM on the phone (problems/scenarios/minilm-phone.yaml), a grid of targets x
   buffers: both plans' submodels run on the 1,000 held-out test tweets, with their real
   fidelity (cosine to fp32) and task accuracy (runtime/profiling/submodel.py), and the check that
   the planner's objective predicts them (runtime/profiling/additive.py's summary). A plot: accuracy
   and fidelity against the target, exact vs greedy, at two buffers.

    python -m benchmarks.plan_quality [--targets 4,5,...] [--buffers 0,2] [--out-dir D]

Writes plan_quality_scenarios.csv, plan_quality_minilm.csv and plan_quality.png.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.common import EXACT, GREEDY, HEAD, MINILM_PHONE, STORE, out_path, pyplot, save_figure, start, write_csv
from benchmarks.solver_speed import instances
from elasticplan.cli import number_list
from elasticplan.errors import ElasticplanError
from elasticplan.plans.report import optional
from elasticplan.problem.question import Objective
from elasticplan.problem.spec import FULL_PRECISION_BITS
from elasticplan.solvers import solve
from runtime.profiling import additive
from runtime.profiling.submodel import TestSplit
from runtime.store import ShardStore

MODULE = "benchmarks.plan_quality"


def scenarios(gap: float, time_limit_s: float) -> list[dict]:
    print(f"{'scenario':<28} {'objective':<15} {'exact':>12} {'status':<8} {'gap':>8} "
          f"{'greedy':>12} {'exact/greedy':>12}")
    rows = []
    for name, sc in instances():
        row = {"scenario": name, "objective": sc.objective.value}
        for solver in (EXACT, GREEDY):
            try:
                plan = solve(sc, solver, time_limit_s=time_limit_s, relative_gap=gap)
                row[solver] = plan.objective
                if solver == EXACT:
                    row.update(status=plan.status.value, gap=plan.gap)
            except ElasticplanError as e:
                row[f"{solver}_error"] = type(e).__name__
        if EXACT in row and GREEDY in row and row[GREEDY] > 0:
            row["ratio"] = row[EXACT] / row[GREEDY]
        rows.append(row)
        minimise = sc.objective == Objective.MIN_BUFFER
        unit = (lambda v: f"{v / 1e6:.3f} MB") if minimise else (lambda v: f"{v:.5f}")
        print(f"{name:<28} {sc.objective.value:<15} "
              f"{unit(row[EXACT]) if EXACT in row else row.get(EXACT + '_error', '-'):>12} "
              f"{row.get('status', '-'):<8} {optional(row.get('gap'), '.1e'):>8} "
              f"{unit(row[GREEDY]) if GREEDY in row else row.get(GREEDY + '_error', '-'):>12} "
              f"{optional(row.get('ratio'), '.4f'):>12}", flush=True)
    return rows


def minilm_grid(targets, buffers, gap, time_limit_s, evaluator) -> list[additive.PlanPoint]:
    print(f"\n# MiniLM on the phone ({MINILM_PHONE.relative_to(MINILM_PHONE.parents[2])}): "
          f"exact ({EXACT}, gap {gap:g}) vs greedy; submodels on the test split (1,000 tweets)")
    print(f"{'target ms':>9} {'buf MB':>6} {'solver':<7} {'status':<8} {'objective':>9} "
          f"{'kept (quant)':>12} {'fidelity':>8} {'accuracy':>8}")

    def log(line):
        if "no plan" in line:
            print(f"# {line}")
    points = additive.run(str(MINILM_PHONE), str(STORE), str(HEAD), targets, buffers,
                          time_limit_s=time_limit_s, solver=EXACT, relative_gap=gap, log=log,
                          evaluator=evaluator)
    for p in points:
        print(f"{p.target_ms:>9g} {p.buffer_mb:>6g} {p.solver:<7} {p.status:<8} "
              f"{p.objective:>9.4f} {f'{p.shards} ({p.quantised})':>12} "
              f"{p.measured_fidelity:>8.4f} {p.measured_accuracy:>8.3f}", flush=True)
    return points


def grid_summary(points, full) -> None:
    by_q = {}
    for p in points:
        by_q.setdefault((p.target_ms, p.buffer_mb), {})[p.solver] = p
    both = [(q[EXACT], q[GREEDY]) for q in by_q.values() if EXACT in q and GREEDY in q]
    only = [q[EXACT] for q in by_q.values() if EXACT in q and GREEDY not in q]
    if both:
        d_acc = np.array([e.measured_accuracy - g.measured_accuracy for e, g in both])
        d_fid = np.array([e.measured_fidelity - g.measured_fidelity for e, g in both])
        ratio = np.array([e.objective / g.objective for e, g in both if g.objective > 0])
        print(f"\n# {len(both)} questions with both plans: exact/greedy objective median "
              f"{np.median(ratio):.3f} (range {ratio.min():.3f}-{ratio.max():.3f}); accuracy "
              f"exact {np.mean([e.measured_accuracy for e, _ in both]):.3f} vs greedy "
              f"{np.mean([g.measured_accuracy for _, g in both]):.3f} on average "
              f"(difference median {np.median(d_acc):+.3f}, range {d_acc.min():+.3f} to "
              f"{d_acc.max():+.3f}, exact ahead in {int((d_acc > 0).sum())}, level in "
              f"{int((d_acc == 0).sum())}, behind in {int((d_acc < 0).sum())}); fidelity "
              f"exact {np.mean([e.measured_fidelity for e, _ in both]):.4f} vs greedy "
              f"{np.mean([g.measured_fidelity for _, g in both]):.4f} (exact ahead in "
              f"{int((d_fid > 0).sum())}, behind in {int((d_fid < 0).sum())})")
    if only:
        print(f"# {len(only)} questions where greedy found no plan and the exact plan did: "
              + ", ".join(f"{p.target_ms:g} ms/{p.buffer_mb:g} MB (accuracy "
                          f"{p.measured_accuracy:.3f})" for p in only))
    print(f"# reference: the full fp32 model, accuracy {full.accuracy:.3f}")
    s = additive.summary(points)
    print(f"# does the objective predict the submodel? over {s['plans']} exact plans, "
          f"Spearman(objective, fidelity) {s['spearman_objective_fidelity']:.3f}, (objective, "
          f"accuracy) {s['spearman_objective_accuracy']:.3f}; fidelity from the profile, mean "
          f"error: additive {s['mae_fidelity_additive']:.3f}, calibrated "
          f"{s['mae_fidelity_additive_calibrated']:.3f} (k {s['calibration_k']:.3f}), product "
          f"{s['mae_fidelity_product']:.3f}; the higher objective has the higher fidelity in "
          f"{s['pairs_fidelity_agree']} of {s['pairs']} pairs, the higher accuracy in "
          f"{s['pairs_accuracy_agree']}")


def plot(points, buffers, full, path, command) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(buffers), figsize=(5.2 * len(buffers), 4.2), sharey=True,
                             squeeze=False)
    for ax, buf in zip(axes[0], buffers):
        for solver, colour in ((EXACT, "tab:blue"), (GREEDY, "tab:orange")):
            pts = sorted((p for p in points if p.buffer_mb == buf and p.solver == solver),
                         key=lambda p: p.target_ms)
            t = [p.target_ms for p in pts]
            label = "exact (HiGHS)" if solver == EXACT else "greedy (STI)"
            ax.plot(t, [p.measured_accuracy for p in pts], "o-", color=colour,
                    label=f"{label}: accuracy")
            ax.plot(t, [p.measured_fidelity for p in pts], "s--", color=colour, alpha=0.6,
                    markersize=4, label=f"{label}: fidelity")
        ax.axhline(full.accuracy, color="grey", linewidth=0.8, linestyle=":")
        ax.text(ax.get_xlim()[0], full.accuracy + 0.01, f" fp32 accuracy {full.accuracy:.3f}",
                fontsize=7, color="grey")
        ax.axhline(0.5, color="grey", linewidth=0.5, linestyle=":")
        ax.set_title(f"MiniLM-L6 on the phone, preload buffer {buf:g} MB", fontsize=9)
        ax.set_xlabel("target latency (ms)")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("test split (1,000 tweets)")
    axes[0, 0].legend(fontsize=7, loc="lower right")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    save_figure(fig, path, command)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    ap.add_argument("--targets", type=number_list, default="4,5,6,7,8,10,12,14,17,20,25",
                    help="MiniLM grid, ms")
    ap.add_argument("--buffers", type=number_list, default="0,2",
                    help="MiniLM grid, MB (two for the plot)")
    ap.add_argument("--gap", type=float, default=1e-4, help="relative gap the exact plan proves")
    ap.add_argument("--time-limit", type=float, default=10.0, help="per solve, s")
    ap.add_argument("--out-dir", help="default out/bench")
    a = ap.parse_args(argv)
    command = start(MODULE, argv)
    t0 = time.monotonic()
    rows = scenarios(a.gap, a.time_limit)
    write_csv(out_path("plan_quality_scenarios.csv", a.out_dir), rows,
              ["scenario", "objective", EXACT, "status", "gap", GREEDY, "ratio",
               f"{EXACT}_error", f"{GREEDY}_error"])
    evaluator = TestSplit(ShardStore(STORE), HEAD)
    full = evaluator.uniform(FULL_PRECISION_BITS)
    points = minilm_grid(a.targets, a.buffers, a.gap, a.time_limit, evaluator)
    grid_summary(points, full)
    write_csv(out_path("plan_quality_minilm.csv", a.out_dir), [vars(p) for p in points],
              list(additive.PlanPoint.__dataclass_fields__))
    plot(points, a.buffers, full, out_path("plan_quality.png", a.out_dir), command)
    print(f"# {evaluator.evaluations} submodels evaluated; {time.monotonic() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
