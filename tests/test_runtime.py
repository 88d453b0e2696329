"""The runtime: it computes exactly what the plan says, its timeline is consistent, its reads
are the plan's streamed shards (counted at the system call), bad input stops it before any
compute, and the baselines and calibration fit are sound. No timing thresholds."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elasticplan.cli import main
from elasticplan.costmodel import PIPELINED, SEQUENTIAL, Pick, simulate
from elasticplan.errors import CalibrationError, SpecError, StoreError
from elasticplan.plans.baselines import STRATEGIES, baseline_plan
from elasticplan.plans.plan import Plan, SolveStatus
from elasticplan.plans.verify import verify_plan, with_plan_question
from elasticplan.problem.loader import load_scenario
from elasticplan.problem.spec import Device
from runtime.calibrate import fit_compute
from runtime.executor import Executor
from runtime.iodev import DeviceClock
from runtime.measurement.measure import (
    DEFAULT_TOLERANCE,
    Reference,
    measure_plan,
    measure_plans,
    query_batches,
)
from runtime.store import ShardStore
from tests.submodel_oracle import oracle_layers

PROBLEMS = Path(__file__).resolve().parent.parent / "problems"
MINILM = PROBLEMS / "scenarios" / "minilm-phone.yaml"
TEXTS = ["The pipeline streams shards while the previous layer computes.",
         "short one"]


@pytest.fixture(scope="module")
def scenario():
    return load_scenario(MINILM)


@pytest.fixture(scope="module")
def store(store_dir):
    return ShardStore(store_dir)


@pytest.fixture(scope="module")
def batch(store):
    return store.tokenizer(128)(TEXTS, pad_to=128)


def _plan(scenario, selection, execution=PIPELINED) -> Plan:
    return Plan.from_selection(scenario, selection, solver="test", status=SolveStatus.FEASIBLE,
                               gap=None, solve_seconds=0.0, execution=execution)


def _run(plan, scenario, store, batch, emulate=False):
    with Executor(plan, scenario, store, emulate=emulate) as ex:
        ex.fill_preload()
        return ex.run(batch)


def test_all_fp32_equals_reference_encoder(scenario, store, reference, batch):
    plan = baseline_plan(scenario, "layerwise-pipelining")
    trace = _run(plan, scenario, store, batch)
    with torch.inference_mode():
        want = reference.encoder.forward(batch.ids, batch.mask, reference.full_layers)
    assert trace.embedding.shape == want.shape
    assert (trace.embedding - want).abs().max().item() < 1e-5


@st.composite
def selections(draw, model):
    out = []
    for layer in model.layers:
        n = len(layer.shards)
        chosen = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
        out.append(tuple(Pick(s, draw(st.integers(0, len(model.bitwidths) - 1)),
                              draw(st.booleans())) for s in chosen))
    return tuple(out)


@settings(max_examples=4)
@given(data=st.data())
def test_dropped_and_quantised_plan_computes_exactly_that_submodel(data, scenario, store,
                                                                   reference, batch):
    sel = data.draw(selections(scenario.model))
    plan = _plan(scenario, sel)
    trace = _run(plan, scenario, store, batch)
    with torch.inference_mode():
        want = reference.encoder.forward(batch.ids, batch.mask,
                                         oracle_layers(reference, scenario.model, sel))
    assert (trace.embedding - want).abs().max().item() < 1e-5


def _count_preadv(monkeypatch):
    calls = []
    real = os.preadv

    def counting(fd, buffers, offset, *args):
        calls.append((os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), offset))
        return real(fd, buffers, offset, *args)

    monkeypatch.setattr(os, "preadv", counting)
    return calls


def test_timeline_is_consistent_and_preloaded_shards_cause_no_reads(scenario, store, batch,
                                                                     monkeypatch):
    rng = np.random.default_rng(3)
    model = scenario.model
    sel = tuple(tuple(Pick(int(s), int(rng.integers(len(model.bitwidths))), bool(s % 3 == 0))
                      for s in rng.choice(len(layer.shards), 10, replace=False))
                for layer in model.layers)
    plan = _plan(scenario, sel)
    calls = _count_preadv(monkeypatch)
    with Executor(plan, scenario, store, emulate=False) as ex:
        # the checksum pass reads every variant once (resident.bin: the resident tensors)
        assert len([c for c in calls if c[0] != "resident.bin"]) == plan.n_shards
        calls.clear()
        ex.fill_preload()
        fill_calls = list(calls)
        calls.clear()
        trace = ex.run(batch)
    where = {}
    for lp in plan.layers:
        for c in lp.shards:
            v = store.variant(lp.index, c.name, c.bits)
            where[v.file, v.offset] = c.preloaded
    streamed = [k for k, pre in where.items() if not pre]
    # every streamed shard read exactly once per query (fp32 ones may need several
    # preadv calls only beyond IOV_MAX iovecs, which MiniLM's shards never reach)
    assert sorted(calls) == sorted(streamed)
    assert all(not where[k] for k in calls)
    assert sorted(fill_calls) == sorted(k for k, pre in where.items() if pre)
    assert trace.reads == len(streamed)
    prev_end = trace.embed_ms[1]
    for lt, lp in zip(trace.layers, plan.layers):
        assert lt.reads == sum(not c.preloaded for c in lp.shards)
        assert lt.io_start_ms <= lt.io_end_ms
        assert lt.compute_start_ms >= lt.io_end_ms
        assert lt.compute_start_ms >= prev_end
        assert lt.compute_end_ms >= lt.compute_start_ms
        prev_end = lt.compute_end_ms
    for a, b in zip(trace.layers, trace.layers[1:]):
        assert b.io_start_ms >= a.io_end_ms  # one channel, in layer order
    assert trace.latency_ms >= trace.layers[-1].compute_end_ms


def test_sequential_plan_computes_after_every_read(scenario, store, batch):
    plan = baseline_plan(scenario, "load-then-execute")
    assert plan.execution == SEQUENTIAL
    with Executor(plan, scenario, store, emulate=False) as ex:
        ex.fill_preload()
        trace = ex.run(batch)
        memory = ex.memory
    last_io = trace.layers[-1].io_end_ms
    assert all(lt.compute_start_ms >= last_io for lt in trace.layers)
    # Nothing preloaded, every fp32 shard streamed into the ring, and all of them in use
    # at once before the first layer computes: the ring is exactly that big, and full.
    assert memory.preload_bytes == 0
    assert memory.ring_bytes == memory.ring_high_water_bytes == plan.streamed_bytes


def test_windowed_plan_keeps_its_ring_and_matches_the_reference(scenario, store):
    """A plan solved under a memory budget with window 1 and the embedding table streamed:
    the executor allocates exactly the predicted buffers, never uses more ring than the
    two-layer window, reads only the query's rows, and computes what the full-precision
    shards of the same selection compute."""
    from elasticplan.costmodel import simulate
    from elasticplan.solvers import solve

    batch = store.tokenizer(128)(TEXTS[:1], pad_to=128)
    q = scenario.with_overrides(memory_budget_mb=16, prefetch_window=1)
    plan = solve(q, time_limit_s=5)
    assert plan.embeddings == "streamed"  # the 46.9 MB table cannot be resident in 16 MB
    assert plan.window == 1 and plan.memory.peak_bytes <= 16e6
    predicted = simulate(q, plan.selection(q), layout=plan.layout).memory
    with Executor(plan, q, store, emulate=False) as ex:
        ex.fill_preload()
        trace = ex.run(batch)
        memory = ex.memory
    streamed = [sum(s.variant.nbytes for s in row if not s.preloaded) for row in ex.shards]
    two = max(a + b for a, b in zip(streamed, streamed[1:]))
    assert memory.ring_bytes == two == predicted.working_peak_bytes - q.model.scratch_bytes
    assert memory.ring_high_water_bytes <= memory.ring_bytes
    assert memory.scratch_bytes == q.model.scratch_bytes
    assert memory.preload_bytes == predicted.preload_bytes
    assert memory.resident_bytes == predicted.resident_bytes
    assert memory.query_rows_bytes == q.model.embedding_query_bytes
    # one read per distinct token (the padding's repeats are copied, not read)
    assert trace.embedding_rows == len(set(batch.ids[0].tolist())) < 128
    # the same selection, decoded by the store into separate fused layers
    enc = store.encoder()
    layers = [store.layer_weights(lp.index, {c.name: c.bits for c in lp.shards})
              for lp in plan.layers]
    with torch.inference_mode():
        expect = enc.forward(batch.ids, batch.mask, layers)
    assert torch.allclose(trace.embedding, expect, atol=1e-5)


def test_streamed_rows_are_priced_per_distinct_token_and_reported_per_query(scenario, store):
    """query_tokens prices a streamed table at that many rows (one read each); a run's report
    predicts each query at the rows it read, and keeps the plan's own (its bound) beside."""
    from elasticplan.costmodel import embedding_read_ms
    from elasticplan.solvers import solve

    base = scenario.with_overrides(memory_budget_mb=16, prefetch_window=1)
    few = base.with_overrides(query_tokens=40)
    assert few.model.query_rows == 40 and base.model.query_rows is None
    assert embedding_read_ms(few.device, few.model) == pytest.approx(
        embedding_read_ms(base.device, base.model) * 40 / 128)
    plan = solve(few, time_limit_s=5)
    assert plan.embeddings == "streamed" and plan.scenario.question.query_tokens == 40
    # the plan's file carries its question's query_tokens, and the verifier prices them
    verify_plan(few, plan)
    queries = [store.tokenizer(128)([t], pad_to=128) for t in TEXTS]
    r = measure_plans([(plan, few, None)], store, repeats=2, emulate=True, queries=queries,
                      reference=Reference(store), head=None, probe=lambda p: None)[0]
    distinct = [len(set(q.ids[0].tolist())) for q in queries]
    assert r.embedding_rows == tuple(distinct) and r.planned_rows == 40
    assert r.planned_latency_ms == plan.predicted_latency_ms
    at = [simulate(few.with_overrides(query_tokens=n), plan.selection(few),
                   layout=plan.layout).latency_ms for n in distinct]
    assert r.predicted_latency_ms == pytest.approx(float(np.median(at)), abs=1e-3)
    with pytest.raises(SpecError, match="query_tokens"):
        base.with_overrides(query_tokens=129)


