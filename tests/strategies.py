"""Shared constructive strategies: valid small problems built directly, never filtered."""

from __future__ import annotations

import dataclasses

from hypothesis import strategies as st

from elasticplan.problem.question import Objective, Question
from elasticplan.problem.spec import Device, Layer, ModelProfile, Scenario, Shard

BITS = (2, 3, 4, 8, 32)


def _num(lo: float, hi: float):
    # Rounded to 4 significant digits: realistic inputs, no denormal noise.
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False).map(lambda v: float(f"{v:.4g}"))


@st.composite
def devices(draw):
    """Every compute term in play: the per-byte and per-weight dequantisation (either or
    both), a per-shard overhead, the per-query embedding and pooling, the wake-up, the
    contention on streamed shards. (Drawn before, CP-SAT disagreed with HiGHS's row
    generation: on min_memory, with or without the term, OR-Tools 9.15's presolve proved a
    worse plan optimal (test_cpsat_presolve_keeps_the_optimum); on min_latency by less than
    CP-SAT's tick rounding, which the term's sub-tick coefficients made show.)"""
    per_byte = draw(st.one_of(st.none(), _num(0.5, 20)))
    per_weight = () if per_byte is not None and draw(st.booleans()) else \
        tuple((b, draw(_num(0, 5))) for b in BITS if b < 32)
    return Device(name="dev", bandwidth_mb_s=draw(_num(20, 2000)),
                  latency_us=draw(_num(0, 500)), gflops=draw(_num(1, 200)),
                  layer_overhead_ms=draw(_num(0, 2)), dequant_gb_s=per_byte, memory_mb=1e4,
                  shard_overhead_ms=draw(st.one_of(st.just(0.0), _num(0, 0.5))),
                  dequant_ns_per_weight=per_weight,
                  embed_ms=draw(st.one_of(st.just(0.0), _num(0, 3))),
                  pool_ms=draw(st.one_of(st.just(0.0), _num(0, 1))),
                  wake_ms=draw(st.one_of(st.just(0.0), _num(0, 0.5))),
                  stream_ms_per_mb=draw(st.one_of(st.just(0.0), _num(0, 3))),
                  contention_ms_per_mb=draw(st.one_of(st.just(0.0), _num(0, 3))),
                  contention_ms_per_read=draw(st.one_of(st.just(0.0), _num(0, 0.5))))


@st.composite
def models(draw, max_layers=2, max_shards=2, max_bits=2, shared_costs=False,
           same_shape=False, min_layers=1):
    """With `shared_costs`, shards of a layer come in cost classes (equal flops and bytes,
    own importance), as heads and FFN slices do: the aggregated program's structure. With
    `same_shape`, every layer has the first layer's shard costs (own importances), as the
    layers of a transformer do."""
    bitwidths = tuple(sorted(draw(st.sets(st.sampled_from(BITS), min_size=1, max_size=max_bits))))
    layers = []
    shape: list = []
    for li in range(draw(st.integers(min_layers, max_layers))):
        shards = []
        costs = None
        count = len(shape) if same_shape and li else draw(st.integers(1, max_shards))
        for si in range(count):
            if same_shape and li:
                costs = shape[si]
            elif costs is None or not (shared_costs and draw(st.booleans())):
                # bytes grow with bits, importance too (as real quantisation behaves)
                per_bit = draw(st.integers(500, 300_000))
                costs = (tuple(per_bit * b // 8 + draw(st.integers(0, 500)) for b in bitwidths),
                         draw(_num(1e4, 2e8)), per_bit)
            if not li:
                shape.append(costs)
            nbytes, flops, weights = costs
            base = draw(_num(0.001, 1.0))
            quality = sorted(draw(st.lists(_num(0.05, 1.0), min_size=len(bitwidths),
                                           max_size=len(bitwidths))))
            shards.append(Shard(name=f"s{si}", kind=draw(st.sampled_from(["head", "ffn"])),
                                flops=flops, bytes=nbytes, weights=weights,
                                importance=tuple(float(f"{base * q:.6g}") for q in quality)))
        layers.append(Layer(shards=tuple(shards)))
    return ModelProfile(name="m", seq_len=16, bitwidths=bitwidths, layers=tuple(layers))


@st.composite
def scenarios(draw, max_layers=2, max_shards=2, max_bits=2, min_shards=None,
              shared_costs=False, same_shape=False, min_layers=1):
    model = draw(models(max_layers, max_shards, max_bits, shared_costs, same_shape, min_layers))
    widest = min(len(layer.shards) for layer in model.layers)
    m = draw(st.integers(0, min(2, widest))) if min_shards is None else min(min_shards, widest)
    return Scenario(name="generated", device=draw(devices()), model=model,
                    question=Question(target_latency_ms=draw(_num(0.2, 60)),
                                      preload_budget_mb=draw(_num(0, 0.6)),
                                      min_shards_per_layer=m, objective=Objective.MAX_IMPORTANCE),
                    content_hash="generated")


@st.composite
def memory_scenarios(draw, max_layers=3, max_shards=2, max_bits=2, shared_costs=False,
                     same_shape=False, min_layers=1):
    """A scenario with the memory model in play: fixed memory terms, perhaps a streamable
    embedding table, a prefetch window, and a memory budget between the least any plan
    holds and everything held at once (so it binds, or is infeasible, or is slack)."""
    sc = draw(scenarios(max_layers, max_shards, max_bits, shared_costs=shared_costs,
                        same_shape=same_shape, min_layers=min_layers))
    rows = draw(st.sampled_from([0, 0, 50, 5000]))
    model = dataclasses.replace(
        sc.model, resident_bytes=draw(st.integers(0, 100_000)),
        embedding_rows=rows, embedding_row_bytes=draw(st.integers(4, 2000)) if rows else 0,
        activation_bytes=draw(st.integers(0, 50_000)), scratch_bytes=draw(st.integers(0, 50_000)))
    window = draw(st.sampled_from([None, 1, 2]))
    everything = sum(max(s.bytes) for layer in model.layers for s in layer.shards)
    budget = None
    if draw(st.booleans()):
        share = draw(st.floats(0, 1.2))
        budget = (model.fixed_memory_bytes + model.embedding_table_bytes
                  + share * everything) / 1e6
        budget = float(f"{max(budget, model.fixed_memory_bytes / 1e6 + 1e-6):.6g}")
    return sc.with_overrides(model=model, prefetch_window=window, memory_budget_mb=budget)
