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
the pages the plan's streamed shards cover in every run. A throttled plan is predicted
three ways, from the same runs: `throttled`, with the throttle's settings as the device's
storage (what the device file says), `thr-fit`, with the storage terms the throttled
calibration runs delivered (runtime.calibrate.DeliveredStorage: per read and per MB,
fitted to their layers' read intervals), and `thr-steps`, with those terms, each layer's
reads held to the throttle's 100 ms steps (elasticplan.costmodel.Steps) and a streamed
table's rows unpriced (they come from the page cache); the compute terms the same.

Reads. What the kernel's throttle delivers, without compute or a pipeline: four read lists
(every shard of every layer at 8 bits; half of them at 4 bits; a third at fp32; every
fp32 shard), each read cold (evicted, read-ahead off), back to back, --read-runs times
with 0.3 s between runs (a fresh throttle slice each), on this disk without a cgroup and
throttled at each bandwidth: the median time, MB/s, the runs' robust sigma, and what the
device (latency x reads + MB / bandwidth) would take; then a run of 4 lists back to back
at the first bandwidth (one slice's allowance spent by the first).

Memory. On the first bandwidth's emulated device: the exact plans at --cap-budgets (10 and
20 MB), hold-in-memory, load-then-execute and layer-wise pipelining, each run in the memory
probe's process under a memory cgroup capped at its baseline + its own predicted peak +
--cap-margin, and under the exact 10 MB plan's cap: completed or killed, with the
cgroup's peak, its anonymous memory and the probe's VmHWM above the baseline.

    python -m benchmarks.kernel_limits [--bandwidths 200,1000] [--fractions 0.6,0.8,1.0]
        [--buffers 0,2] [--memory-mb none,10] [--repeat 5] [--cap-margin 5] [--read-runs 7]
        [--quick] [--store DIR]

--quick: 1 GB/s only, one target, 2 MB buffer, repeat 3, 10 s calibrations: a check that
it runs. Needs root and writable cgroups (exit 13 otherwise). Writes kernel_limits.csv,
kernel_limits_caps.csv, kernel_limits_reads.csv and kernel_limits_summary.csv.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
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
from elasticplan.costmodel import Steps, embedding_read_ms, read_ms, simulate, under_throttle
from elasticplan.errors import CalibrationError, ElasticplanError, MemoryCapExceeded
from elasticplan.plans.baselines import baseline_plan
from elasticplan.solvers import solve, solve_any_window
from runtime.cgroups import THROTTLE_GAP_S, IoThrottle, capped_probe, disk_check
from runtime.measurement.measure import measure_plans

MODULE = "benchmarks.kernel_limits"
MODES = ("emulated", "throttled", "thr-fit", "thr-steps")  # thr-fit: the throttled runs,
# predicted with the storage terms the throttled calibration delivered; thr-steps: with
# those terms, the throttle's steps (costmodel.Steps) and the rows from the page cache
STAGES = ("total", "io", "compute", "embed_pool")
STRATEGIES = ("hold-in-memory", "load-then-execute", "layerwise-pipelining")
COLUMNS = ["bandwidth_mb_s", "mode", "fraction", "target_ms", "buffer_mb", "memory_budget_mb", "shards",
           "reads", "streamed_mb", "predicted_ms", "measured_ms", *[f"{s}_error" for s in STAGES],
           "io_predicted_ms", "io_measured_ms", "disk_equal", "disk_bytes", "page_bytes",
           "runs_ms"]
READ_COLUMNS = ["condition", "list", "reads", "mb", "median_ms", "mb_s", "sigma_pct",
                "device_ms", "runs_ms"]
CAP_COLUMNS = ["plan", "cap_of", "predicted_peak_mb", "allowance_mb", "cap_mb", "baseline_mb",
               "outcome", "cgroup_peak_mb", "anon_mb", "page_cache_mb", "vmhwm_mb", "why"]


def throttled_scenario(bw: float, *, store, queries, budget_s: float, latency_us: float):
    """MiniLM's question on this machine with the reads throttled by the kernel at `bw`:
    calibrated once under the same throttle into build/bench/calibrated-throttled-X
    (reused while newer than the store's index), as `elasticplan calibrate --throttle`.
    Returns (scenario, default target ms, the storage the throttled reads delivered: a
    runtime.calibrate.DeliveredStorage, kept beside it in delivered.json)."""
    from elasticplan.problem.loader import load_scenario
    from runtime.calibrate import DeliveredStorage, calibrate, describe_compute, write_calibration

    out = CALIBRATED / f"calibrated-throttled-{bw:g}"
    path, kept = out / "scenario.yaml", out / "delivered.json"
    sc = load_scenario(path) if path.is_file() and kept.is_file() and \
        path.stat().st_mtime > (Path(store.path) / "index.json").stat().st_mtime else None
    if sc is not None and sc.device.disk is not None:  # (older files lack the disk: made again)
        d = json.loads(kept.read_text())
        delivered = DeliveredStorage(**{**d, "stage_errors": {
            k: tuple(v) for k, v in d["stage_errors"].items()}})
        print(f"# {bw:g} MB/s throttled: reusing {out} ({describe_compute(sc.device)}); "
              f"{delivered.describe()}")
        return sc, sc.target_latency_ms, delivered
    base = load_scenario(MINILM_PHONE)
    try:
        cal = calibrate(store, base, bandwidth_mb_s=bw, latency_us=latency_us, queries=queries,
                        budget_s=budget_s, max_error_pct=1000.0, throttle=True)
    except CalibrationError as e:
        if getattr(e, "calibration", None) is None:
            raise
        # A stage spread beyond what a device may carry (the throttle's settings predict
        # reads the kernel does not deliver): calibrate writes nothing; this benchmark
        # measures how well it predicts, so it keeps the device, its spreads clamped to
        # what a device file may carry (plans at the median do not use them), and says so
        # in the file's header.
        from elasticplan.problem.limits import MAX_SPREAD

        print(f"# {bw:g} MB/s throttled: calibrate refused the device: {e}; kept for this "
              f"benchmark, spreads clamped to {MAX_SPREAD:g}")
        cal = e.calibration
        sp = cal.device.spread
        cal.facts["storage"] += (f"; REFUSED by calibrate (spread IO {sp.io:.3f}, compute "
                                 f"{sp.compute:.3f}), kept by {MODULE} with its spreads "
                                 f"clamped to {MAX_SPREAD:g}")
        clamped = dataclasses.replace(sp, io=min(sp.io, MAX_SPREAD),
                                      compute=min(sp.compute, MAX_SPREAD))
        cal = dataclasses.replace(cal, device=dataclasses.replace(cal.device, spread=clamped))
    _, scen_path, target = write_calibration(out, base, cal, None)
    kept.write_text(json.dumps(cal.delivered.to_dict(), indent=1) + "\n")
    print(f"# {bw:g} MB/s throttled: calibrated into {out}: {describe_compute(cal.device)}; "
          f"out-of-sample stage |error| median / p95: "
          + ", ".join(f"{k} {m:.1f} / {p:.1f} %" for k, (m, p) in cal.stage_errors.items())
          + f"; {cal.delivered.describe()}")
    return load_scenario(scen_path), target, cal.delivered


def errors(plan, r, scenario, rows_cached: bool = False) -> dict:
    """Total and per-stage relative errors of one run report (as benchmarks/prediction;
    `rows_cached`: a streamed table's rows not priced: they come from the page cache)."""
    lays = r.layers
    d = scenario.device
    rows_ms = embedding_read_ms(d, scenario.model, r.median_run_rows) \
        if plan.embeddings == "streamed" and not rows_cached else 0.0
    ep_m = (r.embed_ms[1] - r.embed_ms[0]) + (r.pool_ms[1] - r.pool_ms[0])
    return {"predicted_ms": r.predicted_latency_ms, "total_error": r.relative_error,
            "io_predicted_ms": stage_ms(lays, "predicted", "io"),
            "io_measured_ms": stage_ms(lays, "measured", "io"),
            "io_error": relative(stage_ms(lays, "measured", "io"),
                                 stage_ms(lays, "predicted", "io")),
            "compute_error": relative(stage_ms(lays, "measured", "compute"),
                                      stage_ms(lays, "predicted", "compute")),
            "embed_pool_error": relative(ep_m, rows_ms + d.embed_ms + d.pool_ms)}


def errors_on(plan, r, scenario, device, steps: Steps | None = None) -> dict:
    """errors() of the same runs predicted on another device (the same plan, priced as the
    run report prices it: at the embedding rows each query read, when they are streamed),
    its reads held to a throttle's `steps` if given."""
    sc = scenario.with_overrides(device=device)
    sel = plan.selection(sc)
    at = lambda n: simulate(sc if n is None else sc.with_overrides(query_tokens=n), sel,  # noqa: E731
                            plan.execution, plan.layout, steps=steps,
                            rows_cached=steps is not None)
    rows = r.embedding_rows or (None,)
    predicted = statistics.median(at(n).latency_ms for n in rows)
    stages = at(r.median_run_rows if r.embedding_rows else None).layers
    lays = [dataclasses.replace(lay, predicted=dataclasses.replace(
        lay.predicted, **{k: getattr(sp, k) for k in ("io_start_ms", "io_end_ms",
                                                      "compute_start_ms", "compute_end_ms")}))
            for lay, sp in zip(r.layers, stages)]
    out = errors(plan, dataclasses.replace(r, layers=tuple(lays), predicted_latency_ms=predicted,
                                           relative_error=relative(r.measured_latency_ms,
                                                                   predicted)), sc,
                 rows_cached=steps is not None)
    return out


def run_one(mode: str, bw: float, plan, sc, store, queries, reference, repeat: int,
            fraction: float | None = None) -> list[dict]:
    """The plan's runs, emulated or throttled, as rows: one, or for a throttled plan on a
    device that gives the disk beneath the throttle three (predicted with the device's
    storage, the throttle's settings as a linear rate; with the disk's terms; and with
    them held to the throttle's steps, as `run --throttle` predicts). Throttled runs are
    spaced as `run --throttle` spaces them (THROTTLE_GAP_S)."""
    runs = [[]]
    common = dict(repeats=repeat, queries=queries, reference=reference, head=None,
                  probe=lambda _: None)  # no memory probe here: the caps are measured below
    if mode == "emulated":
        (r,) = measure_plans([(plan, sc, None)], store, emulate=True, **common)
        check = None
    else:
        with IoThrottle(store.path, bw, sc.device.latency_us) as t:  # the device's: nominal
            (r,) = measure_plans([(plan, sc, None)], store, emulate=False, disk=t.counters,
                                 disk_runs=runs, gap_s=THROTTLE_GAP_S, **common)
        check = disk_check(plan, sc, store, runs[0], t.bps)
    q = plan.scenario.question
    row = {"bandwidth_mb_s": bw, "mode": mode, "fraction": fraction,
           "target_ms": q.target_latency_ms,
           "buffer_mb": q.preload_budget_mb, "memory_budget_mb": q.memory_budget_mb,
           "shards": plan.n_shards, "reads": r.reads_per_run,
           "streamed_mb": r.streamed_bytes / 1e6, "measured_ms": r.measured_latency_ms,
           **errors(plan, r, sc),
           "disk_equal": None if check is None else check.equal,
           "disk_bytes": None if check is None else " ".join(str(c.bytes) for c in check.runs),
           "page_bytes": None if check is None else check.page_bytes,
           "runs_ms": " ".join(f"{v:g}" for v in r.measured_runs_ms)}
    if mode == "emulated" or sc.device.disk is None:
        return [row]
    disk, steps = under_throttle(sc)  # as `run --throttle` predicts (thr-steps)
    return [row, {**row, "mode": "thr-fit", **errors_on(plan, r, sc, disk.device)},
            {**row, "mode": "thr-steps", **errors_on(plan, r, sc, disk.device, steps)}]


def _print_row(row: dict, buf, mem) -> None:
    disk = "" if row["disk_equal"] is None else ("equal" if row["disk_equal"] else "DIFFER")
    print(f"{row['bandwidth_mb_s']:>5g} {row['mode']:<9} {row['target_ms']:>6.1f} {buf:>4g} "
          f"{'none' if mem is None else f'{mem:g}':>5} {row['shards']:>6} "
          f"{row['predicted_ms']:>8.2f} {row['measured_ms']:>8.2f} "
          f"{row['total_error']:>+7.1%} {row['io_error']:>+7.1%} "
          f"{row['compute_error']:>+7.1%} {row['embed_pool_error']:>+8.1%} "
          f"{disk:>6}", flush=True)


def latency_part(a, store, reference, queries) -> list[dict]:
    rows = []
    print(f"{'MB/s':>5} {'mode':<9} {'target':>6} {'buf':>4} {'mem':>5} {'shards':>6} "
          f"{'pred ms':>8} {'meas ms':>8} {'total':>7} {'IO':>7} {'compute':>7} {'emb+pool':>8} "
          f"{'disk':>6}")
    for bw in a.bandwidths:
        devices = {}
        for mode, make in (
                ("emulated", lambda: (*calibrated_scenario(bw, store=store, queries=queries),
                                      None)),
                ("throttled", lambda: throttled_scenario(bw, store=store, queries=queries,
                                                         budget_s=a.calibration_budget_s,
                                                         latency_us=a.latency_us))):
            try:
                devices[mode] = make()
            except CalibrationError as e:
                print(f"# {bw:g} MB/s {mode}: calibration refused, no plans measured: {e}")
        for frac, buf, mem in itertools.product(a.fractions, a.buffers, a.memory_mb):
            for mode in devices:
                sc0, default, _ = devices[mode]
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
                for row in run_one(mode, bw, plan, sc, store, queries, reference, a.repeat,
                                   frac):
                    rows.append(row)
                    _print_row(row, buf, mem)
    return rows


def reads_part(a, store) -> list[dict]:
    """What the kernel's throttle delivers, reads only (module docstring, "Reads")."""
    names = store.config.shard_names()
    pick = lambda bits, every=1: [store.variant(l, n, bits)  # noqa: E731
                                  for l in range(store.config.layers)
                                  for i, n in enumerate(names) if i % every == 0]
    lists = {"8-bit, every shard": pick(8), "4-bit, half": pick(4, 2),
             "fp32, a third": pick(32, 3), "fp32, every shard": pick(32)}
    fds: dict[str, int] = {}
    buf = memoryview(bytearray(max(v.nbytes for vs in lists.values() for v in vs)))
    rows = []

    def once(vs) -> float:
        for fd in fds.values():
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        for v in vs:
            os.preadv(fds[v.file], [buf[:v.nbytes]], v.offset)
        return (time.perf_counter() - t0) * 1e3

    def series(condition: str, device) -> None:
        for name, vs in lists.items():
            ms = []
            for _ in range(a.read_runs):
                time.sleep(0.3)  # idle past a throttle slice (100 ms): each run starts a new one
                ms.append(once(vs))
            med, mb = statistics.median(ms), sum(v.nbytes for v in vs) / 1e6
            sigma = 100 * 1.4826 * statistics.median(abs(math.log(m / med)) for m in ms)
            dev = None if device is None else sum(read_ms(device, v.nbytes) for v in vs)
            rows.append({"condition": condition, "list": name, "reads": len(vs), "mb": mb,
                         "median_ms": med, "mb_s": mb / med * 1e3, "sigma_pct": sigma,
                         "device_ms": dev, "runs_ms": " ".join(f"{m:.2f}" for m in ms)})
            print(f"{condition:<16} {name:<19} {len(vs):>5} {mb:>6.2f} {med:>8.2f} "
                  f"{mb / med * 1e3:>6.0f} {sigma:>6.1f} "
                  f"{'-' if dev is None else f'{dev:.2f}':>9}", flush=True)

    from elasticplan.problem.spec import Device

    try:
        for vs in lists.values():
            for v in vs:
                if v.file not in fds:
                    fds[v.file] = os.open(store.file(v.file), os.O_RDONLY)
                    os.posix_fadvise(fds[v.file], 0, 0, os.POSIX_FADV_RANDOM)
        print(f"{'reads, cold':<16} {'list':<19} {'reads':>5} {'MB':>6} {'med ms':>8} "
              f"{'MB/s':>6} {'sigma%':>6} {'device ms':>9}")
        series("this disk", None)
        for bw in a.bandwidths:
            device = Device(name="throttle", bandwidth_mb_s=bw, latency_us=a.latency_us,
                            gflops=1.0, layer_overhead_ms=0.0, dequant_gb_s=None, memory_mb=1.0)
            with IoThrottle(store.path, bw, a.latency_us):
                series(f"throttled {bw:g}", device)
        bw = a.bandwidths[0]
        device = dataclasses.replace(device, bandwidth_mb_s=bw)
        with IoThrottle(store.path, bw, a.latency_us):  # one slice's allowance spent first
            vs = lists["8-bit, every shard"]
            time.sleep(0.3)
            ms = [once(vs) for _ in range(4)]
        mb = sum(v.nbytes for v in vs) / 1e6
        rows.append({"condition": f"throttled {bw:g}, 4 back to back",
                     "list": "8-bit, every shard", "reads": len(vs), "mb": mb,
                     "median_ms": statistics.median(ms), "mb_s": 4 * mb / sum(ms) * 1e3,
                     "sigma_pct": None, "device_ms": sum(read_ms(device, v.nbytes) for v in vs),
                     "runs_ms": " ".join(f"{m:.2f}" for m in ms)})
        print(f"# {bw:g} MB/s, the 8-bit list 4 times back to back ({4 * mb:.1f} MB): "
              + ", ".join(f"{m:.1f}" for m in ms) + f" ms ({4 * mb / sum(ms) * 1e3:.0f} MB/s)")
    finally:
        for fd in fds.values():
            os.close(fd)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per bandwidth (and all) and stage: median and p95 |error| of each mode (emulated,
    throttled, thr-fit, thr-steps), the median of the per-question difference (each
    throttled mode - emulated), and the plans within 3 %."""
    out = []
    for g in sorted({r["bandwidth_mb_s"] for r in rows}) + ["all"]:
        sel = [r for r in rows if g == "all" or r["bandwidth_mb_s"] == g]
        by_q: dict = {}
        for r in sel:
            # the same question on each device: its target is the same fraction of that
            # device's default (the emulated and the throttled default targets differ)
            by_q.setdefault((r["bandwidth_mb_s"], r.get("fraction") or r["target_ms"], r["buffer_mb"],
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
            for other, name in (("throttled", "median_difference"),
                                ("thr-fit", "median_difference_fit"),
                                ("thr-steps", "median_difference_steps")):
                diffs = [by_q[(*k[:4], other)][key] - r[key] for k, r in by_q.items()
                         if k[4] == "emulated" and (*k[:4], other) in by_q]
                if other == "throttled":
                    line["questions_both"] = len(diffs)
                line[name] = statistics.median(diffs) if diffs else None
            out.append(line)
    return out


def caps_part(a, store, queries) -> list[dict]:
    try:
        sc0, default = calibrated_scenario(a.bandwidths[0], store=store, queries=queries)
    except CalibrationError as e:  # memory does not need this machine's timing: the phone's
        from elasticplan.problem.loader import load_scenario

        sc0 = load_scenario(MINILM_PHONE)
        default = sc0.target_latency_ms
        print(f"# caps: the {a.bandwidths[0]:g} MB/s calibration was refused ({e}); the "
              f"plans are solved on {MINILM_PHONE.name} instead")
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
    ap.add_argument("--read-runs", type=int, default=7,
                    help="runs of each read list in the reads part (0: skip it)")
    ap.add_argument("--skip-latency", action="store_true", help="no latency grid")
    ap.add_argument("--skip-caps", action="store_true", help="no memory caps")
    ap.add_argument("--quick", action="store_true",
                    help="1 GB/s, one target, 2 MB buffer, repeat 3, 10 s calibrations")
    ap.add_argument("--store", help="the MiniLM store to read (default build/shards/minilm-l6); "
                                    "a private copy, where others read the default one")
    ap.add_argument("--out-dir", help="default out/bench")
    a = ap.parse_args(argv)
    a.strategies = STRATEGIES
    if a.quick:
        a.bandwidths, a.fractions, a.buffers = [1000.0], [0.8], [2.0]
        a.repeat, a.calibration_budget_s, a.read_runs = 3, 10.0, min(a.read_runs, 3)
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
    if a.read_runs > 0:
        reads = reads_part(a, store)
        write_csv(out_path("kernel_limits_reads.csv", a.out_dir), reads, READ_COLUMNS)
        print()
    if not a.skip_latency:
        rows = latency_part(a, store, reference, queries)
        if rows:
            stats = summary(rows)
            print()
            print(f"{'MB/s':>5} {'stage':<10} {'median / p95 |error|: emulated':>31} "
                  f"{'throttled':>15} {'thr-fit':>15} {'thr-steps':>15} "
                  f"{'diff thr/fit/steps':>20} {'<=3 %: emu/thr/fit/steps':>24}")
            for s in stats:
                g = s["bandwidth"] if s["bandwidth"] == "all" else f"{s['bandwidth']:g}"
                cell = lambda m: (f"{s[f'{m}_median_abs']:.1%} / {s[f'{m}_p95_abs']:.1%}"  # noqa: E731
                                  if s[f"{m}_plans"] else "-")
                pct = lambda v: "-" if v is None else f"{v:+.1%}"  # noqa: E731
                diff = "/".join(pct(s[k]) for k in ("median_difference", "median_difference_fit",
                                                    "median_difference_steps"))
                within = "/".join(str(s[f"{m}_within_3pct"]) for m in MODES)
                print(f"{g:>5} {s['stage']:<10} {cell('emulated'):>31} {cell('throttled'):>15} "
                      f"{cell('thr-fit'):>15} {cell('thr-steps'):>15} {diff:>20} {within:>24}")
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
