"""Limits the kernel enforces (runtime/cgroups.py): emulated against kernel-throttled
storage, and every strategy under a real memory cap.

Latency. For each bandwidth (default 200 MB/s and 1 GB/s, 100 us per read), two devices
are calibrated on this machine: with the storage emulated (the device clock,
benchmarks/common.calibrated_scenario) and with the device clock off and the reads
throttled by the kernel (`calibrate --throttle`: a block-IO cgroup at that bandwidth and
10,000 reads/s, into build/bench/calibrated-throttled-X). Every question of the grid
(--fractions of the default target x --buffers x --memory-mb) is solved exactly on each
device and run the matching way (measure_plans: a discarded warm-up, then --repeat cold
runs; throttled: read-ahead off, the cgroup's counters read around every run). Per plan:
the error of the total latency (median run) and of each stage (IO, compute, embedding +
pooling, as benchmarks/prediction.py sums them), emulated and throttled, and their
difference (throttled - emulated, same question), and whether the cgroup's counters equal
the pages the plan's streamed shards cover in every run.

Memory. On the first bandwidth's emulated device: the exact plans at --cap-budgets (10 and
20 MB), hold-in-memory, load-then-execute and layer-wise pipelining, each run in the memory
probe's process under a memory cgroup capped at its baseline + its own predicted peak +
--cap-margin, and under the exact 10 MB plan's cap: completed or killed, with the
cgroup's peak, its anonymous memory and the probe's VmHWM above the baseline.

    python -m benchmarks.kernel_limits [--bandwidths 200,1000] [--fractions 0.6,0.8,1.0]
        [--buffers 0,2] [--memory-mb none,10] [--repeat 5] [--cap-margin 5] [--quick]

--quick: 1 GB/s only, one target, 2 MB buffer, repeat 3, 10 s calibrations: a check that
it runs. Needs root and writable cgroups (exit 13 otherwise). Writes kernel_limits.csv,
kernel_limits_caps.csv and kernel_limits_summary.csv.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

from benchmarks.common import (
    CALIBRATED,
    EXACT,
    MINILM_PHONE,
    calibrated_scenario,
    out_path,
    percentile,
    relative,
    runtime_inputs,
    start,
    write_csv,
)
from benchmarks.prediction import memory_list, stage_ms
from elasticplan.cli import number_list
from elasticplan.costmodel import embedding_read_ms
from elasticplan.errors import CalibrationError, ElasticplanError, MemoryCapExceeded
from elasticplan.plans.baselines import baseline_plan
from elasticplan.solvers import solve, solve_any_window
from runtime.cgroups import IoThrottle, capped_probe, disk_check
from runtime.measurement.measure import measure_plans

MODULE = "benchmarks.kernel_limits"
MODES = ("emulated", "throttled")
STAGES = ("total", "io", "compute", "embed_pool")
STRATEGIES = ("hold-in-memory", "load-then-execute", "layerwise-pipelining")
COLUMNS = ["bandwidth_mb_s", "mode", "target_ms", "buffer_mb", "memory_budget_mb", "shards",
           "reads", "streamed_mb", "predicted_ms", "measured_ms", *[f"{s}_error" for s in STAGES],
           "io_predicted_ms", "io_measured_ms", "disk_equal", "disk_bytes", "page_bytes",
           "runs_ms"]
CAP_COLUMNS = ["plan", "cap_of", "predicted_peak_mb", "allowance_mb", "cap_mb", "baseline_mb",
               "outcome", "cgroup_peak_mb", "anon_mb", "page_cache_mb", "vmhwm_mb", "why"]


def throttled_scenario(bw: float, *, store, queries, budget_s: float, latency_us: float):
    """MiniLM's question on this machine with the reads throttled by the kernel at `bw`:
    calibrated once under the same throttle into build/bench/calibrated-throttled-X
    (reused while newer than the store's index), as `elasticplan calibrate --throttle`.
    Returns (scenario, default target ms)."""
    from elasticplan.problem.loader import load_scenario
    from runtime.calibrate import calibrate, describe_compute, write_calibration

    out = CALIBRATED / f"calibrated-throttled-{bw:g}"
    path = out / "scenario.yaml"
    if path.is_file() and path.stat().st_mtime > (Path(store.path) / "index.json").stat().st_mtime:
        sc = load_scenario(path)
        print(f"# {bw:g} MB/s throttled: reusing {out} ({describe_compute(sc.device)})")
        return sc, sc.target_latency_ms
    base = load_scenario(MINILM_PHONE)
    cal = calibrate(store, base, bandwidth_mb_s=bw, latency_us=latency_us, queries=queries,
                    budget_s=budget_s, max_error_pct=1000.0, throttle=True)
    _, scen_path, target = write_calibration(out, base, cal, None)
    print(f"# {bw:g} MB/s throttled: calibrated into {out}: {describe_compute(cal.device)}; "
          f"out-of-sample stage |error| median / p95: "
          + ", ".join(f"{k} {m:.1f} / {p:.1f} %" for k, (m, p) in cal.stage_errors.items()))
    return load_scenario(scen_path), target


def errors(plan, r, scenario) -> dict:
    """Total and per-stage relative errors of one run report (as benchmarks/prediction)."""
    lays = r.layers
    d = scenario.device
    rows_ms = embedding_read_ms(d, scenario.model) if plan.embeddings == "streamed" else 0.0
    ep_m = (r.embed_ms[1] - r.embed_ms[0]) + (r.pool_ms[1] - r.pool_ms[0])
    return {"total_error": r.relative_error,
            "io_predicted_ms": stage_ms(lays, "predicted", "io"),
            "io_measured_ms": stage_ms(lays, "measured", "io"),
            "io_error": relative(stage_ms(lays, "measured", "io"),
                                 stage_ms(lays, "predicted", "io")),
            "compute_error": relative(stage_ms(lays, "measured", "compute"),
                                      stage_ms(lays, "predicted", "compute")),
            "embed_pool_error": relative(ep_m, rows_ms + d.embed_ms + d.pool_ms)}


def run_one(mode: str, bw: float, plan, sc, store, queries, reference, repeat: int) -> dict:
    runs = [[]]
    common = dict(repeats=repeat, queries=queries, reference=reference, head=None,
                  probe=lambda _: None)  # no memory probe here: the caps are measured below
    if mode == "emulated":
        (r,) = measure_plans([(plan, sc, None)], store, emulate=True, **common)
        check = None
    else:
        with IoThrottle(store.path, bw, sc.device.latency_us) as t:
            (r,) = measure_plans([(plan, sc, None)], store, emulate=False, disk=t.counters,
                                 disk_runs=runs, **common)
        check = disk_check(plan, sc, store, runs[0])
    q = plan.scenario.question
    return {"bandwidth_mb_s": bw, "mode": mode, "target_ms": q.target_latency_ms,
            "buffer_mb": q.preload_budget_mb, "memory_budget_mb": q.memory_budget_mb,
            "shards": plan.n_shards, "reads": r.reads_per_run,
            "streamed_mb": r.streamed_bytes / 1e6, "predicted_ms": r.predicted_latency_ms,
            "measured_ms": r.measured_latency_ms, **errors(plan, r, sc),
            "disk_equal": None if check is None else check.equal,
            "disk_bytes": None if check is None else
            " ".join(str(c.bytes) for c in check.runs),
            "page_bytes": None if check is None else check.page_bytes,
            "runs_ms": " ".join(f"{v:g}" for v in r.measured_runs_ms)}


def latency_part(a, store, reference, queries) -> list[dict]:
    rows = []
    print(f"{'MB/s':>5} {'mode':<9} {'target':>6} {'buf':>4} {'mem':>5} {'shards':>6} "
          f"{'pred ms':>8} {'meas ms':>8} {'total':>7} {'IO':>7} {'compute':>7} {'emb+pool':>8} "
          f"{'disk':>6}")
    for bw in a.bandwidths:
        devices = {}
        try:
            devices["emulated"] = calibrated_scenario(bw, store=store, queries=queries)
            devices["throttled"] = throttled_scenario(bw, store=store, queries=queries,
                                                      budget_s=a.calibration_budget_s,
                                                      latency_us=a.latency_us)
        except CalibrationError as e:
            print(f"# {bw:g} MB/s: calibration refused, no plans measured: {e}")
            continue
        for frac, buf, mem in itertools.product(a.fractions, a.buffers, a.memory_mb):
            for mode in MODES:
                sc0, default = devices[mode]
                sc = sc0.with_overrides(target_latency_ms=round(default * frac, 1),
                                        preload_budget_mb=buf, memory_budget_mb=mem)
                try:
                    if mem is None:
                        plan = solve(sc, EXACT, time_limit_s=a.time_limit)
                    else:
                        plan, sc = solve_any_window(sc, EXACT, time_limit_s=a.time_limit)
                except ElasticplanError as e:
                    print(f"# {bw:g} MB/s {mode}: target {sc.target_latency_ms:g} ms, buffer "
                          f"{buf:g} MB, memory {mem}: no plan: {e}")
                    continue
                row = run_one(mode, bw, plan, sc, store, queries, reference, a.repeat)
                rows.append(row)
                disk = "" if row["disk_equal"] is None else \
                    ("equal" if row["disk_equal"] else "DIFFER")
                print(f"{bw:>5g} {mode:<9} {row['target_ms']:>6.1f} {buf:>4g} "
                      f"{'none' if mem is None else f'{mem:g}':>5} {row['shards']:>6} "
                      f"{row['predicted_ms']:>8.2f} {row['measured_ms']:>8.2f} "
                      f"{row['total_error']:>+7.1%} {row['io_error']:>+7.1%} "
                      f"{row['compute_error']:>+7.1%} {row['embed_pool_error']:>+8.1%} "
                      f"{disk:>6}", flush=True)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per bandwidth (and all) and stage: median and p95 |error| emulated and throttled,
    the median of the per-question difference (throttled - emulated), and the plans
    within 3 % in total."""
    out = []
    for g in sorted({r["bandwidth_mb_s"] for r in rows}) + ["all"]:
        sel = [r for r in rows if g == "all" or r["bandwidth_mb_s"] == g]
        by_q: dict = {}
        for r in sel:
            by_q.setdefault((r["bandwidth_mb_s"], r["target_ms"], r["buffer_mb"],
                             r["memory_budget_mb"], r["mode"]), r)
        for stage in STAGES:
            key = f"{stage}_error"
            line = {"bandwidth": g, "stage": stage}
            for mode in MODES:
                errs = [abs(r[key]) for r in sel if r["mode"] == mode]
                line[f"{mode}_plans"] = len(errs)
                line[f"{mode}_median_abs"] = percentile(errs, 50) if errs else None
                line[f"{mode}_p95_abs"] = percentile(errs, 95) if errs else None
                line[f"{mode}_within_3pct"] = sum(e <= 0.03 for e in errs)
            diffs = [by_q[(*k[:4], "throttled")][key] - r[key]
                     for k, r in by_q.items() if k[4] == "emulated" and (*k[:4], "throttled") in by_q]
            line["questions_both"] = len(diffs)
            line["median_difference"] = statistics.median(diffs) if diffs else None
            out.append(line)
    return out


def caps_part(a, store, queries) -> list[dict]:
    sc0, default = calibrated_scenario(a.bandwidths[0], store=store, queries=queries)
    sc0 = sc0.with_overrides(target_latency_ms=default, preload_budget_mb=2.0)
    plans = []
    for mb in a.cap_budgets:
        plan, sc = solve_any_window(sc0.with_overrides(memory_budget_mb=mb), EXACT,
                                    time_limit_s=a.time_limit)
        plans.append((f"exact {mb:g} MB", plan, sc))
    for name in a.strategies:
        plans.append((name, baseline_plan(sc0, name), sc0))
    ref_name, ref_plan, _ = plans[0]
    ref_mb = ref_plan.memory.peak_bytes / 1e6
    rows = []
    print(f"{'plan':<22} {'cap of':<16} {'pred MB':>8} {'allow MB':>8} {'cap MB':>8} "
          f"{'base MB':>8} {'outcome':<9} {'cgroup':>7} {'anon':>7} {'cache':>6} {'VmHWM':>7}")
    for (name, plan, sc), (cap_of, allowance) in itertools.product(
            plans, [("its own peak", None), (f"{ref_name}'s", ref_mb)]):
        row = {"plan": name, "cap_of": cap_of,
               "predicted_peak_mb": plan.memory.peak_bytes / 1e6,
               "allowance_mb": (plan.memory.peak_bytes / 1e6) if allowance is None else allowance}
        try:
            rep = capped_probe(plan, sc, store, repeats=a.repeat, threads=1,
                               allowance_mb=allowance, margin=a.cap_margin / 100)
            row.update(outcome="completed", cap_mb=rep.cap_bytes / 1e6,
                       baseline_mb=rep.baseline_bytes / 1e6,
                       cgroup_peak_mb=rep.peak_above_baseline_bytes / 1e6,
                       anon_mb=rep.anon_above_baseline_bytes / 1e6,
                       page_cache_mb=rep.sampled_page_cache_bytes / 1e6,
                       vmhwm_mb=rep.process_peak_above_baseline_bytes / 1e6)
        except MemoryCapExceeded as e:
            row.update(outcome="killed", why=str(e), cap_mb=e.cap_bytes / 1e6,
                       baseline_mb=e.baseline_bytes / 1e6)
        rows.append(row)
        f = lambda k, w=7: f"{row[k]:>{w}.3f}" if row.get(k) is not None else " " * (w - 1) + "-"  # noqa: E731
        print(f"{name:<22} {cap_of:<16} {f('predicted_peak_mb', 8)} {f('allowance_mb', 8)} "
              f"{f('cap_mb', 8)} {f('baseline_mb', 8)} {row['outcome']:<9} {f('cgroup_peak_mb')} "
              f"{f('anon_mb')} {f('page_cache_mb', 6)} {f('vmhwm_mb')}", flush=True)
        if row["outcome"] == "killed":
            print(f"#   {row['why']}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    ap.add_argument("--bandwidths", type=number_list, default="200,1000", help="MB/s")
    ap.add_argument("--latency-us", type=float, default=100.0, help="per read (default 100)")
    ap.add_argument("--fractions", type=number_list, default="0.6,0.8,1.0",
                    help="targets, as fractions of each device's default target")
    ap.add_argument("--buffers", type=number_list, default="0,2", help="preload budgets, MB")
    ap.add_argument("--memory-mb", type=memory_list, default="none,10",
                    help="memory budgets, MB ('none': unbounded)")
    ap.add_argument("--repeat", type=int, default=5, help="measured runs per plan")
    ap.add_argument("--time-limit", type=float, default=5.0, help="per solve, s")
    ap.add_argument("--calibration-budget-s", type=float, default=60.0,
                    help="rounds of the throttled calibration (as calibrate --budget-s)")
    ap.add_argument("--cap-budgets", type=number_list, default="10,20",
                    help="memory budgets of the exact plans capped, MB (the first's cap is "
                         "also every plan's second cap)")
    ap.add_argument("--cap-margin", type=float, default=5.0, help="%% of the allowance")
    ap.add_argument("--skip-latency", action="store_true", help="only the memory caps")
    ap.add_argument("--skip-caps", action="store_true", help="only the latency grid")
    ap.add_argument("--quick", action="store_true",
                    help="1 GB/s, one target, 2 MB buffer, repeat 3, 10 s calibrations")
    ap.add_argument("--store", help="the MiniLM store to read (default build/shards/minilm-l6); "
                                    "a private copy, where others read the default one")
    ap.add_argument("--out-dir", help="default out/bench")
    a = ap.parse_args(argv)
    a.strategies = STRATEGIES
    if a.quick:
        a.bandwidths, a.fractions, a.buffers = [1000.0], [0.8], [2.0]
        a.repeat, a.calibration_budget_s = 3, 10.0
    start(MODULE, argv)
    t0 = time.monotonic()
    if a.store:  # a private copy: nobody else's reads warm or evict its pages
        from elasticplan.problem.loader import load_scenario
        from runtime.measurement.measure import Reference, query_batches
        from runtime.store import ShardStore

        store = ShardStore(a.store)
        reference = Reference(store)
        queries = query_batches(store, load_scenario(MINILM_PHONE).model.seq_len, a.repeat)
    else:
        store, reference, queries = runtime_inputs(a.repeat)
    if not a.skip_latency:
        rows = latency_part(a, store, reference, queries)
        if rows:
            stats = summary(rows)
            print()
            print(f"{'MB/s':>5} {'stage':<10} {'emulated median/p95 |err|':>26} "
                  f"{'throttled median/p95 |err|':>27} {'median diff':>11} {'<=3 % emu/thr':>13}")
            for s in stats:
                g = s["bandwidth"] if s["bandwidth"] == "all" else f"{s['bandwidth']:g}"
                cell = lambda m: (f"{s[f'{m}_median_abs']:.1%} / {s[f'{m}_p95_abs']:.1%}"  # noqa: E731
                                  if s[f"{m}_plans"] else "-")
                diff = "-" if s["median_difference"] is None else f"{s['median_difference']:+.1%}"
                print(f"{g:>5} {s['stage']:<10} {cell('emulated'):>26} {cell('throttled'):>27} "
                      f"{diff:>11} {s['emulated_within_3pct']:>6}/{s['throttled_within_3pct']:<6}")
            thr = [r for r in rows if r["mode"] == "throttled"]
            print(f"# disk counters equal to the plan's pages in every run: "
                  f"{sum(bool(r['disk_equal']) for r in thr)} of {len(thr)} throttled plans")
            write_csv(out_path("kernel_limits.csv", a.out_dir), rows, COLUMNS)
            write_csv(out_path("kernel_limits_summary.csv", a.out_dir), stats, list(stats[0]))
    if not a.skip_caps:
        print()
        caps = caps_part(a, store, queries)
        write_csv(out_path("kernel_limits_caps.csv", a.out_dir), caps, CAP_COLUMNS)
    print(f"# {time.monotonic() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
