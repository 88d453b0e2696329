"""A llama layer computed shard by shard over preallocated buffers, and the embedding /
LM-head table read from its stored bytes: the compute of the decode executor
(runtime/decoding.py).

The math is runtime/families/llama.py's Decoder, op for op where it can be (RMSNorm,
rotary positions, softmax attention over the KV cache, SwiGLU), but a layer's shards are
applied one at a time, each from where its weights lie (the preload buffer, the IO ring,
or the one compute scratch a quantised shard is decoded into), and every intermediate
lives in a `DecodeWorkspace` allocated once: a pass holds nothing else. The sums over a
layer's KV groups and FFN slices are taken shard by shard (the Decoder takes them in one
matmul), so the two agree to float rounding (~1e-6), not bit for bit.

Shards as the store keeps them (runtime/store.py): input rows [in_rows, hidden] (a KV
group's Wq rows of its q_per_kv heads, Wk's and Wv's rows of its K/V head; an FFN slice's
gate and up rows) and output rows [rows - in_rows, hidden] (Wo's columns of its heads;
down's columns), as `runtime.executor.shard_weights` gives them.

The table (the tied embedding / LM head) at b bits is one stored block [vocab, hidden]:
fp32 rows, or (a scheme whose rows decode alone: uniform, group) packed codes [vocab,
row_bytes] then each row's side data (its scale, or its groups' steps and minima) [vocab,
side_bytes].
It may lie in two pieces (wrapped around the IO ring's end); `StoredTable` reads a token's
row out of it and computes the logits `HEAD_CHUNK_ROWS` rows at a time, dequantising
each chunk into the scratch (which the planner prices so:
elasticplan.problem.spec.HEAD_CHUNK_ROWS).

What the planner prices of these buffers is computed in one place each:
elasticplan.problem.spec.activation_buffers gives every activation buffer's bytes (the
workspace checks its own against it when it is made), and `decode_buffers` here the
buffers the schemes need whatever a plan picks (the profile records their bytes as its
decoder block's workspace_bytes, elasticplan.problem.spec.DecoderShape).
"""

from __future__ import annotations

import math
import mmap
import time
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from elasticplan.errors import StoreError
from elasticplan.problem.archgen import work_bytes
from elasticplan.problem.spec import (  # the planner's, so that both agree
    HEAD_CHUNK_ROWS,
    DecoderShape,
    activation_buffers,
    head_chunk_rows,
)
from runtime.families.llama import KVCache, LlamaConfig, rope_tables
from runtime.schemes.base import FP32, DecodeWork
from runtime.store import TABLE, ShardStore, Variant

Weights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (input rows, output rows, bias)


def decoder_shape(c: LlamaConfig, workspace_bytes: int = 0) -> DecoderShape:
    """The planner's DecoderShape of a llama (a profile's `decoder:` block; `workspace_bytes`:
    its store's, `workspace_bytes(store)`)."""
    return DecoderShape(context=c.context, hidden=c.hidden, ffn=c.ffn,
                        ffn_slices=c.ffn_slices, heads=c.heads, head_dim=c.head_dim,
                        q_per_kv=c.q_per_kv, vocab=c.vocab, workspace_bytes=workspace_bytes,
                        kv_kind="group")


def decode_buffers(store: ShardStore) -> tuple[tuple[int, ...], int]:
    """The buffers the schemes need, the same whatever a plan picks: the dequantisation
    workspace (DecodeWork's sizes: the largest need of any quantised shard the store holds,
    and of `head_chunk_rows` rows of any quantised table it holds) and the bounce buffer
    (bytes: the largest quantised shard, or a chunk of the largest quantised table's rows,
    codes and side data: whichever of them lies split at the IO ring's end is joined
    there)."""
    work, bounce = store.decode_buffers()
    rows = head_chunk_rows(decoder_shape(store.config))
    for (_, name, bits), v in store.index.variants.items():
        if name != TABLE or bits == FP32:
            continue
        work = tuple(max(a, b) for a, b in zip(work, v.scheme.decode_work(((rows, v.cols),),
                                                                          bits)))
        bounce = max(bounce, rows * sum(v.scheme.row_layout(v.cols, bits)))
    return work, bounce


def workspace_bytes(store: ShardStore) -> int:
    """The bytes of `decode_buffers` (a decoder profile's workspace_bytes)."""
    work, bounce = decode_buffers(store)
    return work_bytes(work) + bounce


