"""Measured vs predicted: run a plan N times through the executor and report it.

The queries are held-out test tweets (runtime/task.py), one per run, each tokenised and
padded to the profile's seq_len: the shape the plan's compute costs were profiled for.
Every run is preceded by one discarded warm-up. The report is plain data (JSON-ready):
the prediction, every measured run, the median, the relative error, how the storage was
emulated and how cold the reads were, the preload buffer, the output's fidelity to the
fp32 model and the task head's agreement, and per layer the predicted and measured IO
and compute intervals (of the median run).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from elasticplan.plan import Plan
from elasticplan.spec import Scenario
from runtime.executor import Executor, RunTrace
from runtime.model import Batch
from runtime.store import ShardStore
from runtime.task import TaskHead

DEFAULT_TOLERANCE = 0.10
STAGES = ("io_start_ms", "io_end_ms", "compute_start_ms", "compute_end_ms")


def query_batches(store: ShardStore, seq_len: int, n: int) -> list[Batch]:
    """n single-text queries from the test split, padded (or truncated) to seq_len tokens."""
    from runtime.task import load_splits

    texts = list(load_splits().test.texts[:n])
    tok = store.tokenizer(seq_len)
    return [tok([t], pad_to=seq_len) for t in texts]


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


def peak_live_bytes(layers: list, working_bytes: list[int]) -> int:
    """The most working-buffer bytes a pipeline needs at once on a run's timeline: layer l's
    buffers are live from its first read (from its compute, if it reads nothing) to the
    end of its compute. `layers` are LayerTrace-like (io/compute start and end, reads)."""
    events = []
    for lt, nbytes in zip(layers, working_bytes):
        start = lt.io_start_ms if lt.reads else lt.compute_start_ms
        events += [(start, 1, nbytes), (lt.compute_end_ms, 0, -nbytes)]  # frees sort first
    live = peak = 0
    for _, _, delta in sorted(events):
        live += delta
        peak = max(peak, live)
    return peak


def measure_plan(plan: Plan, scenario: Scenario, store: ShardStore, *, repeats: int,
                 emulate: bool, queries: list[Batch], reference: Reference,
                 head: TaskHead | None, tolerance: float = DEFAULT_TOLERANCE,
                 plan_path: str | None = None) -> dict:
    with Executor(plan, scenario, store, emulate=emulate) as ex:
        fill = ex.fill_preload()
        ex.run(queries[0])  # warm-up: first-call costs of torch and the kernels, discarded
        traces: list[RunTrace] = [ex.run(queries[i % len(queries)]) for i in range(repeats)]
        emulated = ex.clock.emulated
        memory = ex.memory
    runs = [t.latency_ms for t in traces]
    median = statistics.median(runs)
    mid = min(range(len(traces)), key=lambda i: abs(runs[i] - median))
    trace = traces[mid]
    fidelities, agree, labels = [], 0, []
    for i, t in enumerate(traces):
        ref = reference.embed(queries[i % len(queries)])
        fidelities.append(float((ref * t.embedding).sum()))
        if head is not None:
            mine, full = int(head.predict(t.embedding)[0]), int(head.predict(ref)[0])
            agree += mine == full
            labels.append((mine, full))
    device = scenario.device
    error = (median - plan.predicted_latency_ms) / plan.predicted_latency_ms \
        if plan.predicted_latency_ms > 0 else float("inf")
    layers = []
    for lp, lt in zip(plan.layers, trace.layers):
        layers.append({"index": lp.index, "shards": len(lp.shards),
                       "preloaded": sum(c.preloaded for c in lp.shards), "reads": lt.reads,
                       "read_bytes": lt.read_bytes,
                       "predicted": {k: getattr(lp, k) for k in STAGES},
                       "measured": {k: round(getattr(lt, k), 4) for k in STAGES},
                       "decode_ms": round(lt.decode_ms, 4)})
    return {
        "plan": plan_path, "solver": plan.solver, "status": plan.status.value,
        "execution": plan.execution, "scenario": plan.scenario.name, "device": device.name,
        "predicted_latency_ms": plan.predicted_latency_ms,
        "measured_latency_ms": round(median, 4),
        "measured_runs_ms": [round(r, 4) for r in runs],
        "relative_error": error, "tolerance": tolerance,
        "within_tolerance": abs(error) <= tolerance,
        "emulated_bandwidth_mb_s": device.bandwidth_mb_s if emulated else None,
        "emulated_latency_us": device.latency_us if emulated else None,
        "storage": (f"emulated {device.bandwidth_mb_s:g} MB/s + {device.latency_us:g} us per "
                    f"read (device clock on real cold reads)" if emulated
                    else "this machine's disk, real cold reads, not emulated"),
        "cold_reads": {"method": "fsync'ed shard files, posix_fadvise(DONTNEED) before each run, "
                                 "checked with mincore",
                       "cached_pages_before_max": max(t.cached_pages_before for t in traces),
                       "streamed_pages": trace.streamed_pages},
        "reads_per_run": trace.reads, "streamed_bytes": plan.streamed_bytes,
        "preload_bytes": plan.preload_bytes, "preload_resident_bytes": fill.resident_bytes,
        "preload_fill_ms": round(fill.fill_ms, 4), "preload_shards": fill.shards,
        "memory": {"resident_model_bytes": memory.resident_model_bytes,
                   "preload_bytes": memory.preload_bytes,
                   "working_allocated_bytes": sum(memory.working_bytes),
                   "working_peak_live_bytes": max(peak_live_bytes(t.layers, memory.working_bytes)
                                                  for t in traces),
                   "method": "the executor's own accounting of its weight buffers; working "
                             "buffers of a layer live from its first read to the end of its "
                             "compute, peak over every measured run's timeline"},
        "fidelity": statistics.fmean(fidelities), "fidelity_min": min(fidelities),
        "task_agreement": agree / len(traces) if head is not None else None,
        "task_labels": labels,
        "threads": torch.get_num_threads(), "seq_len": scenario.model.seq_len,
        "repeats": repeats, "warmup_runs": 1,
        "embed_ms": [round(v, 4) for v in trace.embed_ms],
        "pool_ms": [round(v, 4) for v in trace.pool_ms],
        "layers": layers,
    }


def format_report(r: dict) -> str:
    out = [f"{r['plan'] or 'plan'} ({r['solver']}, {r['execution']}) on {r['device']}: storage "
           f"{r['storage']}; compute real (torch threads {r['threads']}, seq_len "
           f"{r['seq_len']}, batch 1)",
           f"cold reads: {r['cold_reads']['cached_pages_before_max']} of "
           f"{r['cold_reads']['streamed_pages']} streamed pages cached before a run (mincore); "
           f"{r['reads_per_run']} reads, {r['streamed_bytes'] / 1e6:.3f} MB per run",
           f"preload: {r['preload_shards']} shards, {r['preload_bytes'] / 1e6:.3f} MB, filled in "
           f"{r['preload_fill_ms']:.1f} ms before the query; resident "
           f"{r['preload_resident_bytes'] / 1e6:.3f} MB (measured)",
           f"memory: preload {r['memory']['preload_bytes'] / 1e6:.3f} MB + working buffers "
           f"{r['memory']['working_peak_live_bytes'] / 1e6:.3f} MB live at peak (of "
           f"{r['memory']['working_allocated_bytes'] / 1e6:.3f} MB allocated), beside "
           f"{r['memory']['resident_model_bytes'] / 1e6:.3f} MB of always-resident weights",
           "",
           f"{'layer':>5} {'shards':>6} {'reads':>5} | {'IO predicted':>15} {'IO measured':>15} "
           f"| {'compute predicted':>17} {'compute measured':>17} {'end err':>8}"]
    for lay in r["layers"]:
        p, m = lay["predicted"], lay["measured"]
        err = m["compute_end_ms"] - p["compute_end_ms"]
        out.append(f"{lay['index']:>5} {lay['shards']:>6} {lay['reads']:>5} | "
                   f"{p['io_start_ms']:>6.2f} - {p['io_end_ms']:>6.2f} "
                   f"{m['io_start_ms']:>6.2f} - {m['io_end_ms']:>6.2f} | "
                   f"{p['compute_start_ms']:>7.2f} - {p['compute_end_ms']:>7.2f} "
                   f"{m['compute_start_ms']:>7.2f} - {m['compute_end_ms']:>7.2f} {err:>+7.2f}")
    runs = r["measured_runs_ms"]
    verdict = "within" if r["within_tolerance"] else "OUTSIDE"
    out += ["",
            f"latency: predicted {r['predicted_latency_ms']:.2f} ms, measured "
            f"{r['measured_latency_ms']:.2f} ms (median of {len(runs)}: {min(runs):.2f} .. "
            f"{max(runs):.2f}), error {r['relative_error']:+.1%}: {verdict} "
            f"±{r['tolerance']:.0%}",
            f"output: fidelity {r['fidelity']:.4f} (cosine to fp32, mean of {len(runs)} queries, "
            f"min {r['fidelity_min']:.4f})"
            + (f"; task head agrees with fp32 on {r['task_agreement']:.0%} of queries"
               if r["task_agreement"] is not None else "")]
    return "\n".join(out)


def peak_bytes(r: dict) -> int:
    """A report's peak weight memory: the preload plus the working buffers live at peak."""
    return r["memory"]["preload_bytes"] + r["memory"]["working_peak_live_bytes"]


