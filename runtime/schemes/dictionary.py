"""Dictionary quantisation with outliers (after GOBO, MICRO 2020), the second scheme beside
runtime/schemes/uniform.py's uniform one: a store built with `elasticplan shard --scheme dict`
keeps its quantised shards this way (runtime/store.py); `python -m benchmarks.dictquant`
measures it against the uniform scheme on the whole model (docs/results.md).

Scheme (b in 1..8 bits), per block [rows, cols] (rows are output channels):
- outliers: the `outliers_per_row(cols, share)` = ceil(share x cols) weights of each row
  farthest from the row's mean are kept exactly (their column index and fp32 value);
- a scaled dictionary for the rest: one sorted codebook D of 2^b fp32 values for the whole
  block and one fp32 scale s_r per row, a weight w being reconstructed as s_r x D[code].
  Fit: s_r starts as the RMS of the row's non-outliers, D as the optimal one-dimensional
  k-means (kmeans1d: an exact dynamic programme) of every non-outlier w / s_r of the block;
  then FIT_ROUNDS rounds of alternating least squares (each weight its nearest value, each
  s_r by least squares given the codes, each D[k] by least squares given the codes and
  scales), none of which can raise the block's squared error;
- codes: each non-outlier weight is stored as the index of its nearest value s_r D[k]; an
  outlier's code is 0 (overwritten when decoded). With a block's input covariance
  (runtime/schemes/gptq.py) the codes are chosen with error compensation instead.

Why a scaled codebook: measured against a dictionary per 8 rows (benchmarks.dictquant,
error-compensated, 300 test tweets) it has the higher whole-model fidelity at 2, 3 and 4
bits, and it decodes as the uniform scheme does (one byte table, one lookup, one multiply
by the row scales) plus the outlier scatter, where per-group dictionaries cost a table per
group or a shift-and-mask pass.

Error bound (tested, without compensation): over a block's non-outliers, the RMS error is
at most max_r(rms_r) x (max z - min z) / 2^(b+1), with rms_r the row's RMS and z = w / rms_r.
k-means minimises the squared error of z over every 2^b-level quantiser, and the grid of
cell midpoints on [min z, max z] has every error within half a cell; a weight's error is
s_r times its z error; the least-squares rounds only lower the total; the outliers are exact.

Packed layout of a group of blocks (a shard variant's input and output blocks, in that
order), section by section: each block's codes (each row a little-endian bit stream,
value k in bits [k b, (k+1) b), padded to a whole byte: ceil(cols b / 8) bytes per row;
each block's section zero-padded to a multiple of 4 bytes), the blocks' codebooks (2^b
fp32 each, ascending), their row scales (rows fp32 each), each block's outlier column
indices (rows x n uint16, ascending within a row; each section padded to a multiple of 4
bytes), the blocks' outlier values (rows x n fp32 each), with n = outliers_per_row(cols,
share). Every section starts 4-aligned, so the decoder views them in place. A block's
share of the bytes depends only on its shape (`block_bytes`); a group's is their sum.

Decoding (`decode_into`, allocation-free with a DecodeWork): at 1, 2, 4 and 8 bits, where a
byte holds whole codes, the blocks' codebooks are folded into the values of every byte
(256 x 8/b per block) with one index_select, and all the blocks' bytes (block i's offset
by 256 i) are looked up in those tables with one more; at other widths, block by block
(so the code buffers need only the larger block), the codes of lcm(b, 8) bits (G bytes)
at a time are copied into 4- or 8-byte little-endian words, cut out with one broadcast
shift and mask and looked up in the block's codebook. Then per block one
multiply by its row scales writes its destination view, and its outliers are scattered
over it. Grouping the sections by kind is what lets a shard's two blocks share these
steps: measured per shard, it decodes within 1.3x of the uniform scheme's time.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from runtime.families.weights import MAX_WEIGHT, out_of_range
from runtime.schemes import gptq
from runtime.schemes.base import FP32, Blocks, DecodeWork, Scheme, take
from runtime.schemes.uniform import UNIFORM

if TYPE_CHECKING:
    from elasticplan.problem.inputs import Fields

MAX_BITS = 8
DEFAULT_OUTLIER_SHARE = 0.005  # measured against 0 % and 2 % (benchmarks.dictquant)
FIT_ROUNDS = 6  # alternating least-squares rounds after the k-means start


def outliers_per_row(cols: int, share: float) -> int:
    return math.ceil(share * cols) if share > 0 else 0


def _ceil4(n: int) -> int:
    return -(-n // 4) * 4


def block_bytes(rows: int, cols: int, bits: int, share: float = DEFAULT_OUTLIER_SHARE) -> int:
    n = outliers_per_row(cols, share)
    return _ceil4(rows * math.ceil(cols * bits / 8)) + 4 * 2 ** bits + 4 * rows + \
        _ceil4(2 * rows * n) + 4 * rows * n


def _words(bits: int) -> tuple[int, int, int]:
    """(G bytes of whole codes, word bytes P >= G holding them, codes per word)."""
    G = bits // math.gcd(bits, 8)
    return G, (1 if G == 1 else 4 if G <= 3 else 8), 8 * G // bits


def _outlier_mask(w: np.ndarray, share: float) -> np.ndarray:
    n = outliers_per_row(w.shape[1], share)
    mask = np.zeros(w.shape, dtype=bool)
    if n:
        far = np.argpartition(-np.abs(w - w.mean(axis=1, keepdims=True)), n - 1, axis=1)[:, :n]
        np.put_along_axis(mask, far, True, axis=1)
    return mask


def _rms(w: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Each row's RMS over its non-outliers (1 where that is 0 or there are none)."""
    s = np.sqrt(np.where(keep, w * w, 0.0).sum(axis=1) / np.maximum(keep.sum(axis=1), 1))
    return np.where(s > 0, s, 1.0)


