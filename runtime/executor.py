"""The executor: runs one inference exactly as a plan says, and timestamps every stage.

It decides nothing. From the plan it takes, per layer, the shards that run, their
bitwidths, which are preloaded, the read order and the execution mode (pipelined, or
sequential for load-then-execute); from the plan's device, the storage it emulates.

- Before anything runs (`Executor(...)`): the plan must be for the store's model, every
  planned variant must exist with the size the profile claims, and every planned variant
  is read once and checked against its sha256. Then all buffers are allocated: the
  layers' fused weights (runtime/model.py), one staging buffer per layer for its
  quantised streamed shards, one preload buffer for the preloaded quantised shards.
- `fill_preload()`, before the query (timed, not part of query latency): preloaded shards
  are read cold through the device clock; quantised ones into the preload buffer (held in
  their stored form, dequantised per query: the cost model charges that), fp32 ones
  straight into their fused slots (they are held there, no copy per query).
- `run(batch)`: every streamed file's pages are evicted first (and counted with mincore,
  so the trace says how cold the run really was). Then one IO thread streams the streamed
  shards in plan order, back to back: an fp32 shard with one scattered `preadv` straight
  into its fused slot, a quantised one into its staging slice; the device clock books
  when each read completes on the emulated device. The compute thread (the caller's;
  torch only runs there) embeds, then per layer waits for the layer's reads (or for all
  reads, when sequential), sleeps once to the device's completion time for them, and
  after the previous layer dequantises the layer's quantised shards into the fused slots,
  runs the layer, and finally pools.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from elasticplan.costmodel import PIPELINED
from elasticplan.errors import StoreError
from elasticplan.plan import Plan
from elasticplan.spec import Scenario
from runtime import quant
from runtime.iodev import DeviceClock, buffer_resident_bytes, evict, resident_pages
from runtime.model import Batch, LayerWeights
from runtime.store import ShardStore, Variant, decode_into

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


def _runs(t: torch.Tensor) -> list[memoryview]:
    """The tensor view's memory as maximal contiguous runs, in row-major element order."""
    if t.is_contiguous():
        return [memoryview(t.numpy()).cast("B")] if t.numel() else []
    return [mv for sub in t for mv in _runs(sub)]


@dataclass
class _Shard:
    """One planned shard: where its bytes come from and where they go."""

    variant: Variant
    preloaded: bool
    slot: object  # runtime.model.Slot
    iov: list[memoryview]  # where its read lands: the fused slot (fp32) or a raw slice
    raw: memoryview | None  # quantised: the stored bytes to dequantise per query

    @property
    def fp32(self) -> bool:
        return self.variant.bits == quant.FP32


@dataclass
class LayerTrace:
    index: int
    reads: int
    read_bytes: int
    io_start_ms: float
    io_end_ms: float
    compute_start_ms: float
    compute_end_ms: float
    decode_ms: float  # part of compute: dequantising this layer's quantised shards


@dataclass
class RunTrace:
    latency_ms: float  # query arrival -> pooled embedding
    layers: list[LayerTrace]
    embed_ms: tuple[float, float]  # embedding lookup (start, end), overlapping layer 0's IO
    pool_ms: tuple[float, float]  # mean pooling after the last layer (start, end)
    cached_pages_before: int  # pages of the streamed shards still in the page cache at start
    streamed_pages: int
    embedding: torch.Tensor = field(repr=False)

    @property
    def reads(self) -> int:
        return sum(t.reads for t in self.layers)


@dataclass
class MemoryAccount:
    """The executor's own accounting of the weight buffers it holds for a plan (bytes).

    `preload_bytes`: held across queries, the preload buffer (quantised preloaded shards in
    stored form) plus the fused slots of fp32 preloaded shards. `working_bytes[l]`: what
    layer l needs during a query, its fused weights (less the fp32 preloaded slots, counted
    above) plus the staging area for its quantised streamed shards. The executor allocates
    every layer's working buffers up front; `peak_live_bytes` (runtime/measure.py) is what
    a pipeline needs at once, from a run's timeline."""

    preload_bytes: int
    working_bytes: list[int]
    resident_model_bytes: int  # embeddings, LayerNorms, shared biases: every strategy holds them


@dataclass
class FillReport:
    fill_ms: float
    shards: int
    bytes: int  # stored bytes of the preloaded shards (the plan's preload_bytes)
    resident_bytes: int  # measured: see Executor.fill_preload


def check_model(plan: Plan, store: ShardStore) -> None:
    """The plan must be for the model this store holds."""
    if plan.scenario.model != store.model:
        raise StoreError(f"{store.path}: the plan is for model {plan.scenario.model!r}, this "
                         f"shard store holds {store.model!r}")
    if len(plan.layers) != store.config.layers:
        raise StoreError(f"{store.path}: the plan has {len(plan.layers)} layers, the store's "
                         f"model has {store.config.layers}")


