"""The decode executor: a llama decoder generating token by token, as a plan says, with
every stage timestamped and every buffer accounted (the runtime of `elasticplan
generate`; docs/runtime.md, "The decode executor").

It takes, per layer, the shards that run (KV groups, FFN slices), their stored bitwidths
and whether each is resident (held for the whole answer, in stored form) or streamed
(read again in every pass); the embedding / LM-head table's bitwidth and whether it is
resident or streamed; the prefetch window; the context (prompt + answer tokens) and the
storage (emulated at a device's bandwidth and per-read latency, or this machine's). It
decides nothing.

- Open (`DecodeExecutor(...)`): every picked variant and the table variant must exist;
  the files are opened and every buffer is allocated once, touched, and never grown, in
  two mappings of the executor's own (runtime.decode_layers.Arena: nothing from the C
  heap). First the IO buffers: the preload buffer (resident shards, stored form), the
  table buffer (the table when resident, stored form), the IO ring (the most streamed
  bytes of any W+1 consecutive layers, the streamed table counted as a last pseudo-layer:
  elasticplan.costmodel.window_peak, as the planner predicts it). The resident set is
  then read, each variant into the buffer it will use and checked against its sha256
  (streamed ones into the ring), and the norms are loaded from resident.bin (its checksum
  checked, the fp32 table left in the file); the heap's free pages go back to the system
  (malloc_trim: the checks' temporaries). Then the compute buffers: the compute scratch
  (one shard in fp32, or HEAD_CHUNK_ROWS rows of the table), the dequantisation workspace
  and the bounce buffer (sized for the store, whatever the plan picks:
  runtime.decode_layers.decode_buffers, the profile's workspace_bytes), the activation
  workspace (runtime.decode_layers.DecodeWorkspace: elasticplan.problem.spec.
  activation_buffers, buffer by buffer) and the KV cache of the kept KV groups only at
  the full context (runtime.families.llama.KVCache). Every term is what the planner
  predicts for the same choices (elasticplan.problem.spec.pass_model; tested). glibc's
  fastbins are turned off for the process (`no_fastbins`: the passes' tiny torch
  temporaries otherwise grow the heap token by token).
- `generate(prompt, max_new_tokens, on_token)`: greedy decoding, one pipelined pass per
  token, each exactly the encoder Executor's pipeline (runtime/executor.py: the same
  placement, reads, window, device clock, ring accounting and traces). Before every pass
  the streamed files' pages are evicted (cold reads; mincore counts what stayed). The
  prompt pass (prefill): when the table is streamed, the prompt's embedding rows are
  read from the table variant first, one read per token (two for a quantised table: the
  row's codes and its scale); then every streamed shard is read into the ring layer by
  layer (layer l's reads wait until layer l-W-1 has computed); each layer computes the
  whole prompt (causal attention, in chunks of `chunk` positions); then the table (read
  into the ring after the last layer when streamed, under the same window) gives the
  logits of the last position. Each decode step is the same pass for one token: every
  streamed shard read again, attention over the KV cache so far, the LM head at the
  table's bitwidth (read again when streamed); its input row is the previous token's,
  copied out of the table while it still lay in the ring (streamed: no read) or from the
  resident table. Stops at EOS (included) or max_new_tokens; `on_token(id)` is called as
  each token is produced (after its pass's trace is taken).
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import hashlib
import os
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Sequence

import numpy as np
import torch

from elasticplan.costmodel import window_peak
from elasticplan.errors import StoreError
from elasticplan.problem.archgen import work_bytes
from elasticplan.problem.spec import Device, activation_buffers
from runtime.decode_layers import (
    Arena,
    DecodeWorkspace,
    StoredTable,
    attention_group,
    decode_buffers,
    decoder_shape,
    ffn_slice,
    rms_norm_into,
    vector_weights,
)
from runtime.executor import (
    LayerIO,
    LayerTrace,
    PlacedShard,
    QueryIO,
    ShardFiles,
    await_reads,
    check_placed,
    evict_shards,
    fill_shards,
    io_failed,
    join_pieces,
    open_files,
    place_shards,
    raise_io_failure,
    read_layers,
    read_shard,
    ring_views,
    shard_weights,
)
from runtime.families.llama import KVCache
from runtime.iodev import DeviceClock
from runtime.schemes.base import FP32, DecodeWork
from runtime.store import TABLE, ShardStore, Variant, check_values

MODEL_EOS = -1  # generate's default eos_id: the model's


@dataclass(frozen=True)
class ShardPick:
    """One shard of a layer that runs: its name ("group1", "ffn3"), stored bitwidth, and
    whether it is resident (held in stored form for the whole answer) or streamed."""

    name: str
    bits: int
    resident: bool = False


@dataclass(frozen=True)
class TablePick:
    """The embedding / LM-head table: stored bitwidth, resident or streamed, and, streamed,
    how many pieces of rows it is read in (elasticplan.problem.spec.head_pieces: each
    piece's logits computed as soon as it is in, two pieces in the ring; 1: whole)."""

    bits: int = FP32
    resident: bool = True
    pieces: int = 1


def emulated_storage(bandwidth_mb_s: float, latency_us: float) -> Device:
    """A device whose storage the executor emulates (only its storage terms are used)."""
    return Device(name=f"storage {bandwidth_mb_s:g} MB/s + {latency_us:g} us",
                  bandwidth_mb_s=bandwidth_mb_s, latency_us=latency_us, gflops=1.0,
                  layer_overhead_ms=0.0, dequant_gb_s=None, memory_mb=1e6)


@dataclass
class PassTrace:
    """One pass (the prompt's, or one decode step's), ms from the pass's start: its input
    (embedding rows: read when the table is streamed in the prompt pass), per layer the IO
    and compute intervals (runtime.executor.LayerTrace), the LM head as its own stage (its
    IO the table's read when streamed; `index` = the number of layers), and the total."""

    kind: str  # "prefill" or "decode"
    position: int  # the first position it computes
    tokens: int  # positions it computes
    token: int  # the token it produced (greedy)
    latency_ms: float  # pass start -> the token known
    embed_ms: tuple[float, float]  # input rows in place (start, end)
    rows_io_ms: tuple[float, float] | None  # the prompt's row reads on the device (streamed)
    row_reads: int  # reads of embedding rows (prompt pass, table streamed)
    layers: list[LayerTrace]
    head: LayerTrace
    cached_pages_before: int  # pages of the streamed files' ranges still cached at start
    streamed_pages: int
    ring_high_water_bytes: int

    @property
    def reads(self) -> int:
        return sum(t.reads for t in self.layers) + self.head.reads + self.row_reads

    @property
    def read_bytes(self) -> int:
        return sum(t.read_bytes for t in self.layers) + self.head.read_bytes


@dataclass
class DecodeMemory:
    """The decode executor's own accounting of what it holds (bytes), by term, exact: each
    the planner's term of the same name for the same choices (elasticplan.costmodel.Memory;
    working = ring + scratch, activation = workspace, kept = KV cache).

    `resident_bytes`: the norms. `preload_bytes`: the resident shards and the resident
    table (stored form). `ring_bytes`: the IO ring, as sized; `ring_high_water_bytes`: the
    most of it in use in any pass so far (a layer's bytes are in use from the start of its
    first read to the end of its compute; the table's to the end of the LM head and the
    next row's copy). `kv_cache_bytes`: the KV cache of the kept groups at the full
    context. `scratch_bytes`: the one compute scratch. `workspace_bytes`: the activations
    (DecodeWorkspace, where a quantised table's prompt rows are read too), the
    dequantisation workspace and the bounce buffer."""

    resident_bytes: int
    preload_bytes: int
    ring_bytes: int
    kv_cache_bytes: int
    scratch_bytes: int
    workspace_bytes: int
    ring_high_water_bytes: int = 0

    def _fixed(self) -> int:
        return (self.resident_bytes + self.preload_bytes + self.kv_cache_bytes
                + self.scratch_bytes + self.workspace_bytes)

    @property
    def peak_bytes(self) -> int:
        """What it held at its peak: every term, the ring at its high-water mark."""
        return self._fixed() + self.ring_high_water_bytes

    @property
    def allocated_bytes(self) -> int:
        """Every term, the ring at its size: what a plan predicts."""
        return self._fixed() + self.ring_bytes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"peak_bytes": self.peak_bytes,
                                           "allocated_bytes": self.allocated_bytes}


