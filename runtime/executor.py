"""The executor: runs one inference exactly as a plan says, and timestamps every stage.

It decides nothing. From the plan it takes, per layer, the shards that run, their
bitwidths, which are preloaded, the read order and the execution mode (pipelined, or
sequential for load-then-execute); from the plan's device, the storage it emulates.

- Before anything runs (`Executor(...)`): the plan must be for the store's model, every
  planned variant must exist with the size the profile claims, and every planned variant
  is read once and checked against its sha256. Every buffer is allocated, once, at
  the sizes the cost model predicts (elasticplan.costmodel.memory_of), and never grown:
  first the preload buffer (preloaded shards in stored form) and the IO ring (the most
  streamed bytes of any W+1 consecutive layers, W the plan's prefetch window), which the
  checksum pass reads into; then, once the pass's temporaries are given back to the
  system (malloc_trim), one compute scratch (the largest shard in fp32, reused by every
  shard), the activation workspace, the dequantisation workspace and a bounce buffer
  (runtime.families.encoder.Workspace, runtime.schemes.DecodeWork), and, when the plan
  streams the embedding table, a buffer for one query's rows. `page_cache=False` (the
  memory probe's) reads lean: no read-ahead, no hints, every read's pages dropped from the
  page cache once it completes.
- `fill_preload()`, before the query (timed, not part of query latency): preloaded shards
  are read cold through the device clock into the preload buffer.
- `run(batch)`: every streamed file's pages are evicted first (and counted with mincore,
  so the trace says how cold the run really was). One IO thread reads, in plan order:
  the query's embedding rows (streamed table: one pread per distinct token), then per layer
  its streamed shards into the ring, each at the ring offset that follows the previous
  one (a shard crossing the ring's end is read as two pieces). Before layer l's reads it
  waits until layer l-W-1 has computed (the window), which also frees that layer's part
  of the ring. The device clock books when each read completes on the emulated device.
  The compute thread (the caller's; torch only runs there) embeds, then per layer waits
  for the layer's reads (or all reads, when sequential), sleeps to the device's
  completion time for them, computes the layer shard by shard (a quantised shard is first
  decoded into the scratch; an fp32 one is used where it lies), releases its ring bytes,
  and finally pools.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from elasticplan.costmodel import PIPELINED, simulate
from elasticplan.errors import StoreError
from elasticplan.plans.plan import Plan
from elasticplan.problem.spec import ModelProfile, Scenario
from runtime.families.encoder import Batch, Slot, Workspace, parse_shard_name, shard_scratch_floats
from runtime.iodev import PAGE, DeviceClock, buffer_resident_bytes, evict, resident_pages
from runtime.schemes import DEFAULT_NAME, REGISTRY
from runtime.schemes.base import FP32, DecodeWork
from runtime.store import ShardStore, Variant, decode_into

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


@dataclass
class PlacedShard:
    """One planned shard: where its bytes come from and where they go (the encoder's and the
    decode executor's, runtime/decoding.py)."""

    variant: Variant
    preloaded: bool
    iov: list[memoryview]  # where its read lands: the preload buffer or the ring
    raw: memoryview | None  # its stored bytes in one piece (None: split at the ring's end)
    head: bool  # an attention shard: an encoder's head, a decoder's KV group (else FFN)
    # fp32 in one piece: views of its weights where they lie (no copy per query)
    views: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def fp32(self) -> bool:
        return self.variant.bits == FP32


def _stored_views(v: Variant, raw: memoryview) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An fp32 variant's (input rows [in_rows, cols], output rows [rows - in_rows, cols], bias)
    as views of its stored bytes (the output block is stored transposed: a transposed view)."""
    buf = torch.frombuffer(raw, dtype=torch.float32)
    n_in, n_out = v.in_rows * v.cols, v.cols * (v.rows - v.in_rows)
    return (buf[:n_in].view(v.in_rows, v.cols),
            buf[n_in:n_in + n_out].view(v.cols, v.rows - v.in_rows).t(),
            buf[n_in + n_out:n_in + n_out + v.bias])


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
    # when the IO thread really read the layer's bytes (first read's start, last read's
    # end): within the IO interval, which an emulated device stretches to its deadline
    read_span_ms: tuple[float, float] | None = None
    # a stage read and computed piece by piece (a decoder's table read in pieces): its
    # compute without its waits for pieces, and its reads without their waits for room
    # in the ring (the channel's busy time); None: the compute and the IO interval
    busy_ms: float | None = None
    io_busy_ms: float | None = None

    @property
    def io_ms(self) -> float:
        """The channel's time on this stage's reads (its waits for room left out)."""
        return self.io_end_ms - self.io_start_ms if self.io_busy_ms is None \
            else self.io_busy_ms

    @property
    def compute_ms(self) -> float:
        """The compute thread's time on this stage (its waits for pieces left out)."""
        return self.compute_end_ms - self.compute_start_ms if self.busy_ms is None \
            else self.busy_ms


def concurrent(traces: Sequence[LayerTrace], l: int) -> tuple[float, float, float]:
    """(MB, read requests, ms) the IO thread read while stage `l` of `traces` (one query's
    or one pass's layers, a decoder's streamed head last) computed: each stage's read bytes
    and requests spread evenly over the span in which they were really read (its IO
    interval where the span is not known), counted where that overlaps stage l's compute,
    and the time those spans overlap it. The features of the contention terms (compute
    slowed by the reads that run beside it; runtime/calibrate.py): under an emulated device
    the bytes are read at this machine's speed, then the IO thread sleeps to the device's
    deadline, so the copies fall early in the interval."""
    cs, ce = traces[l].compute_start_ms, traces[l].compute_end_ms
    nbytes = reads = ms = 0.0
    for t in traces:
        if not t.read_bytes:
            continue
        a, b = t.read_span_ms or (t.io_start_ms, t.io_end_ms)
        both = max(0.0, min(ce, b) - max(cs, a))
        share = both / (b - a) if b > a else float(cs <= a <= ce)
        nbytes += t.read_bytes * share
        reads += t.reads * share
        ms += both
    return nbytes / 1e6, reads, ms


@dataclass
class RunTrace:
    latency_ms: float  # query arrival -> pooled embedding
    layers: list[LayerTrace]
    embed_ms: tuple[float, float]  # embedding lookup (start, end), overlapping layer 0's IO
    pool_ms: tuple[float, float]  # mean pooling after the last layer (start, end)
    cached_pages_before: int  # pages of the streamed shards still in the page cache at start
    streamed_pages: int
    embedding: torch.Tensor = field(repr=False)
    embedding_rows: int = 0  # rows read from a streamed table (one per distinct token)

    @property
    def reads(self) -> int:
        return sum(t.reads for t in self.layers)


@dataclass
class MemoryAccount:
    """The executor's own accounting of the memory it holds for a plan (bytes), exact.

    `resident_bytes`: the resident tensors it loaded (the word-embedding table only when
    the plan keeps it resident). `preload_bytes`: the preload buffer (every preloaded
    shard in stored form). `ring_bytes`: the IO arena the streamed shards land in, sized
    for the plan's window; `ring_high_water_bytes`: the most of it ever in use (a layer's
    bytes are in use from the start of its first read to the end of its compute).
    `scratch_bytes`: the one compute scratch every quantised shard is decoded into in turn.
    `query_rows_bytes`: the buffer one query's embedding rows are read into (streamed).
    `workspace_bytes`: the activation workspace, dequantisation workspace and bounce buffer
    (the profile's `activation_bytes`: the executor refuses a profile that says otherwise)."""

    resident_bytes: int
    preload_bytes: int
    ring_bytes: int
    scratch_bytes: int
    query_rows_bytes: int
    workspace_bytes: int
    ring_high_water_bytes: int = 0

    @property
    def peak_bytes(self) -> int:
        """What the executor holds at its peak: resident + preload + the arena's high-water
        mark (ring in use + scratch) + the query rows + the activation workspace."""
        return (self.resident_bytes + self.preload_bytes + self.ring_high_water_bytes
                + self.scratch_bytes + self.query_rows_bytes + self.workspace_bytes)


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
    # a decoder's plan has one more: its table, the last layer (elasticplan.problem.spec)
    layers = store.config.layers + (1 if plan.scenario.question.decoding else 0)
    if len(plan.layers) != layers:
        raise StoreError(f"{store.path}: the plan has {len(plan.layers)} layers, the store's "
                         f"model has {store.config.layers}"
                         + (" and its table" if plan.scenario.question.decoding else ""))


def check_schemes(profile: ModelProfile, store: ShardStore) -> None:
    """StoreError naming the store's index if a bitwidth of the profile is stored in
    another scheme than the profile was measured on (the profile's `quantisation`; absent:
    uniform)."""
    measured = dict(profile.schemes)
    for bits in profile.bitwidths:
        if bits >= 32 or bits not in store.bitwidths:
            continue
        want, got = measured.get(bits, DEFAULT_NAME), store.scheme_of(bits)
        if want != got:
            fix = f"rebuild it with `elasticplan shard --scheme {want}`" if want in REGISTRY \
                else f"no scheme is named {want!r} (known: {', '.join(REGISTRY)})"
            raise StoreError(f"{store.path / 'index.json'}: {bits}-bit shards are stored in "
                             f"the {got} scheme, but the profile of {profile.name!r} was "
                             f"measured on the {want} scheme; use the profile measured on "
                             f"this store, or {fix}")


def planned_variants(plan: Plan, profile: ModelProfile, store: ShardStore
                     ) -> list[list[tuple[Variant, bool]]]:
    """Per layer, each planned shard's variant in the store and whether it is preloaded;
    StoreError if one is missing or not the size the profile claims (profile and store
    do not match)."""
    check_schemes(profile, store)
    out = []
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
            row.append((v, ch.preloaded))
        out.append(row)
    return out


class _Ring:
    """The IO ring's use during one query, shared by the IO thread (a layer's bytes are in
    use from the start of its first read) and the compute thread (until the end of its
    compute): bytes live now and the most ever live."""

    def __init__(self):
        self.live = self.high = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> None:
        with self._lock:
            self.live += nbytes
            self.high = max(self.high, self.live)

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.live -= nbytes


@dataclass
class LayerIO:
    """One layer's reads as the IO thread did them (perf_counter seconds)."""

    start: float = 0.0
    end: float = 0.0
    deadline: float | None = None  # when the emulated device completed its last read
    reads: int = 0
    nbytes: int = 0


class QueryIO:
    """What the IO thread and the compute thread of one query share: the ring, an event per
    layer read and per layer computed, each layer's reads, the embedding rows' completion,
    and the IO thread's failure (raised on the compute thread)."""

    def __init__(self, layers: int):
        self.ring = _Ring()
        self.read = [threading.Event() for _ in range(layers)]
        self.computed = [threading.Event() for _ in range(layers)]
        self.layers = [LayerIO() for _ in range(layers)]
        self.go, self.rows_ready = threading.Event(), threading.Event()
        self.rows_deadline: float | None = None
        self.rows_read = 0  # embedding rows read (streamed table: one per distinct token)
        self.failure: list[BaseException] = []

    def traces(self, t0: float, compute: list[tuple[float, float, float]]) -> list[LayerTrace]:
        """Each layer's IO as the (emulated) device served it: it starts when its first read
        really started or when the channel freed up, whichever is later, and ends when its
        last read completed on the device (never before it really completed)."""
        out = []
        prev_end = (self.rows_deadline - t0) * 1e3 if self.rows_deadline is not None else 0.0
        for l, io in enumerate(self.layers):
            if io.reads:
                io_start = max((io.start - t0) * 1e3, prev_end)
                prev_end = max((io.end - t0) * 1e3, (io.deadline - t0) * 1e3)
            else:
                io_start = max(prev_end, (io.start - t0) * 1e3)
                prev_end = io_start
            span = ((io.start - t0) * 1e3, (io.end - t0) * 1e3) if io.reads else None
            out.append(LayerTrace(l, io.reads, io.nbytes, io_start, prev_end, *compute[l],
                                  read_span_ms=span))
        return out


# --- the parts the encoder's Executor and the decode executor (runtime/decoding.py) share -

def open_files(store: ShardStore, files: set[str]) -> dict[str, int]:
    """The store's files opened read-only (name -> fd); StoreError naming the one that
    cannot be opened (those opened before it are closed)."""
    fds: dict[str, int] = {}
    for f in sorted(files):
        try:
            fds[f] = store.open_file(f)
        except StoreError:
            for fd in fds.values():
                os.close(fd)
            raise
    return fds


def ring_views(ring: np.ndarray, pos: int, nbytes: int) -> list[memoryview]:
    """Where `nbytes` read at ring position `pos` (mod its size) land: one or two views."""
    size = ring.nbytes
    if nbytes == 0:
        return []
    if nbytes > size:
        raise AssertionError(f"a shard of {nbytes} B does not fit the ring of {size} B")
    start = pos % size
    first = min(nbytes, size - start)
    views = [memoryview(ring[start:start + first]).cast("B")]
    if first < nbytes:
        views.append(memoryview(ring[:nbytes - first]).cast("B"))
    return views


def place_shards(variants: list[list[tuple[Variant, bool]]], preload_buffer: np.ndarray,
                 ring: np.ndarray, attention: Callable[[str], bool]) -> list[list[PlacedShard]]:
    """Where each planned shard's read lands: preloaded ones one after the other in the
    preload buffer, streamed ones one after the other around the ring. `attention(name)`:
    whether a shard feeds the attention half."""
    out = []
    ppos = rpos = 0
    for row in variants:
        shards = []
        for v, preloaded in row:
            if preloaded:
                raw = memoryview(preload_buffer[ppos:ppos + v.nbytes]).cast("B")
                iov = [raw]
                ppos += v.nbytes
            else:
                iov = ring_views(ring, rpos, v.nbytes)
                raw = iov[0] if len(iov) == 1 else None  # None: joined per query
                rpos += v.nbytes
            fp32_views = _stored_views(v, raw) if v.bits == FP32 and raw is not None \
                else None
            shards.append(PlacedShard(v, preloaded, iov, raw, attention(v.name), fp32_views))
        out.append(shards)
    return out


def check_placed(store: ShardStore, rows: list[list[PlacedShard]], ring: np.ndarray,
                 fds: dict[str, int]) -> None:
    """Every placed variant against its checksum, read into the buffer it will use (so
    checking allocates nothing): streamed ones into the ring, preloaded in place."""
    for row in rows:
        for s in row:
            view = s.raw if s.preloaded else memoryview(ring[:s.variant.nbytes])
            store.check_into(s.variant, view, fds[s.variant.file])


def read_shard(store: ShardStore, fds: dict[str, int], s: PlacedShard) -> None:
    """One shard's stored bytes into where it lands (os.preadv, IOV_MAX views a call)."""
    fd, off, v = fds[s.variant.file], s.variant.offset, s.variant
    done = 0
    for i in range(0, len(s.iov), IOV_MAX):
        part = s.iov[i:i + IOV_MAX]
        n = os.preadv(fd, part, off + done)
        if n != sum(m.nbytes for m in part):
            raise StoreError(f"{store.file(v.file)}: short read of shard {v.name} of "
                             f"layer {v.layer} ({n} bytes at offset {off + done})")
        done += n


def hint_shards(fds: dict[str, int], row: list[PlacedShard]) -> None:
    """Ask the kernel to start reading a window-held layer's shards from disk now
    (POSIX_FADV_WILLNEED, asynchronous; the bytes go to the page cache, not to the
    plan's buffers). Only under emulation: the device clock still charges each read
    from when the reader issues it, once the window opens; the hint keeps this host's
    own disk latency (~0.2 ms per cold read here, more than a fast emulated device
    charges) from adding to it, as read-ahead hides it for an unbounded window."""
    for s in row:
        if not s.preloaded:
            os.posix_fadvise(fds[s.variant.file], s.variant.offset, s.variant.nbytes,
                             os.POSIX_FADV_WILLNEED)


def evict_shards(fds: dict[str, int], shards, keep: bool = False) -> tuple[int, int]:
    """Evict the files of these shards (`keep`: leave their pages cached); (resident, total)
    pages of their ranges after."""
    files = set() if keep else {s.variant.file for s in shards}
    for f in files:
        evict(fds[f])
    cached = total = 0
    for s in shards:
        r, t = resident_pages(fds[s.variant.file], s.variant.offset, s.variant.nbytes)
        cached, total = cached + r, total + t
    return cached, total


def fill_shards(store: ShardStore, fds: dict[str, int], clock: DeviceClock,
                shards: list[PlacedShard]) -> float:
    """Read these (preloaded) shards cold, back to back through the device clock, into
    where they lie; returns the milliseconds the fill took on the device."""
    evict_shards(fds, shards)
    t0 = time.perf_counter()
    clock.start(t0)
    deadline = t0
    for s in shards:
        read_shard(store, fds, s)
        deadline = clock.complete(s.variant.nbytes, time.perf_counter())
    return (DeviceClock.sleep_until(deadline) - t0) * 1e3


def read_layers(q: QueryIO, rows: list[list[PlacedShard]], layer_bytes: list[int],
                window: int | None, clock: DeviceClock,
                read: Callable[[PlacedShard], None],
                hint: Callable[[list[PlacedShard]], None]) -> None:
    """The IO thread's reads of one query, layer by layer in order: layer l's reads wait
    for layer l-W-1's compute (the window; meanwhile, under emulation, `hint` asks the
    kernel to read its shards ahead); its ring bytes are taken when its reads start; each
    read is booked on the device clock; q.read[l] is set when they are done. Real reads
    run ahead of the emulated device (absorbing the real disk's latency spikes); the
    compute thread sleeps to a layer's deadline (`await_reads`)."""
    for l, row in enumerate(rows):
        if window is not None and l > window:
            if clock.emulated:
                hint(row)
            q.computed[l - window - 1].wait()
            if q.failure:
                return
        q.ring.take(layer_bytes[l])
        start = time.perf_counter()
        n = nbytes = 0
        deadline = None
        for s in row:
            if s.preloaded:
                continue
            issued = time.perf_counter()
            read(s)
            deadline = clock.complete(s.variant.nbytes, time.perf_counter(), issued)
            n, nbytes = n + 1, nbytes + s.variant.nbytes
        q.layers[l] = LayerIO(start, time.perf_counter(), deadline, n, nbytes)
        q.read[l].set()


def io_failed(q: QueryIO, e: BaseException) -> None:
    """The IO thread failed: record it for the compute thread and wake every waiter."""
    q.failure.append(e)
    q.rows_ready.set()
    for ev in q.read:
        ev.set()


def await_reads(q: QueryIO, l: int) -> bool:
    """On the compute thread: wait for layer l's reads, then sleep to the emulated
    device's completion of them; False if the IO thread failed."""
    q.read[l].wait()
    if q.failure:
        return False
    if q.layers[l].deadline is not None:  # the device's completion
        DeviceClock.sleep_until(q.layers[l].deadline)
    return True


def raise_io_failure(q: QueryIO, store: ShardStore) -> None:
    """Raise the IO thread's failure, if any, on the compute thread (a StoreError as is)."""
    if q.failure:
        e = q.failure[0]
        if isinstance(e, StoreError):
            raise e
        raise StoreError(f"{store.path}: IO worker failed: {e}") from e


def join_pieces(s: PlacedShard, target: np.ndarray) -> memoryview:
    """A shard that lies in two pieces (wrapped around the ring's end) joined at the start
    of `target`: its stored bytes."""
    pos = 0
    for piece in s.iov:
        target[pos:pos + piece.nbytes] = piece
        pos += piece.nbytes
    return memoryview(target[:s.variant.nbytes]).cast("B")


def shard_weights(s: PlacedShard, scratch: torch.Tensor, scratch_bytes: np.ndarray,
                  bounce: np.ndarray, work: DecodeWork
                  ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], float]:
    """A placed shard's fp32 weights (input rows [in_rows, cols], output rows
    [rows - in_rows, cols], bias) and the seconds spent decoding them: an fp32 shard in one
    piece where it lies; a quantised one decoded into the one compute scratch (a shard
    wrapped around the ring's end is joined first, in the scratch if fp32, else in the
    bounce buffer)."""
    if s.views is not None:
        return s.views, 0.0
    t = time.perf_counter()
    v = s.variant
    raw = s.raw
    if raw is None:  # wrapped around the ring's end: joined first
        raw = join_pieces(s, scratch_bytes if s.fp32 else bounce)
    if s.fp32 and s.raw is None:
        views = _stored_views(v, raw)  # now lying in the scratch
    else:
        # laid out in the scratch as an fp32 variant is stored: the output block in its
        # stored orientation [cols, rows - in_rows], contiguous, used through a transposed
        # view (as _stored_views gives it). Decoding into the transposed view instead wrote
        # every value cols floats from the last: 2.5-3.5x the time per weight of these
        # blocks ([576, 128], [576, 192]; 4 and 8 bits, both schemes, one thread).
        n_in, n_out = v.in_rows * v.cols, v.cols * (v.rows - v.in_rows)
        w_in = scratch[:n_in].view(v.in_rows, v.cols)
        w_out = scratch[n_in:n_in + n_out].view(v.cols, v.rows - v.in_rows)
        bias = scratch[n_in + n_out:n_in + n_out + v.bias]
        decode_into(v, raw, Slot(w_in, w_out, bias), work)
        views = (w_in, w_out.t(), bias)
    return views, time.perf_counter() - t


