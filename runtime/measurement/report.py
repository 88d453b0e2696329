"""A run report: typed, frozen, with a JSON form (`to_dict`), read by attribute by the CLI,
the formatters, the Gantt plot and the benchmarks. `runtime.measurement.measure.measure_plan` makes
one per plan run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from elasticplan.problem.outputs import save_figure

STAGES = ("io_start_ms", "io_end_ms", "compute_start_ms", "compute_end_ms")


@dataclass(frozen=True)
class StageTimes:
    """One layer's IO and compute interval, ms since the query arrived."""

    io_start_ms: float
    io_end_ms: float
    compute_start_ms: float
    compute_end_ms: float


@dataclass(frozen=True)
class LayerReport:
    index: int
    shards: int
    preloaded: int
    reads: int
    read_bytes: int
    predicted: StageTimes
    measured: StageTimes  # of the median run
    decode_ms: float  # dequantisation inside the measured compute


@dataclass(frozen=True)
class ColdReads:
    method: str
    cached_pages_before_max: int  # most streamed pages found in the page cache before a run
    streamed_pages: int


@dataclass(frozen=True)
class MemoryReport:
    """Predicted against measured peak memory (bytes); `method` and `process_method` say
    how each measured figure was taken."""

    window: int | None  # the plan's prefetch window (None: unbounded)
    embeddings: str  # resident or streamed
    predicted: dict  # the cost model's terms (elasticplan.costmodel.Memory.to_dict)
    predicted_peak_bytes: int
    measured_peak_bytes: int  # the executor's exact accounting (every buffer it holds)
    relative_error: float  # (measured - predicted) / predicted, of the two above
    resident_bytes: int
    preload_bytes: int
    ring_bytes: int
    ring_high_water_bytes: int
    scratch_bytes: int
    query_rows_bytes: int
    workspace_bytes: int  # activation and dequantisation workspaces, bounce buffer
    measured_process_peak_bytes: int | None  # VmHWM above a baseline, in a fresh process
    process_relative_error: float | None
    method: str
    process_method: str | None


@dataclass(frozen=True)
class RunReport:
    plan: str | None  # the plan file, if run from one
    solver: str
    status: str
    execution: str
    scenario: str
    device: str
    # For the queries run: the plan's prediction, or, when the plan streams the embedding
    # table, the median of each run's prediction at the rows its query read
    # (embedding_rows); the plan's own, priced at its question's query_tokens, is
    # planned_latency_ms.
    predicted_latency_ms: float
    measured_latency_ms: float  # median of the measured runs
    measured_runs_ms: tuple[float, ...]
    relative_error: float  # (measured - predicted) / predicted
    tolerance: float
    within_tolerance: bool
    emulated_bandwidth_mb_s: float | None
    emulated_latency_us: float | None
    storage: str
    cold_reads: ColdReads
    reads_per_run: int
    streamed_bytes: int
    preload_bytes: int
    preload_resident_bytes: int
    preload_fill_ms: float
    preload_shards: int
    memory: MemoryReport
    fidelity: float  # mean cosine to the fp32 model's embedding
    fidelity_min: float
    task_agreement: float | None  # share of queries where the task head agrees with fp32
    task_labels: tuple[tuple[int, int], ...]  # (this plan's label, fp32's label) per query
    threads: int
    seq_len: int
    repeats: int
    warmup_runs: int
    embed_ms: tuple[float, ...]
    pool_ms: tuple[float, ...]
    layers: tuple[LayerReport, ...]
    planned_latency_ms: float = 0.0  # the plan's predicted latency (at its query_tokens)
    embedding_rows: tuple[int, ...] = ()  # rows read per measured run (streamed table)
    planned_rows: int = 0  # the rows the plan is priced for (streamed table)
    median_run_rows: int = 0  # rows read by the run whose stages `layers` shows

    def to_dict(self) -> dict:
        """The JSON form: every field, nested as in the dataclasses."""
        return dataclasses.asdict(self)


