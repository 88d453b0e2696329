"""The runtime's commands, registered with the `elasticplan` CLI through the entry-point
group `elasticplan.commands` (pyproject.toml): shard, profile, scenario, calibrate,
evaluate, run. The MiniLM defaults live here, beside the code that uses them; a profile of
a user's checkpoint names its store and task head (`runtime:`), and the commands that take
a plan or scenario default to those. Heavy imports (torch) happen inside the handlers, so
that the planner's commands start without them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from elasticplan.cli import (
    MAX_THREADS,
    buffer_mb,
    memory_mb,
    out_file,
    positive,
    quantile_arg,
    real,
    target_ms,
    whole,
)
from elasticplan.errors import InvalidArgument, StoreError, ToleranceError
from elasticplan.plans.baselines import baseline_questions
from elasticplan.plans.plan import Plan
from elasticplan.plans.verify import scenario_for, verify_plan
from elasticplan.problem.limits import MAX_BANDWIDTH_MB_S, MAX_LATENCY_US, MIN_BANDWIDTH_MB_S
from elasticplan.problem.loader import load_scenario
from elasticplan.problem.outputs import figure_format, refuse_inputs, writable, write_text
from runtime.cgroups import DEFAULT_MARGIN
from runtime.defaults import DEFAULT_HEAD, DEFAULT_STORE, head_for, store_for
from runtime.schemes import DEFAULT_NAME, REGISTRY
from runtime.sources import PACKAGED, open_checkpoint_dir, open_packaged

DEFAULT_PROFILE = "problems/models/minilm-l6.yaml"
DEFAULT_CACHE = "build/profile/minilm-l6"
DEFAULT_CALIBRATED = "build/calibrated"
DEFAULT_RUN_THREADS = 1
DEFAULT_BASE_SCENARIO = "problems/scenarios/minilm-phone.yaml"
DEFAULT_SCENARIO_BUFFER_MB = 2.0


def _is_default_store(store: str) -> bool:
    return Path(store).resolve() == Path(DEFAULT_STORE).resolve()


def register(sub) -> None:
    """Add shard, profile, scenario, calibrate, evaluate and run to the `elasticplan`
    sub-command parsers."""
    h = sub.add_parser("shard", help="build a shard store from a checkpoint (default: the "
                                     "packaged MiniLM); idempotent, resumable")
    h.set_defaults(handler=cmd_shard)
    h.add_argument("--checkpoint", metavar="DIR",
                   help="a Hugging Face checkpoint directory (config.json, model.safetensors, "
                        "tokenizer.json; modules.json for an encoder's pooling): BERT, "
                        "DistilBERT, RoBERTa or llama; default: MiniLM")
    h.add_argument("--gguf", metavar="FILE", help="a llama model's GGUF file")
    h.add_argument("--model", choices=tuple(PACKAGED),
                   help="a packaged model: " + "; ".join(
                       f"{name}: {line}" for name, (_, _, line) in PACKAGED.items()))
    h.add_argument("--out", help=f"store directory (default {DEFAULT_STORE}, or "
                                 f"build/shards/NAME for a checkpoint or a packaged model; "
                                 f"another scheme than {DEFAULT_NAME} adds -SCHEME)")
    h.add_argument("--name", help="the model's name (default: the checkpoint directory's)")
    h.add_argument("--pooling", choices=("mean", "cls"),
                   help="sentence embedding (default: what modules.json declares, else mean)")
    h.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="L2-normalise the embedding (default: as modules.json declares, "
                        "else not)")
    h.add_argument("--scheme", choices=tuple(REGISTRY), default=DEFAULT_NAME,
                   help="how shards below 32 bits are kept: " + "; ".join(
                       f"{name}: {line}" for name, (_, _, line) in REGISTRY.items()) +
                   f" (default {DEFAULT_NAME})")
    h.add_argument("--outlier-share", type=float, default=None, metavar="F",
                   help="dict only: the share of each row's weights kept exactly, in [0, 0.5] "
                        "(default 0.005; 0.02 measured +0.01 fidelity at 2 and 3 bits for "
                        "19-26 %% more bytes, docs/results.md)")
    h.add_argument("--force", action="store_true", help="rewrite every file")

    p = sub.add_parser("profile", help="measure shard importance on the real model and write "
                                       "the model profile (minutes; resumable)")
    p.set_defaults(handler=cmd_profile)
    p.add_argument("--store", default=DEFAULT_STORE, help=f"default {DEFAULT_STORE}")
    p.add_argument("--task", metavar="CSV",
                   help="a labelled CSV: train a task head on it and profile on its texts "
                        "(without one, another store than MiniLM's is profiled for "
                        "fidelity only, on the tweets)")
    p.add_argument("--text-column", default="text", metavar="C", help="default text")
    p.add_argument("--label-column", default="label", metavar="C", help="default label")
    p.add_argument("--out", type=out_file, help=f"profile YAML (default {DEFAULT_PROFILE} for MiniLM, "
                                 f"else STORE/profile.yaml)")
    p.add_argument("--cache", help=f"measurement cache (default {DEFAULT_CACHE} for MiniLM, "
                                   f"else build/profile/NAME)")
    p.add_argument("--head", help=f"task head JSON (default {DEFAULT_HEAD} for MiniLM, else "
                                  f"beside the profile, with --task)")
    p.add_argument("--texts", type=int, default=None, metavar="N",
                   help="a decoder's store: profile on the first N calibration tweets "
                        "(default 16)")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N",
                   help="a decoder's store: cut each text to N tokens (default 32)")
    p.add_argument("--metric", choices=("fidelity", "logloss"), default="fidelity",
                   help="what importance measures (default fidelity: cosine to fp32)")
    p.add_argument("--head-only", action="store_true",
                   help="a decoder's store: measure only the embedding table / LM head at "
                        "every stored bitwidth, on the texts the existing profile --out was "
                        "measured on, and add its head: and decoder: blocks to it (the "
                        "layers' importance is kept)")

    q = sub.add_parser("scenario", help="pose a question on a store's measured profile: a "
                                        "device, a target and a memory budget")
    q.set_defaults(handler=cmd_scenario)
    q.add_argument("--store", required=True)
    q.add_argument("--device", required=True, metavar="DEVICE.yaml")
    q.add_argument("--target-ms", type=target_ms, required=True)
    q.add_argument("--memory-mb", type=memory_mb, help="the whole process's memory budget")
    q.add_argument("--buffer-mb", type=buffer_mb, default=DEFAULT_SCENARIO_BUFFER_MB,
                   help=f"preload buffer (default {DEFAULT_SCENARIO_BUFFER_MB:g})")
    q.add_argument("--latency-quantile", type=quantile_arg, metavar="Q",
                   help="plan for this quantile of the latency (needs the device's spread)")
    q.add_argument("--profile", help="the store's profile (default STORE/profile.yaml; "
                                     f"{DEFAULT_PROFILE} for MiniLM's store)")
    q.add_argument("-o", "--output", required=True, type=out_file, help="the scenario YAML to write")

    c = sub.add_parser("calibrate", help="measure this machine's compute in the pipelined "
                                         "runtime; write a device spec and a scenario on it")
    c.set_defaults(handler=cmd_calibrate)
    c.add_argument("--store", help=f"default: the store the model profile names, else "
                                    f"{DEFAULT_STORE}")
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
                   help="measured runs per plan, at least (default 3): rounds go on, every "
                        "plan once per round, until each term is known within 1 %% of the "
                        "time it explains or --budget-s is spent")
    c.add_argument("--budget-s", type=real(0, 3600), default=60.0, metavar="S",
                   help="time for more rounds than --repeats (default 60; 0: exactly --repeats)")
    c.add_argument("--max-error-pct", type=real(0.1, 1000), default=5.0, metavar="P",
                   help="refuse to write a device whose calibration runs, each predicted out "
                        "of sample, miss by more than P %% (median of a stage) or 3P %% (p95) "
                        "(default 5)")
    c.add_argument("--threads", type=whole(1, MAX_THREADS), default=DEFAULT_RUN_THREADS,
                   help=f"torch threads (default {DEFAULT_RUN_THREADS}); use the same for run")
    c.add_argument("--throttle", action="store_true",
                   help="no device clock: the kernel throttles the runs' reads to "
                        "--storage-mb-s and --storage-latency-us (a block-IO cgroup; "
                        "docs/runtime.md, 'Kernel limits'); an encoder's scenario only")
    c.add_argument("--warm-reads", action="store_true",
                   help="a decoder's emulated storage read from the page cache at the device's "
                        "pace (a device faster than this machine's disk; `generate "
                        "--warm-reads`); default: cold reads")
    c.add_argument("--out-dir", default=DEFAULT_CALIBRATED,
                   help=f"writes device.yaml and scenario.yaml here (default {DEFAULT_CALIBRATED})")

    e = sub.add_parser("evaluate", help="a plan's submodel on the held-out test split: "
                                        "fidelity and accuracy with their sampling errors")
    e.set_defaults(handler=cmd_evaluate)
    e.add_argument("plan")
    e.add_argument("--store", help=f"default: the store the model profile names, else "
                                    f"{DEFAULT_STORE}")
    e.add_argument("--head", help=f"task head (default: the profile's, else "
                                   f"{DEFAULT_HEAD} for MiniLM)")
    e.add_argument("--json", metavar="FILE", type=out_file, help="write the evaluation as JSON")

    r = sub.add_parser("run", help="execute a plan on the real model; measured vs predicted")
    r.set_defaults(handler=cmd_run)
    r.add_argument("plan")
    r.add_argument("--scenario", help="scenario file (default: the path the plan records)")
    r.add_argument("--store", help=f"default: the store the model profile names, else "
                                    f"{DEFAULT_STORE}")
    r.add_argument("--head", help=f"task head (default: the profile's, else "
                                   f"{DEFAULT_HEAD} for MiniLM)")
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
    r.add_argument("--json", metavar="FILE", type=out_file, help="write the report as JSON")
    r.add_argument("--gantt", metavar="PNG", type=out_file, help="draw predicted and measured pipelines")
    r.add_argument("--memory-cap", nargs="?", const=True, type=positive, metavar="MB",
                   help="run the memory probe's queries in a memory cgroup capped at its "
                        "process's baseline after start-up + the plan's predicted peak (or MB) "
                        "+ --cap-margin, swap off; a process over its cap is killed by the "
                        "kernel: exit 12 (docs/runtime.md, 'Kernel limits')")
    r.add_argument("--cap-margin", type=real(0, 1000), metavar="PCT",
                   help=f"with --memory-cap: the cap's margin, in %% of the plan's predicted "
                        f"peak or MB (default {100 * DEFAULT_MARGIN:g})")
    r.add_argument("--throttle", action="store_true",
                   help="no device clock: the kernel throttles the reads (a block-IO cgroup on "
                        "the store's disk at the device's bandwidth, one read per latency as "
                        "reads/s); its counters are checked against the plan's reads "
                        "(docs/runtime.md, 'Kernel limits')")

    g = sub.add_parser("generate", help="a decoder plan answering a prompt token by token; "
                                        "every figure measured against the plan's")
    g.set_defaults(handler=cmd_generate)
    g.add_argument("plan")
    g.add_argument("--prompt", required=True, help="the text to answer")
    g.add_argument("--chat", action="store_true",
                   help="send the prompt as a user's message through the model's chat template")
    g.add_argument("--max-new-tokens", type=whole(1, 1 << 20), metavar="N",
                   help="tokens to generate at most (default: the plan's answer_tokens)")
    g.add_argument("--scenario", help="scenario file (default: the path the plan records)")
    g.add_argument("--store", help="default: the store the model profile names")
    g.add_argument("--no-emulate", action="store_true",
                   help="read at this machine's real disk speed instead of the device's")
    g.add_argument("--warm-reads", action="store_true",
                   help="emulated storage read from the page cache at the device's pace (a "
                        "device faster than this machine's disk); default: cold reads")
    g.add_argument("--no-compare", action="store_true",
                   help="skip the full fp32 model's answer (the agreement figure)")
    g.add_argument("--threads", type=whole(1, MAX_THREADS), default=DEFAULT_RUN_THREADS,
                   help=f"torch threads (default {DEFAULT_RUN_THREADS})")
    g.add_argument("--json", metavar="FILE", type=out_file, help="write the report as JSON")

    from runtime.encode import register as register_encode  # `encode`: runtime/encode.py

    register_encode(sub)


def cmd_shard(a) -> int:
    from runtime.schemes import create
    from runtime.sources.llama_source import open_gguf
    from runtime.store import build_store

    t0 = time.monotonic()
    try:
        scheme = create(a.scheme, outlier_share=a.outlier_share)
    except ValueError as e:
        raise InvalidArgument(f"--scheme {a.scheme}: {e}") from None
    given = [f"--{k}" for k in ("checkpoint", "gguf", "model") if getattr(a, k) is not None]
    if len(given) > 1:
        raise InvalidArgument(f"{' and '.join(given)}: give one model source")
    if (a.pooling or a.normalize is not None) and a.checkpoint is None:
        raise InvalidArgument("--pooling and --normalize apply to an encoder's --checkpoint")
    if a.name and not (a.checkpoint or a.gguf):
        raise InvalidArgument("--name applies to --checkpoint and --gguf")
    # a store per scheme by default: a build into another scheme's store rewrites it all
    suffix = "" if a.scheme == DEFAULT_NAME else f"-{a.scheme}"
    if a.checkpoint is None and a.gguf is None:
        ckpt = open_packaged(a.model or next(iter(PACKAGED)))
        out = a.out or ((DEFAULT_STORE if a.model is None else f"build/shards/{a.model}")
                        + suffix)
    else:  # every check before anything is written
        given_path = a.checkpoint or a.gguf
        ckpt = open_gguf(a.gguf, name=a.name) if a.gguf else \
            open_checkpoint_dir(a.checkpoint, name=a.name, pooling=a.pooling,
                                normalize=a.normalize)
        out = a.out or f"build/shards/{ckpt.config.name}{suffix}"
        refuse_inputs(Path(out) / "index.json",
                      (str(Path(given_path) / "config.json") if a.checkpoint else given_path,))
        if Path(out).resolve() == Path(given_path).resolve():
            raise InvalidArgument(f"--out {out}: the store must not be the model's own path")
    print(f"{ckpt.path}: {ckpt.describe()}", file=sys.stderr)
    report = build_store(out, ckpt, scheme=scheme, force=a.force,
                         log=lambda s: print(s, file=sys.stderr))
    print(f"{report.path}: {len(report.written)} file(s) written, {len(report.kept)} kept "
          f"(checksums match), {report.total_bytes / 1e6:.1f} MB in all, "
          f"{time.monotonic() - t0:.1f} s")
    return 0


def cmd_profile(a) -> int:
    from runtime.families import family
    from runtime.families.encoder import MODEL_NAME
    from runtime.profiling.profile import measurements_path, profile_model
    from runtime.sources.task import csv_task
    from runtime.store import ShardStore

    store = ShardStore(a.store)  # a missing or unfinished store stops here
    if family(store.config.family).decoder:
        return _profile_decoder(a, store)
    if a.texts is not None or a.max_tokens is not None or a.head_only:
        raise InvalidArgument("--texts, --max-tokens and --head-only apply to a decoder's "
                              "store")
    task = csv_task(a.task, a.text_column, a.label_column) if a.task else None
    tweets = task is None and store.model == MODEL_NAME  # MiniLM's own task: the tweets
    if _is_default_store(a.store) and tweets:
        out, cache, head = a.out or DEFAULT_PROFILE, a.cache or DEFAULT_CACHE, \
            a.head or DEFAULT_HEAD
    else:
        out = a.out or str(Path(a.store) / "profile.yaml")
        cache = a.cache or f"build/profile/{Path(a.store).resolve().name}"
        head = a.head or (str(Path(out).with_name(Path(out).name.removesuffix(".yaml") +
                                                  ".taskhead.json")) if task or tweets
                          else None)
    for path in (Path(out), measurements_path(Path(out))):  # before minutes of measuring
        refuse_inputs(path, (*store.files(), *([a.task] if a.task else [])))
    profile_model(a.store, out, cache_dir=cache, head_path=head, task=task, metric=a.metric,
                  link=not _is_default_store(a.store))
    return 0


def _profile_decoder(a, store) -> int:
    """`profile` of a llama store: next-token KL importance (runtime/profiling/
    decoder_profile.py) on the calibration tweets."""
    from runtime.profiling.decoder_profile import (
        MAX_TOKENS,
        TEXTS,
        profile_decoder,
        profile_decoder_head,
    )
    from runtime.profiling.profile import measurements_path

    for flag, value in (("--task", a.task), ("--head", a.head),
                        ("--metric", None if a.metric == "fidelity" else a.metric)):
        if value is not None:
            raise InvalidArgument(f"{flag}: a decoder's importance is next-token KL on text; "
                                  f"no task head")
    texts = TEXTS if a.texts is None else a.texts
    tokens = MAX_TOKENS if a.max_tokens is None else a.max_tokens
    if not 1 <= texts <= 100_000 or not 2 <= tokens <= store.config.context:
        raise InvalidArgument(f"--texts {texts} / --max-tokens {tokens}: texts in [1, 100000], "
                              f"tokens in [2, {store.config.context}]")
    out = a.out or str(Path(a.store) / "profile.yaml")
    cache = a.cache or f"build/profile/{Path(a.store).resolve().name}"
    for path in (Path(out), measurements_path(Path(out))):  # before minutes of measuring
        refuse_inputs(path, store.files())
    if a.head_only:  # (the texts are the existing profile's; given ones must agree)
        profile_decoder_head(a.store, out, cache_dir=cache, texts=a.texts,
                             max_tokens=a.max_tokens)
        return 0
    profile_decoder(a.store, out, cache_dir=cache, texts=texts, max_tokens=tokens)
    return 0


def cmd_scenario(a) -> int:
    """A scenario on a store's measured profile: paths relative to the written file."""
    from elasticplan.problem.loader import parse_device, parse_model, read_yaml, write_checked_yaml
    from runtime.executor import check_schemes
    from runtime.store import ShardStore

    store = ShardStore(a.store)
    profile = a.profile or (DEFAULT_PROFILE if _is_default_store(a.store)
                            else str(Path(a.store) / "profile.yaml"))
    if not Path(profile).is_file():
        raise InvalidArgument(f"{profile}: no profile of this store; run `elasticplan profile "
                              f"--store {a.store}` (or give --profile)")
    model = parse_model(read_yaml(profile), profile)
    if model.name != store.model:
        raise InvalidArgument(f"{profile}: a profile of {model.name!r}, the store "
                              f"{a.store} holds {store.model!r}")
    check_schemes(model, store)
    device = parse_device(read_yaml(a.device), a.device)
    if a.latency_quantile and a.latency_quantile > 0.5 and device.spread is None:
        raise InvalidArgument(f"{a.device}: --latency-quantile {a.latency_quantile:g} needs the "
                              f"device's spread (`elasticplan calibrate` measures it)")
    out = Path(a.output)
    refuse_inputs(out, (a.device, profile, a.store))  # (the store holds only what shard wrote)
    here = out.resolve().parent
    data = {"name": out.stem.removesuffix(".scenario") or "scenario",
            "description": f"{model.name} on {Path(a.device).stem} within {a.target_ms:g} ms",
            "device": os.path.relpath(Path(a.device).resolve(), here),
            "model": os.path.relpath(Path(profile).resolve(), here),
            "target_latency_ms": a.target_ms, "preload_budget_mb": a.buffer_mb,
            "min_shards_per_layer": 1, "objective": "max_importance"}
    if a.memory_mb is not None:
        data["memory_budget_mb"] = a.memory_mb
    if a.latency_quantile is not None:
        data["latency_quantile"] = a.latency_quantile
    out.parent.mkdir(parents=True, exist_ok=True)
    write_checked_yaml(out, data, f"Written by `elasticplan scenario` for the store {a.store}.",
                       lambda d, f: None)
    scenario = load_scenario(out)  # it must load (paths resolve, fields valid)
    print(f"wrote {out}: {model.name} ({len(model.layers)} layers) on {Path(a.device).name}, "
          f"target {scenario.target_latency_ms:g} ms, buffer {scenario.preload_budget_mb:g} MB"
          + (f", memory {scenario.memory_budget_mb:g} MB" if scenario.memory_budget_mb else ""))
    return 0


