"""Check the planner's additive importance against the real submodels it selects.

Solves the MiniLM scenario over a grid of targets and buffers, runs each plan's submodel
(exactly the planned shards at the planned bitwidths, weights from the shard store) on
the held-out test tweets (runtime/profiling/submodel.py), and compares the planner's objective with what was measured:

- Spearman rank correlation of the objective with measured fidelity and with accuracy;
- the additive prediction of the loss, Σ_s loss(choice of s) = Σ_s loss(drop) - objective,
  against the measured loss 1 - fidelity, with a fitted calibration
  measured ≈ k * predicted (least squares through the origin) and its R²;
- the multiplicative reading of the same profile, fidelity ≈ Π_s (1 - loss(choice of s)),
  which cannot go below 0 as the additive sum can;
- pairwise: at each (target, buffer) STI's greedy plan is run too, and the check counts
  how often the plan with the higher objective also has the higher measured fidelity and
  accuracy (the planner's real job is choosing between plans).

    python -m runtime.profiling.additive [--scenario S] [--targets 4,6,8] [--buffers 0,1,4]
                               [--solver highs] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from elasticplan.errors import ElasticplanError
from elasticplan.plans.plan import Plan
from elasticplan.problem.loader import load_scenario
from elasticplan.problem.outputs import write_text
from elasticplan.problem.spec import FULL_PRECISION_BITS, Scenario
from elasticplan.solvers import DEFAULT_SOLVER, solve
from runtime.profiling.submodel import TestSplit
from runtime.store import ShardStore

DEFAULT_SCENARIO = "problems/scenarios/minilm-phone.yaml"
DEFAULT_TARGETS = (4, 5, 6, 7, 8, 10, 12, 14, 17, 20, 25)
DEFAULT_BUFFERS = (0, 2)


@dataclass
class PlanPoint:
    target_ms: float
    buffer_mb: float
    solver: str
    status: str
    objective: float
    predicted_loss: float  # additive: Σ_s loss(choice of s)
    predicted_product: float  # multiplicative: Π_s (1 - loss(choice of s))
    measured_fidelity: float
    measured_accuracy: float
    shards: int
    quantised: int


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho with average ranks for ties."""
    def ranks(x):
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for v in np.unique(x):  # ties share their mean rank
            idx = x == v
            r[idx] = r[idx].mean()
        return r
    ra, rb = ranks(np.asarray(a, float)), ranks(np.asarray(b, float))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def calibrate(predicted: np.ndarray, measured: np.ndarray) -> tuple[float, float]:
    """measured ≈ k * predicted through the origin: (k, R² of that fit)."""
    k = float(predicted @ measured / (predicted @ predicted)) if predicted.any() else 0.0
    resid = measured - k * predicted
    tot = ((measured - measured.mean()) ** 2).sum()
    return k, float(1 - (resid ** 2).sum() / tot) if tot > 0 else float("nan")


def run(scenario_path: str, store_path: str, head_path: str, targets, buffers,
        time_limit_s: float = 10.0, solver: str = DEFAULT_SOLVER, relative_gap: float = 1e-4,
        log=print, evaluator: TestSplit | None = None) -> list[PlanPoint]:
    """At each (target, buffer): the exact plan (`solver`) and STI's greedy plan, each with
    its submodel measured on the test split."""
    base = load_scenario(scenario_path)
    evaluator = evaluator or TestSplit(ShardStore(store_path), head_path)
    drop_loss = _drop_loss(base)
    points = []
    for buffer_mb in buffers:
        for target in targets:
            sc = base.with_overrides(target_latency_ms=target, preload_budget_mb=buffer_mb)
            for name in (solver, "greedy"):
                try:
                    plan = solve(sc, name, time_limit_s=time_limit_s, relative_gap=relative_gap)
                except ElasticplanError as e:
                    log(f"target {target} ms, buffer {buffer_mb} MB, {name}: no plan ({e})")
                    continue
                q = evaluator.plan(plan)
                quantised = sum(1 for layer in plan.layers for c in layer.shards
                                if c.bits != FULL_PRECISION_BITS)
                p = PlanPoint(target, buffer_mb, name, plan.status.value, plan.importance,
                              drop_loss - plan.importance, _product(sc, plan), q.fidelity,
                              q.accuracy, plan.n_shards, quantised)
                points.append(p)
                log(f"target {target:5g} ms  buffer {buffer_mb:g} MB  {name:6} {p.status:8}  "
                    f"objective {p.objective:.5f}  predicted loss {p.predicted_loss:.4f}  "
                    f"measured fidelity {q.fidelity:.4f}  accuracy {q.accuracy:.3f}  shards "
                    f"{p.shards} ({quantised} quantised)")
    return points


def uniform_points(store_path: str, head_path: str) -> list[tuple[str, float, float]]:
    """Reference submodels on the test split: every shard at b bits, for each stored b."""
    store = ShardStore(store_path)
    ev = TestSplit(store, head_path)
    out = []
    for bits in sorted(store.bitwidths, reverse=True):
        q = ev.uniform(bits)
        out.append((f"all shards at {bits} bits", q.fidelity, q.accuracy))
    return out