def format_comparison(reports: list[dict]) -> str:
    out = [f"{'strategy':<22} {'execution':<10} {'predicted ms':>12} {'measured ms':>11} "
           f"{'error':>7} {'preload MB':>10} {'streamed MB':>11} {'peak MB':>7} {'fidelity':>8}"]
    for r in reports:
        out.append(f"{r['solver']:<22} {r['execution']:<10} {r['predicted_latency_ms']:>12.2f} "
                   f"{r['measured_latency_ms']:>11.2f} {r['relative_error']:>+7.1%} "
                   f"{r['preload_bytes'] / 1e6:>10.3f} {r['streamed_bytes'] / 1e6:>11.3f} "
                   f"{peak_bytes(r) / 1e6:>7.2f} {r['fidelity']:>8.4f}")
    return "\n".join(out)


def gantt(reports: list[dict], path: str | Path) -> None:
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
            for lay in r["layers"]:
                t = lay[which]
                a, b = t[f"{stage}_start_ms"], t[f"{stage}_end_ms"]
                if b > a:
                    ax.barh(3 - y, b - a, left=a, height=0.7, color=cmap(lay["index"] % 10),
                            edgecolor="black", linewidth=0.4)
                    if b - a > 0.04 * r["measured_latency_ms"]:
                        ax.text((a + b) / 2, 3 - y, str(lay["index"]), ha="center",
                                va="center", fontsize=7)
        ax.set_yticks(range(4), [name for name, _, _ in reversed(rows)], fontsize=8)
        ax.axvline(r["predicted_latency_ms"], color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(f"{r['solver']} ({r['execution']}): predicted "
                     f"{r['predicted_latency_ms']:.1f} ms, measured "
                     f"{r['measured_latency_ms']:.1f} ms ({r['relative_error']:+.1%}), "
                     f"{r['storage']}", fontsize=8)
    axes[-1, 0].set_xlabel("ms since the query arrived (bars numbered by layer)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