def _set_threads(n: int) -> None:
    import torch

    if n < 1:
        raise InvalidArgument(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)


def cmd_calibrate(a) -> int:
    from runtime.calibrate import calibrate, describe_compute, fit_report, write_calibration
    from runtime.measurement.measure import query_batches
    from runtime.store import ShardStore

    if a.repeats < 1:
        raise InvalidArgument("--repeats must be >= 1")
    _set_threads(a.threads)
    base = load_scenario(a.scenario)
    a.store = store_for(a.store, base.model)
    for name in ("device.yaml", "scenario.yaml"):  # before minutes of measuring
        refuse_inputs(Path(a.out_dir) / name, base.files)
    store = ShardStore(a.store)
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    if base.question.decoding and a.throttle:
        raise InvalidArgument("--throttle calibrates an encoder's scenario only")
    if a.warm_reads and not (base.question.decoding and a.storage_mb_s is not None):
        raise InvalidArgument("--warm-reads calibrates a decoder's scenario on emulated storage "
                              "only (with --storage-mb-s)")
    if base.question.decoding:  # a decoder: prompt passes and decode steps
        from runtime.decode_calibrate import calibrate_decoder

        cal = calibrate_decoder(store, base, bandwidth_mb_s=a.storage_mb_s,
                                latency_us=a.storage_latency_us, plans=a.plans,
                                repeats=a.repeats, budget_s=a.budget_s,
                                max_error_pct=a.max_error_pct, warm_reads=a.warm_reads,
                                log=log)
    else:
        queries = query_batches(store, base.model.seq_len, a.repeats)
        cal = calibrate(store, base, bandwidth_mb_s=a.storage_mb_s,
                        latency_us=a.storage_latency_us, plans=a.plans, repeats=a.repeats,
                        budget_s=a.budget_s, max_error_pct=a.max_error_pct, queries=queries,
                        log=log, throttle=a.throttle)
    device_path, scenario_path, target = write_calibration(Path(a.out_dir), base, cal, a.target_ms)
    print(f"compute: {describe_compute(cal.device)}")
    print(fit_report(cal))
    print(f"storage: {cal.facts['storage']}")
    print(f"wrote {device_path} and {scenario_path} (target {target:g} ms, buffer "
          f"{base.preload_budget_mb:g} MB)")
    return 0


