"""The one cost model: a plan's schedule, latency, buffer and importance.

Pure and solver-free. The formulation writes these same formulas as constraints;
the verifier, the greedy baseline and the brute-force oracle evaluate them here.

- Each streamed (not preloaded) shard is one read: latency_us + bytes / bandwidth.
  Reads run on one channel, in layer order: layer l's reads start when layer l-1's end.
  A shard read in pieces (Shard.pieces: a decoder's streamed table, its rows in pieces;
  only ever its pass model's last layer) is `table_reads` reads per piece, and each
  piece computes as soon as it is in: n pieces of one read r1 and one compute c1 each
  (the shard's / n), piece i read once piece i - 2 has computed (two pieces in the ring;
  i - 1 at window 0, where nothing overlaps), computed wake_ms after its read and after
  piece i - 1. That replay is max-plus linear in where it starts, so its layer ends at
  max(reads start + alpha, layer before's end + beta) exactly (`piece_ms`: alpha, beta
  from the replay itself), which is the recurrence below with the layer's reads charged
  alpha - beta - wake_ms and its compute beta (`charged_read_ms`, `charged_compute_ms`):
  constants per choice, so every program keeps its form. The channel is busy for the
  whole read; the compute thread for n c1 (LayerTimes.busy_ms). It holds two pieces of
  the IO ring (Shard.ring_bytes).
- A layer's compute: layer_overhead_ms + per shard that runs, shard_overhead_ms
  + flops / gflops and, for a quantised shard (bits < 32), its stored bytes / dequant_gb_s
  + its weights x dequant_ns_per_weight[bits] (the terms the device gives; a device
  calibrated on a decoder gives 32 too: one token's pass over fp32 weights is bound by
  reading them, not by its flops; a shard multiplied by one vector, Shard.vector: a
  decoder's pass of one position and its LM head, takes vector_ns_per_weight[bits]
  instead where the device gives it: the runtime's kernels compute some bitwidths from
  their stored bytes), and for a
  streamed shard its stored bytes x stream_ms_per_mb (compute on weights just read into
  the IO ring runs slower than on preloaded ones), plus, where reads run beside compute
  (pipelined, window >= 1), its stored bytes x contention_ms_per_mb and its read requests
  x contention_ms_per_read (the IO thread's reads slow the compute they overlap: charged
  to the shard's own layer, so that a pass pays it once per byte and request it streams).
  The replay under a kernel throttle (simulate's `steps`) places it in time instead where
  the device gives a contention_share: a layer's compute runs at 1 - share of its speed
  while the channel reads, whichever layer's reads they are (pipeline's `share`; not a
  program's rule: the programs plan on the per-shard charge).
  A layer with no shards is skipped and costs nothing (only its residual path runs).
- The query's embedding (embed_ms) runs on the compute thread first, once the embedding
  rows are there; pooling (pool_ms) runs after the last layer.
- Layer l computes once its reads are done and layer l-1 has computed (layer -1: the
  embedding): compute_start = max(io_end[l] + wake_ms, compute_end[l-1]), wake_ms the
  compute thread's wake-up after the reads it waited for.
  Latency = compute_end of the last layer + pool_ms.
- Prefetch window W (layers; None = unbounded): layer l's reads wait until layer l-W-1 has
  computed and released its buffers, io_start[l] = max(io_end[l-1], compute_end[l-W-1]).
  W = 1 is classic layer-wise pipelining: one layer read while one computes.
- Streamed embeddings: the query's token rows (one read per distinct token: at most
  model.query_row_reads, the question's query_tokens or seq_len) are read first, so the channel starts at their end; with the table resident it starts at 0.
- Execution `sequential` (the load-then-execute baseline) has no overlap: compute starts
  only when every read is done, compute_start = max(io_end[L-1], compute_end[l-1]). It
  needs an unbounded window (every layer is read before any computes).

Memory (bytes; the peak the process holds during a query, docs/design.md "Memory"):
  resident    model.resident_bytes, plus the embedding table when it is resident
  preload     stored bytes of the preloaded shards
  working     the IO arena, max over W+1 consecutive layers of their streamed bytes (the
              layers that can be in flight at once; a shard read in pieces counts two
              pieces), plus the compute scratch
  activation  model.activation_bytes, plus one query's embedding rows when streamed
  kept        what kept shards hold wherever their weights live (Shard.kept_bytes: a
              decoder's KV cache, elasticplan.decoding); 0 for an encoder
  peak        their sum
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass

from elasticplan.problem.question import window_binds, window_span
from elasticplan.problem.spec import (
    FULL_PRECISION_BITS,
    Device,
    ModelProfile,
    Scenario,
    Shard,
    table_reads,
)


@dataclass(frozen=True)
class Pick:
    """One shard that runs: its index in the layer, its bitwidth index, and where it comes from."""

    shard: int
    bit: int
    preloaded: bool


Selection = tuple[tuple[Pick, ...], ...]  # per layer, the shards that run (in read order)


def every_shard(model: ModelProfile, bit: int, preloaded: bool) -> Selection:
    """Every shard of every layer at bitwidth index `bit`, all preloaded or all streamed
    (hold-in-memory, uniform-B, the calibration's whole-model plans)."""
    return tuple(tuple(Pick(s, bit, preloaded) for s in range(len(layer.shards)))
                 for layer in model.layers)

PIPELINED = "pipelined"  # layer l computes as soon as its own reads are done (the plans solved)
SEQUENTIAL = "sequential"  # every read first, then every layer (load-then-execute)
EXECUTIONS = (PIPELINED, SEQUENTIAL)


@dataclass(frozen=True)
class Layout:
    """How a plan runs besides its shards: the prefetch window and where the embedding
    table lives. The default is the unbounded window with the table resident."""

    window: int | None = None
    stream_embeddings: bool = False


UNBOUNDED = Layout()


@dataclass(frozen=True)
class Steps:
    """Reads admitted by the kernel's block-IO throttle (Linux 6.x blk-throttle): from a
    query's first read after a slice without reads, `bytes_per_s` x `slice_ms` at once
    and as much again at each slice after, each step `late_ms` after its slice boundary
    (the throttle's timer: one jiffy here). Measured an exact staircase on a disk that
    keeps up (docs/runtime.md); a replay that knows it (`simulate(..., steps=)`) holds
    each layer's reads until the step that admits its last byte, plus the disk's time for
    what that step admits of them (a layer read in pieces is held as a whole: which only
    ever charges more). Bytes are the shards' own, not the pages the kernel charges. The
    programs do not price steps; the throttle's bandwidth as a linear term is slower than
    its steps except within `late_ms` after a step."""

    bytes_per_s: int
    slice_ms: float = 100.0
    late_ms: float = 4.0

    def __post_init__(self):
        if self.bytes_per_s <= 0 or self.slice_ms <= 0:
            raise ValueError(f"steps need a positive bandwidth and slice, got "
                             f"{self.bytes_per_s} B/s and {self.slice_ms} ms")

    @property
    def allowance_bytes(self) -> float:
        """What a slice admits (at once, after a slice without reads)."""
        return round(self.bytes_per_s) * self.slice_ms / 1000

    def waits(self, nbytes: int) -> int:
        """How many steps after the first a query's first `nbytes` bytes wait for (0: all
        at once), in the kernel's integer arithmetic (an allowance in whole bytes)."""
        return max(0, math.ceil(nbytes * 1000 / (round(self.bytes_per_s) * self.slice_ms)) - 1)

    def release_ms(self, streamed: list[int], io_ms: list[float],
                   start_ms: float = 0.0) -> list[float]:
        """Per layer, the earliest its reads can end under the steps (-inf: unbound), for
        its streamed bytes and its reads' time on the disk, from a first read at start_ms."""
        out, before = [], 0
        for nbytes, read in zip(streamed, io_ms):
            after = before + nbytes
            k = self.waits(after) if nbytes else 0
            if k == 0:
                out.append(-math.inf)
            else:
                tail = after - max(before, k * self.allowance_bytes)  # what step k admits of it
                out.append(start_ms + k * self.slice_ms + self.late_ms + read * tail / nbytes)
            before = after
        return out


def under_throttle(scenario: Scenario) -> tuple[Scenario, Steps]:
    """How a kernel throttle set to the scenario's storage runs it (`run --throttle`): the
    reads at the disk's own terms beneath it (device.disk, which `calibrate --throttle`
    measures), held to the steps of the throttle's bandwidth (simulate(..., steps=)). The
    throttle's read-IOPS limit (one read per latency_us) is not stepped: at 100 us a slice
    admits 1,000 reads, several times what a MiniLM query makes (the disk check counts
    them)."""
    d = scenario.device
    if d.disk is None:
        raise ValueError(f"device {d.name!r} gives no disk beneath the throttle (storage.disk: "
                         f"`calibrate --throttle` measures it)")
    disk = dataclasses.replace(d, bandwidth_mb_s=d.disk.bandwidth_mb_s,
                               latency_us=d.disk.latency_us, disk=None)
    return scenario.with_overrides(device=disk), Steps(round(d.bandwidth_mb_s * 1e6))


@dataclass(frozen=True)
class Memory:
    resident_bytes: int
    preload_bytes: int
    working_peak_bytes: int
    activation_bytes: int
    kept_bytes: int = 0  # a decoder's KV cache (the kept KV groups')

    @property
    def peak_bytes(self) -> int:
        return self.resident_bytes + self.preload_bytes + self.working_peak_bytes + \
            self.activation_bytes + self.kept_bytes

    def to_dict(self) -> dict:
        """The JSON form; kept_bytes only when a plan keeps some (a decoder's)."""
        return {"resident_bytes": self.resident_bytes, "preload_bytes": self.preload_bytes,
                "working_peak_bytes": self.working_peak_bytes,
                "activation_bytes": self.activation_bytes} | \
            ({"kept_bytes": self.kept_bytes} if self.kept_bytes else {}) | \
            {"peak_bytes": self.peak_bytes}


@dataclass(frozen=True)
class LayerTimes:
    io_start_ms: float
    io_end_ms: float
    compute_start_ms: float
    compute_end_ms: float
    # read in pieces: its reads as the recurrence charges them end this long before the
    # channel's (io_end_ms), and the compute thread is busy for busy_ms of its compute
    # interval (which the recurrence charges whole)
    overlap_ms: float = 0.0
    busy_ms: float | None = None

    @property
    def io_ready_ms(self) -> float:
        """When the recurrence counts the layer's reads done (before the wake-up)."""
        return self.io_end_ms - self.overlap_ms

    @property
    def io_ms(self) -> float:
        """The channel's time on the layer's reads."""
        return self.io_end_ms - self.io_start_ms

    @property
    def compute_ms(self) -> float:
        """The compute thread's time on the layer."""
        return self.compute_end_ms - self.compute_start_ms if self.busy_ms is None \
            else self.busy_ms


@dataclass(frozen=True)
class Schedule:
    layers: tuple[LayerTimes, ...]
    latency_ms: float
    preload_bytes: int
    streamed_bytes: int
    importance: float
    memory: Memory
    layout: Layout = UNBOUNDED


def stage_factors(device: Device, quantile: float) -> tuple[float, float]:
    """How much longer than predicted (the median) the IO and the compute stage run at this
    quantile of the device's measured spread: exp(z_q sigma) per stage (log-normal)."""
    if quantile == 0.5 or device.spread is None:
        return 1.0, 1.0
    z = statistics.NormalDist().inv_cdf(quantile)
    return math.exp(z * device.spread.io), math.exp(z * device.spread.compute)


def at_quantile(scenario: Scenario) -> Scenario:
    """The scenario as the planner sees it: its device's reads and compute stretched to the
    scenario's latency quantile (stage_factors), so that a plan whose predicted latency on
    it meets the target meets it at that quantile (each stage at its own quantile: a bound,
    since the stages' deviations are not perfectly correlated). The scenario itself when
    the quantile is 0.5."""
    io, comp = stage_factors(scenario.device, scenario.latency_quantile)
    if io == comp == 1.0:
        return scenario
    return scenario.with_overrides(device=stretched(scenario.device, io, comp),
                                   latency_quantile=0.5)


def stretched(d: Device, io: float, comp: float) -> Device:
    """The device with its reads taking `io` times and its compute `comp` times as long
    (every compute term; a share of time, contention_share, stays)."""
    return dataclasses.replace(
        d, bandwidth_mb_s=d.bandwidth_mb_s / io, latency_us=d.latency_us * io,
        gflops=d.gflops / comp, layer_overhead_ms=d.layer_overhead_ms * comp,
        shard_overhead_ms=d.shard_overhead_ms * comp,
        stream_ms_per_mb=d.stream_ms_per_mb * comp,
        contention_ms_per_mb=d.contention_ms_per_mb * comp,
        contention_ms_per_read=d.contention_ms_per_read * comp,
        dequant_gb_s=None if d.dequant_gb_s is None else d.dequant_gb_s / comp,
        dequant_ns_per_weight=tuple((b, ns * comp) for b, ns in d.dequant_ns_per_weight),
        vector_ns_per_weight=tuple((b, ns * comp) for b, ns in d.vector_ns_per_weight),
        embed_ms=d.embed_ms * comp, pool_ms=d.pool_ms * comp, wake_ms=d.wake_ms * comp)


def read_ms(device: Device, nbytes: int) -> float:
    """One read request of `nbytes` on the device's storage."""
    return device.latency_us / 1e3 + nbytes / (device.bandwidth_mb_s * 1e3)


def reads_beside(execution: str, window: int | None) -> bool:
    """Do a plan's reads run beside its compute (pipelined with a window >= 1)?"""
    return execution == PIPELINED and window != 0


def shard_reads(model: ModelProfile, shard: Shard, bit: int) -> int:
    """The read requests of one streamed shard at bitwidth index `bit`: one, or, read in
    pieces, table_reads per piece."""
    return 1 if shard.pieces == 1 else shard.pieces * table_reads(model, bit)


def shard_read_ms(device: Device, model: ModelProfile, shard: Shard, bit: int) -> float:
    """The reads of one streamed shard at bitwidth index `bit`: its requests
    (shard_reads) and its bytes."""
    if shard.pieces == 1:
        return read_ms(device, shard.bytes[bit])
    return shard_reads(model, shard, bit) * device.latency_us / 1e3 + \
        shard.bytes[bit] / (device.bandwidth_mb_s * 1e3)


def piece_ms(device: Device, model: ModelProfile, shard: Shard, bit: int,
             beside: bool = True) -> tuple[float, float]:
    """A streamed shard read in pieces, as the recurrence charges it: (its reads, its
    compute), such that its layer ends at max(reads start + reads + wake_ms, layer before's
    end) + compute, which is the piece-by-piece replay exactly (the module's rules; its
    reads never less than 0, which only ever charges more)."""
    n = shard.pieces
    r1 = shard_read_ms(device, model, shard, bit) / n
    c1 = shard_compute_ms(device, model, shard, bit, True, beside) / n
    lag = 2 if beside else 1
    wake = device.wake_ms

    def replay(a: float, b: float) -> float:
        channel, done = a, []
        for i in range(n):
            start = channel if i < lag else max(channel, done[i - lag])
            channel = start + r1
            done.append(max(channel + wake, done[-1] if done else b) + c1)
        return done[-1]

    alpha, beta = replay(0.0, -math.inf), replay(-math.inf, 0.0)
    return max(0.0, alpha - beta - wake), beta


def charged_read_ms(device: Device, model: ModelProfile, shard: Shard, bit: int,
                    beside: bool = True) -> float:
    """What the recurrence charges a streamed shard's reads: its reads, or, read in
    pieces, piece_ms's."""
    if shard.pieces == 1:
        return shard_read_ms(device, model, shard, bit)
    return piece_ms(device, model, shard, bit, beside)[0]


def charged_compute_ms(device: Device, model: ModelProfile, shard: Shard, bit: int,
                       streamed: bool = False, beside: bool = True) -> float:
    """What the recurrence charges a shard's compute: shard_compute_ms, or, streamed in
    pieces, piece_ms's."""
    if streamed and shard.pieces > 1:
        return piece_ms(device, model, shard, bit, beside)[1]
    return shard_compute_ms(device, model, shard, bit, streamed, beside)


def shard_compute_ms(device: Device, model: ModelProfile, shard: Shard, bit: int,
                     streamed: bool = False, beside: bool = True) -> float:
    """Compute of one shard at bitwidth index `bit`, without the layer's fixed overhead;
    `streamed`: read into the IO ring for this query (not preloaded), which adds the
    device's streamed-weights term and, when `beside` (its reads overlap compute: a
    pipelined plan with a window), its contention term."""
    ms = device.shard_overhead_ms + shard.flops / (device.gflops * 1e6)
    if streamed:
        per_mb = device.stream_ms_per_mb + (device.contention_ms_per_mb if beside else 0.0)
        ms += shard.bytes[bit] * per_mb / 1e6
        if beside and device.contention_ms_per_read:
            ms += shard_reads(model, shard, bit) * device.contention_ms_per_read
    bits = model.bitwidths[bit]
    if bits < FULL_PRECISION_BITS and device.dequant_gb_s is not None:
        ms += shard.bytes[bit] / (device.dequant_gb_s * 1e6)
    ns = device.weight_ns(bits, shard.vector)  # (a decoder's device gives 32 too)
    if ns:  # Scenario checks that the shard's weights are known
        ms += shard.weights * ns / 1e6
    return ms


def embedding_read_ms(device: Device, model: ModelProfile, rows: int | None = None) -> float:
    """One query's embedding rows, streamed: embedding_row_reads reads per distinct token,
    priced at the most a query has (model.query_row_reads), or at `rows` read."""
    if not model.embedding_rows:
        return 0.0
    return (model.query_row_reads if rows is None else rows) * (model.embedding_row_reads * device.latency_us / 1e3
                                    + model.embedding_row_bytes / (device.bandwidth_mb_s * 1e3))


def window_peak(streamed: list[int], window: int | None) -> int:
    """Most streamed bytes of any W+1 consecutive layers (all of them when unbounded)."""
    span = window_span(window, len(streamed))
    run = peak = sum(streamed[:span])
    for l in range(span, len(streamed)):
        run += streamed[l] - streamed[l - span]
        peak = max(peak, run)
    return peak


def memory_of(model: ModelProfile, layout: Layout, preload: int, streamed: list[int],
              kept: int = 0) -> Memory:
    """The predicted peak memory, by term, of a plan with these per-layer bytes of the IO
    ring (its streamed shards' Shard.ring_bytes) and `kept` (its kept shards' kept_bytes)."""
    if layout.stream_embeddings and not model.embedding_rows:
        raise ValueError(f"model {model.name!r} has no embedding table to stream")
    table = model.embedding_table_bytes
    return Memory(
        resident_bytes=model.resident_bytes + (0 if layout.stream_embeddings else table),
        preload_bytes=preload,
        working_peak_bytes=window_peak(streamed, layout.window) + model.scratch_bytes,
        activation_bytes=model.activation_bytes
        + (model.embedding_query_bytes if layout.stream_embeddings else 0),
        kept_bytes=kept)


def memory_constants(model: ModelProfile) -> tuple[int, int]:
    """The two constants the programs' memory rows need, from memory_of itself: the peak of
    a plan that streams and preloads nothing with the table resident, and what streaming
    the table adds to it (negative: the rows are smaller than the table; 0 without one).
    A plan's peak is then the first + its ring + its preload + e x the second."""
    empty = [0] * len(model.layers)
    resident = memory_of(model, UNBOUNDED, 0, empty).peak_bytes
    if not model.embedding_rows:
        return resident, 0
    return resident, memory_of(model, Layout(stream_embeddings=True), 0, empty).peak_bytes \
        - resident


def pipeline(io_ms: list[float], compute_ms: list[float], *, window: int | None = None,
             start_ms: float = 0.0, execution: str = PIPELINED,
             embed_ms: float = 0.0, wake_ms: float = 0.0,
             overlap_ms: list[float] | None = None,
             busy_ms: list[float | None] | None = None,
             release_ms: list[float] | None = None,
             share: float = 0.0) -> list[LayerTimes]:
    """The schedule of layers with these read and compute times (the rules above): the
    channel starts at start_ms (the embedding rows' reads end), the compute thread at
    start_ms + embed_ms; a layer's compute is ready wake_ms after its reads end, less its
    overlap_ms (a layer read in pieces: its reads as charged end that much earlier; its
    compute thread busy busy_ms of its compute; defaults 0 and None); a layer's reads end
    no earlier than its release_ms (Steps.release_ms; default none). `share` (contention
    placed in time, Device.contention_share): while the channel reads, compute runs at
    1 - share of its speed, so a layer's compute takes its compute_ms plus share x the
    time the channel read during it (read_busy); 0: as the rules above."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"contention share {share} is not in [0, 1)")
    if execution not in EXECUTIONS:
        raise ValueError(f"execution {execution!r} is not one of {EXECUTIONS}")
    if execution == SEQUENTIAL and window_binds(window, len(io_ms)):
        raise ValueError("sequential execution reads every layer first: it needs an unbounded "
                         "prefetch window")
    io, io_end = [], start_ms
    if release_ms is not None and len(release_ms) != len(io_ms):
        raise ValueError(f"{len(release_ms)} release times for {len(io_ms)} layers")
    released = release_ms or [-math.inf] * len(io_ms)  # -inf: every end as it was
    if execution == SEQUENTIAL:
        for read, release in zip(io_ms, released):
            start = io_end
            io_end = max(io_end + read, release)
            io.append((start, io_end))
    times: list[LayerTimes] = []
    compute_end = start_ms + embed_ms
    overlaps = overlap_ms or [0.0] * len(io_ms)
    last = len(io_ms) - 1
    for l, compute in enumerate(compute_ms):
        # the channel's reads as far as they are known before layer l computes: layer j's
        # wait on the window is layer j-W-1's compute, done for every j <= l + W
        ahead = l if not share else last if window is None else min(last, l + window)
        while execution == PIPELINED and len(io) <= ahead:
            j = len(io)
            gate = times[j - window - 1].compute_end_ms \
                if window is not None and j > window else 0.0
            io_start = max(io_end, gate)
            io_end = max(io_start + io_ms[j], released[j])
            io.append((io_start, io_end))
        overlap = overlaps[l] if execution == PIPELINED else 0.0
        ready = (io[l][1] if execution == PIPELINED else io[-1][1]) - overlap + wake_ms
        start = max(ready, compute_end)
        compute_end = start + compute if not share or execution != PIPELINED else \
            slowed_end(start, compute, read_busy(io, io_ms), share)
        times.append(LayerTimes(io[l][0], io[l][1], start, compute_end, overlap,
                                busy_ms[l] if busy_ms else None))
    return times


def read_busy(io: list[tuple[float, float]], io_ms: list[float]) -> list[tuple[float, float]]:
    """When the channel reads, per layer in order: its last io_ms of its interval (a layer
    whose reads a throttle's step holds reads at its end; one read at once, at its start,
    which is the same interval), none for a layer without reads."""
    return [(end - read, end) for (_, end), read in zip(io, io_ms) if read > 0]


def slowed_end(start: float, work: float, busy: list[tuple[float, float]],
               share: float) -> float:
    """When `work` ms of compute begun at `start` ends, running at 1 - share of its speed
    within the `busy` intervals (in order, disjoint) and at full speed outside them: its
    end is start + work + share x the busy time within [start, end]."""
    t, left = start, work
    for a, b in busy:
        if b <= t:
            continue
        if a > t:
            if left <= a - t:
                return t + left
            left, t = left - (a - t), a
        room = (b - t) * (1.0 - share)
        if left <= room:
            return t + left / (1.0 - share)
        left, t = left - room, b
    return t + left


def critical_path(times: list[LayerTimes] | tuple[LayerTimes, ...], window: int | None,
                  start_ms: float = 0.0, embed_ms: float = 0.0,
                  wake_ms: float = 0.0) -> tuple[int, ...]:
    """A longest chain of a pipelined schedule, from the channel's start to the last
    layer's compute end: per layer, 1 if the chain takes its reads, 2 its compute, 3 both.
    Its reads (a layer read in pieces: as charged, charged_read_ms), compute,
    start_ms, wake_ms per layer marked 3 (compute after its own reads), and embed_ms when the first layer's mark has no reads (the chain starts at the
    embedding), sum to the last layer's compute end (path_ms). Walked back
    from the end: a layer's compute waited on its own reads or on the layer before's
    compute (layer 0: on the embedding); its reads on the layer before's reads or, through
    the window, on layer l-W-1's compute."""
    marks = [0] * len(times)
    kind, l = "compute", len(times) - 1
    while l >= 0:
        t = times[l]
        if kind == "compute":
            marks[l] |= 2
            before = times[l - 1].compute_end_ms if l else start_ms + embed_ms
            if before > t.io_ready_ms + wake_ms:
                if not l:
                    break  # the chain starts at the embedding
                l -= 1
            else:
                kind = "io"
            continue
        marks[l] |= 1
        before = times[l - 1].io_end_ms if l else start_ms
        if window is not None and l > window and \
                times[l - window - 1].compute_end_ms > before:
            kind, l = "compute", l - window - 1
        else:
            l -= 1
    return tuple(marks)


