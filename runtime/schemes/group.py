"""Affine quantisation per group of 32 consecutive weights of a row, as GGUF's block formats.

Scheme (`elasticplan shard --scheme group`), for b < 32 bits, block by block: each row's
columns are cut into groups of GROUP = 32 (the last one shorter where 32 does not divide
them). A group keeps an fp16 step s and an fp16 minimum m, and each weight a b-bit code u
in [0, 2^b), reconstructed as

    w' = m + u * s     (fp32: s and m widened, the product exact, one rounding)

The grid of each group is the one with the least squared error among:
- asymmetric, over 2^k - 1 steps for k = b, b-1, ..., 1: m = the group's minimum, s = its
  range / (2^k - 1) (the codes then use the first 2^k levels). k = b is the usual min-max
  grid; a smaller k keeps exact a group whose weights already lie on a coarser grid (a
  Q4_1 source's 16 levels at 8 bits: its range / 255 is not exact in fp16, its range / 15
  is);
- symmetric: s = max |w| / (2^(b-1) - 1), m = -2^(b-1) s (zero exact; a Q8_0 source's
  grid).
s and m are rounded to fp16 before the codes are chosen (u = clamp(round((w - m) / s))), so
the reconstruction is what the chosen grid gives, and the error is measured on it.

A weight that came from a GGUF file quantised per 32 along the row in Q4_1 (16 levels from
the group's minimum) is kept exactly at 4, 6 and 8 bits, one in Q8_0 (integers -127..127
times a scale, the largest at ±127) at 8 bits: SmolLM2's layers (Q4_1) decode bit for bit
at 4, 6 and 8 bits and its table (Q8_0) at 8 (tests/test_group_scheme.py;
docs/decoders.md). (Q4_0's grid, (q - 8) times max|w| / 8, is not among the candidates.)
A candidate whose step or minimum is not an fp16, or whose top level would lie beyond
±65504 (what `check` refuses), is not used for that group. Other weights get at most the
per-group min-max grid's squared error (an RMS of at most s/2, s = the group's range /
(2^b - 1)).

Layout of a block [rows, cols]: packed codes [rows, ceil(cols*b/8)] (the uniform scheme's
bit stream, runtime/schemes/uniform.py; a row's bytes padded to an even count, which a
multiple of 32 columns always is), then per row its G = ceil(cols / 32) steps and then
its G minima, fp16 little-endian ([rows, 2G] halves: 4G bytes per row). Every row decodes
alone
(codes and side data at fixed offsets): the decoder reads its embedding table's rows so.
Costs b + 1 bits per weight (5 at 4 bits, 9 at 8).

Decoding (`decode_rows`; the base class cuts each block into its rows' codes and side
data): the codes into the output (uniform.codes_into: by byte at 2, 4 and 8 bits, a lookup
table otherwise), the steps and minima widened into the workspace, then out * s and + m
in place over [rows, G, 32] views (a fused addcmul with the group's broadcast measured 6x
slower: 0.92 against 0.16 ns per weight on a 1536 x 576 block). u * s is exact (at most 8
+ 11 significant bits), so the two steps round once, as m + u * s does. Against the
uniform scheme side by side: `python -m benchmarks.dequant_speed`
(docs/decoders.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from elasticplan.problem import archgen
from runtime.families.weights import MAX_WEIGHT
from runtime.schemes import groupmv, uniform
from runtime.schemes.base import FP32, Blocks, DecodeWork, Scheme, take

if TYPE_CHECKING:
    from elasticplan.problem.inputs import Fields

GROUP = 32  # weights per group, along a row (GGUF's block size)
QUANT_BITS = uniform.QUANT_BITS  # 2, 3, 4, 6, 8: the packed bit stream's widths
LAYOUT = ("codes [r, ceil(c*b/8) padded to even] then per row fp16 steps [ceil(c/32)] and "
          "fp16 minima [ceil(c/32)]")
GRIDS = "per 32 weights: least squared error of min-max over 2^k-1 steps (k <= b) and symmetric"
ROWS_PER_PASS = 4096  # rows quantised at once (bounds the encoder's temporaries)
CHECK_ROWS = 1024  # rows whose side data `check` widens at once (~0.15 MB for a table's)


def _groups(cols: int) -> int:
    """Groups of a row of cols weights: 32 each, the last one shorter where 32 does not
    divide cols."""
    return -(-cols // GROUP)


def _parts(cols: int) -> list[tuple[int, int, int, int]]:
    """(first column, end column, first group, end group) of a row's whole groups and of its
    shorter last group, if any."""
    full = cols // GROUP * GROUP
    parts = [(0, full, 0, full // GROUP)] if full else []
    if cols > full:
        parts.append((full, cols, full // GROUP, full // GROUP + 1))
    return parts


def code_bytes(cols: int, bits: int) -> int:
    """Bytes of one row's codes: the packed bit stream, padded to an even count (so that the
    fp16 side data after a block's codes is aligned)."""
    n = uniform.row_bytes(cols, bits)
    return n + (n & 1)