def cmd_evaluate(a) -> int:
    """Rebuild the plan's submodel from the store (its shards at their bitwidths) and run
    it on every test text (runtime/profiling/submodel.py)."""
    from runtime.executor import check_model, planned_variants
    from runtime.families import family
    from runtime.profiling.submodel import TestSplit
    from runtime.store import ShardStore

    plan = Plan.load(a.plan)
    scenario = scenario_for(plan)
    a.store, a.head = store_for(a.store, scenario.model), head_for(a.head, scenario.model)
    if a.json:
        refuse_inputs(a.json, (a.plan, a.store, *([a.head] if a.head else []),
                               *scenario.files))
        writable(a.json)
    verify_plan(scenario, plan)  # a stale or tampered plan stops here, before any compute
    store = ShardStore(a.store)
    check_model(plan, store)
    planned_variants(plan, scenario.model, store)  # in this store, the sizes the profile says
    if family(store.config.family).decoder:
        return _evaluate_decoder(a, plan, store, scenario)
    ev = TestSplit(store, a.head).evaluate(plan)
    accuracy = ("no task head: fidelity only" if ev.accuracy is None else
                f"accuracy {ev.accuracy:.3f} +- {ev.accuracy_stderr:.3f} (fp32 "
                f"{ev.fp32_accuracy:.3f})")
    print(f"{a.plan} ({plan.solver}): {plan.n_shards} shards; on {ev.texts} test texts: "
          f"fidelity {ev.fidelity:.4f} +- {ev.fidelity_stderr:.4f} (mean cosine to fp32), "
          f"{accuracy}; +- one standard error")
    if a.json:
        data = {"plan": a.plan, "solver": plan.solver, "shards": plan.n_shards,
                **ev.to_dict()}
        write_text(a.json, json.dumps(data, indent=1, allow_nan=False) + "\n",
                   inputs=(a.plan, a.store, *([a.head] if a.head else []), *scenario.files))
        print(f"evaluation written to {a.json}")
    return 0


