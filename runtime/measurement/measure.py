"""Measured vs predicted: run a plan N times through the executor and report it.

The queries are held-out test tweets (runtime/sources/task.py), one per run, each tokenised and
padded to the profile's seq_len: the shape the plan's compute costs were profiled for.
Every run is preceded by one discarded warm-up. The report (runtime.measurement.report.RunReport) is
typed data with a JSON form:
the prediction, every measured run, the median, the relative error, how the storage was
emulated and how cold the reads were, the preload buffer, the output's fidelity to the
fp32 model and the task head's agreement, and per layer the predicted and measured IO
and compute intervals (of the median run).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import torch

from elasticplan.costmodel import Schedule, simulate, under_throttle
from elasticplan.errors import StoreError
from elasticplan.plans.plan import Plan
from elasticplan.problem.spec import Scenario
from runtime.executor import Executor, RunTrace
from runtime.families.encoder import Batch, cosine
from runtime.measurement.report import STAGES, ColdReads, LayerReport, MemoryReport, RunReport, StageTimes
from runtime.sources.task import TaskHead
from runtime.store import ShardStore

DEFAULT_TOLERANCE = 0.10


def query_batches(store: ShardStore, seq_len: int, n: int) -> list[Batch]:
    """n single-text queries from the test split, padded (or truncated) to seq_len tokens."""
    from runtime.sources.task import load_splits

    texts = list(load_splits().test.texts[:n])
    tok = store.tokenizer(seq_len)
    return [tok([t], pad_to=seq_len) for t in texts]


class Spacing:
    """Measured runs at least `gap_s` apart (`run --throttle` and `calibrate --throttle`:
    runtime.cgroups.THROTTLE_GAP_S, so that every query meets the throttle's allowance
    afresh): `run(fn)` waits until `gap_s` after the last run ended, then runs fn;
    `mark()` notes a run made outside it (a warm-up). 0: no waiting."""

    def __init__(self, gap_s: float = 0.0):
        self.gap_s, self.ended = gap_s, -math.inf

    def mark(self) -> None:
        self.ended = time.monotonic()

    def run(self, fn: Callable[[], Any]) -> Any:
        if self.gap_s > 0:
            time.sleep(max(0.0, self.ended + self.gap_s - time.monotonic()))
        try:
            return fn()
        finally:
            self.mark()


def query_schedules(plan: Plan, scenario: Scenario, rows) -> dict[int, Schedule]:
    """The plan's schedule for a query that read n rows of its streamed embedding table,
    for each n in `rows` (the cost model at query_tokens = n): what a query is predicted
    to take, where the plan's own figure is priced at its question's query_tokens."""
    selection = plan.selection(scenario)
    return {n: simulate(scenario.with_overrides(query_tokens=n), selection, plan.execution,
                        plan.layout) for n in set(rows)}


def distinct_tokens(store: ShardStore, texts: list[str], seq_len: int) -> list[int]:
    """Each text's distinct tokens at seq_len (cut and padded as a query is): the rows a
    streamed embedding table reads for it, what a question's query_tokens bounds."""
    tok = store.tokenizer(seq_len)
    return [len(set(tok([t], pad_to=seq_len).ids[0].tolist())) for t in texts]


class Reference:
    """The fp32 model from the store: what fidelity is measured against."""

    def __init__(self, store: ShardStore):
        names = store.config.shard_names()
        self.encoder = store.encoder()
        self.layers = [store.layer_weights(l, {n: 32 for n in names})
                       for l in range(store.config.layers)]

    @torch.inference_mode()
    def embed(self, batch: Batch) -> torch.Tensor:
        return self.encoder.forward(batch.ids, batch.mask, self.layers)


def memprobe_argv(plan: Plan, path: str, store: ShardStore, repeats: int,
                  threads: int) -> list[str]:
    """The command of runtime.measurement.memprobe for `plan`, saved at `path`."""
    return [sys.executable, "-m", "runtime.measurement.memprobe", path, "--store",
            str(store.path), "--scenario", os.path.abspath(plan.scenario.path), "--repeat",
            str(repeats), "--threads", str(threads)]


def process_peak(plan: Plan, store: ShardStore, repeats: int, threads: int) -> int | None:
    """The plan's process-level peak above a baseline, from runtime.measurement.memprobe in a fresh
    process (None when the plan names no scenario file to reload there)."""
    if plan.scenario.path is None:
        return None
    with tempfile.TemporaryDirectory(prefix="elasticplan-memprobe-") as tmp:
        path = os.path.join(tmp, "plan.json")
        plan.save(path)
        out = subprocess.run(memprobe_argv(plan, path, store, repeats, threads),
                             capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"runtime.measurement.memprobe failed: {out.stderr.strip()[-2000:]}")
    return int(json.loads(out.stdout)["peak_above_baseline_bytes"])