def side_bytes(cols: int) -> int:
    """Bytes of one row's steps and minima."""
    return 4 * _groups(cols)


def _candidates(w: np.ndarray, bits: int):
    """(step, minimum) fp16 pairs [rows, G] of every candidate grid for groups w [rows, G, 32]."""
    lo, hi = w.min(axis=2), w.max(axis=2)
    for k in range(bits, 0, -1):
        yield (hi - lo) / (2 ** k - 1), lo
    amax = np.maximum(np.abs(lo), np.abs(hi))
    s = amax / (2 ** (bits - 1) - 1) if bits > 1 else amax
    yield s, -(2 ** (bits - 1)) * s


def _codes(w: np.ndarray, step: np.ndarray, low: np.ndarray, bits: int) -> np.ndarray:
    s, m = step[..., None].astype(np.float32), low[..., None].astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.rint((w - m) / s)
    u[~np.isfinite(u)] = 0  # a zero step (a constant group): every code 0, the weight = m
    return np.clip(u, 0, 2 ** bits - 1)


def _fit(w3: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Groups w3 [rows, g, n] -> (codes [rows, g, n], steps fp16 [rows, g], minima fp16)."""
    best = None
    for step, low in _candidates(w3, bits):
        with np.errstate(over="ignore", invalid="ignore"):
            s16, m16 = step.astype(np.float16), low.astype(np.float16)
            s32, m32 = s16.astype(np.float32), m16.astype(np.float32)
            top = m32 + (2 ** bits - 1) * s32
            # a grid whose step or minimum is not an fp16, or whose top code would lie
            # beyond ±MAX_WEIGHT (what `check` refuses), is not a candidate for that group
            usable = np.isfinite(top) & (np.abs(m32) <= MAX_WEIGHT) & (np.abs(top) <= MAX_WEIGHT)
        s16, m16 = np.where(usable, s16, 0), np.where(usable, m16, 0)
        u = _codes(w3, s16, m16, bits)
        err = ((m16[..., None].astype(np.float32) + u * s16[..., None].astype(np.float32)
                - w3) ** 2).sum(axis=2)
        err[~usable] = np.inf
        if best is None:
            best = [err, u, s16, m16]
            continue
        better = err < best[0]
        best[0] = np.where(better, err, best[0])
        best[1] = np.where(better[..., None], u, best[1])
        best[2] = np.where(better, s16, best[2])
        best[3] = np.where(better, m16, best[3])
    if np.isinf(best[0]).any():
        row, g = map(int, np.argwhere(np.isinf(best[0]))[0])
        raise ValueError(f"row {row}'s group {g} spans {w3[row, g].min():g} .. "
                         f"{w3[row, g].max():g}: no grid with an fp16 step and minimum keeps "
                         f"it within ±{MAX_WEIGHT:g}")
    return best[1], best[2], best[3]


def quantize(matrix: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """fp32 [rows, cols] -> (codes uint8 [rows, cols], steps fp16 [rows, G], minima fp16
    [rows, G]); ValueError if a weight is not finite or a step or minimum overflows fp16."""
    if bits not in QUANT_BITS:
        raise ValueError(f"bitwidth {bits} is not packed by the group scheme; use one of "
                         f"{QUANT_BITS}")
    w = np.asarray(matrix, dtype=np.float32)
    rows, cols = w.shape
    if not np.isfinite(w).all():
        raise ValueError("the block holds a NaN or an infinity")
    G = _groups(cols)
    codes = np.empty((rows, cols), np.uint8)
    steps, lows = np.empty((rows, G), np.float16), np.empty((rows, G), np.float16)
    for r0 in range(0, rows, ROWS_PER_PASS):
        r1 = min(rows, r0 + ROWS_PER_PASS)
        for a, b, ga, gb in _parts(cols):
            u, s16, m16 = _fit(w[r0:r1, a:b].reshape(r1 - r0, gb - ga, -1), bits)
            codes[r0:r1, a:b] = u.reshape(r1 - r0, b - a)
            steps[r0:r1, ga:gb], lows[r0:r1, ga:gb] = s16, m16
    return codes, steps, lows


def dequantize_np(codes: np.ndarray, steps: np.ndarray, lows: np.ndarray) -> np.ndarray:
    """The reference reconstruction m + u * s, fp32 [rows, cols]."""
    rows, cols = codes.shape
    out = np.empty((rows, cols), np.float32)
    for a, b, ga, gb in _parts(cols):
        u = codes[:, a:b].astype(np.float32).reshape(rows, gb - ga, -1)
        out[:, a:b] = (lows[:, ga:gb].astype(np.float32)[..., None]
                       + u * steps[:, ga:gb].astype(np.float32)[..., None]).reshape(rows, b - a)
    return out


def _side_views(rows: int, G: int):
    """A function cutting, from a DecodeWork's fp32 values (None: fresh tensors), the views
    one decode of `rows` rows of G groups writes: their side data widened as stored [rows,
    2G], and its steps and minima each contiguous ([rows, G], and as [rows, G, 1])."""
    def make(work):
        buf = take(work and work.values, 4 * rows * G, torch.float32)
        wide = buf[:2 * rows * G].view(rows, 2 * G)
        steps, lows = buf[2 * rows * G:].view(2, rows, G)
        return (wide, wide[:, :G], wide[:, G:], steps, lows, steps.view(rows, G, 1),
                lows.view(rows, G, 1))
    return make


def decode_rows(out: torch.Tensor, codes: torch.Tensor, side: torch.Tensor, bits: int,
                work: DecodeWork | None = None) -> torch.Tensor:
    """Rows of a block into `out` (a view of rows * cols elements whose last dimension is
    cols): `codes` uint8 [rows, code bytes], `side` uint8 [rows, 4G] (their steps then
    minima, fp16). With `work`, allocation-free (the widened side data in its fp32 values,
    after the codes are out of them). The steps and minima are made contiguous before the
    affine step: broadcast from the widened rows (a row stride of 2G) each pass took 3x
    as long (15 against 4-5 us on a [576, 128] block)."""
    rows, cols = codes.shape[0], out.shape[-1]
    G = _groups(cols)
    uniform.codes_into(out, codes[:, :uniform.row_bytes(cols, bits)], bits, work)
    make = _side_views(rows, G)
    wide, wide_steps, wide_lows, steps, lows, steps3, lows3 = \
        make(None) if work is None else work.views(("group", rows, G), make)
    wide.copy_(side.view(torch.float16).view(rows, 2 * G))
    steps.copy_(wide_steps)
    lows.copy_(wide_lows)
    if cols % GROUP == 0 and out.is_contiguous():
        grouped = out.view(rows, G, GROUP)
        grouped.mul_(steps3).add_(lows3)  # (u * s is exact: one rounding, as m + u * s)
        return out
    lead = tuple(out.shape[:-1])
    for a, b, ga, gb in _parts(cols):
        grouped = out[..., a:b].unflatten(-1, (gb - ga, b - a) if gb - ga == 1 else
                                          (gb - ga, GROUP))
        grouped.mul_(steps[:, ga:gb].reshape(*lead, gb - ga, 1))
        grouped.add_(lows[:, ga:gb].reshape(*lead, gb - ga, 1))
    return out


@dataclass(frozen=True)
class Grouped(Scheme):
    """`elasticplan shard --scheme group`: every quantised bitwidth (2/3/4/6/8) affine per
    group of 32 weights of a row, fp16 step and minimum per group (b + 1 bits per weight)."""

    name: ClassVar[str] = "group"
    bitwidths: ClassVar[tuple[int, ...]] = QUANT_BITS + (FP32,)
    index_key: ClassVar[str] = "group"
    rowwise: ClassVar[bool] = True

    def coder(self, bits: int) -> Scheme:
        return self if bits in QUANT_BITS else uniform.UNIFORM

    def block_bytes(self, rows: int, cols: int, bits: int) -> int:
        return rows * (code_bytes(cols, bits) + side_bytes(cols))

    def row_layout(self, cols: int, bits: int) -> tuple[int, int]:
        return code_bytes(cols, bits), side_bytes(cols)

    def decode_work(self, blocks: Blocks, bits: int) -> tuple[int, ...]:
        sizes = [list(archgen.decode_work(r, c, bits)) for r, c in blocks]
        for (r, c), s in zip(blocks, sizes):
            s[2] = max(s[2], r * 4 * _groups(c))
            if self.vector_kernel(bits, c):  # (the kernel's temporaries: never above that)
                s[2] = max(s[2], groupmv.work_floats(c))
        return tuple(max(k) for k in zip(*sizes))

    def vector_kernel(self, bits: int, cols: int) -> bool:
        return groupmv.applies(bits, cols)

    def vector_rows(self, codes: torch.Tensor, side: torch.Tensor, rows: int, cols: int,
                    bits: int, work: DecodeWork) -> groupmv.GroupRows:
        return groupmv.GroupRows.of(codes, side, rows, cols, work.values)

    def encode_blocks(self, blocks: list[np.ndarray], bits: int,
                      hessians: list[np.ndarray | None]) -> bytes:
        chunks = []
        for block in blocks:
            codes, steps, lows = quantize(np.ascontiguousarray(block, dtype=np.float32), bits)
            packed = uniform.pack(codes, bits)
            if packed.shape[1] & 1:
                packed = np.pad(packed, ((0, 0), (0, 1)))
            chunks += [packed.tobytes(),
                       np.concatenate([steps, lows], axis=1).astype("<f2").tobytes()]
        return b"".join(chunks)

    def decode_rows(self, out: torch.Tensor, codes: torch.Tensor, side: torch.Tensor,
                    bits: int, work: DecodeWork | None) -> torch.Tensor:
        return decode_rows(out, codes, side, bits, work)

    def check(self, buf: np.ndarray, blocks: Blocks, bits: int) -> None:
        # finite steps >= 0 and minima; the top of every group's grid within ±MAX_WEIGHT
        pos = 0
        for i, (r, c) in enumerate(blocks):
            if r == 0 or c == 0:
                continue
            n, G = r * code_bytes(c, bits), _groups(c)
            side = np.frombuffer(buf, "<f2", r * 2 * G, pos + n).reshape(r, 2 * G)
            # in pieces of rows: a table's whole side data widened would be 7 MB of
            # temporaries, above what the executor's plan accounts while it checks
            for r0 in range(0, r, CHECK_ROWS):
                part = side[r0:r0 + CHECK_ROWS].astype(np.float32)
                steps, lows = part[:, :G], part[:, G:]
                top = lows + (2 ** bits - 1) * steps
                bad = ~(np.isfinite(steps) & np.isfinite(lows) & (steps >= 0)
                        & (np.abs(lows) <= MAX_WEIGHT) & (np.abs(top) <= MAX_WEIGHT))
                if bad.any():
                    row, g = map(int, np.argwhere(bad)[0])
                    raise ValueError(f"block {i}'s row {r0 + row}, group {g}: step "
                                     f"{steps[row, g]:g}, minimum {lows[row, g]:g} (a step "
                                     f"must be finite and >= 0, every weight within "
                                     f"±{MAX_WEIGHT:g})")
            pos += n + r * side_bytes(c)

    def build_key(self, calibration: list[str]) -> dict[str, Any]:
        return {"group": GROUP, "layout": LAYOUT, "grids": GRIDS}

    def index_entry(self, calibration: list[str]) -> dict[str, Any]:
        return {"group": GROUP, "layout": LAYOUT}

    @classmethod
    def from_index(cls, f: "Fields") -> "Grouped":
        f.integer("group", minimum=GROUP, maximum=GROUP)
        if f.string("layout") != LAYOUT:
            raise f.err("layout", "not this version's group layout (a store built by another "
                                  "version: rebuild it with elasticplan shard)")
        f.done()
        return cls()


GROUPED = Grouped()