def _evaluate_decoder(a, plan: Plan, store, scenario) -> int:
    """`evaluate` of a decoder plan: its submodel against the full model on the test
    tweets, teacher-forced (runtime/profiling/decoder_profile.py)."""
    from runtime.profiling.decoder_profile import EVAL_TEXTS, evaluate_bits
    from runtime.sources.task import load_splits

    bits = [{ch.name: ch.bits for ch in lp.shards} for lp in plan.layers]
    table = None
    if scenario.question.decoding:  # its last layer is the table (one part)
        (choice,) = plan.layers[-1].shards
        bits, table = bits[:-1], choice.bits
    ev = evaluate_bits(store, bits, list(load_splits().test.texts[:EVAL_TEXTS]),
                       table_bits=table)
    # the importance left out is the KL the profile predicts, if single-shard KLs add up
    best = sum(max(sh.importance) for layer in scenario.model.layers for sh in layer.shards)
    predicted = best - plan.importance
    print(f"{a.plan} ({plan.solver}): {plan.n_shards} shards; on {ev.texts} test texts "
          f"({ev.positions} next tokens, teacher-forced): KL {ev.kl:.4f} +- {ev.kl_stderr:.4f} "
          f"nats (predicted {predicted:.4f}: the importance left out), top-1 agreement "
          f"{ev.top1:.3f} +- {ev.top1_stderr:.3f}, perplexity "
          f"{ev.perplexity:.2f} +- {ev.perplexity_stderr:.2f} (fp32 {ev.fp32_perplexity:.2f}); "
          f"+- one standard error")
    if a.json:
        data = {"plan": a.plan, "solver": plan.solver, "shards": plan.n_shards,
                "predicted_kl": predicted, **ev.to_dict()}
        write_text(a.json, json.dumps(data, indent=1, allow_nan=False) + "\n",
                   inputs=(a.plan, a.store, *scenario.files))
        print(f"evaluation written to {a.json}")
    return 0