PROCESS_METHOD = ("runtime.measurement.memprobe: VmHWM minus VmRSS of a fresh process, the baseline taken "
                  "after imports, the queries and one throwaway run of the plan (warm kernels), "
                  "then gc + malloc_trim; the peak reset via /proc/self/clear_refs; the process "
                  "set up as a memory-tight deployment: glibc's mmap threshold held at 128 KiB, "
                  "lean reads (no read-ahead, each read's pages dropped once it completes)")


def measure_plan(plan: Plan, scenario: Scenario, store: ShardStore, *, repeats: int,
                 emulate: bool, queries: list[Batch], reference: Reference,
                 head: TaskHead | None, tolerance: float = DEFAULT_TOLERANCE,
                 plan_path: str | None = None) -> RunReport:
    """One plan's runs and report (measure_plans with one plan)."""
    return measure_plans([(plan, scenario, plan_path)], store, repeats=repeats,
                         emulate=emulate, queries=queries, reference=reference, head=head,
                         tolerance=tolerance)[0]


def measure_plans(items: list[tuple[Plan, Scenario, str | None]], store: ShardStore, *,
                  repeats: int, emulate: bool, queries: list[Batch], reference: Reference,
                  head: TaskHead | None, tolerance: float = DEFAULT_TOLERANCE,
                  probe: Callable[[Plan], int | None] | None = None,
                  disk: Callable[[], object] | None = None,
                  disk_runs: list[list] | None = None, gap_s: float = 0.0,
                  throttled: bool = False) -> list[RunReport]:
    """Run several plans side by side and report each: every executor is set up (preload
    filled, one discarded warm-up run) before any is measured, then the measured runs are
    interleaved, one query per plan per round, so that the plans share the machine's
    moods (this VM's speed moves by 10-20 % within seconds) instead of each meeting its
    own. (plan, its question, the plan's file or None) per item. `probe(plan)`: the
    process's peak above its baseline, when measured already (`run --memory-cap`: in its
    capped process); else process_peak measures it. `disk()` (`run --throttle`: the
    block-IO cgroup's counters): read-ahead is turned off on every executor's files (each
    read fetches its own pages, no more) and `disk_runs[k]` gets plan k's counts per
    measured run (disk() after - before). `gap_s`: each measured run starts at least this
    long after the run before it ended (`run --throttle`: THROTTLE_GAP_S, so that every
    query meets the throttle's allowance afresh, as one after an idle spell does).
    `throttled`: a plan whose device gives the disk beneath the throttle (device.disk) is
    predicted as the throttle runs it (elasticplan.costmodel.under_throttle: the disk's
    terms, the throttle's steps, a streamed table's rows from the page cache)."""
    executors, fills = [], []
    try:
        for plan, scenario, _ in items:
            ex = Executor(plan, scenario, store, emulate=emulate)
            executors.append(ex)
            if disk is not None:  # read-ahead off: each read fetches its own pages, no more
                for fd in ex.fds.values():
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            fills.append(ex.fill_preload())
            ex.run(queries[0])  # warm-up: first-call costs of torch and the kernels, discarded
        traces: list[list[RunTrace]] = [[] for _ in items]
        spacing = Spacing(gap_s)
        spacing.mark()  # the warm-ups
        for i in range(repeats):
            for k, ex in enumerate(executors):
                before = disk() if disk is not None else None
                traces[k].append(spacing.run(lambda: ex.run(queries[i % len(queries)])))
                if disk is not None and disk_runs is not None:
                    disk_runs[k].append(disk() - before)
    finally:
        for ex in executors:
            ex.close()
    return [_report(plan, scenario, store, ex, fill, runs, repeats=repeats, queries=queries,
                    reference=reference, head=head, tolerance=tolerance, plan_path=path,
                    probe=probe, throttled=throttled)
            for (plan, scenario, path), ex, fill, runs in zip(items, executors, fills, traces)]


