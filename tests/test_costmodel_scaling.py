"""The cost model by hand, and the integer scaling's soundness and bound."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from elasticplan.costmodel import Layout, Pick, read_ms, simulate
from elasticplan.problem.question import Objective, Question
from elasticplan.problem.spec import Device, Layer, ModelProfile, Scenario, Shard
from elasticplan.solvers.plain import program as formulation
from elasticplan.solvers.plain import scaling
from tests import oracle
from tests.strategies import scenarios


def _hand_scenario(min_shards=1):
    dev = Device("d", bandwidth_mb_s=100, latency_us=1000, gflops=1, layer_overhead_ms=0.5,
                 dequant_gb_s=0.1, memory_mb=100)
    shard = Shard("a", "head", flops=2e6, bytes=(100_000, 400_000), importance=(0.5, 1.0))
    model = ModelProfile("m", 8, (8, 32), (Layer((shard,)), Layer((shard,))))
    return Scenario("s", dev, model, Question(target_latency_ms=100, preload_budget_mb=1,
                                              min_shards_per_layer=min_shards))


def test_schedule_by_hand():
    sc = _hand_scenario()
    # layer 0: 8-bit streamed: read 1 ms + 100000 B / 100 MB/s = 2 ms;
    #          compute 0.5 + 2e6 flop / 1 GFLOP/s (2 ms) + 100000 B / 0.1 GB/s (1 ms) = 3.5 ms
    # layer 1: fp32 preloaded: no read; compute 0.5 + 2 = 2.5 ms
    s = simulate(sc, ((Pick(0, 0, False),), (Pick(0, 1, True),)))
    assert read_ms(sc.device, 100_000) == pytest.approx(2.0)
    t0, t1 = s.layers
    assert (t0.io_start_ms, t0.io_end_ms, t0.compute_start_ms, t0.compute_end_ms) == \
        pytest.approx((0, 2, 2, 5.5))
    assert (t1.io_start_ms, t1.io_end_ms, t1.compute_start_ms, t1.compute_end_ms) == \
        pytest.approx((2, 2, 5.5, 8.0))
    assert s.latency_ms == pytest.approx(8.0)
    assert (s.preload_bytes, s.streamed_bytes, s.importance) == (400_000, 100_000, 1.5)


def test_contention_charges_streamed_shards_only():
    """stream_ms_per_mb adds stored MB x it to a streamed shard's compute and nothing to a
    preloaded one's; the exact program (HiGHS) and greedy plan on the same charge (their
    plans verify, and a target that the charge makes too short is infeasible)."""
    from elasticplan.errors import InfeasibleError
    from elasticplan.plans.verify import verify_plan
    from elasticplan.solvers import solve

    sc = _hand_scenario()
    slow = sc.with_overrides(device=dataclasses.replace(sc.device, stream_ms_per_mb=2.0))
    sel = ((Pick(0, 0, False),), (Pick(0, 1, True),))
    base, charged = simulate(sc, sel), simulate(slow, sel)
    # layer 0 streams 0.1 MB: +0.2 ms of compute; layer 1 is preloaded: unchanged
    c = [t.compute_end_ms - t.compute_start_ms for t in charged.layers]
    c0 = [t.compute_end_ms - t.compute_start_ms for t in base.layers]
    assert c == pytest.approx([c0[0] + 0.2, c0[1]])
    assert charged.latency_ms == pytest.approx(base.latency_ms + 0.2)
    for solver in ("highs", "cpsat", "greedy"):
        plan = solve(slow.with_overrides(target_latency_ms=charged.latency_ms), solver)
        verify_plan(slow.with_overrides(target_latency_ms=charged.latency_ms), plan)
    # the cheapest plan without the charge: both layers one 8-bit shard, preloaded where
    # the buffer allows; with a huge charge nothing streamed fits a tight target
    tight = dataclasses.replace(sc.device, stream_ms_per_mb=1e4)
    with pytest.raises(InfeasibleError):
        solve(sc.with_overrides(device=tight, preload_budget_mb=0.0,
                                target_latency_ms=base.latency_ms), "highs")


def test_read_contention_is_charged_only_where_reads_overlap_compute():
    """contention_ms_per_mb adds stored MB x it, and contention_ms_per_read its read
    requests x it, to a streamed shard's compute in a
    pipelined plan with a window (its reads run beside compute), and nothing in sequential
    execution (every read before any compute) or at window 0 (load-on-demand: a layer's
    reads wait for the layer before it); the exact program plans on the same charge."""
    from elasticplan.costmodel import SEQUENTIAL
    from elasticplan.plans.verify import verify_plan
    from elasticplan.solvers import solve

    sc = _hand_scenario()
    busy = sc.with_overrides(device=dataclasses.replace(sc.device, stream_ms_per_mb=1.0,
                                                        contention_ms_per_mb=3.0,
                                                        contention_ms_per_read=0.25))
    sel = ((Pick(0, 0, False),), (Pick(0, 1, True),))

    def work(s):
        return [t.compute_end_ms - t.compute_start_ms for t in s.layers]

    base = work(simulate(sc, sel))
    # layer 0 streams 0.1 MB in one read: +0.1 ms (streamed weights) +0.3 ms and +0.25 ms
    # (its bytes and its read beside compute)
    assert work(simulate(busy, sel)) == pytest.approx([base[0] + 0.65, base[1]])
    assert work(simulate(busy, sel, layout=Layout(window=1))) == \
        pytest.approx([base[0] + 0.65, base[1]])
    assert work(simulate(busy, sel, SEQUENTIAL)) == pytest.approx([base[0] + 0.1, base[1]])
    assert work(simulate(busy, sel, layout=Layout(window=0))) == \
        pytest.approx([base[0] + 0.1, base[1]])
    target = simulate(busy, sel).latency_ms
    plan = solve(busy.with_overrides(target_latency_ms=target), "highs")
    verify_plan(busy.with_overrides(target_latency_ms=target), plan)


def test_contention_placed_in_time_by_hand():
    """pipeline's `share`: while the channel reads, compute runs at 1 - share of its speed.
    Three layers, reads 2, 4, 4 ms, compute 5 ms each, share 0.5."""
    from elasticplan.costmodel import pipeline

    def spans(times):
        return [(t.io_start_ms, t.io_end_ms, t.compute_start_ms, t.compute_end_ms)
                for t in times]

    # unbounded window: the channel reads [0, 10]; layer 0 computes from 2 beside the
    # reads of layers 1 and 2 (8 ms: 4 ms of work), then 1 ms alone: ends at 11
    assert spans(pipeline([2.0, 4.0, 4.0], [5.0] * 3, share=0.5)) == \
        [(0.0, 2.0, 2.0, 11.0), (2.0, 6.0, 11.0, 16.0), (6.0, 10.0, 16.0, 21.0)]
    # window 1: layer 2's reads wait for layer 0's compute (ends at 9: [2, 6] beside layer
    # 1's reads), then slow layer 1's compute for their 4 ms
    assert spans(pipeline([2.0, 4.0, 4.0], [5.0] * 3, window=1, share=0.5)) == \
        [(0.0, 2.0, 2.0, 9.0), (2.0, 6.0, 9.0, 16.0), (9.0, 13.0, 16.0, 21.0)]
    # share 0 is the recurrence as it was; a share of 1 or more makes no progress
    assert spans(pipeline([2.0, 4.0, 4.0], [5.0] * 3, share=0.0)) == \
        spans(pipeline([2.0, 4.0, 4.0], [5.0] * 3))
    with pytest.raises(ValueError, match="contention share"):
        pipeline([1.0], [1.0], share=1.0)


@given(reads=st.lists(st.floats(0, 10), min_size=1, max_size=7), data=st.data())
def test_contention_placed_in_time_adds_share_of_the_reads_beside(reads, data):
    """Each layer's compute takes its own time plus share x the time the channel read
    within it (read_busy), exactly; no layer computes less than it would without
    contention, and none more than its time / (1 - share); the reads' intervals are
    unchanged where no window waits on a compute (unbounded)."""
    from elasticplan.costmodel import pipeline, read_busy

    L = len(reads)
    work = data.draw(st.lists(st.floats(0, 10), min_size=L, max_size=L))
    window = data.draw(st.sampled_from([None, *range(0, L + 1)]))
    share = data.draw(st.sampled_from([0.2, 0.5, 0.9]))
    wake = data.draw(st.sampled_from([0.0, 0.08]))
    slow = pipeline(reads, work, window=window, wake_ms=wake, share=share)
    busy = read_busy([(t.io_start_ms, t.io_end_ms) for t in slow], reads)
    for t, w in zip(slow, work):
        took = t.compute_end_ms - t.compute_start_ms
        beside = sum(max(0.0, min(b, t.compute_end_ms) - max(a, t.compute_start_ms))
                     for a, b in busy)
        assert took == pytest.approx(w + share * beside, rel=1e-9, abs=1e-9)
        assert w - 1e-9 <= took <= w / (1 - share) + 1e-9
    if window is None:
        plain = pipeline(reads, work, wake_ms=wake)
        assert [(t.io_start_ms, t.io_end_ms) for t in slow] == \
            [(t.io_start_ms, t.io_end_ms) for t in plain]
        assert slow[-1].compute_end_ms >= plain[-1].compute_end_ms - 1e-9


def test_throttled_replay_places_the_contention_in_time():
    """simulate(..., steps=) with a device's contention_share prices the shards' compute
    without the per-MB and per-read contention and slows each layer's compute while the
    channel reads beside it; without a share, or without steps, the per-shard terms."""
    from elasticplan.costmodel import Steps

    sc = _hand_scenario()
    linear = dataclasses.replace(sc.device, contention_ms_per_mb=3.0, contention_ms_per_read=0.25)
    timed = dataclasses.replace(linear, contention_share=0.5)
    sel = ((Pick(0, 0, False),), (Pick(0, 0, False),))
    steps = Steps(round(sc.device.bandwidth_mb_s * 1e6))
    at = {name: simulate(sc.with_overrides(device=d), sel, steps=s)
          for name, d, s in (("linear", linear, steps), ("unstepped", timed, None),
                             ("timed", timed, steps), ("none", sc.device, steps))}
    assert at["unstepped"] == at["linear"]  # no steps: the planner's per-shard charge
    none, t = at["none"].layers, at["timed"].layers
    # the reads are where they were; layer 0 computes beside layer 1's reads
    assert [(x.io_start_ms, x.io_end_ms) for x in t] == \
        [(x.io_start_ms, x.io_end_ms) for x in none]
    beside = max(0.0, t[1].io_end_ms - t[0].compute_start_ms)
    assert beside > 0
    assert t[0].compute_end_ms - t[0].compute_start_ms == pytest.approx(
        none[0].compute_end_ms - none[0].compute_start_ms + 0.5 * beside)
    assert t[1].compute_end_ms - t[1].compute_start_ms == pytest.approx(
        none[1].compute_end_ms - none[1].compute_start_ms)


def test_concurrent_spreads_each_layers_reads_over_its_interval():
    """The contention features: a layer's read bytes and requests spread evenly over its
    IO interval, counted where that interval overlaps the layer's compute, and the time
    they overlap."""
    from runtime.executor import LayerTrace, concurrent

    t = [LayerTrace(0, 1, 4_000_000, 0.0, 4.0, 4.0, 6.0, 0.0),   # read before it computes
         LayerTrace(1, 6, 2_000_000, 4.0, 8.0, 8.0, 9.0, 0.0),   # half of it during layer 0
         LayerTrace(2, 0, 0, 8.0, 8.0, 9.0, 9.5, 0.0)]           # nothing read
    assert concurrent(t, 0) == pytest.approx((1.0, 3.0, 2.0))
    assert concurrent(t, 1) == pytest.approx((0.0, 0.0, 0.0))
    assert concurrent(t, 2) == pytest.approx((0.0, 0.0, 0.0))
    # an emulated device: layer 1's bytes really read in [4, 5], then a sleep to 8
    t[1] = dataclasses.replace(t[1], read_span_ms=(4.0, 5.0))
    assert concurrent(t, 0) == pytest.approx((2.0, 6.0, 1.0))


def test_window_and_memory_by_hand():
    """Three layers, each one 8-bit shard streamed: read 2 ms, compute 3.5 ms, 100 kB."""
    import dataclasses

    sc = _hand_scenario()
    shard = sc.model.layers[0].shards[0]
    model = dataclasses.replace(sc.model, layers=(Layer((shard,)),) * 3, resident_bytes=1000,
                                embedding_rows=100, embedding_row_bytes=10,
                                activation_bytes=300, scratch_bytes=20)
    sc = dataclasses.replace(sc, model=model)
    sel = ((Pick(0, 0, False),),) * 3
    free = simulate(sc, sel)  # unbounded: reads back to back
    assert [t.io_start_ms for t in free.layers] == pytest.approx([0, 2, 4])
    assert free.latency_ms == pytest.approx(2 + 3 * 3.5)
    assert free.memory.to_dict() == {"resident_bytes": 1000 + 1000, "preload_bytes": 0,
                                     "working_peak_bytes": 300_000 + 20,
                                     "activation_bytes": 300, "peak_bytes": 302_320}
    # W = 1: layer 2's reads wait for layer 0's compute (ends at 5.5)
    w1 = simulate(sc, sel, layout=Layout(window=1))
    assert [t.io_start_ms for t in w1.layers] == pytest.approx([0, 2, 5.5])
    assert [t.compute_end_ms for t in w1.layers] == pytest.approx([5.5, 9, 12.5])
    assert w1.memory.working_peak_bytes == 200_000 + 20
    # streamed table: 8 rows (seq_len) of 1 ms + 10 B / 100 MB/s each, read first
    st_ = simulate(sc, sel, layout=Layout(window=1, stream_embeddings=True))
    assert st_.layers[0].io_start_ms == pytest.approx(8 * 1.0001)
    assert st_.memory.resident_bytes == 1000
    assert st_.memory.activation_bytes == 300 + 8 * 10


@given(sc=scenarios(max_layers=4, max_shards=2, max_bits=2), data=st.data())
def test_window_reduces_to_unbounded_and_trades_memory_for_time(sc, data):
    """A window as deep as the model is the unbounded pipeline; a deeper window is never
    slower and never holds less."""
    from tests.oracle import all_selections

    L = len(sc.model.layers)
    sel = data.draw(st.sampled_from(list(itertools.islice(all_selections(sc), 200))))
    free = simulate(sc, sel)
    assert simulate(sc, sel, layout=Layout(window=L)) == \
        dataclasses.replace(free, layout=Layout(window=L))
    prev = None
    for w in range(1, L + 1):
        s = simulate(sc, sel, layout=Layout(window=w))
        if prev is not None:
            assert s.latency_ms <= prev.latency_ms + 1e-9
            assert s.memory.working_peak_bytes >= prev.memory.working_peak_bytes
        prev = s
    assert prev.latency_ms == pytest.approx(free.latency_ms, abs=1e-9)


def test_skipped_layer_costs_nothing():
    sc = _hand_scenario(min_shards=0)
    s = simulate(sc, ((), (Pick(0, 1, False),)))
    # layer 1 alone: read 1 + 4 = 5 ms, compute 2.5 ms; layer 0 adds no overhead
    assert s.layers[0].compute_end_ms == 0
    assert s.latency_ms == pytest.approx(7.5)


@given(coefs=st.lists(st.floats(-50, 50, allow_nan=False), min_size=1, max_size=8),
       rhs=st.floats(-100, 100, allow_nan=False), sense=st.sampled_from(["<=", ">="]),
       scale=st.sampled_from([1.0, 1e5, 1e8]), data=st.data())
def test_row_rounding_is_conservative_and_bounded(coefs, rhs, sense, scale, data):
    row = formulation.Row("r", formulation.Unit.TIME_MS,
                          tuple((f"x{i}", c) for i, c in enumerate(coefs)), sense, rhs)
    ints = scaling.scale_row(row, scale, frozenset())
    x = data.draw(st.lists(st.integers(0, 1), min_size=len(coefs), max_size=len(coefs)))
    exact_lhs = sum(c * v for c, v in zip(coefs, x)) * scale
    int_lhs = sum(c * v for (_, c), v in zip(ints.terms, x))
    active = sum(x)
    sign = 1 if sense == "<=" else -1
    # conservative: the scaled slack is never larger than the exact one
    assert sign * (int_lhs - exact_lhs) >= -1e-6 * max(1.0, abs(exact_lhs))
    assert sign * (ints.rhs - rhs * scale) <= 1e-6 * max(1.0, abs(rhs * scale))
    # bounded: less than one unit per active boolean, and one for the bound
    assert abs(int_lhs - exact_lhs) <= active + 1e-6 * max(1.0, abs(exact_lhs))
    assert abs(ints.rhs - rhs * scale) <= 1 + 1e-6 * max(1.0, abs(rhs * scale))


@given(sc=scenarios(max_layers=3, max_shards=3, max_bits=3), data=st.data())
def test_scaled_latency_of_any_plan_is_within_bound(sc, data):
    """For any selection: exact latency <= scaled latency <= exact + documented margin."""
    sel = data.draw(st.sampled_from(list(_few_selections(sc))))
    lat = sc.with_overrides(objective=Objective.MIN_LATENCY)
    program = formulation.build(lat)
    ip = scaling.to_integers(program)
    bools = program.assignment(sel)
    z = scaling.earliest_times(ip, bools)["Z"] * ip.tick_ms
    exact = simulate(sc, sel).latency_ms
    assert exact - 1e-9 <= z <= exact + oracle.rounding_margin_ms(sc)
    violated = scaling.satisfies(ip, {**bools, **scaling.earliest_times(ip, bools)})
    assert [label for label in violated if label.startswith("latency")] == []


def _few_selections(sc, limit=200):
    for i, sel in enumerate(oracle.all_selections(sc)):
        if i >= limit:
            return
        yield sel


def test_formulation_matches_cost_model_on_shipped_plan(tmp_path):
    """The solver's own objective equals the cost model's on a returned plan."""
    from elasticplan.problem.loader import load_scenario
    from elasticplan.solvers import solve

    sc = load_scenario("problems/scenarios/minilm-phone.yaml")
    plan = solve(sc, "cpsat", time_limit_s=60)
    program = formulation.build(sc)
    values = program.assignment(plan.selection(sc))
    objective = sum(c * values[v] for v, c in program.objective)
    assert math.isclose(objective, plan.importance, rel_tol=1e-12)
    assert simulate(sc, plan.selection(sc)).latency_ms == pytest.approx(plan.predicted_latency_ms)


@given(reads=st.lists(st.floats(0, 10), min_size=1, max_size=7), data=st.data())
def test_critical_path_sums_to_the_latency_and_every_path_is_below_it(reads, data):
    """The critical path's reads and compute (and the embedding, for a path that starts
    there) sum to the schedule's latency; any path of the recurrence (here: the unrolled
    rows "reads of 0..l, compute of l..L-1", valid under every window, and "the embedding,
    then every layer's compute") sums to at most it, which is what makes a path a valid
    row."""
    from elasticplan.costmodel import critical_path, path_ms, pipeline

    L = len(reads)
    work = data.draw(st.lists(st.floats(0, 10), min_size=L, max_size=L))
    window = data.draw(st.sampled_from([None, *range(1, L + 1)]))
    start = data.draw(st.floats(0, 5))
    embed = data.draw(st.sampled_from([0.0, 0.5, 20.0]))
    wake = data.draw(st.sampled_from([0.0, 0.08, 3.0]))
    times = pipeline(reads, work, window=window, start_ms=start, embed_ms=embed, wake_ms=wake)
    latency = times[-1].compute_end_ms

    def total(path):
        return path_ms(path, reads, work, start, embed, wake)

    path = critical_path(times, window, start, embed, wake)
    assert path[-1] & 2 and (path[0] & 1 or embed > 0)
    assert total(path) == pytest.approx(latency, rel=1e-9, abs=1e-9)
    for row in range(L):
        unrolled = tuple(1 if i < row else 3 if i == row else 2 for i in range(L))
        assert total(unrolled) <= latency + 1e-9
    assert total((2,) * L) <= latency + 1e-9


def test_embedding_and_pooling_bracket_the_layers():
    """The compute thread embeds before layer 0 and pools after the last layer: a plan
    that reads nothing is embed + compute + pool; the streamed rows come first."""

    dev = Device("d", bandwidth_mb_s=100, latency_us=1000, gflops=1, layer_overhead_ms=0.5,
                 dequant_gb_s=1.0, memory_mb=100, embed_ms=0.3, pool_ms=0.2)
    shard = Shard("a", "head", flops=2e6, bytes=(100_000, 400_000), importance=(0.5, 1.0))
    model = ModelProfile("m", 8, (8, 32), (Layer((shard,)), Layer((shard,))),
                         embedding_rows=10, embedding_row_bytes=100)
    sc = Scenario("s", dev, model, Question(target_latency_ms=100, preload_budget_mb=1.0))
    preloaded = ((Pick(0, 1, True),), (Pick(0, 1, True),))
    assert simulate(sc, preloaded).latency_ms == pytest.approx(0.3 + 2 * (0.5 + 2.0) + 0.2)
    streamed = simulate(sc, preloaded, layout=Layout(stream_embeddings=True))
    rows = 8 * (1.0 + 100 / 1e5)  # 8 reads of one 100-byte row
    assert streamed.layers[0].compute_start_ms == pytest.approx(rows + 0.3)
    assert streamed.latency_ms == pytest.approx(rows + 0.3 + 5.0 + 0.2)


def test_at_quantile_stretches_every_compute_term():
    """costmodel.stretched (at_quantile's): a plan that reads nothing takes the compute
    factor times as long; every compute term is stretched (a decoder's one-vector cost
    among them), a share of time (contention_share) is not."""
    from elasticplan.costmodel import at_quantile, stretched
    from elasticplan.problem.spec import Spread

    sc = _hand_scenario()
    d = dataclasses.replace(sc.device, embed_ms=0.5, pool_ms=0.2, wake_ms=0.1,
                            stream_ms_per_mb=1.0, contention_ms_per_mb=2.0,
                            contention_ms_per_read=0.1, contention_share=0.3,
                            vector_ns_per_weight=((8, 0.4),))
    sc = sc.with_overrides(device=d)
    held = ((Pick(0, 0, True),), (Pick(0, 1, True),))
    slow = sc.with_overrides(device=stretched(d, 1.0, 1.5))
    assert simulate(slow, held).latency_ms == pytest.approx(1.5 * simulate(sc, held).latency_ms)
    s = stretched(d, 2.0, 2.0)
    assert s.vector_ns_per_weight == ((8, 0.8),) and s.contention_share == 0.3
    assert (s.bandwidth_mb_s, s.latency_us) == (d.bandwidth_mb_s / 2, d.latency_us * 2)
    q = sc.with_overrides(device=dataclasses.replace(d, spread=Spread(0.1, 0.2, 10)),
                          latency_quantile=0.9)
    assert at_quantile(q).device.vector_ns_per_weight[0][1] > 0.4