def cmd_generate(a) -> int:
    """Answer a prompt with a decoder plan (runtime/measurement/generate.py): the answer on
    stdout as it comes, then the report."""
    import sys

    from runtime.decode_layers import workspace_bytes
    from runtime.executor import check_model, planned_variants
    from runtime.families import family
    from runtime.measurement.generate import format_report, generate, prompt_ids
    from runtime.store import ShardStore

    plan = Plan.load(a.plan)
    scenario = scenario_for(plan, a.scenario)
    if not scenario.question.decoding:
        raise InvalidArgument(f"{a.plan}: the plan answers an encoder's question, not a "
                              f"decoder's (no prompt_tokens/answer_tokens): use `run`")
    a.store = store_for(a.store, scenario.model)
    inputs = (a.plan, a.store, *scenario.files)
    if a.json:
        refuse_inputs(a.json, inputs)
        writable(a.json)
    verify_plan(scenario, plan)  # stale or invalid plans stop here, before any compute
    store = ShardStore(a.store)
    if not family(store.config.family).decoder:
        raise StoreError(f"{a.store}: the store holds an encoder; a decoder plan needs its "
                         f"decoder's store")
    check_model(plan, store)
    planned_variants(plan, scenario.model, store)  # in this store, the sizes the profile says
    need = workspace_bytes(store)  # the schemes' buffers the plan's memory counts
    if scenario.source_model.decoder.workspace_bytes != need:
        raise StoreError(f"{a.store}: its schemes' buffers take {need} B, but the profile "
                         f"{scenario.source_model.name!r} says "
                         f"{scenario.source_model.decoder.workspace_bytes} B (decoder."
                         f"workspace_bytes): the store changed since it was profiled; "
                         f"re-profile it (`elasticplan profile --head-only`)")
    _set_threads(a.threads)
    ids = prompt_ids(store, a.prompt, a.chat)
    tok = store.text_tokenizer()
    said: list[int] = []
    shown = [""]

    def on_token(t: int) -> None:  # the answer as it comes (whole characters only)
        said.append(t)
        text = tok.decode(said)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(shown[0]):])
            sys.stdout.flush()
            shown[0] = text

    try:
        _, report = generate(plan, a.plan, scenario, store, ids,
                             max_new_tokens=a.max_new_tokens, emulate=not a.no_emulate,
                             threads=a.threads, on_token=on_token, compare=not a.no_compare,
                             warm_reads=a.warm_reads)
    except BaseException:
        if shown[0]:  # the answer so far ends its line before the stop or error message
            sys.stdout.write("\n")
            sys.stdout.flush()
        raise
    print(report.text[len(shown[0]):] if report.text.startswith(shown[0]) else "")
    print()
    print(format_report(report))
    if a.json:
        write_text(a.json, json.dumps(report.to_dict(), indent=1, allow_nan=False) + "\n",
                   inputs=inputs)
        print(f"report written to {a.json}")
    return 0