def _product(scenario: Scenario, plan: Plan) -> float:
    """Π_s (1 - loss(choice of s)), with loss(b) = loss(drop) - importance[b]."""
    model, out = scenario.model, 1.0
    i32 = model.bit_index(FULL_PRECISION_BITS)
    for layer, lp in zip(model.layers, plan.layers):
        chosen = {c.name: model.bit_index(c.bits) for c in lp.shards}
        for shard in layer.shards:
            drop = shard.importance[i32]
            b = chosen.get(shard.name)
            out *= 1.0 - (drop if b is None else drop - shard.importance[b])
    return out


def _drop_loss(scenario: Scenario) -> float:
    """Σ_s loss(drop) = Σ_s importance at fp32 (the profile's definition)."""
    i32 = scenario.model.bit_index(FULL_PRECISION_BITS)
    return sum(s.importance[i32] for layer in scenario.model.layers for s in layer.shards)


def summary(points: list[PlanPoint]) -> dict:
    exact = [p for p in points if p.solver != "greedy"]
    obj = np.array([p.objective for p in exact])
    fid = np.array([p.measured_fidelity for p in exact])
    acc = np.array([p.measured_accuracy for p in exact])
    pred = np.array([p.predicted_loss for p in exact])
    prod = np.array([p.predicted_product for p in exact])
    k, r2 = calibrate(pred, 1 - fid)
    # pairs: same question, two solvers
    by_q = {}
    for p in points:
        by_q.setdefault((p.target_ms, p.buffer_mb), {})[p.solver] = p
    pairs = [(e, q["greedy"]) for q in by_q.values() if len(q) == 2
             for e in [next(p for s, p in q.items() if s != "greedy")]
             if e.objective != q["greedy"].objective]

    def agree(attr):
        return sum((a.objective > b.objective) == (getattr(a, attr) > getattr(b, attr))
                   for a, b in pairs)
    return {"plans": len(exact), "pairs": len(pairs),
            "spearman_objective_fidelity": spearman(obj, fid),
            "spearman_objective_accuracy": spearman(obj, acc),
            "calibration_k": k, "calibration_r2": r2,
            "mae_fidelity_additive": float(np.abs((1 - pred) - fid).mean()),
            "mae_fidelity_additive_calibrated": float(np.abs((1 - k * pred) - fid).mean()),
            "mae_fidelity_product": float(np.abs(prod - fid).mean()),
            "pairs_fidelity_agree": agree("measured_fidelity"),
            "pairs_accuracy_agree": agree("measured_accuracy"),
            "mean_fidelity_gain_over_greedy": float(np.mean(
                [a.measured_fidelity - b.measured_fidelity for a, b in pairs])) if pairs else 0.0,
            "mean_accuracy_gain_over_greedy": float(np.mean(
                [a.measured_accuracy - b.measured_accuracy for a, b in pairs])) if pairs else 0.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.profiling.additive", description=__doc__.split("\n")[0])
    ap.add_argument("--scenario", default=DEFAULT_SCENARIO)
    ap.add_argument("--store", default="build/shards/minilm-l6")
    ap.add_argument("--head", default="problems/models/minilm-l6.taskhead.json")
    ap.add_argument("--targets", default=",".join(map(str, DEFAULT_TARGETS)))
    ap.add_argument("--buffers", default=",".join(map(str, DEFAULT_BUFFERS)))
    ap.add_argument("--solver", default=DEFAULT_SOLVER, help=f"the exact backend (default "
                                                             f"{DEFAULT_SOLVER})")
    ap.add_argument("--time-limit", type=float, default=10.0, help="per solve, s (default 10)")
    ap.add_argument("--json", help="write points and summary as JSON")
    ap.add_argument("--uniform", action="store_true",
                    help="only evaluate the uniform-bitwidth reference models")
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    if a.uniform:
        print(f"{'model (test split, 1000 tweets)':32} {'fidelity':>9} {'accuracy':>9}")
        for name, fid, acc in uniform_points(a.store, a.head):
            print(f"{name:32} {fid:9.4f} {acc:9.3f}")
        return 0
    try:
        points = run(a.scenario, a.store, a.head, [float(v) for v in a.targets.split(",")],
                     [float(v) for v in a.buffers.split(",")], time_limit_s=a.time_limit,
                     solver=a.solver)
    except ElasticplanError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    s = summary(points)
    print(f"\n{s['plans']} exact plans (+ greedy) in {time.monotonic() - t0:.0f} s")
    print(f"Spearman(objective, measured fidelity) = {s['spearman_objective_fidelity']:.3f}")
    print(f"Spearman(objective, measured accuracy) = {s['spearman_objective_accuracy']:.3f}")
    print(f"measured loss = {s['calibration_k']:.3f} x additive prediction (R² "
          f"{s['calibration_r2']:.3f})")
    print(f"mean |predicted - measured fidelity|: additive {s['mae_fidelity_additive']:.4f}, "
          f"additive calibrated {s['mae_fidelity_additive_calibrated']:.4f}, product "
          f"{s['mae_fidelity_product']:.4f}")
    print(f"{a.solver} vs greedy at the same question ({s['pairs']} pairs): the higher objective "
          f"has the higher measured fidelity in {s['pairs_fidelity_agree']}, the higher "
          f"accuracy in {s['pairs_accuracy_agree']}; mean gain fidelity "
          f"{s['mean_fidelity_gain_over_greedy']:+.4f}, accuracy "
          f"{s['mean_accuracy_gain_over_greedy']:+.4f}")
    if a.json:
        write_text(a.json, json.dumps({"summary": s, "points": [asdict(p) for p in points]},
                                           indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