def error_bound(matrix: np.ndarray, bits: int, share: float = DEFAULT_OUTLIER_SHARE) -> float:
    """The bound on the block's RMS error over its non-outliers:
    max_r(rms_r) x (max z - min z) / 2^(b+1), z = w / rms_r (module docstring)."""
    w = np.asarray(matrix, dtype=np.float64)
    keep = ~_outlier_mask(w, share)
    if not keep.any():
        return 0.0
    s = _rms(w, keep)
    z = (w / s[:, None])[keep]
    return float(s.max() * (z.max() - z.min()) / 2.0 ** (bits + 1))


def _check(bits: int, cols: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"dictionary bitwidths are 1..{MAX_BITS}, got {bits}")
    if cols > 65535:
        raise ValueError(f"{cols} columns: outlier indices are uint16")


def _nearest(w: np.ndarray, s: np.ndarray, book: np.ndarray) -> np.ndarray:
    """Each weight's nearest value s_r x book[k] (book ascending, s_r > 0)."""
    return np.searchsorted((book[1:] + book[:-1]) / 2, w / s[:, None])


def fit(w: np.ndarray, bits: int, keep: np.ndarray, rounds: int = FIT_ROUNDS
        ) -> tuple[np.ndarray, np.ndarray]:
    """(row scales [rows], ascending codebook [2^b]) in float64 for the non-outliers
    `keep` of the block w (module docstring)."""
    import kmeans1d

    k = 2 ** bits
    s = _rms(w, keep)
    z = (w / s[:, None])[keep]
    if not z.size:
        return s, np.zeros(k)
    _, centroids = kmeans1d.cluster(z if z.size >= k else np.resize(z, k), k)
    book = np.sort(np.asarray(centroids, dtype=np.float64))
    for _ in range(rounds):
        codes = _nearest(w, s, book)
        q = np.where(keep, book[codes], 0.0)
        den = (q * q).sum(axis=1)
        ls = (np.where(keep, w, 0.0) * q).sum(axis=1) / np.where(den > 0, den, 1.0)
        s = np.where((den > 0) & (ls > 0), ls, s)  # a scale stays positive: tables sorted
        weight = np.where(keep, s[:, None] ** 2, 0.0).ravel()
        num = np.bincount(codes.ravel(), np.where(keep, s[:, None] * w, 0.0).ravel(), k)
        den_k = np.bincount(codes.ravel(), weight, k)
        book = np.sort(np.where(den_k > 0, num / np.where(den_k > 0, den_k, 1.0), book))
    return s, book