def test_emulated_reads_never_finish_before_the_device_would(scenario, store, batch):
    model = scenario.model
    sel = tuple(tuple(Pick(s, 0, False) for s in range(3)) for _ in model.layers)
    slow = dataclasses.replace(scenario.device, bandwidth_mb_s=100.0, latency_us=500.0)
    sc = scenario.with_overrides(device=slow, target_latency_ms=1e6)
    plan = _plan(sc, sel)
    trace = _run(plan, sc, store, batch, emulate=True)
    clock_ms = 0.0
    for lt, lp in zip(trace.layers, plan.layers):
        for c in lp.shards:
            clock_ms += 0.5 + store.variant(lp.index, c.name, c.bits).nbytes / 100e3
        assert lt.io_end_ms >= clock_ms - 1e-6  # the device clock is a lower bound


def test_device_clock_books_reads_back_to_back():
    device = Device(name="t", bandwidth_mb_s=100.0, latency_us=1000.0, gflops=1.0,
                    layer_overhead_ms=0.0, dequant_gb_s=1.0, memory_mb=1.0)
    clock = DeviceClock(device)  # 100 MB/s, 1 ms per read
    clock.start(10.0)
    assert clock.complete(1_000_000, 10.0001) == pytest.approx(10.011)
    assert clock.complete(0, 10.0002) == pytest.approx(10.012)
    assert clock.complete(0, 99.0) == 99.0  # a read that really took longer
    real = DeviceClock(None)
    assert real.complete(10**9, 5.0) == 5.0


