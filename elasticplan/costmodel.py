"""The one cost model: a plan's schedule, latency, buffer and importance.

Pure and solver-free. The formulation writes these same formulas as constraints;
the verifier, the greedy baseline and the brute-force oracle evaluate them here.

- Each streamed (not preloaded) shard is one read: latency_us + bytes / bandwidth.
  Reads run on one channel, in layer order: layer l's reads start when layer l-1's end.
- A layer's compute: layer_overhead_ms + sum(flops / gflops)
  + sum over its quantised shards (bits < 32) of stored bytes / dequant_gb_s.
  A layer with no shards is skipped and costs nothing (only its residual path runs).
- Layer l computes once its reads are done and layer l-1 has computed:
  compute_start = max(io_end[l], compute_end[l-1]).  Latency = compute_end of the last layer.
- Execution `sequential` (the load-then-execute baseline) has no overlap: compute starts
  only when every read is done, compute_start = max(io_end[L-1], compute_end[l-1]).
"""

from __future__ import annotations

from dataclasses import dataclass

from elasticplan.spec import FULL_PRECISION_BITS, Device, ModelProfile, Scenario, Shard


@dataclass(frozen=True)
class Pick:
    """One shard that runs: its index in the layer, its bitwidth index, and where it comes from."""

    shard: int
    bit: int
    preloaded: bool


Selection = tuple[tuple[Pick, ...], ...]  # per layer, the shards that run (in read order)

PIPELINED = "pipelined"  # layer l computes as soon as its own reads are done (the plans solved)
SEQUENTIAL = "sequential"  # every read first, then every layer (load-then-execute)
EXECUTIONS = (PIPELINED, SEQUENTIAL)


@dataclass(frozen=True)
class LayerTimes:
    io_start_ms: float
    io_end_ms: float
    compute_start_ms: float
    compute_end_ms: float


@dataclass(frozen=True)
class Schedule:
    layers: tuple[LayerTimes, ...]
    latency_ms: float
    preload_bytes: int
    streamed_bytes: int
    importance: float


def read_ms(device: Device, nbytes: int) -> float:
    """One read request of `nbytes` on the device's storage."""
    return device.latency_us / 1e3 + nbytes / (device.bandwidth_mb_s * 1e3)


def shard_compute_ms(device: Device, model: ModelProfile, shard: Shard, bit: int) -> float:
    """Compute of one shard at bitwidth index `bit`, without the layer's fixed overhead."""
    ms = shard.flops / (device.gflops * 1e6)
    if model.bitwidths[bit] < FULL_PRECISION_BITS:
        ms += shard.bytes[bit] / (device.dequant_gb_s * 1e6)
    return ms


def simulate(scenario: Scenario, selection: Selection, execution: str = PIPELINED) -> Schedule:
    """Replay the pipeline event by event for the chosen shards."""
    device, model = scenario.device, scenario.model
    if len(selection) != len(model.layers):
        raise ValueError(f"selection has {len(selection)} layers, model has {len(model.layers)}")
    if execution not in EXECUTIONS:
        raise ValueError(f"execution {execution!r} is not one of {EXECUTIONS}")
    io_end = compute_end = 0.0
    preload = streamed = 0
    importance = 0.0
    io, compute_ms = [], []
    for layer, picks in zip(model.layers, selection):
        io_start = io_end
        compute = device.layer_overhead_ms if picks else 0.0
        for pick in picks:
            shard = layer.shards[pick.shard]
            nbytes = shard.bytes[pick.bit]
            if pick.preloaded:
                preload += nbytes
            else:
                streamed += nbytes
                io_end += read_ms(device, nbytes)
            compute += shard_compute_ms(device, model, shard, pick.bit)
            importance += shard.importance[pick.bit]
        io.append((io_start, io_end))
        compute_ms.append(compute)
    times = []
    for (io_start, layer_io_end), compute in zip(io, compute_ms):
        start = max(layer_io_end if execution == PIPELINED else io_end, compute_end)
        compute_end = start + compute
        times.append(LayerTimes(io_start, layer_io_end, start, compute_end))
    return Schedule(layers=tuple(times), latency_ms=compute_end, preload_bytes=preload,
                    streamed_bytes=streamed, importance=importance)