def _report(plan: Plan, scenario: Scenario, store: ShardStore, ex: Executor, fill,
            traces: list[RunTrace], *, repeats: int, queries: list[Batch],
            reference: Reference, head: TaskHead | None, tolerance: float,
            plan_path: str | None, probe: Callable[[Plan], int | None] | None = None,
            throttled: bool = False) -> RunReport:
    emulated = ex.clock.emulated
    memory, predicted = ex.memory, ex.predicted_memory
    measured = memory.peak_bytes
    proc = probe(plan) if probe is not None else \
        process_peak(plan, store, repeats, torch.get_num_threads())
    runs = [t.latency_ms for t in traces]
    median = round(statistics.median(runs), 4)  # as reported: the error is computed from it
    mid = min(range(len(traces)), key=lambda i: abs(runs[i] - median))
    trace = traces[mid]
    fidelities, agree, labels = [], 0, []
    for i, t in enumerate(traces):
        ref = reference.embed(queries[i % len(queries)])
        if not (bool(torch.isfinite(t.embedding).all()) and bool(torch.isfinite(ref).all())):
            # never reported as a fidelity, nor as the task head's agreement (the store's
            # values are checked on load; this is what would follow if they were not)
            raise StoreError(f"{store.path}: the plan's output (or the fp32 model's) is not "
                             f"finite: the store's weights overflow fp32; rebuild the store "
                             f"from a sound checkpoint")
        fidelities.append(float(cosine(ref, t.embedding)))
        if head is not None:
            mine, full = int(head.predict(t.embedding)[0]), int(head.predict(ref)[0])
            agree += mine == full
            labels.append((mine, full))
    device = scenario.device
    predicted_ms, stages, rows = plan.predicted_latency_ms, plan.layers, ()
    if plan.embeddings == "streamed":
        rows = tuple(t.embedding_rows for t in traces)
    if throttled and device.disk is not None:  # as the kernel's throttle runs it
        sc, steps = under_throttle(scenario)
        at = simulate(sc, plan.selection(sc), plan.execution, plan.layout, steps=steps,
                      rows_cached=True)
        predicted_ms, stages = round(at.latency_ms, 4), at.layers
    elif rows:  # each query priced at the rows it read
        at = query_schedules(plan, scenario, rows)
        predicted_ms = round(statistics.median(at[n].latency_ms for n in rows), 4)
        stages = at[trace.embedding_rows].layers
    error = (median - predicted_ms) / predicted_ms if predicted_ms > 0 else float("inf")
    layers = tuple(
        LayerReport(index=lp.index, shards=len(lp.shards),
                    preloaded=sum(c.preloaded for c in lp.shards), reads=lt.reads,
                    read_bytes=lt.read_bytes,
                    predicted=StageTimes(**{k: getattr(sp, k) for k in STAGES}),
                    measured=StageTimes(**{k: round(getattr(lt, k), 4) for k in STAGES}),
                    decode_ms=round(lt.decode_ms, 4))
        for lp, sp, lt in zip(plan.layers, stages, trace.layers))
    return RunReport(
        plan=plan_path, solver=plan.solver, status=plan.status.value,
        execution=plan.execution, scenario=plan.scenario.name, device=device.name,
        predicted_latency_ms=predicted_ms, planned_latency_ms=plan.predicted_latency_ms,
        embedding_rows=rows, planned_rows=scenario.model.query_row_reads if rows else 0,
        median_run_rows=trace.embedding_rows if rows else 0,
        measured_latency_ms=median,
        measured_runs_ms=tuple(round(r, 4) for r in runs),
        relative_error=error, tolerance=tolerance,
        within_tolerance=abs(error) <= tolerance,
        emulated_bandwidth_mb_s=device.bandwidth_mb_s if emulated else None,
        emulated_latency_us=device.latency_us if emulated else None,
        storage=(f"emulated {device.bandwidth_mb_s:g} MB/s + {device.latency_us:g} us per "
                 f"read (device clock on real cold reads)" if emulated
                 else "this machine's disk, real cold reads, not emulated"),
        cold_reads=ColdReads(
            method="fsync'ed shard files, posix_fadvise(DONTNEED) before each run, checked "
                   "with mincore",
            cached_pages_before_max=max(t.cached_pages_before for t in traces),
            streamed_pages=trace.streamed_pages),
        reads_per_run=trace.reads, streamed_bytes=plan.streamed_bytes,
        preload_bytes=plan.preload_bytes, preload_resident_bytes=fill.resident_bytes,
        preload_fill_ms=round(fill.fill_ms, 4), preload_shards=fill.shards,
        memory=MemoryReport(
            window=plan.window, embeddings=plan.embeddings, predicted=predicted.to_dict(),
            predicted_peak_bytes=predicted.peak_bytes, measured_peak_bytes=measured,
            relative_error=(measured - predicted.peak_bytes) / predicted.peak_bytes,
            resident_bytes=memory.resident_bytes, preload_bytes=memory.preload_bytes,
            ring_bytes=memory.ring_bytes, ring_high_water_bytes=memory.ring_high_water_bytes,
            scratch_bytes=memory.scratch_bytes, query_rows_bytes=memory.query_rows_bytes,
            workspace_bytes=memory.workspace_bytes,
            measured_process_peak_bytes=proc,
            process_relative_error=None if proc is None else
            (proc - predicted.peak_bytes) / predicted.peak_bytes,
            method="the executor's exact accounting of what it holds: resident tensors, "
                   "preload buffer, the IO ring's high-water mark over every measured run "
                   "(a layer's bytes in use from its first read to the end of its compute), "
                   "the compute scratch, the query's embedding rows, and the activation "
                   "and dequantisation workspaces and bounce buffer",
            process_method=None if proc is None else PROCESS_METHOD),
        fidelity=statistics.fmean(fidelities), fidelity_min=min(fidelities),
        task_agreement=agree / len(traces) if head is not None else None,
        task_labels=tuple(labels),
        threads=torch.get_num_threads(), seq_len=scenario.model.seq_len,
        repeats=repeats, warmup_runs=1,
        embed_ms=tuple(round(v, 4) for v in trace.embed_ms),
        pool_ms=tuple(round(v, 4) for v in trace.pool_ms),
        layers=layers)