def quantize(matrix: np.ndarray, bits: int, share: float = DEFAULT_OUTLIER_SHARE,
             hessian: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """fp32 [rows, cols] -> (codes uint8 [rows, cols], codebook fp32 [2^b], row scales fp32
    [rows], outlier columns uint16 [rows, n], outlier values fp32 [rows, n]). With
    `hessian` (the block's X^T X, runtime/schemes/gptq.py) the codes are chosen with error
    compensation and the outliers keep their compensated values; without, each weight
    takes its nearest value."""
    w = np.asarray(matrix, dtype=np.float64)
    rows, cols = w.shape
    _check(bits, cols)
    mask = _outlier_mask(w, share)
    n = outliers_per_row(cols, share)
    s64, book64 = fit(w, bits, ~mask)
    book, scales = book64.astype(np.float32), s64.astype(np.float32)
    # the values the decoder will produce, and their midpoints, row by row
    table = (scales[:, None] * book[None, :]).astype(np.float64)
    mids = (table[:, 1:] + table[:, :-1]) / 2
    r = np.arange(rows)
    codes = np.zeros((rows, cols), dtype=np.uint8)

    def choose(col: np.ndarray, j: int) -> np.ndarray:
        idx = (col[:, None] > mids).sum(axis=1)  # the nearest value (ascending rows)
        codes[:, j] = np.where(mask[:, j], 0, idx)
        return np.where(mask[:, j], col, table[r, idx])  # an outlier: exact

    if hessian is not None:

        w = gptq.compensate(w, hessian, choose)
    else:
        for j in range(cols):
            choose(w[:, j], j)
    out_cols = np.zeros((rows, n), dtype=np.uint16)
    out_vals = np.zeros((rows, n), dtype=np.float32)
    for i in range(rows):
        idx = np.flatnonzero(mask[i])
        out_cols[i] = idx
        out_vals[i] = w[i, idx]
    return codes, book, scales, out_cols, out_vals


def dequantize_np(codes: np.ndarray, book: np.ndarray, scales: np.ndarray,
                  out_cols: np.ndarray, out_vals: np.ndarray) -> np.ndarray:
    """The block from its parts, in fp32 arithmetic as the decoder does it."""
    out = np.asarray(book, np.float32)[codes.astype(np.int64)] * \
        np.asarray(scales, np.float32)[:, None]
    np.put_along_axis(out, out_cols.astype(np.int64), out_vals, axis=1)
    return out.astype(np.float32)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes uint8 [rows, cols] < 2^b -> [rows, ceil(cols b / 8)] uint8, little-endian bits."""
    rows, cols = codes.shape
    bitplanes = np.unpackbits(codes[:, :, None], axis=2, bitorder="little")[:, :, :bits]
    stream = bitplanes.reshape(rows, cols * bits)
    return np.packbits(stream, axis=1, bitorder="little")


Shapes = Blocks  # (rows, cols) of each block of a group, in order


@lru_cache(maxsize=None)
def _sections(shapes: Shapes, bits: int, share: float) -> tuple[int, ...]:
    """The byte sizes of a group's sections, in the layout's order: per block its codes and
    their padding; the codebooks; the scales; per block its outlier columns and their
    padding; the outlier values. Their sum is the blocks' block_bytes summed."""
    for _, cols in shapes:
        _check(bits, cols)
    sizes: list[int] = []
    for rows, cols in shapes:
        codes = rows * math.ceil(cols * bits / 8)
        sizes += [codes, _ceil4(codes) - codes]
    sizes += [4 * 2 ** bits * len(shapes), 4 * sum(r for r, _ in shapes)]
    for rows, cols in shapes:
        idx = 2 * rows * outliers_per_row(cols, share)
        sizes += [idx, _ceil4(idx) - idx]
    sizes.append(4 * sum(r * outliers_per_row(c, share) for r, c in shapes))
    return tuple(sizes)


def encode_blocks(blocks: list[np.ndarray], bits: int, share: float = DEFAULT_OUTLIER_SHARE,
                  hessians: list[np.ndarray | None] | None = None) -> bytes:
    """A group of blocks (a shard's input and output blocks) quantised, each with its own
    codebook and scales, and laid out section by section (module docstring)."""
    parts = [quantize(b, bits, share, h) for b, h in zip(blocks, hessians or [None] * len(blocks))]
    codes, idx = [], []
    for c, _, _, out_cols, _ in parts:
        packed = pack_codes(c, bits).tobytes()
        codes += [packed, bytes(_ceil4(len(packed)) - len(packed))]
        cols = out_cols.astype("<u2").tobytes()
        idx += [cols, bytes(_ceil4(len(cols)) - len(cols))]
    return b"".join(codes + [p[1].astype("<f4").tobytes() for p in parts] +
                    [p[2].astype("<f4").tobytes() for p in parts] + idx +
                    [p[4].astype("<f4").tobytes() for p in parts])


def _tables(raw, shapes: Shapes, bits: int, share: float
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A group's section offsets (checked against its size), its codebooks [blocks, 2^bits]
    and all its row scales, read with numpy."""
    sizes = _sections(shapes, bits, share)
    if len(raw) != sum(sizes):
        raise ValueError(f"blocks {list(shapes)} at {bits} bits are {sum(sizes)} bytes, got "
                         f"{len(raw)}")
    k, m = 2 ** bits, len(shapes)
    at = np.cumsum((0,) + sizes)
    books = np.frombuffer(raw, "<f4", k * m, at[2 * m]).reshape(m, k)
    scales = np.frombuffer(raw, "<f4", sum(r for r, _ in shapes), at[2 * m + 1])
    return at, books, scales


def parse_blocks(raw: bytes, shapes: Shapes, bits: int, share: float = DEFAULT_OUTLIER_SHARE
                 ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """A group's bytes back to each block's (codes, codebook, row scales, outlier columns,
    outlier values), with numpy: the reference the torch decoder is tested against."""
    shapes = tuple(shapes)
    at, books, scales = _tables(raw, shapes, bits, share)
    m = len(shapes)
    vals_at, row_at, out = at[4 * m + 2], 0, []
    for i, (rows, cols) in enumerate(shapes):
        n, row_bytes = outliers_per_row(cols, share), math.ceil(cols * bits / 8)
        packed = np.frombuffer(raw, np.uint8, rows * row_bytes, at[2 * i]).reshape(rows, row_bytes)
        stream = np.unpackbits(packed, axis=1, bitorder="little")[:, :cols * bits]
        codes = (stream.reshape(rows, cols, bits).astype(np.int64) << np.arange(bits)).sum(axis=2)
        out_cols = np.frombuffer(raw, "<u2", rows * n, at[2 * m + 2 + 2 * i]).reshape(rows, n)
        out_vals = np.frombuffer(raw, "<f4", rows * n, vals_at).reshape(rows, n)
        out.append((codes.astype(np.uint8), books[i], scales[row_at:row_at + rows], out_cols,
                    out_vals))
        vals_at += 4 * rows * n
        row_at += rows
    return out


def check_blocks(raw: np.ndarray, shapes: Shapes, bits: int,
                 share: float = DEFAULT_OUTLIER_SHARE) -> None:
    """ValueError if a group's bytes would decode outside the weights' range or write
    outside a block: every codebook value, row scale and outlier value finite, every
    s_r x D[k] and outlier value within ±MAX_WEIGHT, every outlier column inside its row.
    (The codes themselves are always valid: b bits index 2^b values.)"""
    shapes = tuple(shapes)
    at, books, scales = _tables(raw, shapes, bits, share)
    m = len(shapes)
    vals_at, row_at = at[4 * m + 2], 0
    for i, (rows, cols) in enumerate(shapes):
        n = outliers_per_row(cols, share)
        book, scale = books[i], scales[row_at:row_at + rows]
        out_cols = np.frombuffer(raw, "<u2", rows * n, at[2 * m + 2 + 2 * i])
        out_vals = np.frombuffer(raw, "<f4", rows * n, vals_at)
        why = out_of_range(book, f"block {i}'s codebook") or \
            out_of_range(scale, f"block {i}'s row scales") or \
            out_of_range(out_vals, f"block {i}'s outlier values")
        if why:
            raise ValueError(why)
        top = float(np.abs(book).max()) * float(np.abs(scale).max()) if rows else 0.0
        if top > MAX_WEIGHT:
            raise ValueError(f"block {i}'s codebook times its row scales reaches {top:g}, "
                             f"beyond ±{MAX_WEIGHT:g} (the largest weight accepted)")
        if n and int(out_cols.max()) >= cols:
            j = int(np.flatnonzero(out_cols >= cols)[0])
            raise ValueError(f"block {i}'s outlier column {int(out_cols[j])} (row {j // n}) "
                             f"is outside its {cols} columns")
        vals_at += 4 * rows * n
        row_at += rows


@lru_cache(maxsize=None)
def _byte_codes(bits: int, blocks: int) -> torch.Tensor:
    """[blocks x 256 x 8/b] int32: the codes held in every byte value, in order, offset by
    each block's place among the codebooks."""
    per, k = 8 // bits, 2 ** bits
    byte = torch.arange(256, dtype=torch.int32)
    codes = (byte[:, None] >> (torch.arange(per, dtype=torch.int32) * bits)) & (k - 1)
    return (torch.arange(blocks, dtype=torch.int32).view(-1, 1, 1) * k + codes).view(-1)


@lru_cache(maxsize=None)
def _offset(n: int) -> torch.Tensor:
    """n as a one-element int32 tensor: added to uint8 codes it makes the sum int32 (a
    Python int or 0-d tensor would be added in uint8 and wrap)."""
    return torch.tensor([n], dtype=torch.int32)


@lru_cache(maxsize=None)
def _shifts(bits: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(8 * _words(bits)[0] // bits, dtype=dtype) * bits


def decode_work(shapes: Shapes, bits: int, share: float = DEFAULT_OUTLIER_SHARE
                ) -> tuple[int, int, int, int, int]:
    """Elements of the decode workspace for one group of blocks, in DecodeWork's order:
    (int32 words (1/2/4/8 bits: all blocks'), int32 codes of the largest block or, at
    1/2/4 bits, the byte tables' fp32 values, fp32 values (all blocks'), uint8 padded bytes
    of the largest block / 4 rounded up, int64 outlier indices (all blocks'))."""
    G, P, per = _words(bits)
    groups = [r * -(-c // per) for r, c in shapes]
    values = sum(groups) * per
    longs = sum(_ceil4(2 * r * outliers_per_row(c, share)) // 2 for r, c in shapes)
    if P == 1:
        return sum(groups), 256 * per * len(shapes) if per > 1 else 0, values, 0, longs
    return 0, max(groups) * per, values, -(-max(groups) * P // 4), longs


class _DecodeLayout:
    """Everything about decoding one group shape that does not depend on the bytes: the
    split of its buffer (codes per block, then the codebooks, scales, outlier columns and
    outlier values as float32 or int16 sections of its 4-aligned tail), and a function
    cutting the workspace's views."""

    def __init__(self, shapes: Shapes, bits: int, share: float):
        sizes, m = _sections(shapes, bits, share), len(shapes)
        self.shapes, self.m, self.nbytes = shapes, m, sum(sizes)
        self.G, self.P, self.per = _words(bits)
        self.key = ("dict", shapes, bits, share)
        self.code_split = sizes[:2 * m] + (self.nbytes - sum(sizes[:2 * m]),)
        self.row_bytes = [sizes[2 * i] // r for i, (r, _) in enumerate(shapes)]
        self.n = [outliers_per_row(c, share) for _, c in shapes]
        rows = [r for r, _ in shapes]
        # the tail, in fp32 elements: codebooks, scales per block, outlier columns (all
        # blocks, with paddings), outlier values per block
        self.tail_split = (2 ** bits * m, *rows, sum(sizes[2 * m + 2:4 * m + 2]) // 4,
                           *(r * n for r, n in zip(rows, self.n)))
        self.wide = [c > 32767 for _, c in shapes]
        self.byte_codes = _byte_codes(bits, m) if self.P == 1 and self.per > 1 else None
        self.offsets = [_offset(256 * i) for i in range(m)]

    def make(self, work):
        """The views of the workspace (None: fresh tensors) a decode writes: (words (int32,
        1/2/4/8 bits) or padded bytes [groups, P], the byte tables [blocks x 256, per] or
        None (8 bits) or the codes buffer, all values [values / per, per], all outlier
        indices (flat), then per block: its words or its padded bytes [rows, groups, P],
        its values [rows, cols], its outlier indices [rows, n], and on the shift path its
        codes [groups, per] and its values (flat))."""
        per, P = self.per, self.P
        groups = [r * -(-c // per) for r, c in self.shapes]
        total = sum(groups)
        values = take(work and work.values, total * per, torch.float32)
        n_idx = [_ceil4(2 * r * n) // 2 for (r, _), n in zip(self.shapes, self.n)]
        idx = take(work and work.longs, sum(n_idx), torch.int64)
        if P == 1:
            first = take(work and work.packed, total, torch.int32)
            second = None if per == 1 else take(work and work.indices.view(torch.float32),
                                                256 * per * self.m,
                                                torch.float32).view(-1, per)
        else:  # the blocks are cut one after the other, each from the buffers' start
            first = take(work and work.bytes, max(groups) * P, torch.uint8)
            second = take(work and work.indices, max(groups) * per, torch.int32)
        blocks, at, iat = [], 0, 0
        for (r, c), g, ni, n in zip(self.shapes, groups, n_idx, self.n):
            blocks.append((first[at:at + g] if P == 1 else first[:g * P].view(r, g // r, P),
                           values[at * per:(at + g) * per].view(r, -1)[:, :c],
                           idx[iat:iat + r * n].view(r, n),
                           None if P == 1 else (second[:g * per].view(g, per),
                                                values[at * per:(at + g) * per])))
            at, iat = at + g, iat + ni
        return first, second, values.view(-1, per), idx, blocks


@lru_cache(maxsize=None)
def _decode_layout(shapes: Shapes, bits: int, share: float) -> _DecodeLayout:
    return _DecodeLayout(shapes, bits, share)


def decode_into(outs: list[torch.Tensor], buf: torch.Tensor, shapes: Shapes, bits: int,
                share: float = DEFAULT_OUTLIER_SHARE, work=None) -> None:
    """Decode a group of blocks (uint8 tensor `buf`, exactly the blocks' block_bytes summed)
    into `outs`, one view per block of rows x cols elements whose last dimension is cols.
    The blocks' codes are looked up together (one table build and one lookup at 1/2/4
    bits), then each block is multiplied by its scales into its view and its outliers
    scattered there. With `work` (a runtime.schemes.uniform.DecodeWork sized by decode_work) nothing
    is allocated but small per-shape constants and the workspace's views, each made once."""
    plan = _decode_layout(shapes if type(shapes) is tuple else tuple(shapes), bits, share)
    if buf.numel() != plan.nbytes:
        raise ValueError(f"blocks {list(shapes)} at {bits} bits are {plan.nbytes} bytes, "
                         f"got {buf.numel()}")
    first, second, values, idx, blocks = plan.make(None) if work is None else \
        work.views(plan.key, plan.make)
    m = plan.m
    parts = buf.split_with_sizes(plan.code_split)
    tail = parts[-1].view(torch.float32).split_with_sizes(plan.tail_split)
    books = tail[0]
    if plan.P == 1:  # a byte holds whole codes: each block's codebook folded into every
        for i in range(m):  # byte's values, block i's bytes offset by 256 i
            if i == 0:
                blocks[0][0].copy_(parts[0])
            else:
                torch.add(parts[2 * i], plan.offsets[i], out=blocks[i][0])
        if second is None:  # 8 bits: the codebooks are the tables
            torch.index_select(books.view(-1, 1), 0, first, out=values)
        else:
            torch.index_select(books, 0, plan.byte_codes, out=second.view(-1))
            torch.index_select(second, 0, first, out=values)
    else:  # block by block, the codes G bytes at a time as little-endian words of P bytes
        G, k = plan.G, 2 ** bits
        wtype = torch.int64 if plan.P == 8 else torch.int32
        for i, (rows, _) in enumerate(shapes):
            pad, _, _, (codes, out_values) = blocks[i]
            row_bytes = plan.row_bytes[i]
            packed = parts[2 * i].view(rows, row_bytes)
            pad.zero_()
            if pad.shape[1] * G == row_bytes:
                pad[..., :G].copy_(packed.view(rows, -1, G))
            else:  # the last group is short: byte j of every group, then zeros
                for j in range(G):
                    pad[:, :len(range(j, row_bytes, G)), j].copy_(packed[:, j::G])
            # (8-byte words shifted into int32 codes keep their low bits: all the mask needs)
            torch.bitwise_right_shift(pad.view(wtype).view(-1, 1), _shifts(bits, wtype),
                                      out=codes)
            codes.bitwise_and_(k - 1)
            torch.index_select(books[i * k:(i + 1) * k], 0, codes.view(-1), out=out_values)
    if idx.numel():  # every block's outlier columns (and paddings) at once
        idx.copy_(tail[m + 1].view(torch.int16))
    for i, (out, (_, src, ix, _)) in enumerate(zip(outs, blocks)):
        scales = tail[1 + i]
        if out.dim() == 2:
            torch.mul(src, scales.view(-1, 1), out=out)
        else:
            torch.mul(src.reshape(out.shape), scales.view(*out.shape[:-1], 1), out=out)
        if plan.n[i]:
            if plan.wide[i]:
                ix.bitwise_and_(0xFFFF)
            vals = tail[m + 2 + i].view(ix.shape)
            if out.dim() == 2:
                out.scatter_(1, ix, vals)
            else:
                lead = (*out.shape[:-1], ix.shape[1])
                out.scatter_(-1, ix.view(lead), vals.view(lead))


def decode_block(raw: bytes | memoryview, rows: int, cols: int, bits: int,
                 share: float = DEFAULT_OUTLIER_SHARE) -> torch.Tensor:
    """The fp32 block [rows, cols] from its packed bytes (a group of one block)."""
    buf = torch.frombuffer(bytearray(raw) if isinstance(raw, bytes) else raw, dtype=torch.uint8)
    out = torch.empty(rows, cols)
    decode_into([out], buf, ((rows, cols),), bits, share)
    return out


# The scheme codes these bitwidths by dictionary and leaves 6 and 8 bits to the uniform
# scheme: there uniform is within 0.5 % of fp32's fidelity (0.995, 0.9997) while a
# dictionary's outliers would add 4 % and 3 % to the bytes.
DICT_BITS = (2, 3, 4, 5)
LAYOUT = ("a variant's two blocks section by section: each block's codes [r, "
          "ceil(c*bits/8)] (each section padded to 4 bytes), their codebooks [2^bits] "
          "fp32, their row scales [r] fp32, each block's outlier columns [r, n] uint16 "
          "(each section padded to 4 bytes), their outlier values [r, n] fp32, then "
          "the bias; n = ceil(outlier_share * c)")


@dataclass(frozen=True)
class Dictionary(Scheme):
    """`elasticplan shard --scheme dict`: 2/3/4/5 bits as a scaled codebook per block with
    exact outliers (`share` of each row), codes rounded with error compensation on the
    first tweets of the train split; 6 and 8 bits uniform."""

    share: float = DEFAULT_OUTLIER_SHARE

    name: ClassVar[str] = "dict"
    bitwidths: ClassVar[tuple[int, ...]] = (2, 3, 4, 5, 6, 8, FP32)
    index_key: ClassVar[str] = "dictionary"

    def __post_init__(self):
        if not (isinstance(self.share, float | int) and 0 <= self.share <= 0.5):
            raise ValueError(f"the outlier share must be in [0, 0.5], got {self.share!r}")

    def coder(self, bits: int) -> Scheme:
        return self if bits in DICT_BITS else UNIFORM

    def block_bytes(self, rows: int, cols: int, bits: int) -> int:
        return block_bytes(rows, cols, bits, self.share)

    def decode_work(self, blocks: Blocks, bits: int) -> tuple[int, ...]:
        return decode_work(tuple(blocks), bits, self.share)

    def encode_blocks(self, blocks: list[np.ndarray], bits: int,
                      hessians: list[np.ndarray | None]) -> bytes:
        return encode_blocks(blocks, bits, self.share, hessians)

    def decode_into(self, outs: list[torch.Tensor], buf: torch.Tensor, blocks: Blocks,
                    bits: int, work: DecodeWork | None) -> None:
        decode_into(outs, buf, blocks, bits, self.share, work)

    def check(self, buf: np.ndarray, blocks: Blocks, bits: int) -> None:
        check_blocks(buf, blocks, bits, self.share)

    @property
    def needs_hessians(self) -> bool:
        return True

    def calibration_texts(self) -> list[str]:
        from runtime.sources.task import load_splits

        return list(load_splits().train.texts[:gptq.CALIBRATION_TEXTS])

    def build_key(self, calibration: list[str]) -> dict[str, Any]:
        import kmeans1d

        return {"outlier_share": self.share, "layout": LAYOUT, "fit_rounds": FIT_ROUNDS,
                "bits": list(DICT_BITS), "kmeans1d": kmeans1d.__version__,
                "rounding": {"damp": gptq.DAMP, "texts": hashlib.sha256(
                    "\n".join(calibration).encode()).hexdigest()}}

    def index_entry(self, calibration: list[str]) -> dict[str, Any]:
        return {"outlier_share": self.share, "layout": LAYOUT,
                # (the text every dictionary store's index holds: a rebuild keeps it)
                "rounding": f"error-compensated (runtime/gptq.py) on the first "
                            f"{len(calibration)} tweets of the train split"}

    @classmethod
    def from_index(cls, f: "Fields") -> "Dictionary":
        scheme = cls(f.number("outlier_share", minimum=0, maximum=0.5))
        if f.string("layout") != LAYOUT:
            raise f.err("layout", "not this version's dictionary layout (a store built by "
                                  "another version: rebuild it with elasticplan shard)")
        f.free_form("rounding", str)
        f.done()
        return scheme

    @classmethod
    def create(cls, *, outlier_share: float | None = None) -> "Dictionary":
        if outlier_share is None:
            return cls()
        if not 0 <= outlier_share <= 0.5:  # (NaN too)
            raise ValueError(f"--outlier-share {outlier_share}: must be in [0, 0.5]")
        return cls(float(outlier_share))
