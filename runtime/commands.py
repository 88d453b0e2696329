"""The runtime's commands, registered with the `elasticplan` CLI through the entry-point
group `elasticplan.commands` (pyproject.toml): shard, profile, calibrate, run. The MiniLM
defaults live here, beside the code that uses them. Heavy imports (torch) happen inside
the handlers, so that the planner's commands start without them.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from elasticplan.baselines import baseline_questions
from elasticplan.cli import MAX_THREADS, positive, real, target_ms, whole
from elasticplan.errors import InvalidArgument, ToleranceError
from elasticplan.loader import load_scenario
from elasticplan.outputs import refuse_inputs, write_text
from elasticplan.plan import Plan
from elasticplan.spec import MAX_BANDWIDTH_MB_S, MAX_LATENCY_US, MIN_BANDWIDTH_MB_S
from elasticplan.verify import scenario_for, verify_plan

DEFAULT_STORE = "build/shards/minilm-l6"
DEFAULT_PROFILE = "problems/models/minilm-l6.yaml"
DEFAULT_CACHE = "build/profile/minilm-l6"
DEFAULT_HEAD = "problems/models/minilm-l6.taskhead.json"
DEFAULT_CALIBRATED = "build/calibrated"
DEFAULT_RUN_THREADS = 1
DEFAULT_BASE_SCENARIO = "problems/scenarios/minilm-phone.yaml"


def register(sub) -> None:
    """Add shard, profile, calibrate and run to the `elasticplan` sub-command parsers."""
    h = sub.add_parser("shard", help="build the MiniLM shard store (idempotent, resumable)")
    h.set_defaults(handler=cmd_shard)
    h.add_argument("--out", default=DEFAULT_STORE, help=f"store directory (default {DEFAULT_STORE})")
    h.add_argument("--force", action="store_true", help="rewrite every file")

    p = sub.add_parser("profile", help="measure shard importance on the real model and write "
                                       "the model profile (minutes; resumable)")
    p.set_defaults(handler=cmd_profile)
    p.add_argument("--store", default=DEFAULT_STORE, help=f"default {DEFAULT_STORE}")
    p.add_argument("--out", default=DEFAULT_PROFILE, help=f"profile YAML (default {DEFAULT_PROFILE})")
    p.add_argument("--cache", default=DEFAULT_CACHE, help=f"measurement cache (default {DEFAULT_CACHE})")
    p.add_argument("--head", default=DEFAULT_HEAD, help=f"task head JSON (default {DEFAULT_HEAD})")
    p.add_argument("--metric", choices=("fidelity", "logloss"), default="fidelity",
                   help="what importance measures (default fidelity: cosine to fp32)")

    c = sub.add_parser("calibrate", help="measure this machine's compute in the pipelined "
                                         "runtime; write a device spec and a scenario on it")
    c.set_defaults(handler=cmd_calibrate)
    c.add_argument("--store", default=DEFAULT_STORE, help=f"default {DEFAULT_STORE}")
    c.add_argument("--scenario", default=DEFAULT_BASE_SCENARIO,
                   help=f"whose model and question to pose on this machine "
                        f"(default {DEFAULT_BASE_SCENARIO})")
    c.add_argument("--storage-mb-s", type=real(MIN_BANDWIDTH_MB_S, MAX_BANDWIDTH_MB_S), metavar="X",
                   help="emulated storage bandwidth; omitted: measure this machine's disk")
    c.add_argument("--storage-latency-us", type=real(0, MAX_LATENCY_US), default=100.0, metavar="U",
                   help="emulated per-read latency (default 100)")
    c.add_argument("--target-ms", type=target_ms,
                   help="the scenario's target (default: every shard at 8 bits, streamed)")
    c.add_argument("--plans", type=whole(2, 1000), default=16,
                   help="calibration plans (default 16): one per stored bitwidth, "
                        "hold-in-memory, then others (at least bitwidths + 1)")
    c.add_argument("--repeats", type=whole(1, 100), default=3,
                   help="measured runs per plan (default 3)")
    c.add_argument("--threads", type=whole(1, MAX_THREADS), default=DEFAULT_RUN_THREADS,
                   help=f"torch threads (default {DEFAULT_RUN_THREADS}); use the same for run")
    c.add_argument("--out-dir", default=DEFAULT_CALIBRATED,
                   help=f"writes device.yaml and scenario.yaml here (default {DEFAULT_CALIBRATED})")

    e = sub.add_parser("evaluate", help="a plan's submodel on the held-out test split: "
                                        "fidelity and accuracy with their sampling errors")
    e.set_defaults(handler=cmd_evaluate)
    e.add_argument("plan")
    e.add_argument("--store", default=DEFAULT_STORE, help=f"default {DEFAULT_STORE}")
    e.add_argument("--head", default=DEFAULT_HEAD, help=f"task head (default {DEFAULT_HEAD})")
    e.add_argument("--json", metavar="FILE", help="write the evaluation as JSON")

    r = sub.add_parser("run", help="execute a plan on the real model; measured vs predicted")
    r.set_defaults(handler=cmd_run)
    r.add_argument("plan")
    r.add_argument("--scenario", help="scenario file (default: the path the plan records)")
    r.add_argument("--store", default=DEFAULT_STORE, help=f"default {DEFAULT_STORE}")
    r.add_argument("--head", default=DEFAULT_HEAD, help=f"task head (default {DEFAULT_HEAD})")
    r.add_argument("--repeat", type=whole(1, 1000), default=5, metavar="N",
                   help="measured runs, after one discarded warm-up (default 5)")
    r.add_argument("--tolerance", type=positive, default=0.10, metavar="F",
                   help="relative tolerance on the total latency (default 0.10)")
    r.add_argument("--enforce", action="store_true",
                   help="exit 10 when the median latency is outside the tolerance, or the "
                        "measured peak memory exceeds the plan's memory budget")
    r.add_argument("--no-emulate", action="store_true",
                   help="read at this machine's real disk speed instead of the device's")
    r.add_argument("--baselines", action="store_true",
                   help="also run hold-in-memory, load-then-execute and layer-wise pipelining "
                        "on the same device and model, in the same run")
    r.add_argument("--threads", type=whole(1, MAX_THREADS), default=DEFAULT_RUN_THREADS,
                   help=f"torch threads (default {DEFAULT_RUN_THREADS}, as calibrated)")
    r.add_argument("--json", metavar="FILE", help="write the report as JSON")
    r.add_argument("--gantt", metavar="PNG", help="draw predicted and measured pipelines")


def cmd_shard(a) -> int:
    from runtime.store import build_store

    t0 = time.monotonic()
    report = build_store(a.out, force=a.force, log=lambda s: print(s, file=sys.stderr))
    print(f"{report.path}: {len(report.written)} file(s) written, {len(report.kept)} kept "
          f"(checksums match), {report.total_bytes / 1e6:.1f} MB in all, "
          f"{time.monotonic() - t0:.1f} s")
    return 0


def cmd_profile(a) -> int:
    from runtime.profile import measurements_path, profile_model

    for out in (Path(a.out), measurements_path(Path(a.out))):  # before minutes of measuring
        refuse_inputs(out, (a.store, a.head))
    profile_model(a.store, a.out, cache_dir=a.cache, head_path=a.head, metric=a.metric)
    return 0


def _set_threads(n: int) -> None:
    import torch

    if n < 1:
        raise InvalidArgument(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)


def cmd_calibrate(a) -> int:
    from runtime.calibrate import calibrate, describe_compute, fit_report, write_calibration
    from runtime.measure import query_batches
    from runtime.store import ShardStore

    if a.repeats < 1:
        raise InvalidArgument("--repeats must be >= 1")
    _set_threads(a.threads)
    base = load_scenario(a.scenario)
    for name in ("device.yaml", "scenario.yaml"):  # before minutes of measuring
        refuse_inputs(Path(a.out_dir) / name, base.files)
    store = ShardStore(a.store)
    queries = query_batches(store, base.model.seq_len, a.repeats)
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    cal = calibrate(store, base, bandwidth_mb_s=a.storage_mb_s, latency_us=a.storage_latency_us,
                    plans=a.plans, repeats=a.repeats, queries=queries, log=log)
    device_path, scenario_path, target = write_calibration(Path(a.out_dir), base, cal, a.target_ms)
    print(f"compute: {describe_compute(cal.device)}")
    print(fit_report(cal))
    print(f"storage: {cal.facts['storage']}")
    print(f"wrote {device_path} and {scenario_path} (target {target:g} ms, buffer "
          f"{base.preload_budget_mb:g} MB)")
    return 0


def cmd_evaluate(a) -> int:
    """Rebuild the plan's submodel from the store (its shards at their bitwidths) and run
    it on every test text (runtime/submodel.py)."""
    from runtime.executor import check_model, planned_variants
    from runtime.store import ShardStore
    from runtime.submodel import TestSplit

    plan = Plan.load(a.plan)
    scenario = scenario_for(plan)
    if a.json:
        refuse_inputs(a.json, (a.plan, a.store, a.head, *scenario.files))
    verify_plan(scenario, plan)  # a stale or tampered plan stops here, before any compute
    store = ShardStore(a.store)
    check_model(plan, store)
    planned_variants(plan, scenario.model, store)  # in this store, the sizes the profile says
    ev = TestSplit(store, a.head).evaluate(plan)
    print(f"{a.plan} ({plan.solver}): {plan.n_shards} shards; on {ev.texts} test texts: "
          f"fidelity {ev.fidelity:.4f} +- {ev.fidelity_stderr:.4f} (mean cosine to fp32), "
          f"accuracy {ev.accuracy:.3f} +- {ev.accuracy_stderr:.3f} (fp32 "
          f"{ev.fp32_accuracy:.3f}); +- one standard error")
    if a.json:
        data = {"plan": a.plan, "solver": plan.solver, "shards": plan.n_shards,
                **ev.to_dict()}
        write_text(a.json, json.dumps(data, indent=1) + "\n",
                   inputs=(a.plan, a.store, a.head, *scenario.files))
        print(f"evaluation written to {a.json}")
    return 0


def cmd_run(a) -> int:
    from runtime.executor import check_model
    from runtime.measure import Reference, measure_plan, query_batches
    from runtime.report import format_comparison, format_report, gantt
    from runtime.store import ShardStore
    from runtime.task import TaskHead

    if a.repeat < 1:
        raise InvalidArgument(f"--repeat must be >= 1, got {a.repeat}")
    plan = Plan.load(a.plan)
    scenario = scenario_for(plan, a.scenario)
    inputs = (a.plan, a.store, a.head, *scenario.files)
    for out in (a.json, a.gantt):
        if out:
            refuse_inputs(out, inputs)
    verify_plan(scenario, plan)  # stale or invalid plans stop here, before any compute
    store = ShardStore(a.store)
    check_model(plan, store)
    _set_threads(a.threads)
    head = TaskHead.load(a.head)
    queries = query_batches(store, scenario.model.seq_len, a.repeat)
    reference = Reference(store)
    common = dict(repeats=a.repeat, emulate=not a.no_emulate, queries=queries,
                  reference=reference, head=head, tolerance=a.tolerance)
    report = measure_plan(plan, scenario, store, plan_path=a.plan, **common)
    print(format_report(report))
    reports = [report]
    if a.baselines:
        skipped = lambda strategy, e: print(f"{strategy}: not run: {e}")  # noqa: E731
        for b, question in baseline_questions(scenario, skipped):
            reports.append(measure_plan(b, question, store, **common))
        print()
        print(format_comparison(reports))
    if a.json:
        data = report.to_dict()
        if a.baselines:
            data["baselines"] = [r.to_dict() for r in reports[1:]]
        write_text(a.json, json.dumps(data, indent=1) + "\n", inputs=inputs)
        print(f"report written to {a.json}")
    if a.gantt:
        gantt(reports, a.gantt, inputs=inputs)
        print(f"pipelines drawn to {a.gantt}")
    budget = scenario.memory_budget_bytes
    if a.enforce and budget is not None and report.memory.measured_peak_bytes > budget:
        raise ToleranceError(f"measured peak memory {report.memory.measured_peak_bytes / 1e6:.3f}"
                             f" MB exceeds the plan's memory budget {budget / 1e6:g} MB")
    q = scenario.latency_quantile
    if q > 0.5:
        # The plan was made for this quantile of the latency: the runs' quantile must meet
        # the target (numpy's linear interpolation between the order statistics).
        measured_q = float(np.quantile(report.measured_runs_ms, q))
        verdict = "meets" if measured_q <= scenario.target_latency_ms else "MISSES"
        print(f"latency at quantile {q:g}: planned {plan.quantile_latency_ms:.2f} ms, measured "
              f"{measured_q:.2f} ms over {len(report.measured_runs_ms)} runs: {verdict} the "
              f"target {scenario.target_latency_ms:g} ms")
        if a.enforce and measured_q > scenario.target_latency_ms:
            raise ToleranceError(f"measured latency at quantile {q:g}, {measured_q:.2f} ms, "
                                 f"exceeds the target {scenario.target_latency_ms:g} ms")
    if a.enforce and not report.within_tolerance:
        raise ToleranceError(f"measured {report.measured_latency_ms:.2f} ms vs predicted "
                             f"{report.predicted_latency_ms:.2f} ms "
                             f"({report.relative_error:+.1%}) is outside "
                             f"±{a.tolerance:.0%}")
    return 0
