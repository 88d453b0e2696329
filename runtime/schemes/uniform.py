"""Per-row symmetric quantisation with an MSE-optimal clip, and the packed layout.

Scheme (for b < 32 bits), row by row of a stored block (rows are output channels):
- a clip c is chosen among CLIP_GRID ratios of the row's max |w| (1.0 included) to
  minimise the row's squared error; the scale is s = c / 2^(b-1);
- codes are mid-rise: q = clamp(floor(w / s), -2^(b-1), 2^(b-1) - 1), reconstructed as
  (q + 1/2) * s. All 2^b levels are used, symmetric about zero (a 2-bit row has the four
  levels ±s/2, ±3s/2 rather than a ternary grid);
- stored code u = q + 2^(b-1) in [0, 2^b).

Error bound (tested): because the grid contains the no-clip ratio 1.0, whose error is at
most s/2 = max|w| / 2^b per element, the chosen clip gives a row RMS error
<= max|w_row| / 2^b.

Packed layout of one row: codes as a little-endian bit stream, value k in bits
[k*b, (k+1)*b), padded with zero bits to a whole byte: ceil(cols * b / 8) bytes.
Unpacking works on 24-bit groups (3 bytes), so the stored bitwidths must divide 24:
2, 3, 4, 6, 8 (and 32 = fp32, stored raw).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import numpy as np
import torch

from elasticplan.problem import archgen
from runtime.families.weights import MAX_WEIGHT, out_of_range
from runtime.schemes.base import FP32, Blocks, DecodeWork, Scheme, take

QUANT_BITS = (2, 3, 4, 6, 8)  # the bitwidths this scheme packs (divisors of 24)
CLIP_GRID = np.linspace(0.2, 1.0, 81)  # ratios of the row's max |w|; 1.0 bounds the error
SCHEME = "symmetric mid-rise, per-row scale, MSE-optimal clip over 81 ratios in [0.2, 1]"


def check_bits(bits: int) -> None:
    if bits != FP32 and bits not in QUANT_BITS:
        raise ValueError(f"bitwidth {bits} is not stored; use one of {QUANT_BITS} or {FP32}")


def row_bytes(cols: int, bits: int) -> int:
    return cols * 4 if bits == FP32 else math.ceil(cols * bits / 8)


def error_bound(matrix: np.ndarray, bits: int) -> np.ndarray:
    """Per-row bound on the RMS quantisation error: max|w_row| / 2^bits."""
    return np.abs(matrix).max(axis=1) / 2.0 ** bits


def _levels(bits: int) -> tuple[int, int]:
    half = 2 ** (bits - 1)
    return -half, half - 1


def quantize(matrix: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """fp32 [rows, cols] -> (codes uint8 [rows, cols] in [0, 2^bits), scales fp32 [rows])."""
    check_bits(bits)
    if bits == FP32:
        raise ValueError("fp32 is stored raw, not quantised")
    w = np.asarray(matrix, dtype=np.float32)
    lo, hi = _levels(bits)
    amax = np.abs(w).max(axis=1).astype(np.float64)
    zero = amax == 0
    amax[zero] = 1.0  # placeholder; an all-zero row gets scale 0 (exact zeros) below
    best_err = np.full(w.shape[0], np.inf)
    best_scale = np.zeros(w.shape[0])
    for ratio in CLIP_GRID:  # vectorised over rows; 81 candidates
        s = (ratio * amax / -lo).astype(np.float32)
        q = np.clip(np.floor(w / s[:, None]), lo, hi)
        err = (((q + 0.5) * s[:, None] - w) ** 2).sum(axis=1)
        better = err < best_err
        best_err[better], best_scale[better] = err[better], s[better]
    scales = best_scale.astype(np.float32)
    q = np.clip(np.floor(w / scales[:, None]), lo, hi)
    scales[zero] = 0.0
    return (q - lo).astype(np.uint8), scales


def dequantize_np(codes: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    lo, _ = _levels(bits)
    return ((codes.astype(np.float32) + (lo + 0.5)) * scales[:, None]).astype(np.float32)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes uint8 [rows, cols] -> packed uint8 [rows, row_bytes(cols, bits)]."""
    rows, cols = codes.shape
    per = 24 // bits
    groups = -(-cols // per)
    padded = np.zeros((rows, groups * per), dtype=np.uint32)
    padded[:, :cols] = codes
    shifts = (np.arange(per, dtype=np.uint32) * bits)[None, None, :]
    g = (padded.reshape(rows, groups, per) << shifts).sum(axis=2, dtype=np.uint32)
    raw = np.stack([(g >> 0) & 0xFF, (g >> 8) & 0xFF, (g >> 16) & 0xFF], axis=2)
    return raw.reshape(rows, groups * 3).astype(np.uint8)[:, :row_bytes(cols, bits)]


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """packed uint8 [rows, row_bytes] -> codes int32 [rows, cols] (torch, for the runtime)."""
    rows, nbytes = packed.shape
    per = 24 // bits
    groups = -(-cols // per)
    if groups * 3 != nbytes:
        full = torch.zeros(rows, groups * 3, dtype=torch.uint8)
        full[:, :nbytes] = packed
        packed = full
    b = packed.view(rows, groups, 3).to(torch.int32)
    g = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    codes = (g.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(rows, groups * per)[:, :cols]


def _lut(bits: int, width: int, offset: float) -> torch.Tensor:
    """[2^width, width/bits] fp32: code + offset of the values packed in every possible
    `width`-bit chunk (offset lo + 1/2: this scheme's reconstruction offsets)."""
    chunk = torch.arange(2 ** width, dtype=torch.int32)
    codes = (chunk[:, None] >> (torch.arange(width // bits, dtype=torch.int32) * bits)) \
        & ((1 << bits) - 1)
    return codes.to(torch.float32) + offset


# Lookup tables for dequantisation, by (bits, offset): a byte holds whole 2/4/8-bit values;
# 3- and 6-bit values straddle bytes, but a 24-bit group splits into two 12-bit halves that
# hold whole values.
_LUTS: dict[tuple[int, float], torch.Tensor] = {}


def _chunk_bits(bits: int) -> int:
    """The bits a lookup-table index covers: a byte, or half a 24-bit group."""
    return 8 if 8 % bits == 0 else 12


def _table(bits: int, offset: float) -> torch.Tensor:
    if (bits, offset) not in _LUTS:
        _LUTS[bits, offset] = _lut(bits, _chunk_bits(bits), offset)
    return _LUTS[bits, offset]


@lru_cache(maxsize=None)
def _workspace(rows: int, nbytes: int, cols: int, bits: int):
    """A function cutting, from a DecodeWork (None: fresh tensors), the views one block's
    decode writes: (int32 chunks, int32 24-bit groups [rows, groups, 3] or None, the
    looked-up values [chunks, per], the values of the block [rows, cols])."""
    per = _chunk_bits(bits) // bits

    def make(work):
        if 8 % bits == 0:
            chunks, b = take(work and work.indices, rows * nbytes, torch.int32), None
        else:
            groups = -(-cols // (24 // bits))
            b = take(work and work.packed, rows * groups * 3, torch.int32).view(rows, groups, 3)
            chunks = take(work and work.indices, rows * groups * 2, torch.int32)
        values = take(work and work.values, chunks.numel() * per, torch.float32)
        return chunks, b, values.view(-1, per), values.view(rows, -1)[:, :cols]
    return make


def dequantize_into(out: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                    bits: int, work: DecodeWork | None = None) -> torch.Tensor:
    """Dequantise packed rows straight into `out` (any view with rows * cols elements whose
    last dimension is cols): out = (code + lo + 1/2) * scale. 8, 4 and 2 bits take each
    value's bits straight out of its bytes (_dequantize_bytes); 3 and 6 bits, and a 4- or
    2-bit view that cannot be split by byte, a lookup table (_dequantize_lut). Both give
    the same bits: a float code plus lo + 1/2 is exact, then one rounding by the scale."""
    return _decode(out, packed, scales, bits, work, _levels(bits)[0] + 0.5)


def codes_into(out: torch.Tensor, packed: torch.Tensor, bits: int,
               work: DecodeWork | None = None) -> torch.Tensor:
    """The packed codes themselves (0 .. 2^bits - 1, as fp32) into `out` (a view as for
    dequantize_into), by the same two paths: what a scheme with other scales than one per
    row (runtime/schemes/group.py) starts from."""
    return _decode(out, packed, None, bits, work, 0.0)


def _decode(out: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor | None, bits: int,
            work: DecodeWork | None, offset: float) -> torch.Tensor:
    rows, nbytes = packed.shape
    cols = out.shape[-1]
    if bits == 8 or (8 % bits == 0 and nbytes * (8 // bits) == cols and out.dim() == 2
                     and out.stride(1) == 1):
        return _dequantize_bytes(out, packed, scales, bits, work, offset)
    return _dequantize_lut(out, packed, scales, bits, work, offset)


def _dequantize_bytes(out: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor | None,
                      bits: int, work: DecodeWork | None, offset: float) -> torch.Tensor:
    """8 bits: the packed bytes are the codes, converted into `out` at once. 4 and 2 bits:
    value k of each byte is shifted down and masked in byte arithmetic (into the
    workspace's int32 index buffer seen as bytes), then converted into out's k-th of every
    8 / bits columns. Then plus `offset`, times the row's scale (if `scales` is given).
    On a 1536 x 576 block, against the lookup table side by side (tests/test_model_quant.py
    checks they are the same bits): 8 bits 9.6 -> 1.0 ns per weight, 4 bits 4.9 -> 2.1
    (the table's index_select copies a few bytes per index). Shifting the high values in
    bytes rather than scaling them in floats by 2^-(k*bits) (exact either way) took 4-bit
    codes from 0.325 to 0.179 ns per weight on that block, and the whole 4-bit decode from
    0.44 to 0.29; 2 bits by byte rather than by table 0.55 -> 0.35 (one thread, side by
    side; `python -m benchmarks.dequant_speed` gives every block)."""
    rows, nbytes = packed.shape
    if bits == 8:
        out.copy_(packed if out.dim() == 2 else packed.reshape(out.shape))
    else:
        per, mask = 8 // bits, (1 << bits) - 1
        part = take(work and work.indices, -(-rows * nbytes // 4), torch.int32) \
            .view(torch.uint8)[:rows * nbytes].view(rows, nbytes)
        spread = out.view(rows, nbytes, per)
        for k in range(per):  # value k: its bits shifted down (uint8 ops), then converted
            if k == 0:
                torch.bitwise_and(packed, mask, out=part)
            else:
                torch.bitwise_right_shift(packed, k * bits, out=part)
                if k < per - 1:
                    part.bitwise_and_(mask)
            spread[..., k].copy_(part)
    if offset:
        out.add_(offset)
    if scales is not None:
        out.mul_(scales.view(*out.shape[:-1], 1))
    return out


def _dequantize_lut(out: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor | None,
                    bits: int, work: DecodeWork | None, offset: float) -> torch.Tensor:
    """dequantize_into through a lookup table (a few torch ops per block: small shards are
    dominated by per-op cost, measured 2-3x faster than unpacking bit by bit): 3 and 6
    bits, and 2 or 4 bits of a view that _dequantize_bytes cannot split by byte. With
    `work`, every intermediate lives in its buffers (their views cut once per block
    shape)."""
    cols = out.shape[-1]
    rows, nbytes = packed.shape
    lut = _table(bits, offset)
    make = _workspace(rows, nbytes, cols, bits)
    chunks, b, lookup, values = make(None) if work is None else \
        work.views(("uniform", rows, nbytes, cols, bits), make)
    if b is None:
        chunks.copy_(packed.reshape(-1))
    else:
        groups = b.shape[1]
        if groups * 3 != nbytes:
            b.zero_()
            b.view(rows, groups * 3)[:, :nbytes].copy_(packed)
        else:
            b.copy_(packed.view(rows, groups, 3))
        c = chunks.view(rows, groups, 2)
        low, high = c[..., 0], c[..., 1]
        low.copy_(b[..., 1]).bitwise_and_(15).bitwise_left_shift_(8).bitwise_or_(b[..., 0])
        high.copy_(b[..., 1]).bitwise_right_shift_(4)
        high.bitwise_or_(b[..., 2].bitwise_left_shift_(4))
    torch.index_select(lut, 0, chunks, out=lookup)
    if scales is None:
        out.copy_(values if out.dim() == 2 else values.reshape(out.shape))
    elif out.dim() == 2:
        torch.mul(values, scales.view(rows, 1), out=out)
    else:
        torch.mul(values.reshape(out.shape), scales.view(*out.shape[:-1], 1), out=out)
    return out


@dataclass(frozen=True)
class Uniform(Scheme):
    """The default scheme: every block per output channel, packed codes [r, ceil(c*b/8)]
    then fp32 scales [r]; 2/3/4/6/8 bits."""

    name: ClassVar[str] = "uniform"
    bitwidths: ClassVar[tuple[int, ...]] = archgen.DEFAULT_BITWIDTHS

    rowwise: ClassVar[bool] = True

    def coder(self, bits: int) -> Scheme:
        return self

    def block_bytes(self, rows: int, cols: int, bits: int) -> int:
        return rows * row_bytes(cols, bits) + (0 if bits == FP32 else 4 * rows)

    def row_layout(self, cols: int, bits: int) -> tuple[int, int]:
        return row_bytes(cols, bits), 4

    def decode_rows(self, out: torch.Tensor, codes: torch.Tensor, side: torch.Tensor,
                    bits: int, work: DecodeWork | None) -> torch.Tensor:
        return dequantize_into(out, codes, side.view(torch.float32), bits, work)

    def decode_work(self, blocks: Blocks, bits: int) -> tuple[int, ...]:
        return tuple(max(k) for k in zip(*(archgen.decode_work(r, c, bits) for r, c in blocks)))

    def encode_blocks(self, blocks: list[np.ndarray], bits: int,
                      hessians: list[np.ndarray | None]) -> bytes:
        out = []
        for block in blocks:
            codes, scales = quantize(np.ascontiguousarray(block, dtype=np.float32), bits)
            out += [pack(codes, bits).tobytes(), scales.astype("<f4").tobytes()]
        return b"".join(out)

    def check(self, buf: np.ndarray, blocks: Blocks, bits: int) -> None:
        # every code is a valid level; a weight is at most (2^(b-1) - 1/2) scales
        top = 2 ** (bits - 1) - 0.5
        pos = 0
        for i, (r, c) in enumerate(blocks):
            n = r * row_bytes(c, bits)
            scales = np.frombuffer(buf, "<f4", r, pos + n)
            why = out_of_range(scales, f"block {i}'s row scales", MAX_WEIGHT / top)
            if why:
                raise ValueError(why)
            pos += n + 4 * r


UNIFORM = Uniform()