def test_corrupt_shard_is_an_error_before_any_compute(scenario, store_dir, tmp_path, batch):
    bad = tmp_path / "store"
    shutil.copytree(store_dir, bad)
    store = ShardStore(bad)
    plan = baseline_plan(scenario, "layerwise-pipelining")
    v = store.variant(2, "ffn3", 32)
    with open(bad / v.file, "r+b") as fh:
        fh.seek(v.offset + 100)
        byte = fh.read(1)
        fh.seek(v.offset + 100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(StoreError, match=r"layer2\.b32\.bin: shard ffn3 of layer 2 at 32 bits "
                                         r"fails its checksum"):
        Executor(plan, scenario, store)
    (bad / v.file).unlink()
    with pytest.raises(StoreError, match="cannot open shard file"):
        Executor(plan, scenario, store)


@pytest.fixture(scope="module")
def plan_file(scenario, tmp_path_factory):
    from elasticplan.solvers import solve

    path = tmp_path_factory.mktemp("plans") / "minilm.plan.json"
    solve(scenario, "greedy").save(path)
    return path


def test_run_rejects_bad_plans_with_clear_errors(plan_file, store_dir, tmp_path, capsys):
    # a plan for another model
    bert = tmp_path / "bert.plan.json"
    assert main(["solve", str(PROBLEMS / "scenarios" / "distilbert-sbc.yaml"), "--solver",
                 "greedy", "-o", str(bert)]) == 0
    capsys.readouterr()
    assert main(["run", str(bert), "--store", str(store_dir)]) == 8
    assert "the plan is for model 'distilbert', this shard store holds 'minilm-l6'" in \
        capsys.readouterr().err
    # a stale scenario: the plan's scenario changed since it was solved
    moved = tmp_path / "s"
    shutil.copytree(PROBLEMS, moved)
    stale = moved / "p.json"
    plan = Plan.load(plan_file)
    plan.save(stale)
    data = json.loads(stale.read_text())
    data["scenario"]["path"] = "scenarios/minilm-phone.yaml"
    stale.write_text(json.dumps(data))
    dev = moved / "devices" / "phone-ufs31.yaml"
    dev.write_text(dev.read_text().replace("bandwidth_mb_s: 1200", "bandwidth_mb_s: 1100"))
    assert main(["run", str(stale), "--store", str(store_dir)]) == 6
    assert "stale plan" in capsys.readouterr().err
    # a plan the verifier rejects
    data = json.loads(plan_file.read_text())
    data["layers"][3]["compute_end_ms"] -= 1.0
    data["scenario"]["path"] = str(MINILM)
    tampered = tmp_path / "t.json"
    tampered.write_text(json.dumps(data))
    assert main(["run", str(tampered), "--store", str(store_dir)]) == 6
    assert "plan rejected: layer 3: predicted compute_end_ms" in capsys.readouterr().err
    # no store
    assert main(["run", str(plan_file), "--store", str(tmp_path / "none")]) == 8
    assert "no shard store here" in capsys.readouterr().err


def test_run_cli_report_json_and_baselines(plan_file, store_dir, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["run", str(plan_file), "--store", str(store_dir), "--repeat", "2",
                 "--no-emulate", "--baselines", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "latency: predicted" in text and "hold-in-memory" in text
    r = json.loads(out.read_text())
    for key in ("predicted_latency_ms", "measured_latency_ms", "measured_runs_ms",
                "relative_error", "emulated_bandwidth_mb_s", "fidelity",
                "preload_resident_bytes", "layers"):
        assert key in r
    assert len(r["measured_runs_ms"]) == 2
    assert r["measured_latency_ms"] == pytest.approx(float(np.median(r["measured_runs_ms"])))
    assert r["emulated_bandwidth_mb_s"] is None  # --no-emulate
    assert r["relative_error"] == pytest.approx(
        (r["measured_latency_ms"] - r["predicted_latency_ms"]) / r["predicted_latency_ms"])
    assert 0.5 < r["fidelity"] <= 1.0 + 1e-6
    assert r["preload_resident_bytes"] >= r["preload_bytes"]
    plan = Plan.load(plan_file)
    assert r["reads_per_run"] == sum(not c.preloaded for lp in plan.layers for c in lp.shards)
    for lay, lp in zip(r["layers"], plan.layers):
        assert lay["predicted"]["compute_end_ms"] == lp.compute_end_ms
        assert set(lay["measured"]) == {"io_start_ms", "io_end_ms", "compute_start_ms",
                                        "compute_end_ms"}
    assert [b["solver"] for b in r["baselines"]] == list(STRATEGIES)
    hold = r["baselines"][0]
    assert hold["reads_per_run"] == 0 and hold["fidelity"] == pytest.approx(1.0, abs=1e-5)


def test_fp32_preloaded_report_and_fidelity(scenario, store, tmp_path):
    plan = baseline_plan(scenario, "hold-in-memory")
    queries = query_batches(store, scenario.model.seq_len, 2)
    r = measure_plan(plan, scenario, store, repeats=2, emulate=True, queries=queries,
                     reference=Reference(store), head=None)
    assert r.fidelity == pytest.approx(1.0, abs=1e-5)
    assert r.reads_per_run == 0
    assert r.preload_resident_bytes == plan.preload_bytes
    # every shard in the preload buffer, nothing in the ring, the table resident
    assert r.memory.preload_bytes == plan.preload_bytes
    assert r.memory.ring_bytes == r.memory.ring_high_water_bytes == 0
    assert r.memory.resident_bytes == store.resident_bytes > 0
    # the executor's accounting is the prediction, exactly (activations are predicted)
    assert r.memory.measured_peak_bytes == r.memory.predicted_peak_bytes
    assert r.memory.measured_process_peak_bytes > 0
    assert r.tolerance == DEFAULT_TOLERANCE
    assert json.loads(json.dumps(r.to_dict()))["memory"]["preload_bytes"] == plan.preload_bytes


def test_baselines_verify_and_sequential_latency_is_io_plus_compute(scenario):
    for strategy in STRATEGIES:
        plan = baseline_plan(scenario, strategy)
        verify_plan(with_plan_question(scenario, plan), plan)
        assert plan.n_shards == scenario.model.n_shards
    seq = baseline_plan(scenario, "load-then-execute")
    sel = seq.selection(scenario)
    pipe = simulate(scenario, sel, PIPELINED)
    s = simulate(scenario, sel, SEQUENTIAL)
    compute = sum(t.compute_end_ms - t.compute_start_ms for t in pipe.layers)
    assert s.latency_ms == pytest.approx(pipe.layers[-1].io_end_ms + compute)
    assert s.latency_ms >= pipe.latency_ms


def test_compute_fit_recovers_known_costs_and_their_uncertainty():
    """Samples made from known terms (per layer, per shard, per flop, per weight at 2 and
    8 bits, per streamed MB, per MB and per read request beside the layer): the fit
    recovers them exactly with R^2 1 and no loose term;
    with noise added, each term lies within a few standard errors of the truth, the
    standard errors are not zero, and the noisiest terms are reported loose."""
    from runtime.calibrate import Sample, _loose_terms

    rng = np.random.default_rng(1)

    def samples(noise):
        out = []
        for i in range(60):
            k = int(rng.integers(1, 25))
            flops = float(rng.uniform(1e6, 5e8))
            w = {2: int(rng.integers(0, 10**6)), 8: int(rng.integers(0, 10**6))}
            mb = float(rng.uniform(0, 8)) if i % 3 else 0.0
            beside = float(rng.uniform(0, 12)) if i % 4 else 0.0
            reads = float(rng.uniform(0, 120)) if i % 5 else 0.0
            ms = 0.3 + 0.05 * k + flops / 60e6 + (1.2 * w[2] + 2.9 * w[8]) / 1e6 + 0.2 * mb \
                + 0.15 * beside + 0.03 * reads
            out.append(Sample(i % 6, k, flops, w, ms + float(rng.normal(0, noise)),
                              streamed_mb=mb, beside_mb=beside, beside_reads=reads))
        return out

    fit = fit_compute(samples(0.0), (2, 8))
    assert fit.layer_overhead_ms == pytest.approx(0.3, rel=1e-6)
    assert fit.shard_overhead_ms == pytest.approx(0.05, rel=1e-6)
    assert fit.gflops == pytest.approx(60.0, rel=1e-6)
    assert fit.dequant_ns == pytest.approx({2: 1.2, 8: 2.9}, rel=1e-6)
    assert fit.stream_ms_per_mb == pytest.approx(0.2, rel=1e-6)
    assert fit.contention_ms_per_mb == pytest.approx(0.15, rel=1e-6)
    assert fit.contention_ms_per_read == pytest.approx(0.03, rel=1e-6)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.layer_residuals_ms == pytest.approx([0.0] * 6, abs=1e-9)
    noisy = fit_compute(samples(0.05), (2, 8))
    se = noisy.stderr
    for name, truth, got, err in (
            ("layer_overhead_ms", 0.3, noisy.layer_overhead_ms, se.layer_overhead_ms),
            ("shard_overhead_ms", 0.05, noisy.shard_overhead_ms, se.shard_overhead_ms),
            ("gflops", 60.0, noisy.gflops, se.gflops),
            ("dequant_ns_per_weight[2]", 1.2, noisy.dequant_ns[2], se.dequant_ns[2]),
            ("dequant_ns_per_weight[8]", 2.9, noisy.dequant_ns[8], se.dequant_ns[8]),
            ("stream_ms_per_mb", 0.2, noisy.stream_ms_per_mb, se.stream_ms_per_mb),
            ("contention_ms_per_mb", 0.15, noisy.contention_ms_per_mb,
             se.contention_ms_per_mb),
            ("contention_ms_per_read", 0.03, noisy.contention_ms_per_read,
             se.contention_ms_per_read)):
        assert 0 < err and abs(got - truth) < 5 * err, name
    assert _loose_terms(fit, samples(0.0)) == []
    assert _loose_terms(fit_compute(samples(0.5), (2, 8)), samples(0.5))
    # a bitwidth no sample ran cannot be fitted: a clear error, not a zero cost
    with pytest.raises(CalibrationError, match="no calibration plan ran a shard at"):
        fit_compute(samples(0.0), (2, 4, 8))


def test_fit_recovers_the_contention_share_from_the_time_read_beside():
    """The contention placed in time (Fit.contention_share): fitted through 0 to what the
    other terms but the per-MB and per-read contention leave, on the ms the IO thread read
    beside each layer; exact without noise, within its standard errors with it, 0 where
    no read ran beside compute, and never above MAX_CONTENTION_SHARE."""
    from elasticplan.problem.limits import MAX_CONTENTION_SHARE
    from runtime.calibrate import Sample

    rng = np.random.default_rng(2)

    def samples(noise, share=0.35, beside=True):
        out = []
        for i in range(80):
            k = int(rng.integers(1, 25))
            flops = float(rng.uniform(1e6, 5e8))
            w = {8: int(rng.integers(0, 10**6))}
            mb = float(rng.uniform(0, 8)) if i % 3 else 0.0
            ms_beside = float(rng.uniform(0, 10)) if beside and i % 4 else 0.0
            ms = 0.3 + 0.05 * k + flops / 60e6 + 2.9 * w[8] / 1e6 + 0.2 * mb \
                + share * ms_beside
            # the MB and reads beside in proportion to the time: the per-MB and per-read
            # terms explain the same, and the other terms are the ones the share is fitted on
            out.append(Sample(i % 6, k, flops, w, ms + float(rng.normal(0, noise)),
                              streamed_mb=mb, beside_mb=0.9 * ms_beside,
                              beside_reads=3 * ms_beside, beside_ms=ms_beside))
        return out

    fit = fit_compute(samples(0.0), (8,))
    assert fit.contention_share == pytest.approx(0.35, rel=1e-6)
    assert fit.stream_ms_per_mb == pytest.approx(0.2, rel=1e-6)
    noisy = fit_compute(samples(0.05), (8,))
    assert 0 < noisy.stderr.contention_share
    assert abs(noisy.contention_share - 0.35) < 5 * noisy.stderr.contention_share
    assert fit_compute(samples(0.0, beside=False), (8,)).contention_share == 0.0
    assert fit_compute(samples(0.0, share=3.0), (8,)).contention_share == MAX_CONTENTION_SHARE


def test_fit_separates_the_one_vector_terms():
    """A decoder's samples: weights multiplied by one vector at the kernel's bitwidth (4)
    cost their own term, beside the matrix terms of the same and other bitwidths."""
    from runtime.calibrate import Sample

    rng = np.random.default_rng(2)
    out = []
    for i in range(80):
        k = int(rng.integers(1, 25))
        flops = float(rng.uniform(1e6, 5e8)) if i % 2 else 0.0
        w = {4: int(rng.integers(0, 10**6)), 32: int(rng.integers(0, 10**6))}
        vec = {4: int(rng.integers(0, 10**6))} if i % 2 == 0 else {}
        ms = 0.3 + 0.05 * k + flops / 60e6 + (0.6 * w[4] + 0.3 * w[32] + 0.13 * vec.get(4, 0)) / 1e6
        out.append(Sample(i % 6, k, flops, w, ms, vector_weights=vec))
    fit = fit_compute(out, (4, 32), None, (4,))
    assert fit.dequant_ns == pytest.approx({4: 0.6, 32: 0.3}, rel=1e-6)
    assert fit.vector_ns == pytest.approx({4: 0.13}, rel=1e-6)
    assert fit.gflops == pytest.approx(60.0, rel=1e-6)
    assert fit.stderr.vector_ns.keys() == {4}
    with pytest.raises(CalibrationError, match=r"at \[8\] bits multiplied by one vector"):
        fit_compute(out, (4, 32), None, (4, 8))


def test_one_slow_run_moves_no_term_and_wide_errors_are_refused(scenario):
    """A calibration sample is the median of its plan's runs: one run three times as slow
    leaves every sample, every fitted term and the noise figure where they were. A
    calibration whose
    out-of-sample stage errors are wide is refused with the stage, both figures, the
    machine's noise and what to try."""
    from types import SimpleNamespace

    from runtime.calibrate import (
        Calibration,
        _samples,
        design,
        refusal,
        run_to_run,
        wide_stages,
    )

    model = scenario.model
    designed = [(name, sel, None) for name, sel in design(model, 9, np.random.default_rng(0))]
    rng = np.random.default_rng(1)

    def run(sel, slow=1.0):
        layers, t = [], 0.0
        for picks in sel:
            ms = (0.5 + 0.1 * len(picks)) * slow * float(rng.uniform(0.99, 1.01))
            layers.append(SimpleNamespace(compute_start_ms=t, compute_end_ms=t + ms, read_bytes=0))
            t += ms
        return SimpleNamespace(layers=layers, latency_ms=t)

    steady = [[run(sel) for _ in range(5)] for _, sel, _ in designed]
    bumped = [runs[:2] + [run(designed[i][1], slow=3.0)] + runs[3:]
              for i, runs in enumerate(steady)]
    a, b = _samples(model, designed, steady), _samples(model, designed, bumped)
    fa, fb = fit_compute(a, (2, 3, 4, 6, 8)), fit_compute(b, (2, 3, 4, 6, 8))
    assert [s.ms for s in b] == pytest.approx([s.ms for s in a], rel=0.03)
    assert fb.layer_overhead_ms == pytest.approx(fa.layer_overhead_ms, rel=0.05, abs=0.01)
    assert fb.shard_overhead_ms == pytest.approx(fa.shard_overhead_ms, rel=0.05)
    # the noise figure is robust too: one slow run in five does not inflate it; runs that
    # all scatter by +-20 % do
    assert run_to_run(steady) < 2.0 and run_to_run(bumped) < 2.0
    scattered = [[run(sel, slow=float(rng.uniform(0.8, 1.2))) for _ in range(5)]
                 for _, sel, _ in designed]
    assert run_to_run(scattered) > 5.0
    errors = {"io": (0.5, 1.0), "compute": (7.5, 20.0), "total": (4.0, 16.0)}
    assert wide_stages(errors, 5.0) == ["compute", "total"]  # median 7.5; p95 16 > 15
    assert wide_stages(errors, 8.0) == []
    from elasticplan.problem.spec import Spread

    device = SimpleNamespace(spread=Spread(io=0.02, compute=0.1, runs=60))
    cal = Calibration(device=device, fit=fa, stage_errors=errors,
                      facts={"noise_pct": 9.3, "repeats": 12, "seconds": 61.0})
    text = refusal(cal, ["compute"], 5.0)
    assert "compute median 7.5 % / p95 20.0 %" in text and "9.3 %" in text
    assert "Nothing was written" in text and "--max-error-pct" in text
    assert "too noisy" in text  # 9.3 % sigma: a median of 5 runs is +-5.2 %, above 5 %
    cal.facts["noise_pct"] = 2.0
    assert "too noisy" not in refusal(cal, ["compute"], 5.0)
    # a spread a device file may not carry (> 1) is a reason of its own
    device.spread = Spread(io=1.1, compute=0.1, runs=60)
    assert "IO stage's runs spread 1.10" in refusal(cal, [], 5.0)


def test_calibration_design_separates_every_term(scenario):
    """One plan per stored bitwidth (only that bitwidth), then hold-in-memory (every shard
    fp32, preloaded); too few plans for that is refused."""
    from runtime.calibrate import design

    model = scenario.model
    plans = design(model, 9, np.random.default_rng(0))
    assert len(plans) == 9
    for b, (_, sel) in enumerate(plans[:len(model.bitwidths)]):
        assert {p.bit for picks in sel for p in picks} == {b}
        assert len({len(picks) for picks in sel}) > 1  # subsets of several sizes
    _, hold = plans[len(model.bitwidths)]
    assert all(p.preloaded and model.bitwidths[p.bit] == 32 for picks in hold for p in picks)
    assert sum(map(len, hold)) == model.n_shards
    with pytest.raises(CalibrationError, match="too few"):
        design(model, len(model.bitwidths), np.random.default_rng(0))
    # a decoder's kernel bits: every shard held at them, a plan of its own after
    # hold-in-memory, in place of a random one (the lowest bitwidth has its plan already)
    bits = model.bitwidths[1]
    plans = design(model, 12, np.random.default_rng(0))
    held = design(model, 12, np.random.default_rng(0), held_bits=(bits, model.bitwidths[0]))
    assert len(held) == 12 and held[:len(model.bitwidths) + 1] == plans[:len(model.bitwidths) + 1]
    name, sel = held[len(model.bitwidths) + 1]
    assert name == f"every shard at {bits} bits, preloaded"
    assert {(p.bit, p.preloaded) for picks in sel for p in picks} == {(1, True)}
    assert sum(map(len, sel)) == model.n_shards
    assert [n for n, _ in held].count("random") == [n for n, _ in plans].count("random") - 1
    # `calibrate --throttle`: every shard at the top bitwidth, streamed (layers read whole)
    streamed = design(model, 12, np.random.default_rng(0), streamed_top=True)
    assert len(streamed) == 12
    (sel,) = [sel for name, sel in streamed if name == "every shard at 32 bits, streamed"]
    assert {(model.bitwidths[p.bit], p.preloaded) for picks in sel for p in picks} == {(32, False)}
    assert sum(map(len, sel)) == model.n_shards
    assert [n for n, _ in streamed].count("random") == [n for n, _ in plans].count("random") - 1


def test_calibrate_cli_writes_a_device_and_a_scenario_that_load(store_dir, tmp_path, capsys):
    """`elasticplan calibrate` end to end (7 plans): a strict error limit is refused (exit 9,
    nothing written); 2 rounds under a loose one write both files, and both load, the device
    has every compute term (a per-weight cost for every quantised bitwidth), its spread and
    the fit's report in its header, and the scenario solves; writing onto its own base
    scenario is refused before measuring."""
    out = tmp_path / "cal"
    assert main(["calibrate", "--store", str(store_dir), "--storage-mb-s", "200",
                 "--plans", "7", "--repeats", "1", "--out-dir", str(out),
                 "--max-error-pct", "0.1", "--budget-s", "0"]) == 9
    assert "does not predict its own calibration runs" in capsys.readouterr().err
    assert not out.exists()  # refused before writing anything
    # Even a loose limit leaves the spread a device may carry (1): on a busy machine the
    # runs may spread wider, and calibrate refuses (rightly; nothing written). Three tries.
    for _ in range(3):
        code = main(["calibrate", "--store", str(store_dir), "--storage-mb-s", "200",
                     "--plans", "7", "--repeats", "2", "--out-dir", str(out),
                     "--max-error-pct", "1000", "--budget-s", "0"])
        if code == 0:
            break
        assert code == 9 and "Nothing was written" in capsys.readouterr().err
        assert not out.exists()
    else:
        pytest.skip("this machine's runs spread beyond what a device may carry, three times "
                    "(calibrate refused each, correctly)")
    sc = load_scenario(out / "scenario.yaml")
    d = sc.device
    assert d.bandwidth_mb_s == 200 and d.gflops > 0 and d.dequant_gb_s is None
    assert [b for b, _ in d.dequant_ns_per_weight] == [2, 3, 4, 6, 8]
    assert d.embed_ms > 0 and d.pool_ms > 0 and d.spread.runs == 14
    assert d.contention_share == 0.0  # an emulated device: no timed replay, no share
    header = (out / "device.yaml").read_text()
    assert "gflops" in header and "+-" in header and "Residual" in header
    assert "Stage |error|" in capsys.readouterr().out
    assert main(["solve", str(out / "scenario.yaml"), "--solver", "greedy"]) == 0
    assert main(["calibrate", "--store", str(store_dir), "--storage-mb-s", "200",
                 "--scenario", str(out / "scenario.yaml"), "--out-dir", str(out)]) == 2
    assert "refusing to write" in capsys.readouterr().err


def test_run_enforce_fails_on_a_measured_peak_above_the_budget(scenario, store_dir, tmp_path,
                                                               monkeypatch, capsys):
    """A memory-budgeted plan whose run measures more than its budget exits 10 with
    --enforce (the measurement is inflated here; the executor itself never exceeds it)."""
    import dataclasses

    import runtime.measurement.measure as measure
    from elasticplan.solvers import solve

    plan_path = tmp_path / "mem.plan.json"
    solve(scenario.with_overrides(memory_budget_mb=16, prefetch_window=1),
          time_limit_s=5).save(plan_path)
    real = measure.measure_plans

    def inflated(*args, **kwargs):
        return [dataclasses.replace(r, memory=dataclasses.replace(
            r.memory, measured_peak_bytes=16_000_001)) for r in real(*args, **kwargs)]

    args = ["run", str(plan_path), "--store", str(store_dir), "--repeat", "1", "--no-emulate",
            "--enforce", "--tolerance", "100"]
    assert main(args) == 0  # as measured: within the budget
    monkeypatch.setattr(measure, "measure_plans", inflated)  # run imports it when it runs
    assert main(args) == 10
    assert "measured peak memory 16.000 MB exceeds the plan's memory budget 16 MB" in \
        capsys.readouterr().err


def test_baseline_and_evaluate_commands(store_dir, tmp_path, capsys):
    """`elasticplan baseline` writes a strategy as a plan that verifies (uniform-B: every
    shard streamed at B bits; an unknown name or bitwidth is a one-line error, exit 2), and
    `elasticplan evaluate` measures a plan's submodel on the test split: hold-in-memory
    (every shard fp32) is the fp32 model itself, and uniform-3 what the profiler's own
    whole-model measurement gives, each with its sampling error."""
    head = str(PROBLEMS / "models" / "minilm-l6.taskhead.json")
    hold, u3 = tmp_path / "hold.json", tmp_path / "u3.json"
    assert main(["baseline", "hold-in-memory", str(MINILM), "-o", str(hold)]) == 0
    assert main(["baseline", "uniform-3", str(MINILM), "-o", str(u3)]) == 0
    assert main(["verify", str(u3)]) == 0
    plan = Plan.load(u3)
    assert plan.solver == "uniform-3" and plan.preload_bytes == 0
    assert {c.bits for lp in plan.layers for c in lp.shards} == {3}
    assert plan.n_shards == 144
    assert main(["baseline", "uniform-5", str(MINILM), "-o", str(tmp_path / "x.json")]) == 2
    assert "stores 2, 3, 4, 6, 8, 32 bits" in capsys.readouterr().err
    out = tmp_path / "e.json"
    assert main(["evaluate", str(hold), "--store", str(store_dir), "--head", head,
                 "--json", str(out)]) == 0
    full = json.loads(out.read_text())
    assert full["texts"] == 1000 and full["fidelity"] == pytest.approx(1.0, abs=1e-5)
    assert full["accuracy"] == full["fp32_accuracy"]
    assert main(["evaluate", str(u3), "--store", str(store_dir), "--head", head,
                 "--json", str(out)]) == 0
    e = json.loads(out.read_text())
    from runtime.profiling.submodel import TestSplit

    q = TestSplit(ShardStore(store_dir), head).uniform(3)
    assert e["fidelity"] == pytest.approx(q.fidelity, abs=1e-6)
    assert e["accuracy"] == pytest.approx(q.accuracy)
    assert 0 < e["fidelity_stderr"] < 0.01 and 0 < e["accuracy_stderr"] < 0.02