@dataclass
class GenerateResult:
    prompt_tokens: int
    tokens: list[int]  # the answer (EOS included when it came)
    stop: str  # "eos" or "max_new_tokens"
    passes: list[PassTrace]  # the prompt pass, then one per decode step
    memory: DecodeMemory  # a copy, after the answer
    process_peak_bytes: int  # VmHWM of this process after the answer
    logits: list[torch.Tensor] | None = field(default=None, repr=False)  # per pass (kept)

    @property
    def ttft_ms(self) -> float:
        return self.passes[0].latency_ms

    @property
    def step_ms(self) -> list[float]:
        return [p.latency_ms for p in self.passes[1:]]


def _table_variant(store: ShardStore, bits: int) -> tuple[Variant, bool]:
    """The table at `bits` and whether its own checksum applies: the stored variant
    (runtime.store ShardStore.table_variant), or, in a store built before tables were
    stored, resident.bin's fp32 table (checked with the file, by ShardStore.resident)."""
    c = store.config
    if any(k[1] == TABLE for k in store.index.variants) or bits != FP32:
        return store.table_variant(bits), True
    e = store.index.resident.tensors["embed"]
    return Variant(layer=c.layers, name=TABLE, bits=FP32, file=store.index.resident.file,
                   offset=e.offset, nbytes=e.nbytes, rows=c.vocab, cols=c.hidden,
                   in_rows=c.vocab, bias=0, sha256=""), False


def _norms(store: ShardStore) -> dict[str, torch.Tensor]:
    """The resident tensors but the table (resident.bin's checksum and values checked in
    full, as ShardStore.resident does; the table's bytes are not loaded)."""
    entry = store.index.resident
    keep = {k: t for k, t in entry.tensors.items() if k not in ("embed", "lm_head")}
    view = copy.copy(store)
    view.index = dataclasses.replace(store.index,
                                     resident=dataclasses.replace(entry, tensors=keep))
    return view.resident()