def format_report(r: RunReport) -> str:
    mem = r.memory
    out = [f"{r.plan or 'plan'} ({r.solver}, {r.execution}) on {r.device}: storage "
           f"{r.storage}; compute real (torch threads {r.threads}, seq_len {r.seq_len}, "
           f"batch 1)",
           f"cold reads: {r.cold_reads.cached_pages_before_max} of "
           f"{r.cold_reads.streamed_pages} streamed pages cached before a run (mincore); "
           f"{r.reads_per_run} reads, {r.streamed_bytes / 1e6:.3f} MB per run",
           f"preload: {r.preload_shards} shards, {r.preload_bytes / 1e6:.3f} MB, filled in "
           f"{r.preload_fill_ms:.1f} ms before the query; resident "
           f"{r.preload_resident_bytes / 1e6:.3f} MB (measured)",
           f"memory (window {'unbounded' if mem.window is None else mem.window}, embeddings "
           f"{mem.embeddings}): predicted peak {mem.predicted_peak_bytes / 1e6:.3f} MB, "
           f"measured {mem.measured_peak_bytes / 1e6:.3f} MB ({mem.relative_error:+.2%}; "
           f"resident {mem.resident_bytes / 1e6:.3f} + preload {mem.preload_bytes / 1e6:.3f} "
           f"+ ring {mem.ring_high_water_bytes / 1e6:.3f} of {mem.ring_bytes / 1e6:.3f} "
           f"+ scratch {mem.scratch_bytes / 1e6:.3f} + rows {mem.query_rows_bytes / 1e6:.3f} "
           f"+ workspaces {mem.workspace_bytes / 1e6:.3f})" + (
               "" if mem.measured_process_peak_bytes is None else
               f"; process {mem.measured_process_peak_bytes / 1e6:.3f} MB "
               f"({mem.process_relative_error:+.2%})"),
           "",
           f"{'layer':>5} {'shards':>6} {'reads':>5} | {'IO predicted':>15} {'IO measured':>15} "
           f"| {'compute predicted':>17} {'compute measured':>17} {'end err':>8}"]
    for lay in r.layers:
        p, m = lay.predicted, lay.measured
        err = m.compute_end_ms - p.compute_end_ms
        out.append(f"{lay.index:>5} {lay.shards:>6} {lay.reads:>5} | "
                   f"{p.io_start_ms:>6.2f} - {p.io_end_ms:>6.2f} "
                   f"{m.io_start_ms:>6.2f} - {m.io_end_ms:>6.2f} | "
                   f"{p.compute_start_ms:>7.2f} - {p.compute_end_ms:>7.2f} "
                   f"{m.compute_start_ms:>7.2f} - {m.compute_end_ms:>7.2f} {err:>+7.2f}")
    runs = r.measured_runs_ms
    verdict = "within" if r.within_tolerance else "OUTSIDE"
    out += ["",
            f"latency: predicted {r.predicted_latency_ms:.2f} ms, measured "
            f"{r.measured_latency_ms:.2f} ms (median of {len(runs)}: {min(runs):.2f} .. "
            f"{max(runs):.2f}), error {r.relative_error:+.1%}: {verdict} ±{r.tolerance:.0%}"
            + (f"; the queries read {min(r.embedding_rows)}..{max(r.embedding_rows)} embedding "
               f"rows (one per distinct token), predicted at each; the plan, priced at "
               f"{r.planned_rows} rows: {r.planned_latency_ms:.2f} ms"
               if r.embedding_rows else ""),
            f"output: fidelity {r.fidelity:.4f} (cosine to fp32, mean of {len(runs)} queries, "
            f"min {r.fidelity_min:.4f})"
            + (f"; task head agrees with fp32 on {r.task_agreement:.0%} of queries"
               if r.task_agreement is not None else "")]
    return "\n".join(out)


def optional_mb(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 1e6:.2f}"


def format_comparison(reports: list[RunReport]) -> str:
    out = [f"{'strategy':<22} {'execution':<10} {'predicted ms':>12} {'measured ms':>11} "
           f"{'error':>7} {'preload MB':>10} {'streamed MB':>11} {'peak MB pred':>12} "
           f"{'meas':>7} {'process':>7} {'fidelity':>8}"]
    for r in reports:
        out.append(f"{r.solver:<22} {r.execution:<10} {r.predicted_latency_ms:>12.2f} "
                   f"{r.measured_latency_ms:>11.2f} {r.relative_error:>+7.1%} "
                   f"{r.preload_bytes / 1e6:>10.3f} {r.streamed_bytes / 1e6:>11.3f} "
                   f"{r.memory.predicted_peak_bytes / 1e6:>12.2f} "
                   f"{r.memory.measured_peak_bytes / 1e6:>7.2f} "
                   f"{optional_mb(r.memory.measured_process_peak_bytes):>7} {r.fidelity:>8.4f}")
    return "\n".join(out)


def gantt(reports: list[RunReport], path: str | Path, *, inputs=()) -> None:
    """Predicted and measured pipelines one above the other, per report (IO and compute rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(reports), 1, figsize=(11, 2.2 * len(reports) + 0.6),
                             squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, r in zip(axes[:, 0], reports):
        rows = [("predicted IO", "predicted", "io"), ("predicted compute", "predicted", "compute"),
                ("measured IO", "measured", "io"), ("measured compute", "measured", "compute")]
        for y, (_, which, stage) in enumerate(rows):
            for lay in r.layers:
                t = getattr(lay, which)
                a, b = getattr(t, f"{stage}_start_ms"), getattr(t, f"{stage}_end_ms")
                if b > a:
                    ax.barh(3 - y, b - a, left=a, height=0.7, color=cmap(lay.index % 10),
                            edgecolor="black", linewidth=0.4)
                    if b - a > 0.04 * r.measured_latency_ms:
                        ax.text((a + b) / 2, 3 - y, str(lay.index), ha="center",
                                va="center", fontsize=7)
        ax.set_yticks(range(4), [name for name, _, _ in reversed(rows)], fontsize=8)
        ax.axvline(r.predicted_latency_ms, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(f"{r.solver} ({r.execution}): predicted {r.predicted_latency_ms:.1f} ms, "
                     f"measured {r.measured_latency_ms:.1f} ms ({r.relative_error:+.1%}), "
                     f"{r.storage}", fontsize=8)
    axes[-1, 0].set_xlabel("ms since the query arrived (bars numbered by layer)")
    fig.tight_layout()
    try:
        save_figure(fig, path, inputs=inputs)
    finally:
        plt.close(fig)