ALIGN = 64  # where each buffer of an Arena starts: a cache line, as torch's allocator aligns
HUGE_PAGE = 2 << 20  # a transparent huge page (x86-64, arm64 with 4 KiB pages)


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


class Arena:
    """Buffers cut one after the other (each at an ALIGN-byte boundary) from one private
    anonymous mapping of their total, the executor's own: never from the C heap, so the
    process holds exactly their pages (the last one rounded up) and gives them back to the
    system when the buffers are freed. Each buffer is zeroed when it is taken (every page
    touched then, not during a pass).

    Why not the heap (measured with `elasticplan generate` on SmolLM2 plans of 25-48 MB):
    numpy asks transparent huge pages (madvise) for every array of 4 MB or more, and once
    such an array has lain in the C heap (glibc serves blocks up to its mmap threshold from
    the heap, and raises that threshold, up to 32 MB, to the largest block freed: a
    throwaway executor's buffers), that heap range keeps asking after it is freed, and the
    range grows as neighbouring ones join it; a buffer or temporary placed there later
    faults in whole 2 MB pages that reach past its own bytes (+1.3 MB on a 25 MB plan's
    preload and table buffers, in a process that had run four plans). Here only the
    mapping's 2 MB-aligned interior asks for huge pages, so they never reach past its
    buffers, and the buffers leave nothing behind in the heap."""

    def __init__(self, sizes: Iterable[int]):
        """A mapping for buffers of these byte sizes (taken in any order)."""
        self.capacity, self.used = sum(aligned(int(n)) for n in sizes), 0
        if self.capacity == 0:
            self.buffer = np.zeros(0, np.uint8)
            return
        m = mmap.mmap(-1, self.capacity, flags=mmap.MAP_PRIVATE)
        self.buffer = np.frombuffer(m, np.uint8)  # (it keeps the mapping alive)
        addr = self.buffer.ctypes.data
        lo, hi = -addr % HUGE_PAGE, (addr + self.capacity) // HUGE_PAGE * HUGE_PAGE - addr
        if hi - lo >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                m.madvise(mmap.MADV_HUGEPAGE, lo, hi - lo)
            except OSError:  # (a kernel without transparent huge pages)
                pass

    def bytes(self, nbytes: int) -> np.ndarray:
        """The next `nbytes` bytes (uint8), zeroed."""
        start = self.used
        if start + aligned(nbytes) > self.capacity:
            raise AssertionError(f"a buffer of {nbytes} B does not fit the arena "
                                 f"({self.capacity - start} of {self.capacity} B left)")
        self.used = start + aligned(nbytes)
        out = self.buffer[start:start + nbytes]
        out.fill(0)
        return out

    def tensor(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The next tensor of this shape and dtype, zeroed."""
        n = math.prod(shape) * dtype.itemsize
        if n == 0:
            return torch.zeros(shape, dtype=dtype)
        return torch.frombuffer(self.bytes(n), dtype=dtype).view(shape)


class DecodeWorkspace:
    """Every activation of one pass, fp32 unless said, allocated (and touched) once:
    the residual stream `x`, its normed copy `h` and the accumulator `acc` [prompt, hidden];
    per chunk of `chunk` positions: a shard's projections `y` [chunk, max((q_per_kv + 2)
    head_dim, 2 ffn_slice)], the rotated queries and the rotation's temporary [q_per_kv,
    chunk, head_dim] each, the scores [q_per_kv, chunk, attended] (attended <= prompt in
    the prompt pass, <= context in a decode step), the context vectors twice [q_per_kv,
    chunk, head_dim] and the causal mask (bool) [chunk, context]; the norm's [prompt, 1],
    the column indices (int64) [context], the rotary tables [context, head_dim] twice, the
    final normed state [hidden] and the logits [vocab]. Each buffer is the bytes the
    planner prices (elasticplan.problem.spec.activation_buffers), checked here.

    A quantised table's stored rows of the prompt (codes and side data) are read into the
    accumulator, which nothing uses before the first layer (`stored_rows`).

    The buffers are cut from `arena` (the executor's, sized for them:
    `activation_buffers`), or from an Arena of their own."""

    def __init__(self, c: LlamaConfig, prompt: int, chunk: int, context: int,
                 arena: Arena | None = None):
        self.config, self.prompt, self.chunk, self.context = c, prompt, chunk, context
        d, hd, qk = c.hidden, c.head_dim, c.q_per_kv
        want = activation_buffers(decoder_shape(c), prompt, context, chunk)
        take = (arena or Arena(want.values())).tensor
        self.x, self.h, self.acc = (take(prompt, d) for _ in range(3))
        self.y = take(chunk * max((qk + 2) * hd, 2 * c.ffn_slice))
        self.q, self.rot, self.ctx, self.ctx2 = (take(qk * chunk * hd) for _ in range(4))
        self.scores = take(qk * max(chunk * prompt, context))
        self.mask = take(chunk * context, dtype=torch.bool)
        self.ms = take(prompt, 1)
        self.col = take(context, dtype=torch.int64)
        self.col.copy_(torch.arange(context))
        self.cos, self.sin = take(context, hd), take(context, hd)
        for have, computed in zip((self.cos, self.sin), rope_tables(c, context)):
            have.copy_(computed)
        self.hn = take(d)
        self.logits = take(c.vocab)
        self.scale = 1.0 / math.sqrt(hd)
        have = self.buffers()
        if have != want:
            raise AssertionError(f"the decode workspace's buffers {have} are not the "
                                 f"planner's {want} (elasticplan.problem.spec."
                                 f"activation_buffers)")

    def buffers(self) -> dict[str, int]:
        """Bytes of each buffer, by the planner's names."""
        return {name: t.numel() * t.element_size() for name, t in (
            ("x", self.x), ("h", self.h), ("acc", self.acc), ("y", self.y), ("q", self.q),
            ("rot", self.rot), ("ctx", self.ctx), ("ctx2", self.ctx2),
            ("scores", self.scores), ("mask", self.mask), ("ms", self.ms), ("col", self.col),
            ("cos", self.cos), ("sin", self.sin), ("hn", self.hn), ("logits", self.logits))}

    @property
    def nbytes(self) -> int:
        return sum(self.buffers().values())

    def stored_rows(self, n: int, row_bytes: int, side_bytes: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the accumulator for n rows of a quantised table as stored: their side
        data (uint8 [n, side_bytes]: a scale, or steps and minima) and codes (uint8 [n,
        row_bytes])."""
        raw = self.acc.view(-1).view(torch.uint8)
        side = -(-n * side_bytes // 4) * 4  # (the codes start on a 4-byte boundary)
        if side + n * row_bytes > raw.numel():
            raise ValueError(f"{n} stored rows of {row_bytes} + {side_bytes} bytes do not fit "
                             f"the accumulator of {raw.numel()} bytes")
        return raw[:n * side_bytes].view(n, side_bytes), \
            raw[side:side + n * row_bytes].view(n, row_bytes)


def rms_norm_into(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, eps: float,
                  ms: torch.Tensor) -> torch.Tensor:
    """out = w * (x * rsqrt(mean(x^2) + eps)) (the Decoder's rms_norm) in preallocated
    buffers (`ms` [n, 1])."""
    torch.mul(x, x, out=out)
    torch.mean(out, -1, keepdim=True, out=ms)
    ms.add_(eps).rsqrt_()
    torch.mul(x, ms, out=out)
    return out.mul_(w)


def rope_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              rot: torch.Tensor) -> torch.Tensor:
    """out = x cos + rotate_half(x) sin (the Decoder's apply_rope), `rot` a buffer of x's
    shape."""
    half = x.shape[-1] // 2
    torch.mul(x, cos, out=out)
    torch.neg(x[..., half:], out=rot[..., :half])
    rot[..., half:].copy_(x[..., :half])
    return out.add_(rot.mul_(sin))


def attention_group(ws: DecodeWorkspace, cache: KVCache, l: int, g: int, w: Weights,
                    start: int, n: int, first: bool) -> None:
    """One kept KV group (index g among layer l's kept groups) on positions start..start+n-1
    (their normed input in ws.h[:n]): its keys (rotated) and values into the cache, its
    q_per_kv heads' softmax attention over cache columns 0..start+n-1 (causal), and its
    output projection into ws.acc[:n] (written if `first`, else added)."""
    c = ws.config
    qk, hd = c.q_per_kv, c.head_dim
    inp, out, _ = w
    chunk = ws.chunk
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        a, e = start + s, start + s + m  # positions of this chunk; it attends columns [0, e)
        y = rows_times(ws.h[s:s + m], inp, ws.y[:m * _rows(inp)].view(m, -1))
        cos, sin = ws.cos[a:e], ws.sin[a:e]
        q = rope_into(ws.q[:qk * m * hd].view(qk, m, hd),
                      y[:, :qk * hd].view(m, qk, hd).transpose(0, 1), cos, sin,
                      ws.rot[:qk * m * hd].view(qk, m, hd))
        rope_into(cache.k[l][0, g, a:e], y[:, qk * hd:(qk + 1) * hd], cos, sin,
                  ws.rot[:m * hd].view(m, hd))
        cache.v[l][0, g, a:e].copy_(y[:, (qk + 1) * hd:])
        scores = torch.mm(q.view(qk * m, hd), cache.k[l][0, g, :e].t(),
                          out=ws.scores[:qk * m * e].view(qk * m, e)).mul_(ws.scale)
        if m > 1:  # a column after a position is masked (a decode step's single row sees all)
            mask = torch.gt(ws.col[None, :e], ws.col[a:e, None],
                            out=ws.mask[:m * e].view(m, e))
            scores.view(qk, m, e).masked_fill_(mask, float("-inf"))
        torch.softmax(scores, -1, out=scores)
        ctx = torch.mm(scores, cache.v[l][0, g, :e], out=ws.ctx[:qk * m * hd].view(qk * m, hd))
        heads = ws.ctx2[:m * qk * hd].view(m, qk, hd)
        heads.copy_(ctx.view(qk, m, hd).transpose(0, 1))
        _project(ws.acc[s:s + m], heads.view(m, qk * hd), out, first)


def ffn_slice(ws: DecodeWorkspace, w: Weights, n: int, first: bool) -> None:
    """One FFN slice on the n positions of ws.h: down(silu(gate h) * up h) into ws.acc[:n]
    (written if `first`, else added)."""
    inp, out, _ = w
    f = _rows(inp) // 2
    for s in range(0, n, ws.chunk):
        m = min(ws.chunk, n - s)
        y = rows_times(ws.h[s:s + m], inp, ws.y[:m * 2 * f].view(m, 2 * f))
        act = F.silu(y[:, :f], inplace=True).mul_(y[:, f:])
        _project(ws.acc[s:s + m], act, out, first)


def _rows(w) -> int:
    """Rows of a shard's input block: an fp32 tensor's, or the kernel's (vector_weights)."""
    return w.shape[0] if isinstance(w, torch.Tensor) else w.rows


def rows_times(x: torch.Tensor, w, out: torch.Tensor) -> torch.Tensor:
    """out [m, rows] = x [m, cols] @ w.T: w an fp32 block [rows, cols], or (one position,
    m = 1) a block the scheme's kernel computes where it lies (`vector_weights`)."""
    if isinstance(w, torch.Tensor):
        return torch.mm(x, w.t(), out=out)
    return w.mv_into(x, out)


def vector_computed(v: Variant) -> bool:
    """Whether a pass of one position multiplies this variant where it lies, with its
    scheme's kernel (Scheme.vector_kernel): a quantised table's rows, or both blocks of a
    quantised shard without a bias. The one rule for the executor and the calibration
    (runtime/decode_calibrate.kernel_bits)."""
    if v.bits == FP32:
        return False
    scheme = v.scheme.coder(v.bits)
    if v.name == TABLE:
        return scheme.vector_kernel(v.bits, v.cols)
    return not v.bias and scheme.vector_kernel(v.bits, v.cols) and \
        scheme.vector_kernel(v.bits, v.rows - v.in_rows)


def vector_weights(v: Variant, buf: torch.Tensor, work: DecodeWork):
    """A quantised shard variant's (input rows, output rows, None) as its scheme's kernel
    computes them from its stored bytes `buf` (uint8, contiguous; Scheme.vector_rows: no
    fp32 copy), for passes of one position; None where `vector_computed` says no."""
    if not vector_computed(v):
        return None
    scheme, k = v.scheme.coder(v.bits), v.rows - v.in_rows
    blocks, at = [], 0
    for rows, cols in ((v.in_rows, v.cols), (v.cols, k)):  # (the output block as stored)
        code, side = scheme.row_layout(cols, v.bits)
        blocks.append(scheme.vector_rows(buf[at:at + rows * code],
                                         buf[at + rows * code:at + rows * (code + side)],
                                         rows, cols, v.bits, work))
        at += rows * (code + side)
    return blocks[0], blocks[1], None


def _project(acc: torch.Tensor, a: torch.Tensor, out_rows, first: bool) -> None:
    """acc (=|+=) a @ out_rows (a shard's output projection; out_rows [k, hidden], or the
    output block as the kernel computes it: vector_weights)."""
    if not isinstance(out_rows, torch.Tensor):
        out_rows.mv_into(a, acc, accumulate=not first)
        return
    if first:
        torch.mm(a, out_rows, out=acc)
    else:
        acc.addmm_(a, out_rows)


# --- the table, from its stored bytes ------------------------------------------------------

def _span(pieces: list[memoryview], start: int, n: int, spill: np.ndarray) -> memoryview:
    """Bytes [start, start + n) of a buffer that lies in `pieces` (one, or two around the
    ring's end): a view where they are in one piece, else joined in `spill`."""
    one = _within(pieces, start, n)
    if one is not None:
        return one
    out = memoryview(spill[:n]).cast("B")
    done, at = 0, 0
    for p in pieces:
        lo, hi = max(start, at), min(start + n, at + p.nbytes)
        if lo < hi:
            out[done:done + hi - lo] = p[lo - at:hi - at]
            done += hi - lo
        at += p.nbytes
    return out


def _within(pieces: list[memoryview], start: int, n: int) -> memoryview | None:
    """Bytes [start, start + n) of a buffer lying in `pieces`, where they lie in one of
    them (else None)."""
    at = 0
    for p in pieces:
        if start < at + p.nbytes:
            return p[start - at:start - at + n] if start + n <= at + p.nbytes else None
        at += p.nbytes
    return None


class StoredTable:
    """The embedding / LM-head table at its stored bitwidth, read from its bytes wherever
    they lie (`pieces`: the resident copy, or its place in the IO ring, one or two views).
    A quantised table is one block in a scheme whose rows decode alone (`Scheme.rowwise`:
    codes, then every row's side data)."""

    def __init__(self, v: Variant, hidden: int):
        self.scheme = v.scheme.coder(v.bits)
        if v.bits != FP32 and not self.scheme.rowwise:
            raise StoreError(f"{v.file}: the embedding table at {v.bits} bits is kept in the "
                             f"{self.scheme.name} scheme, whose rows do not decode alone; the "
                             f"decode executor reads a table kept in the uniform or group "
                             f"scheme")
        self.variant, self.bits, self.vocab, self.hidden = v, v.bits, v.rows, hidden
        # codes (fp32: the row) and side data (a scale; steps and minima) per row
        self.row_bytes, self.side_bytes = (4 * hidden, 0) if v.bits == FP32 else \
            self.scheme.row_layout(hidden, v.bits)
        self.chunk_rows = min(HEAD_CHUNK_ROWS, v.rows)  # (spec.head_chunk_rows)
        # rows the scheme's kernel multiplies where they lie (Scheme.vector_rows)
        self.vector = vector_computed(v)

    @property
    def fp32(self) -> bool:
        return self.bits == FP32

    def spill_bytes(self) -> int:
        """The buffer a chunk of rows split by the ring's end is joined in: its codes and its
        side data (fp32 rows are joined in the compute scratch instead; `decode_buffers`
        sizes the bounce buffer, which serves, for the largest)."""
        return 0 if self.fp32 else self.chunk_rows * (self.row_bytes + self.side_bytes)

    def side_at(self, row: int, rows: int | None = None) -> int:
        """Where row `row`'s side data starts in the bytes of a run of `rows` rows stored
        as the table is (codes, then side data; default: the whole table)."""
        return (self.vocab if rows is None else rows) * self.row_bytes + self.side_bytes * row

    def piece_rows(self, pieces: int) -> int:
        """Rows of each piece when the table is read in `pieces` pieces (the last: the rest;
        elasticplan.problem.spec.Shard.piece_bytes)."""
        return -(-self.vocab // pieces)

    def piece_bytes(self, rows: int) -> int:
        """A run of `rows` rows read as a piece: their codes, then their side data."""
        return rows * (self.row_bytes + self.side_bytes)

    def row_into(self, out: torch.Tensor, pieces: list[memoryview], token: int,
                 spill: np.ndarray, work: DecodeWork | None, rows: int | None = None) -> None:
        """Row `token` (fp32 [hidden]) into `out` from a run of `rows` rows laid out as the
        table (default: the whole table; a row split by the ring's end is joined in
        `spill`: row_bytes + side_bytes at least)."""
        raw = _span(pieces, token * self.row_bytes, self.row_bytes, spill)
        if self.fp32:
            out.copy_(torch.frombuffer(raw, dtype=torch.float32))
            return
        codes = torch.frombuffer(raw, dtype=torch.uint8).view(1, -1)
        side = torch.frombuffer(_span(pieces, self.side_at(token, rows), self.side_bytes,
                                      spill[self.row_bytes:]), dtype=torch.uint8).view(1, -1)
        self.scheme.decode_rows(out.view(1, -1), codes, side, self.bits, work)

    def logits_into(self, logits: torch.Tensor, hn: torch.Tensor, pieces: list[memoryview],
                    scratch: torch.Tensor, scratch_bytes: np.ndarray, spill: np.ndarray,
                    work: DecodeWork | None) -> float:
        """logits [n] = rows @ hn for a run of n rows laid out as the table (the whole
        table, or one piece of it; `logits` has its n entries): fp32 rows where they lie,
        every row of a view at once (a row split by the ring's end joined in the scratch
        first); a quantised table chunk by chunk of rows, each dequantised into the scratch
        first (a chunk split by the ring's end joined first: its codes and side data in
        `spill`). Returns the seconds spent dequantising."""
        n = logits.numel()
        if self.fp32:
            self._fp32_logits(logits, hn, pieces, scratch_bytes)
            return 0.0
        d, R, decode = self.hidden, self.chunk_rows, 0.0
        if self.vector and work is not None:
            self._vector_logits(logits, hn, pieces, spill, work)
            return 0.0
        for r0 in range(0, n, R):
            rows = min(R, n - r0)
            t = time.perf_counter()
            nb = rows * self.row_bytes
            codes = torch.frombuffer(_span(pieces, r0 * self.row_bytes, nb, spill),
                                     dtype=torch.uint8).view(rows, self.row_bytes)
            side = torch.frombuffer(_span(pieces, self.side_at(r0, n), self.side_bytes * rows,
                                          spill[R * self.row_bytes:]), dtype=torch.uint8)
            w = self.scheme.decode_rows(scratch[:rows * d].view(rows, d), codes,
                                        side.view(rows, self.side_bytes), self.bits, work)
            decode += time.perf_counter() - t
            torch.mv(w, hn, out=logits[r0:r0 + rows])
        return decode

    def _vector_logits(self, logits: torch.Tensor, hn: torch.Tensor, pieces: list[memoryview],
                       spill: np.ndarray, work: DecodeWork) -> None:
        """logits_into by the scheme's kernel on the stored rows (no scratch): all of them
        at once where their codes and their side data each lie in one view, else chunk by
        chunk of rows (a chunk split by the ring's end joined in `spill` first)."""
        n, R = logits.numel(), self.chunk_rows
        codes, side = (_within(pieces, 0, n * self.row_bytes),
                       _within(pieces, self.side_at(0, n), n * self.side_bytes))
        whole = codes is not None and side is not None
        for r0 in range(0, n, n if whole else R):
            rows = n if whole else min(R, n - r0)
            if not whole:
                codes = _span(pieces, r0 * self.row_bytes, rows * self.row_bytes, spill)
                side = _span(pieces, self.side_at(r0, n), rows * self.side_bytes,
                             spill[R * self.row_bytes:])
            self.scheme.vector_rows(torch.frombuffer(codes, dtype=torch.uint8),
                                    torch.frombuffer(side, dtype=torch.uint8), rows, self.hidden,
                                    self.bits, work).mv_into(hn, logits[r0:r0 + rows])

    def _fp32_logits(self, logits: torch.Tensor, hn: torch.Tensor, pieces: list[memoryview],
                     scratch_bytes: np.ndarray) -> None:
        d, row, n = self.hidden, self.row_bytes, logits.numel()
        r, at = 0, 0  # the next row; where this view starts in the run's bytes
        for p in pieces:
            end = min(n, (at + p.nbytes) // row)  # rows that end in this view
            if end > r:
                w = torch.frombuffer(p[r * row - at:end * row - at], dtype=torch.float32)
                torch.mv(w.view(end - r, d), hn, out=logits[r:end])
                r = end
            if r < n and r * row < at + p.nbytes:  # split at this view's end
                w = torch.frombuffer(_span(pieces, r * row, row, scratch_bytes),
                                     dtype=torch.float32)
                torch.mv(w.view(1, d), hn, out=logits[r:r + 1])
                r += 1
            at += p.nbytes