def path_ms(path: tuple[int, ...], reads, work, start_ms: float = 0.0, embed_ms: float = 0.0,
            wake_ms: float = 0.0) -> float:
    """The length of a path through the recurrence (marks as in critical_path), for
    per-layer read and compute times: at most the last layer's compute end of any plan with
    these times, and equal to it for its critical path."""
    return start_ms + (0.0 if path[0] & 1 else embed_ms) + \
        sum(r for r, m in zip(reads, path) if m & 1) + \
        sum(c for c, m in zip(work, path) if m & 2) + wake_ms * sum(m == 3 for m in path)


def simulate(scenario: Scenario, selection: Selection, execution: str = PIPELINED,
             layout: Layout = UNBOUNDED, *, steps: Steps | None = None,
             rows_cached: bool = False) -> Schedule:
    """Replay the pipeline event by event for the chosen shards (with `steps`: its reads
    admitted by a kernel throttle's steps, the device's storage then the disk's own, and,
    where the device gives a contention_share, the contention placed in time: the shards'
    compute without the per-MB and per-read contention terms, each layer's compute slowed
    while the channel reads beside it (pipeline's `share`); with `rows_cached`: a streamed
    table's rows from the page cache, as the runtime reads them under the throttle, the
    kernel never seeing them: the channel starts at once, and the rows' own copy,
    microseconds, is not priced)."""
    device, model = scenario.device, scenario.model
    beside = reads_beside(execution, layout.window)  # reads overlap compute
    share = device.contention_share if steps is not None and beside else 0.0
    if share:  # priced where the reads run, not per shard
        device = dataclasses.replace(device, contention_ms_per_mb=0.0, contention_ms_per_read=0.0)
    if len(selection) != len(model.layers):
        raise ValueError(f"selection has {len(selection)} layers, model has {len(model.layers)}")
    preload = kept = 0
    importance = 0.0
    io_ms, compute_ms, overlap_ms, busy_ms, streamed, ring = [], [], [], [], [], []
    for layer, picks in zip(model.layers, selection):
        compute = busy = device.layer_overhead_ms if picks else 0.0
        read = overlap = 0.0
        nstream = nring = 0
        for pick in picks:
            shard = layer.shards[pick.shard]
            nbytes = shard.bytes[pick.bit]
            work = shard_compute_ms(device, model, shard, pick.bit, not pick.preloaded, beside)
            busy += work
            if pick.preloaded:
                preload += nbytes
                compute += work
            else:
                nstream += nbytes
                nring += shard.ring_bytes(pick.bit)
                reads = shard_read_ms(device, model, shard, pick.bit)
                charged = (reads, work) if shard.pieces == 1 else \
                    piece_ms(device, model, shard, pick.bit, beside)
                read += reads
                overlap += reads - charged[0]
                compute += charged[1]
            importance += shard.importance[pick.bit]
            kept += shard.kept_bytes
        io_ms.append(read)
        compute_ms.append(compute)
        overlap_ms.append(overlap)
        busy_ms.append(None if busy == compute else busy)
        streamed.append(nstream)
        ring.append(nring)
    start = embedding_read_ms(device, model) if layout.stream_embeddings and not rows_cached \
        else 0.0
    times = pipeline(io_ms, compute_ms, window=layout.window, start_ms=start,
                     execution=execution, embed_ms=device.embed_ms, wake_ms=device.wake_ms,
                     overlap_ms=overlap_ms, busy_ms=busy_ms,
                     release_ms=None if steps is None else steps.release_ms(streamed, io_ms,
                                                                            start),
                     share=share)
    end = times[-1].compute_end_ms if times else start + device.embed_ms
    return Schedule(layers=tuple(times), latency_ms=end + device.pool_ms,
                    preload_bytes=preload, streamed_bytes=sum(streamed), importance=importance,
                    memory=memory_of(model, layout, preload, ring, kept), layout=layout)