def cmd_run(a) -> int:
    from runtime.calibrate import machine_memory_mb
    from runtime.executor import check_model
    from runtime.measurement.measure import Reference, measure_plans, query_batches
    from runtime.measurement.report import format_comparison, format_report, gantt
    from runtime.sources.task import TaskHead
    from runtime.store import ShardStore

    if a.repeat < 1:
        raise InvalidArgument(f"--repeat must be >= 1, got {a.repeat}")
    plan = Plan.load(a.plan)
    scenario = scenario_for(plan, a.scenario)
    if scenario.question.decoding:
        raise InvalidArgument(f"{a.plan}: the plan answers a decoder's question (it generates "
                              f"token by token): use `elasticplan generate`")
    a.store, a.head = store_for(a.store, scenario.model), head_for(a.head, scenario.model)
    inputs = (a.plan, a.store, *([a.head] if a.head else []), *scenario.files)
    for out in (a.json, a.gantt):
        if out:
            refuse_inputs(out, inputs)
            writable(out)
    if a.gantt:
        figure_format(a.gantt)
    capped_scenario = a.scenario or plan.scenario.path
    if a.memory_cap is not None and a.baselines:
        raise InvalidArgument("--memory-cap caps the plan's own process: run each baseline's "
                              "plan (`elasticplan baseline`) with its own --memory-cap")
    if a.throttle and a.no_emulate:
        raise InvalidArgument("--throttle and --no-emulate: give one (the kernel's throttle, "
                              "or this disk's own speed)")
    if a.cap_margin is not None and a.memory_cap is None:
        raise InvalidArgument("--cap-margin is --memory-cap's margin: give --memory-cap too")
    if isinstance(a.memory_cap, float) and a.memory_cap > machine_memory_mb():
        raise InvalidArgument(f"--memory-cap {a.memory_cap:g} MB is more than this machine's "
                              f"{machine_memory_mb():.0f} MB of memory: a cap that caps "
                              f"nothing")
    if a.memory_cap is not None and capped_scenario is None:
        raise InvalidArgument(f"{a.plan}: --memory-cap reloads the plan in a fresh process, "
                              f"which needs its scenario file: give --scenario")
    verify_plan(scenario, plan)  # stale or invalid plans stop here, before any compute
    store = ShardStore(a.store)
    check_model(plan, store)
    throttle, gap_s = None, 0.0
    if a.throttle:  # a machine that cannot throttle is refused here (exit 13)
        from runtime.cgroups import THROTTLE_GAP_S, IoThrottle

        gap_s = THROTTLE_GAP_S  # each query a fresh slice of the throttle
        throttle = IoThrottle(store.path, scenario.device.bandwidth_mb_s,
                              scenario.device.latency_us)
    _set_threads(a.threads)
    head = TaskHead.load(a.head) if a.head else None
    if head is not None:
        head.check_width(store.config.hidden, a.head, store.path)
    cap = None
    if a.memory_cap is not None:  # first: a plan over its cap stops here (exit 12)
        from runtime.cgroups import capped_probe

        cap = capped_probe(plan, scenario, store, repeats=a.repeat, threads=a.threads,
                           allowance_mb=None if a.memory_cap is True else a.memory_cap,
                           margin=DEFAULT_MARGIN if a.cap_margin is None else
                           a.cap_margin / 100, scenario_path=capped_scenario)
    queries = query_batches(store, scenario.model.seq_len, a.repeat)
    reference = Reference(store)
    common = dict(repeats=a.repeat, emulate=not (a.no_emulate or a.throttle), queries=queries,
                  reference=reference, head=head, tolerance=a.tolerance)
    items = [(plan, scenario, a.plan)]
    if a.baselines:  # measured side by side with the plan, runs interleaved
        skipped = lambda strategy, e: print(f"{strategy}: not run: {e}")  # noqa: E731
        items += [(b, question, None) for b, question in baseline_questions(scenario, skipped)]
    disk_runs, checks = [[] for _ in items], []
    with throttle if throttle is not None else contextlib.nullcontext():
        reports = measure_plans(items, store, **common, probe=None if cap is None else
                                lambda _: cap.process_peak_above_baseline_bytes,
                                disk=None if throttle is None else throttle.counters,
                                disk_runs=disk_runs, throttled=throttle is not None,
                                gap_s=gap_s)
        if throttle is not None:
            from runtime.cgroups import disk_check, throttled_prediction

            storage = f"{throttle.describe()}; {throttled_prediction(scenario.device)}"
            reports = [dataclasses.replace(r, storage=storage) for r in reports]
            checks = [disk_check(p, q, store, runs, throttle.bps)
                      for (p, q, _), runs in zip(items, disk_runs)]
    report = reports[0]
    print(format_report(report))
    if cap is not None:
        print(cap.format(report.memory.measured_peak_bytes))
    if checks:
        print(checks[0].format())
    if a.baselines:
        print()
        print(format_comparison(reports))
    if a.json:
        data = report.to_dict()
        if a.baselines:
            data["baselines"] = [r.to_dict() for r in reports[1:]]
        if cap is not None:
            data["memory_cap"] = cap.to_dict()
        if checks:
            data["throttle"] = {"storage": reports[0].storage, "disk": checks[0].to_dict()}
            for b, check in zip(data.get("baselines", []), checks[1:]):
                b["throttle"] = {"storage": reports[0].storage, "disk": check.to_dict()}
        write_text(a.json, json.dumps(data, indent=1, allow_nan=False) + "\n", inputs=inputs)
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