class DecodeExecutor(ShardFiles):
    def __init__(self, store: ShardStore, picks: Sequence[Sequence[ShardPick]],
                 table: TablePick = TablePick(), *, context: int, window: int | None = None,
                 device: Device | None = None, threads: int | None = None,
                 prompt_tokens: int | None = None, chunk: int | None = None,
                 warm_reads: bool = False):
        """Check the picks against the store, open the files, allocate every buffer, place
        every picked variant and the table, read the resident set and check every variant
        against its sha256. `context`: the KV cache's columns (prompt + answer);
        `prompt_tokens`: the longest prompt (default context - 1); `chunk`: prompt
        positions computed at once in a layer (default: all); `device`: emulated storage
        (None: this machine's); `threads`: torch's (None: as set); `warm_reads`: with
        emulated storage, the streamed files' pages are not evicted before each pass, so
        that the reads come from the page cache at the emulated device's pace (a device
        faster than this machine's disk: cold, the disk would set the pace), else every
        pass reads them cold."""
        c = store.config
        if c.family != "llama":
            raise StoreError(f"{store.path}: the decode executor runs a llama store, this one "
                             f"holds a {c.family}")
        if not c.tied:
            raise StoreError(f"{store.path}: an untied LM head is not supported by the decode "
                             f"executor (the table is both the embeddings and the LM head)")
        if len(picks) != c.layers:
            raise ValueError(f"picks for {len(picks)} layers, the model has {c.layers}")
        if not 2 <= context <= c.context:
            raise ValueError(f"context must be in [2, {c.context}], got {context}")
        prompt_tokens = context - 1 if prompt_tokens is None else int(prompt_tokens)
        if not 1 <= prompt_tokens < context:
            raise ValueError(f"prompt_tokens must be in [1, {context - 1}], got {prompt_tokens}")
        chunk = prompt_tokens if chunk is None else min(int(chunk), prompt_tokens)
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if window is not None and window < 0:
            raise ValueError(f"window must be >= 0 or None, got {window}")
        if warm_reads and device is None:
            raise ValueError("warm reads need emulated storage (a device): this machine's own "
                             "storage is read cold, every pass")
        if threads is not None:
            torch.set_num_threads(threads)
        no_fastbins()
        self.store, self.config, self.context, self.window = store, c, context, window
        self.prompt_tokens, self.chunk = prompt_tokens, chunk
        self.clock, self.warm_reads = DeviceClock(device), warm_reads
        self.picks = [list(row) for row in picks]
        variants = []
        for l, row in enumerate(self.picks):
            names = [p.name for p in row]
            if len(set(names)) != len(names):
                raise ValueError(f"layer {l}: a shard picked twice in {names}")
            for n in names:
                c.parse(n)
            variants.append([(store.variant(l, p.name, p.bits), p.resident) for p in row])
        tv, table_checked = _table_variant(store, table.bits)
        self.table_pick, self.table = table, StoredTable(tv, c.hidden)
        self.stream_table = not table.resident
        self.spans = self._piece_spans(table) if self.stream_table else []
        # a table read in pieces holds two of them in the ring (Shard.ring_bytes)
        slot = min(tv.nbytes, 2 * self.table.piece_bytes(self.spans[0][1])) \
            if len(self.spans) > 1 else tv.nbytes
        self.layer_bytes = [sum(v.nbytes for v, r in row if not r) for row in variants] + \
            ([slot] if self.stream_table else [])
        self.fds: dict[str, int] = open_files(store, {v.file for row in variants for v, _ in row}
                                              | {tv.file})
        try:
            self._allocate_io(variants, tv)
            attention = lambda name: name != TABLE and c.parse(name)[0] == "group"  # noqa: E731
            if len(self.spans) > 1:  # two pieces of it after the last layer's shards
                self.shards = place_shards(variants, self.preload_buffer, self.ring, attention)
                self.table_shard = PlacedShard(tv, False, [], None, False)
                self.slot_at = sum(self.layer_bytes[:-1])  # its place in the ring
            elif self.stream_table:  # the table after the last layer's shards, in the ring
                placed = place_shards(variants + [[(tv, False)]], self.preload_buffer,
                                      self.ring, attention)
                self.shards, self.table_shard = placed[:-1], placed[-1][0]
            else:  # in its own buffer
                self.shards = place_shards(variants, self.preload_buffer, self.ring, attention)
                self.table_shard = place_shards([[(tv, True)]], self.table_buffer, self.ring,
                                                attention)[0][0]
            check_placed(store, self.shards, self.ring, self.fds)
            if len(self.spans) > 1:
                if table_checked:  # piece by piece, through its two pieces of the ring
                    self._check_pieces()
            elif table_checked:
                check_placed(store, [[self.table_shard]], self.ring, self.fds)
            elif not self.stream_table:  # resident.bin's table, checked with the file below
                read_shard(store, self.fds, self.table_shard)
            self.norms = _norms(store)
            # the checksum pass's and the norms' temporaries (the store's value checks: a few
            # hundred KB) go back to the system before the compute buffers exist, so that
            # they never sit on top of every buffer of the plan
            _trim()
            self._allocate_compute()
            self.vectors = self._vector_weights()
        except BaseException:
            self.close()
            raise
        self.rows = self.shards + ([[self.table_shard]] if self.stream_table else [])
        self.memory = DecodeMemory(
            resident_bytes=sum(t.numel() * 4 for t in self.norms.values()),
            preload_bytes=self.preload_buffer.nbytes + self.table_buffer.nbytes,
            ring_bytes=self.ring.nbytes, kv_cache_bytes=self.cache.nbytes,
            scratch_bytes=self.scratch.numel() * 4,
            workspace_bytes=self.ws.nbytes + self.work.nbytes + self.bounce.nbytes)

    def _allocate_io(self, variants: list[list[tuple[Variant, bool]]], tv: Variant) -> None:
        """The buffers the variants are read (and checked) into, in one mapping of their own
        (runtime.decode_layers.Arena): the preload buffer, the table buffer, the IO ring."""
        sizes = (sum(v.nbytes for row in variants for v, r in row if r),
                 0 if self.stream_table else tv.nbytes,
                 window_peak(self.layer_bytes, self.window))
        arena = Arena(sizes)
        self.preload_buffer, self.table_buffer, self.ring = (arena.bytes(n) for n in sizes)

    def _allocate_compute(self) -> None:
        """The compute buffers, in one mapping of their own (after the checksum pass): the
        compute scratch (one shard in fp32, or a chunk of the table's rows), the
        dequantisation workspace and the bounce buffer (the store's, whatever the picks),
        the activations (DecodeWorkspace) and the kept groups' KV cache."""
        c, t, P = self.config, self.table, self.prompt_tokens
        widest = max(c.shard_rows(n) for n in c.shard_names()) * c.hidden
        scratch = max(widest, t.chunk_rows * c.hidden)
        work, bounce = decode_buffers(self.store)
        work = tuple(work) + (0,) * (5 - len(work))  # DecodeWork's five sizes
        kept = [SimpleNamespace(groups=[p.name for p in row if c.parse(p.name)[0] == "group"])
                for row in self.picks]
        kv = 4 * c.head_dim * self.context
        arena = Arena([4 * scratch, 4 * work[0], 4 * work[1], 4 * work[2], 4 * work[3],
                       8 * work[4], bounce,
                       *activation_buffers(decoder_shape(c), P, self.context, self.chunk).values(),
                       *(kv * len(k.groups) for k in kept for _ in ("k", "v"))])
        self.scratch = arena.tensor(scratch)
        self.scratch_bytes = self.scratch.numpy().view(np.uint8)
        self.work = _work(arena, work)
        self.bounce = arena.bytes(bounce)
        # a chunk of a quantised table's rows split at the ring's end is joined in the
        # bounce buffer too (never in use at once: a shard's is decoded before it computes)
        self.spill = self.bounce
        assert self.spill.nbytes >= t.spill_bytes()
        self.ws = DecodeWorkspace(c, P, self.chunk, self.context, arena)
        self.x_bytes = self.ws.x.numpy().reshape(-1).view(np.uint8)  # (fp32 rows read here)
        self.cache = KVCache(c, kept, 1, self.context, empty=arena.tensor)

    def _vector_weights(self) -> dict[int, tuple]:
        """Each placed shard whose scheme's kernel multiplies its blocks where they lie
        (decode_layers.vector_weights), by id: what a pass of one position computes with
        (a shard wrapped around the ring's end is joined in the bounce buffer first, and
        computed there)."""
        out = {}
        for row in self.shards:
            for s in row:
                v = s.variant
                if s.fp32:
                    continue
                raw = s.raw if s.raw is not None else memoryview(self.bounce[:v.nbytes])
                w = vector_weights(v, torch.frombuffer(raw, dtype=torch.uint8), self.work)
                if w is not None:
                    out[id(s)] = w
        return out

    # --- a table read in pieces --------------------------------------------------------

    def _piece_spans(self, table: TablePick) -> list[tuple[int, int]]:
        """(first row, rows) of each piece of a streamed table: table.pieces pieces of
        ceil(vocab / pieces) rows, the last the rest; one piece: the whole table."""
        t = self.table
        if table.pieces < 1:
            raise ValueError(f"table pieces must be >= 1, got {table.pieces}")
        rows = t.piece_rows(table.pieces)
        spans = [(r0, min(rows, t.vocab - r0)) for r0 in range(0, t.vocab, rows)]
        if len(spans) != table.pieces:
            raise ValueError(f"{t.vocab} table rows do not make {table.pieces} pieces of "
                             f"{rows} rows (they make {len(spans)})")
        if len(spans) > 1 and t.variant.nbytes != t.piece_bytes(t.vocab):
            raise StoreError(f"{self.store.path}: the table at {t.bits} bits holds "
                             f"{t.variant.nbytes} bytes, not {t.piece_bytes(t.vocab)} for "
                             f"{t.vocab} rows of codes and side data: it cannot be read in "
                             f"pieces")
        return spans

    def _piece_at(self, i: int) -> int:
        """Where piece i starts in the ring: its half of the table's two pieces."""
        return self.slot_at + (i % 2) * self.table.piece_bytes(self.spans[0][1])

    def _piece_views(self, i: int) -> list[memoryview]:
        """Where piece i lies in the ring: its rows' codes, then their side data."""
        return ring_views(self.ring, self._piece_at(i), self.table.piece_bytes(self.spans[i][1]))

    def _piece_reads(self, i: int) -> list[tuple[list[memoryview], int]]:
        """Piece i's reads: (where it lands, file offset) for its codes and (quantised)
        its side data (spec.table_reads)."""
        t, v = self.table, self.table.variant
        r0, rows = self.spans[i]
        at = self._piece_at(i)
        reads = [(ring_views(self.ring, at, rows * t.row_bytes), v.offset + r0 * t.row_bytes)]
        if t.side_bytes:
            reads.append((ring_views(self.ring, at + rows * t.row_bytes, rows * t.side_bytes),
                          v.offset + t.side_at(r0)))
        return reads

    def _read_piece(self, i: int, clock: DeviceClock) -> tuple[float, int, int, float]:
        """Piece i's reads into its half of the table's place in the ring, each booked on
        `clock`; (the last completion, reads, bytes, seconds the channel was busy with
        them: from when it took the first to the last's completion)."""
        fd, path = self.fds[self.table.variant.file], self.store.file(self.table.variant.file)
        deadline, n, nbytes, began = None, 0, 0, None
        for views, offset in self._piece_reads(i):
            issued = time.perf_counter()
            if began is None:
                began = max(issued, clock.busy_until) if clock.emulated else issued
            want = sum(m.nbytes for m in views)
            if os.preadv(fd, views, offset) != want:
                raise StoreError(f"{path}: short read of the table's rows {self.spans[i][0]}.. "
                                 f"at offset {offset}")
            deadline = clock.complete(want, time.perf_counter(), issued)
            n, nbytes = n + 1, nbytes + want
        return deadline, n, nbytes, deadline - began

    def _check_pieces(self) -> None:
        """The streamed table against its sha256 and its values, read a piece's size at a
        time into the ring (so that checking it allocates nothing; the ring holds two
        pieces at least): the checksum over its bytes in file order (its codes, then its
        side data), then the values piece by piece (a piece laid out as a table of its
        rows: their codes, then their side data)."""
        t, v = self.table, self.table.variant
        fd, path = self.fds[v.file], self.store.file(v.file)

        def read(view: memoryview, offset: int) -> None:
            if os.preadv(fd, [view], offset) != view.nbytes:
                raise StoreError(f"{path}: short read of the table at offset {offset}")

        digest = hashlib.sha256()
        half = t.piece_bytes(self.spans[0][1])
        for at in range(0, v.nbytes, half):
            view = memoryview(self.ring[:min(half, v.nbytes - at)]).cast("B")
            read(view, v.offset + at)
            digest.update(view)
        if digest.hexdigest() != v.sha256:
            raise StoreError(f"{path}: {v.describe()} fails its checksum (offset {v.offset}, "
                             f"{v.nbytes} bytes)")
        for r0, rows in self.spans:
            codes = rows * t.row_bytes
            raw = memoryview(self.ring[:t.piece_bytes(rows)]).cast("B")
            read(raw[:codes], v.offset + r0 * t.row_bytes)
            if t.side_bytes:
                read(raw[codes:], v.offset + t.side_at(r0))
            piece = dataclasses.replace(v, rows=rows, in_rows=rows, nbytes=raw.nbytes)
            why = check_values(piece, raw)
            if why:
                raise StoreError(f"{path}: {v.describe()}, rows {r0}..{r0 + rows - 1}: {why}; "
                                 f"not a store `elasticplan shard` wrote, rebuild it")

    # --- IO ----------------------------------------------------------------------------

    def fill_preload(self) -> float:
        """Read the resident set (resident shards, the resident table) again, cold, through
        the device clock, as a device would load it before the first prompt; returns its
        milliseconds. (Opening already read and checked it: this only times it.)"""
        shards = [s for row in self.shards for s in row if s.preloaded]
        if not self.stream_table:
            shards.append(self.table_shard)
        return fill_shards(self.store, self.fds, self.clock, shards)

    def _read_rows(self, ids: list[int]) -> float | None:
        """The prompt's embedding rows from the streamed table, on the IO thread: per token
        one pread of its fp32 row straight into the residual stream, or (quantised) one of
        its codes and one of its side data (scale; steps and minima) into the rows buffers;
        each booked on the device clock. Returns the last completion."""
        t, v = self.table, self.table_shard.variant
        fd, deadline = self.fds[v.file], None
        if not t.fp32:  # into the accumulator (DecodeWorkspace.stored_rows)
            row_side, row_codes = self.ws.stored_rows(len(ids), t.row_bytes, t.side_bytes)
            codes, sides = row_codes.numpy(), row_side.numpy()
        targets = []
        for i, token in enumerate(ids):
            if t.fp32:
                targets.append((memoryview(self.x_bytes[i * t.row_bytes:(i + 1) * t.row_bytes]),
                                v.offset + token * t.row_bytes))
            else:
                targets += [(memoryview(codes[i]), v.offset + token * t.row_bytes),
                            (memoryview(sides[i]), v.offset + t.side_at(token))]
        for view, offset in targets:
            issued = time.perf_counter()
            if os.preadv(fd, [view], offset) != view.nbytes:
                raise StoreError(f"{self.store.file(v.file)}: short read of an embedding row "
                                 f"at offset {offset}")
            deadline = self.clock.complete(view.nbytes, time.perf_counter(), issued)
        return deadline

    def _io_worker(self, q: QueryIO, ids: list[int] | None, pq: "_Pieces | None") -> None:
        try:
            q.go.wait()
            if ids is not None:
                q.rows_deadline = self._read_rows(ids)
                q.rows_ready.set()
            read_layers(q, self.rows if pq is None else self.shards, self.layer_bytes,
                        self.window, self.clock, self._read, self._hint)
            if pq is not None and not q.failure:
                self._read_pieces(q, pq)
        except BaseException as e:  # reported on the compute thread
            io_failed(q, e)
            if pq is not None:
                for ev in pq.read:
                    ev.set()

    def _read_pieces(self, q: QueryIO, pq: "_Pieces") -> None:
        """The table's pieces after the last layer, on the IO thread: under the window as
        a last layer (its two pieces of the ring taken when its first read starts), piece
        i into half i % 2 once piece i - 2 has computed (i - 1 at window 0: nothing
        overlaps), each read booked on the device clock."""
        L = self.config.layers
        row = self.rows[L]
        if self.window is not None and L > self.window:
            if self.clock.emulated:
                self._hint(row)
            q.computed[L - self.window - 1].wait()
            if q.failure:
                return
        q.ring.take(self.layer_bytes[L])
        lag = 1 if self.window == 0 else 2
        start, reads, nbytes, deadline = time.perf_counter(), 0, 0, None
        for i in range(len(self.spans)):
            if i >= lag:
                pq.done[i - lag].wait()
                if q.failure:
                    return
            deadline, n, b, busy = self._read_piece(i, self.clock)
            reads, nbytes = reads + n, nbytes + b
            pq.io_busy += busy
            pq.deadline[i] = deadline
            pq.read[i].set()
        q.layers[L] = LayerIO(start, time.perf_counter(), deadline, reads, nbytes)
        q.read[L].set()

    # --- compute -----------------------------------------------------------------------

    def _table_pieces(self) -> list[memoryview]:
        return self.table_shard.iov

    def _embed(self, ids: list[int], streamed_rows: bool) -> float:
        """The pass's input rows into the residual stream: read by the IO thread (fp32,
        nothing to do), decoded from the rows read (quantised), or looked up in the
        resident table (a quantised one's rows gathered into the accumulator first), in
        chunks of the LM head's rows (the dequantisation workspace's size). Returns the
        seconds spent dequantising."""
        t, n, x = self.table, len(ids), self.ws.x
        t0 = time.perf_counter()
        if streamed_rows:
            if t.fp32:
                return 0.0
            sides, codes = self.ws.stored_rows(n, t.row_bytes, t.side_bytes)
        elif t.fp32:
            table = torch.frombuffer(self.table_buffer, dtype=torch.float32).view(t.vocab, -1)
            torch.index_select(table, 0, torch.tensor(ids), out=x[:n])
            return 0.0
        else:
            stored = torch.frombuffer(self.table_buffer, dtype=torch.uint8)
            index = torch.tensor(ids)
            sides, codes = self.ws.stored_rows(n, t.row_bytes, t.side_bytes)
            all_codes = stored[:t.vocab * t.row_bytes].view(t.vocab, t.row_bytes)
            torch.index_select(all_codes, 0, index, out=codes)
            all_sides = stored[t.side_at(0):t.side_at(t.vocab)].view(t.vocab, t.side_bytes)
            torch.index_select(all_sides, 0, index, out=sides)
        R = t.chunk_rows
        for r0 in range(0, n, R):
            r1 = min(n, r0 + R)
            t.scheme.decode_rows(x[r0:r1], codes[r0:r1], sides[r0:r1], t.bits, self.work)
        return time.perf_counter() - t0

    def _layer(self, l: int, row: list[PlacedShard], start: int, n: int) -> float:
        """Layer l on positions start..start+n-1, shard by shard: the attention half (its
        norm, each kept group, the residual) and the FFN half; returns the seconds spent
        dequantising."""
        c, ws, decode = self.config, self.ws, 0.0
        x = ws.x[:n]
        for part, norm in (("group", "attn_norm"), ("ffn", "ffn_norm")):
            shards = [s for s in row if s.head == (part == "group")]
            if not shards:
                continue  # a half with no shards is the identity (its norm skipped too)
            rms_norm_into(ws.h[:n], x, self.norms[f"l{l}.{norm}"], c.eps, ws.ms[:n])
            for i, s in enumerate(shards):
                w = self.vectors.get(id(s)) if n == 1 else None
                if w is None:
                    w, seconds = shard_weights(s, self.scratch, self.scratch_bytes,
                                               self.bounce, self.work)
                    decode += seconds
                elif s.raw is None:  # wrapped around the ring's end: joined in the bounce
                    join_pieces(s, self.bounce)
                if part == "group":
                    attention_group(ws, self.cache, l, i, w, start, n, i == 0)
                else:
                    ffn_slice(ws, w, n, i == 0)
            x.add_(ws.acc[:n])
        return decode

    def _head(self, n: int, next_row: bool) -> tuple[int, float]:
        """The final norm of the last position, the logits through the table at its
        bitwidth, the greedy token; with `next_row` and a streamed table, the token's row
        copied out of the table (still in the ring) as the next pass's input."""
        c, ws, t = self.config, self.ws, self.table
        rms_norm_into(ws.hn.view(1, -1), ws.x[n - 1:n], self.norms["norm"], c.eps, ws.ms[:1])
        pieces = self._table_pieces()
        decode = t.logits_into(ws.logits, ws.hn, pieces, self.scratch, self.scratch_bytes,
                               self.spill, self.work)
        token = int(ws.logits.argmax())
        if next_row and self.stream_table:
            t.row_into(ws.x[0], pieces, token, self.scratch_bytes if t.fp32 else self.spill,
                       self.work)
        return token, decode

    def _head_pieces(self, q: QueryIO, pq: "_Pieces", n: int, next_row: bool
                     ) -> tuple[int, float, float] | None:
        """The LM head over a table read in pieces: the final norm of the last position,
        then each piece's logits as soon as it is in (waiting for its read and its device
        deadline), the greedy token; with `next_row`, the row of the best token so far
        decoded into the next pass's input whenever a piece improves on it (the piece
        leaves the ring before the token is known). Returns (token, seconds dequantising,
        seconds computing without the waits), or None if the IO thread failed."""
        c, ws, t = self.config, self.ws, self.table
        t0 = time.perf_counter()
        rms_norm_into(ws.hn.view(1, -1), ws.x[n - 1:n], self.norms["norm"], c.eps, ws.ms[:1])
        busy, decode = time.perf_counter() - t0, 0.0
        best, best_logit = -1, 0.0
        spill = self.scratch_bytes if t.fp32 else self.spill
        for i, (r0, rows) in enumerate(self.spans):
            pq.read[i].wait()
            if q.failure:
                return None
            if pq.deadline[i] is not None:  # the emulated device's completion
                DeviceClock.sleep_until(pq.deadline[i])
            t0 = time.perf_counter()
            views = self._piece_views(i)
            out = ws.logits[r0:r0 + rows]
            decode += t.logits_into(out, ws.hn, views, self.scratch, self.scratch_bytes,
                                    self.spill, self.work)
            j = int(out.argmax())
            if best < 0 or float(out[j]) > best_logit:  # (ties: the first, as argmax)
                best, best_logit = r0 + j, float(out[j])
                if next_row:
                    t.row_into(ws.x[0], views, j, spill, self.work, rows=rows)
            busy += time.perf_counter() - t0
            pq.done[i].set()
        token = int(ws.logits.argmax())
        if next_row and token != best:  # only NaN logits disagree: its row from the file
            self._row_from_file(token)
        return token, decode, busy

    def _row_from_file(self, token: int) -> None:
        """Row `token` of the table read from its file (one or two reads) and decoded into
        the next pass's input."""
        t, v = self.table, self.table.variant
        raw = memoryview(self.x_bytes[:t.row_bytes] if t.fp32 else
                         self.spill[:t.row_bytes + t.side_bytes]).cast("B")
        reads = [(raw[:t.row_bytes], v.offset + token * t.row_bytes)]
        if t.side_bytes:
            reads.append((raw[t.row_bytes:], v.offset + t.side_at(token)))
        for view, offset in reads:
            if os.preadv(self.fds[v.file], [view], offset) != view.nbytes:
                raise StoreError(f"{self.store.file(v.file)}: short read of row {token} of the "
                                 f"table at offset {offset}")
        if not t.fp32:
            t.row_into(self.ws.x[0], [raw], 0, self.spill, self.work, rows=1)

    def _pass(self, ids: list[int], start: int, next_row: bool) -> PassTrace:
        """One pipelined pass over `ids` at positions start.. (the prompt, or one token)."""
        L, n = self.config.layers, len(ids)
        prefill = start == 0
        streamed = [s for row in self.rows for s in row if not s.preloaded]
        cached, total = evict_shards(self.fds, streamed, keep=self.warm_reads)
        q = QueryIO(len(self.rows))
        pq = _Pieces(len(self.spans)) if len(self.spans) > 1 else None
        rows = ids if prefill and self.stream_table else None
        io = threading.Thread(target=self._io_worker, args=(q, rows, pq), name="elasticplan-io",
                              daemon=True)
        io.start()
        compute: list[tuple[float, float, float]] = []
        head = token = None
        busy = None  # the head's compute without its waits for pieces (read in pieces)
        try:
            with torch.inference_mode():
                t0 = time.perf_counter()
                self.clock.start(t0)
                q.go.set()
                ms = lambda: (time.perf_counter() - t0) * 1e3  # noqa: E731
                e0 = ms()
                ok = True
                if rows is not None:
                    q.rows_ready.wait()
                    ok = not q.failure
                    if ok:
                        DeviceClock.sleep_until(q.rows_deadline)
                if ok and (prefill or not self.stream_table):
                    self._embed(ids, rows is not None)
                e1 = ms()
                for l, row in enumerate(self.shards):
                    if not ok or not await_reads(q, l):
                        ok = False
                        break
                    cs = ms()
                    decode_s = self._layer(l, row, start, n)
                    compute.append((cs, ms(), decode_s * 1e3))
                    q.ring.release(self.layer_bytes[l])
                    q.computed[l].set()
                if ok and self.stream_table and pq is None:
                    ok = await_reads(q, L)
                if ok and pq is not None:
                    hs = ms()
                    got = self._head_pieces(q, pq, n, next_row)
                    ok = got is not None
                    if ok:
                        token, decode_s, busy = got
                        head = (hs, ms(), decode_s * 1e3)
                        busy *= 1e3
                        q.ring.release(self.layer_bytes[L])
                        q.computed[L].set()
                elif ok:
                    hs = ms()
                    token, decode_s = self._head(n, next_row)
                    head = (hs, ms(), decode_s * 1e3)
                    if self.stream_table:
                        q.ring.release(self.layer_bytes[L])
                        q.computed[L].set()
        finally:
            for ev in q.computed + (pq.done if pq is not None else []):
                ev.set()  # an IO thread waiting on the window or a piece must not hang
            io.join()
        self.memory.ring_high_water_bytes = max(self.memory.ring_high_water_bytes, q.ring.high)
        raise_io_failure(q, self.store)
        layers = q.traces(t0, compute + ([head] if self.stream_table else []))
        if self.stream_table:
            head_trace = layers.pop() if pq is None else dataclasses.replace(
                layers.pop(), busy_ms=busy, io_busy_ms=pq.io_busy * 1e3)
        else:
            after = layers[-1].io_end_ms if layers else 0.0
            head_trace = LayerTrace(L, 0, 0, after, after, *head)
        rows_io = None if q.rows_deadline is None else (0.0, (q.rows_deadline - t0) * 1e3)
        return PassTrace(kind="prefill" if prefill else "decode", position=start, tokens=n,
                         token=token, latency_ms=head[1], embed_ms=(e0, e1), rows_io_ms=rows_io,
                         row_reads=0 if rows is None else n * (1 if self.table.fp32 else 2),
                         layers=layers, head=head_trace, cached_pages_before=cached,
                         streamed_pages=total, ring_high_water_bytes=q.ring.high)

    def generate(self, prompt: Sequence[int] | torch.Tensor, max_new_tokens: int,
                 on_token: Callable[[int], None] | None = None, *,
                 eos_id: int | None = MODEL_EOS,
                 keep_logits: bool = False) -> GenerateResult:
        """Greedy continuation of `prompt` (token ids): up to max_new_tokens tokens,
        ending at (and including) `eos_id` (default: the model's; None: never). With
        `keep_logits`, each pass's logits are kept (a copy, for checking)."""
        ids = [int(t) for t in (prompt.reshape(-1).tolist() if isinstance(prompt, torch.Tensor)
                                else prompt)]
        c, n = self.config, len(ids)
        eos = c.eos_id if eos_id == MODEL_EOS else eos_id
        if not 1 <= n <= self.prompt_tokens:
            raise ValueError(f"a prompt of {n} tokens; this executor takes 1 to "
                             f"{self.prompt_tokens}")
        if max_new_tokens < 1 or n + max_new_tokens - 1 > self.context:
            raise ValueError(f"{n} prompt tokens + {max_new_tokens} new ones need "
                             f"{n + max_new_tokens - 1} KV cache columns; the context is "
                             f"{self.context}")
        bad = next((t for t in ids if not 0 <= t < c.vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary of {c.vocab}")
        out: list[int] = []
        passes: list[PassTrace] = []
        logits: list[torch.Tensor] = []
        step, stop = ids, "max_new_tokens"
        while True:
            last = len(out) + 1 == max_new_tokens
            trace = self._pass(step, n + len(out) - 1 if out else 0, not last)
            passes.append(trace)
            if keep_logits:
                logits.append(self.ws.logits.clone())
            out.append(trace.token)
            if on_token is not None:
                on_token(trace.token)
            if eos is not None and trace.token == eos:
                stop = "eos"
                break
            if last:
                break
            step = [trace.token]
        return GenerateResult(prompt_tokens=n, tokens=out, stop=stop, passes=passes,
                              memory=dataclasses.replace(self.memory),
                              process_peak_bytes=_status_bytes("VmHWM"),
                              logits=logits if keep_logits else None)


class _Pieces:
    """One pass's pieces of a table read in pieces, as the IO thread and the compute thread
    share them: an event per piece read and per piece computed, each read's completion on
    the device."""

    def __init__(self, n: int):
        self.read = [threading.Event() for _ in range(n)]
        self.done = [threading.Event() for _ in range(n)]
        self.deadline: list[float | None] = [None] * n
        self.io_busy = 0.0  # seconds the channel spent on the pieces' reads


def _work(arena: Arena, sizes: tuple[int, ...]) -> DecodeWork:
    """A DecodeWork of these sizes (runtime.schemes.base: packed int32, indices int32,
    values fp32, 4-byte words, int64s) whose buffers are cut from `arena`."""
    work = DecodeWork(0, 0, 0)
    packed, indices, values, words, longs = sizes
    work.packed = arena.tensor(packed, dtype=torch.int32)
    work.indices = arena.tensor(indices, dtype=torch.int32)
    work.values = arena.tensor(values)
    work.bytes = arena.tensor(4 * words, dtype=torch.uint8)
    work.longs = arena.tensor(longs, dtype=torch.int64)
    assert work.nbytes == work_bytes(sizes)
    return work


M_MXFAST = 1  # glibc's mallopt parameter: the largest freed chunk kept in a fastbin


def no_fastbins() -> bool:
    """Turn glibc's fastbins off for this process (mallopt M_MXFAST 0: freed small chunks
    are merged with their free neighbours at once, as larger ones are); False where this is
    not glibc. The decode executor does so when it is opened.

    Why (measured with `elasticplan generate`, 2026-12-03): a pass makes torch allocate
    many tiny tensors, each through posix_memalign: the scalars that the schemes'
    dequantisation passes to torch (runtime.schemes.uniform: a 4-bit table's LM head takes
    ~4 of them per 256-row chunk, ~800 per token). glibc's memalign does not reuse the
    per-thread cache its own chunks are freed to; those fill, and the next go to fastbins,
    which nothing merges until a large request, so each new small block is cut from fresh
    heap memory, page after page, into pages the heap had given back: +0.1-0.2 MB per token,
    +3.2 MB over a 64-token answer of a 32 MB plan holding its table at 4 bits. Without
    fastbins the freed blocks merge and are cut again: +0.5 MB in all (the answer's
    traces, ~8 KB per token). The scheme's dequantisation
    measured no slower (one 4-bit LM head, 192 chunks: 73 ms against 83 ms with fastbins,
    medians of 30 interleaved rounds)."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MXFAST, 0))
    except (OSError, AttributeError):
        return False


def _trim() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; elsewhere,
    nothing)."""
    from runtime.measurement.memprobe import trim  # (it imports the Executor)

    trim()


def _status_bytes(name: str) -> int:
    from runtime.measurement.memprobe import status_bytes  # (it imports the Executor)

    return status_bytes(name)