class Executor:
    def __init__(self, plan: Plan, scenario: Scenario, store: ShardStore, *,
                 emulate: bool = True):
        self.plan, self.scenario, self.store = plan, scenario, store
        c = store.config
        check_model(plan, store)
        profile = scenario.model
        device = scenario.device
        self.clock = DeviceClock(device if emulate else None)
        self.encoder = store.encoder()
        self.execution = plan.execution
        # Every planned variant: present, the size the profile claims, its checksum.
        variants = []
        for lp in plan.layers:
            layer = profile.layers[lp.index]
            row = []
            for ch in lp.shards:
                v = store.variant(lp.index, ch.name, ch.bits)
                si, bi = layer.shard_index(ch.name), profile.bit_index(ch.bits)
                claimed = layer.shards[si].bytes[bi]
                if v.nbytes != claimed:
                    raise StoreError(f"{store.path}: shard {ch.name} of layer {lp.index} at "
                                     f"{ch.bits} bits is {v.nbytes} B in the store, but the "
                                     f"profile {profile.name!r} says {claimed} B: profile and "
                                     f"store do not match")
                store.read(v)  # raises StoreError naming the file if missing or corrupt
                row.append((v, ch.preloaded))
            variants.append(row)
        self.fds = {f: os.open(store.file(f), os.O_RDONLY)
                    for f in sorted({v.file for row in variants for v, _ in row})}
        # Buffers, all allocated before any query.
        self.weights: list[LayerWeights] = []
        self.shards: list[list[_Shard]] = []
        self.preload_buffer = np.empty(sum(v.nbytes for row in variants for v, p in row
                                           if p and v.bits != quant.FP32), np.uint8)
        ppos = preload_fp32 = 0
        working: list[int] = []
        for l, row in enumerate(variants):
            w = LayerWeights(c, [v.name for v, _ in row])
            for t in (w.attn_in, w.attn_out, w.attn_bias, w.ffn_in, w.ffn_out, w.ffn_bias):
                t.zero_()  # touch every page now, not during a query
            stage = np.empty(sum(v.nbytes for v, p in row if not p and v.bits != quant.FP32),
                             np.uint8)
            stage[:] = 0  # touch its pages now, not during a query
            spos = 0
            shards = []
            for v, preloaded in row:
                slot = w.slot(v.name)
                if v.bits == quant.FP32:
                    iov = _runs(slot.inp) + _runs(slot.out) + _runs(slot.bias)
                    raw = None
                else:
                    buf, pos = (self.preload_buffer, ppos) if preloaded else (stage, spos)
                    raw = memoryview(buf[pos:pos + v.nbytes]).cast("B")
                    iov = [raw]
                    if preloaded:
                        ppos += v.nbytes
                    else:
                        spos += v.nbytes
                if sum(m.nbytes for m in iov) != v.nbytes:
                    raise AssertionError(f"{v}: buffer layout does not match the stored size")
                shards.append(_Shard(v, preloaded, slot, iov, raw))
            self.weights.append(w)
            self.shards.append(shards)
            fused = sum(t.nbytes for t in (w.attn_in, w.attn_out, w.attn_bias, w.ffn_in,
                                           w.ffn_out, w.ffn_bias))
            held = sum(s.variant.nbytes for s in shards if s.preloaded and s.fp32)
            working.append(fused - held + stage.nbytes)
            preload_fp32 += held
        self.memory = MemoryAccount(self.preload_buffer.nbytes + preload_fp32, working,
                                    store.resident_bytes)
        self.filled = not any(s.preloaded for row in self.shards for s in row)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- IO --------------------------------------------------------------------------

    def _read(self, s: _Shard) -> None:
        fd, off, v = self.fds[s.variant.file], s.variant.offset, s.variant
        done = 0
        for i in range(0, len(s.iov), IOV_MAX):
            part = s.iov[i:i + IOV_MAX]
            n = os.preadv(fd, part, off + done)
            if n != sum(m.nbytes for m in part):
                raise StoreError(f"{self.store.file(v.file)}: short read of shard {v.name} of "
                                 f"layer {v.layer} ({n} bytes at offset {off + done})")
            done += n

    def _evict(self, shards) -> tuple[int, int]:
        """Evict the files of these shards; (resident, total) pages of their ranges after."""
        files = {s.variant.file for s in shards}
        for f in files:
            evict(self.fds[f])
        cached = total = 0
        for s in shards:
            r, t = resident_pages(self.fds[s.variant.file], s.variant.offset, s.variant.nbytes)
            cached, total = cached + r, total + t
        return cached, total

    def fill_preload(self) -> FillReport:
        """Read the preloaded shards (cold, through the device clock) before any query.
        Resident bytes are measured: the preload buffer's resident pages (mincore) plus the
        fp32 preloaded shards, which are read into their fused slots and held there."""
        pre = [s for row in self.shards for s in row if s.preloaded]
        self._evict(pre)
        t0 = time.perf_counter()
        self.clock.start(t0)
        deadline = t0
        for s in pre:
            self._read(s)
            deadline = self.clock.complete(s.variant.nbytes, time.perf_counter())
        end = DeviceClock.sleep_until(deadline)
        self.filled = True
        fp32 = sum(s.variant.nbytes for s in pre if s.fp32)
        return FillReport(fill_ms=(end - t0) * 1e3, shards=len(pre),
                          bytes=sum(s.variant.nbytes for s in pre),
                          resident_bytes=min(buffer_resident_bytes(self.preload_buffer),
                                             self.preload_buffer.nbytes) + fp32)

    # --- one query -------------------------------------------------------------------

    def run(self, batch: Batch) -> RunTrace:
        if not self.filled:
            raise RuntimeError("fill_preload() must run before the first query")
        L = len(self.shards)
        streamed = [s for row in self.shards for s in row if not s.preloaded]
        cached, total = self._evict(streamed)
        io_real: list[tuple[float, float, float | None]] = [(0.0, 0.0, None)] * L
        io_counts = [(0, 0)] * L
        done = [threading.Event() for _ in range(L)]
        go = threading.Event()
        failure: list[BaseException] = []

        def io_worker() -> None:
            # Reads back to back in plan order, never sleeping: real reads run ahead of the
            # emulated device (absorbing the real disk's latency spikes), and the device
            # clock books when each read would complete on the device. The compute thread
            # sleeps to a layer's deadline before using it.
            try:
                go.wait()
                for l, row in enumerate(self.shards):
                    start = time.perf_counter()
                    n = nbytes = 0
                    deadline = None
                    for s in row:
                        if s.preloaded:
                            continue
                        self._read(s)
                        deadline = self.clock.complete(s.variant.nbytes, time.perf_counter())
                        n, nbytes = n + 1, nbytes + s.variant.nbytes
                    io_real[l] = (start, time.perf_counter(), deadline)
                    io_counts[l] = (n, nbytes)
                    done[l].set()
            except BaseException as e:  # reported on the compute thread
                failure.append(e)
                for ev in done:
                    ev.set()

        io = threading.Thread(target=io_worker, name="elasticplan-io", daemon=True)
        io.start()
        compute: list[tuple[float, float, float]] = []
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.clock.start(t0)
            go.set()
            ms = lambda: (time.perf_counter() - t0) * 1e3  # noqa: E731
            e0 = ms()
            x = self.encoder.embed(batch.ids)
            e1 = ms()
            for l, row in enumerate(self.shards):
                wait_for = l if self.execution == PIPELINED else L - 1
                done[wait_for].wait()
                if failure:
                    break
                if io_real[wait_for][2] is not None:
                    DeviceClock.sleep_until(io_real[wait_for][2])  # the device's completion
                start = ms()
                for s in row:
                    if s.raw is not None:
                        decode_into(s.variant, s.raw, s.slot)
                decoded = ms()
                x = self.encoder.layer(l, x, batch.mask, self.weights[l])
                compute.append((start, ms(), decoded - start))
            p0 = ms()
            embedding = self.encoder.pool(x, batch.mask) if not failure else None
            p1 = ms()
        io.join()
        if failure:
            e = failure[0]
            if isinstance(e, StoreError):
                raise e
            raise StoreError(f"{self.store.path}: IO worker failed: {e}") from e
        # A layer's IO, as the (emulated) device served it: it starts when its first read
        # really started or when the channel freed up, whichever is later, and ends when its
        # last read completed on the device (never before it really completed).
        layers, prev_end = [], 0.0
        for l in range(L):
            start, end, deadline = io_real[l]
            if io_counts[l][0]:
                io_start = max((start - t0) * 1e3, prev_end)
                prev_end = max((end - t0) * 1e3, (deadline - t0) * 1e3)
            else:
                io_start = prev_end
            layers.append(LayerTrace(l, io_counts[l][0], io_counts[l][1], io_start, prev_end,
                                     compute[l][0], compute[l][1], compute[l][2]))
        return RunTrace(latency_ms=p1, layers=layers, embed_ms=(e0, e1), pool_ms=(p0, p1),
                        cached_pages_before=cached, streamed_pages=total, embedding=embedding)