class ShardFiles:
    """What both executors (this one and runtime/decoding.py's) do with the store's files
    they hold open (`self.fds`, file -> fd; `self.store`): close them (also as a context
    manager), read a placed shard, hint the kernel about a layer's reads."""

    store: ShardStore
    fds: dict[str, int]
    keep_page_cache: bool = True  # False: lean reads (Executor's page_cache argument)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read(self, s: PlacedShard) -> None:
        read_shard(self.store, self.fds, s)
        if not self.keep_page_cache:  # its pages leave the page cache as the read completes
            drop_pages(self.fds[s.variant.file], s.variant.offset, s.variant.nbytes)

    def _hint(self, row: list[PlacedShard]) -> None:
        if self.keep_page_cache:  # (a read ahead into the page cache is memory the plan lacks)
            hint_shards(self.fds, row)


class Executor(ShardFiles):
    def __init__(self, plan: Plan, scenario: Scenario, store: ShardStore, *,
                 emulate: bool = True, page_cache: bool = True):
        """Check the plan against the store and the profile, open the files, allocate every
        buffer at its predicted size, place each planned shard in it, and check every
        planned variant's bytes against its sha256.

        `page_cache=False`: lean reads, for a process whose page cache is charged to it (a
        memory cgroup, `run --memory-cap`): read-ahead off on every file
        (POSIX_FADV_RANDOM: a read brings in its own pages, no more), no WILLNEED hints,
        and the pages of every read dropped from the page cache as soon as it completes
        (the checksum pass's, the preload fill's, each streamed shard's, the query's
        embedding rows'), so the page cache holds at most the read in flight."""
        self.plan, self.scenario, self.store = plan, scenario, store
        self.keep_page_cache = page_cache
        check_model(plan, store)
        self.clock = DeviceClock(scenario.device if emulate else None)
        self.execution = plan.execution
        self.layout = plan.layout
        self.stream_embeddings = self.layout.stream_embeddings
        # Every planned variant: present, the size the profile claims (its checksum below).
        variants = planned_variants(plan, scenario.model, store)
        self.predicted_memory = simulate(scenario, plan.selection(scenario), plan.execution,
                                         self.layout).memory
        if self.stream_embeddings and \
                scenario.model.embedding_row_bytes != 4 * store.config.hidden:
            raise StoreError(f"{store.path}: the profile's embedding rows are "
                             f"{scenario.model.embedding_row_bytes} B, the store's are "
                             f"{4 * store.config.hidden} B")
        self.encoder = store.encoder(without_word=self.stream_embeddings)
        if not page_cache:  # loading it read (and checked) the whole resident file
            drop_file_pages(store.file(store.index.resident.file))
        self.fds: dict[str, int] = {}
        self._open({v.file for row in variants for v, _ in row} |
                   ({store.index.resident.file} if self.stream_embeddings else set()))
        if not self.keep_page_cache:
            for fd in self.fds.values():
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        # The buffers the reads land in first, and the checksum pass into them; its
        # temporaries (the store's value checks: up to a few times the largest variant)
        # go back to the system (malloc_trim) before the compute buffers are allocated, so
        # they never sit on top of every buffer of the plan (docs/runtime.md, "Kernel
        # limits": they did, +0.5-0.6 MB over a 9.6 MB plan).
        self._allocate_io(variants)
        self.shards = self._place(variants)
        self.layer_bytes = [sum(s.variant.nbytes for s in row if not s.preloaded)
                            for row in self.shards]
        self._check_checksums()
        if not self.keep_page_cache:
            for fd in self.fds.values():
                evict(fd)
        malloc_trim()
        self._allocate(variants)
        self.memory = MemoryAccount(
            resident_bytes=sum(t.numel() * t.element_size() for t in self.encoder.r.values()),
            preload_bytes=self.preload_buffer.nbytes, ring_bytes=self.ring.nbytes,
            scratch_bytes=self.scratch.numel() * 4, workspace_bytes=self.activation_bytes,
            query_rows_bytes=0 if self.query_rows is None else self.query_rows.numel() * 4)
        self.filled = not any(s.preloaded for row in self.shards for s in row)

    def _open(self, files: set[str]) -> None:
        self.fds = open_files(self.store, files)

    def _allocate_io(self, variants: list[list[tuple[Variant, bool]]]) -> None:
        """The buffers the planned shards are read into, allocated (and touched) at their
        predicted sizes: the preload buffer and the IO ring."""
        profile = self.scenario.model
        self.preload_buffer = touched(sum(v.nbytes for row in variants for v, p in row if p))
        self.ring = touched(self.predicted_memory.working_peak_bytes - profile.scratch_bytes)

    def _allocate(self, variants: list[list[tuple[Variant, bool]]]) -> None:
        """The compute buffers, allocated (and touched) before any query, at the predicted
        sizes (after _allocate_io's and the checksum pass); the profile's scratch and
        activation bytes must be the runtime's."""
        profile, c = self.scenario.model, self.store.config
        self.scratch = torch.zeros(shard_scratch_floats(c))
        self.scratch_bytes = self.scratch.numpy().view(np.uint8)
        self.workspace = Workspace(c, 1, profile.seq_len)
        work, bounce = self.store.decode_buffers()
        self.work = DecodeWork(*work)
        self.bounce = touched(bounce)
        self.activation_bytes = self.workspace.nbytes + self.work.nbytes + self.bounce.nbytes
        if (profile.scratch_bytes, profile.activation_bytes) != (4 * self.scratch.numel(),
                                                                 self.activation_bytes):
            self.close()
            raise StoreError(f"{self.store.path}: the profile's scratch_bytes and "
                             f"activation_bytes ({profile.scratch_bytes}, "
                             f"{profile.activation_bytes}) are not the runtime's "
                             f"({4 * self.scratch.numel()}, {self.activation_bytes}) at "
                             f"seq_len {profile.seq_len}; re-profile the model")
        self.query_rows = torch.zeros(profile.seq_len, c.hidden) if self.stream_embeddings \
            else None

    def _place(self, variants: list[list[tuple[Variant, bool]]]) -> list[list[PlacedShard]]:
        """Where each planned shard's read lands (place_shards)."""
        return place_shards(variants, self.preload_buffer, self.ring,
                            lambda name: parse_shard_name(name)[0] == "head")

    def _check_checksums(self) -> None:
        """Every planned variant against its checksum, read into the buffer it will use (so
        checking allocates nothing): streamed ones into the ring, preloaded in place."""
        try:
            check_placed(self.store, self.shards, self.ring, self.fds)
        except StoreError:
            self.close()
            raise

    # --- IO --------------------------------------------------------------------------

    def _read_rows(self, ids: torch.Tensor) -> tuple[float | None, int]:
        """One query's word-embedding rows from the store: one pread per distinct token (into
        the position where it first occurs; its repeats, padding above all, are copied from
        there), each booked on the device clock as it completes. Returns the last completion
        and the number of rows read."""
        fd = self.fds[self.store.index.resident.file]
        row = 4 * self.store.config.hidden
        table = self.store.word_table
        base = self.store.word_table.offset
        out = self.query_rows.numpy()
        deadline = None
        tokens = ids.tolist()
        bad = next((t for t in tokens if not 0 <= t < table.shape[0]), None)
        if bad is not None:  # a row past the table would be another tensor's bytes
            raise StoreError(f"{self.store.path / self.store.index.tokenizer.file}: token id "
                             f"{bad} is outside the embedding table's {table.shape[0]} rows")
        first: dict[int, int] = {}
        for i, token in enumerate(tokens):
            if token in first:
                continue
            first[token] = i
            view = memoryview(out[i]).cast("B")
            issued = time.perf_counter()
            if os.preadv(fd, [view], base + token * row) != row:
                raise StoreError(f"{self.store.file(self.store.index.resident.file)}: "
                                 f"short read of embedding row {token}")
            deadline = self.clock.complete(row, time.perf_counter(), issued)
        for i, token in enumerate(tokens):
            j = first[token]
            if j != i:
                out[i] = out[j]
        return deadline, len(first)

    def _evict(self, shards) -> tuple[int, int]:
        return evict_shards(self.fds, shards)

    def fill_preload(self) -> FillReport:
        """Read the preloaded shards (cold, through the device clock) before any query.
        Resident bytes are measured: the preload buffer's resident pages (mincore)."""
        pre = [s for row in self.shards for s in row if s.preloaded]
        fill_ms = fill_shards(self.store, self.fds, self.clock, pre)
        if not self.keep_page_cache:
            evict_shards(self.fds, pre)
        self.filled = True
        return FillReport(fill_ms=fill_ms, shards=len(pre),
                          bytes=sum(s.variant.nbytes for s in pre),
                          resident_bytes=min(buffer_resident_bytes(self.preload_buffer),
                                             self.preload_buffer.nbytes))

    # --- one query -------------------------------------------------------------------

    def run(self, batch: Batch) -> RunTrace:
        if not self.filled:
            raise RuntimeError("fill_preload() must run before the first query")
        if self.stream_embeddings and batch.ids.shape != (1, self.query_rows.shape[0]):
            raise ValueError(f"a streamed embedding table takes one query of "
                             f"{self.query_rows.shape[0]} tokens, got {tuple(batch.ids.shape)}")
        L = len(self.shards)
        cached, total = self._evict([s for row in self.shards for s in row if not s.preloaded])
        q = QueryIO(L)
        B, n = batch.ids.shape
        ws = self.workspace
        if (B, n) != (ws.batch, ws.n):  # not the planned query shape: its own, not accounted
            ws = Workspace(self.store.config, B, n)
        io = threading.Thread(target=self._io_worker, args=(q, batch), name="elasticplan-io",
                              daemon=True)
        io.start()
        compute: list[tuple[float, float, float]] = []
        try:
            with torch.inference_mode():
                t0 = time.perf_counter()
                self.clock.start(t0)
                q.go.set()
                ms = lambda: (time.perf_counter() - t0) * 1e3  # noqa: E731
                e0 = ms()
                rows = None
                if self.stream_embeddings:
                    q.rows_ready.wait()
                    if not q.failure:
                        DeviceClock.sleep_until(q.rows_deadline)
                        rows = self.query_rows.unsqueeze(0)
                if not q.failure:
                    self.encoder.embed_into(ws, batch.ids, batch.mask, rows)
                e1 = ms()
                for l, row in enumerate(self.shards):
                    if not await_reads(q, l if self.execution == PIPELINED else L - 1):
                        break
                    start = ms()
                    decode_s = self._compute_layer(l, row, ws) if row else 0.0
                    compute.append((start, ms(), decode_s * 1e3))
                    q.ring.release(self.layer_bytes[l])
                    q.computed[l].set()
                p0 = ms()
                embedding = None if q.failure else \
                    self.encoder.pool(ws.x.view(*batch.ids.shape, -1), batch.mask)
                p1 = ms()
        finally:
            for ev in q.computed:  # an IO thread waiting on the window must not hang
                ev.set()
            io.join()
        self.memory.ring_high_water_bytes = max(self.memory.ring_high_water_bytes, q.ring.high)
        raise_io_failure(q, self.store)
        return RunTrace(latency_ms=p1, layers=q.traces(t0, compute), embed_ms=(e0, e1),
                        pool_ms=(p0, p1), cached_pages_before=cached, streamed_pages=total,
                        embedding=embedding, embedding_rows=q.rows_read)

    def _io_worker(self, q: "QueryIO", batch: Batch) -> None:
        """The IO thread of one query. Reads back to back in plan order: real reads run ahead
        of the emulated device (absorbing the real disk's latency spikes), and the device
        clock books when each read would complete on the device. Layer l's reads wait for
        layer l-W-1's compute (the window); the compute thread sleeps to a layer's
        deadline."""
        try:
            q.go.wait()
            if self.stream_embeddings:
                q.rows_deadline, q.rows_read = self._read_rows(batch.ids[0])
                if not self.keep_page_cache:  # the rows' pages, read: dropped
                    evict(self.fds[self.store.index.resident.file])
                q.rows_ready.set()
            read_layers(q, self.shards, self.layer_bytes, self.layout.window, self.clock,
                        self._read, self._hint)
        except BaseException as e:  # reported on the compute thread
            io_failed(q, e)

    def _compute_layer(self, l: int, row: list[PlacedShard], ws: Workspace) -> float:
        """Layer l shard by shard (heads, then FFN slices, in plan order): each quantised
        (or split) shard is decoded into the one scratch and applied at once; fp32 shards
        are applied where they lie. Returns the seconds spent decoding."""
        decode = 0.0
        for part in ("attn", "ffn"):
            self.encoder.layer_start(ws, l, part)
            for s in row:
                if s.head != (part == "attn"):
                    continue
                views, seconds = shard_weights(s, self.scratch, self.scratch_bytes, self.bounce,
                                               self.work)
                decode += seconds
                (self.encoder.head if s.head else self.encoder.ffn_slice)(ws, *views)
            self.encoder.layer_end(ws, l, part)
        return decode


def drop_pages(fd: int, offset: int, nbytes: int) -> None:
    """Drop a completed read's pages from the page cache (clean: shard files are fsync'ed),
    the pages it shares with its neighbours included (DONTNEED keeps a range's partial
    pages: 34 of them stayed cached per query of the 10 MB plan)."""
    start = offset - offset % PAGE
    os.posix_fadvise(fd, start, -(-(offset + nbytes - start) // PAGE) * PAGE,
                     os.POSIX_FADV_DONTNEED)


def drop_file_pages(path) -> None:
    """Drop a whole file's clean pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        evict(fd)
    finally:
        os.close(fd)


_libc = None


def malloc_trim() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; elsewhere,
    nothing): memory freed by temporaries otherwise stays resident, and charged."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):
        _libc = False


def touched(nbytes: int) -> np.ndarray:
    """A byte buffer with every page touched now, not during a query."""
    buf = np.empty(max(nbytes, 0), np.uint8)
    buf[:] = 0
    return buf
