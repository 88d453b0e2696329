"""Dictionary quantisation with outliers (after GOBO, MICRO 2020), the second scheme beside
runtime/quant.py's uniform one: a store built with `elasticplan shard --scheme dict`
keeps its quantised shards this way (runtime/store.py); `python -m benchmarks.dictquant`
measures it against the uniform scheme on the whole model (docs/results.md).

Scheme (b in 1..8 bits), row by row of a block (rows are output channels):
- outliers: the `outliers_per_row(cols, share)` = ceil(share x cols) weights of the row
  farthest from the row's mean are kept exactly (their column index and fp32 value);
- dictionary: the other weights of a group of `group` consecutive rows (1: each row its
  own) are clustered by optimal one-dimensional k-means (kmeans1d: an exact dynamic
  programme) into 2^b centroids, kept in fp32, sorted;
- codes: each non-outlier weight is stored as the index of its nearest centroid; an
  outlier's code is 0 (overwritten when decoded).

Error bound (tested): over a group's non-outliers, the RMS error is at most
(max - min) / 2^(b+1). k-means minimises the squared error over every 2^b-level
quantiser, and the 2^b-level uniform grid of cell midpoints on [min, max] has every error
within half a cell; the outliers are exact.

Packed layout of one block [rows, cols], in order: the codes (each row a little-endian bit
stream, value k in bits [k b, (k+1) b), padded to a whole byte: ceil(cols b / 8) bytes
per row; the section zero-padded to a multiple of 4 bytes), the dictionaries
(ceil(rows / group) x 2^b fp32), the outliers' column indices (rows x n uint16,
ascending within a row; the section padded to a multiple of 4 bytes), their values
(rows x n fp32), with n = outliers_per_row(cols, share). Every section starts 4-aligned,
so the decoder views them in place. Its size depends only on the shape: `block_bytes`.

Decoding (`decode_into`, allocation-free with a DecodeWork): the codes of lcm(b, 8) bits
(G bytes) at a time are copied into 4- or 8-byte little-endian words, cut out with one
broadcast shift and mask, offset by their row group's place in the dictionaries, looked
up with one index_select, the outliers scattered over them, and the block copied into its
destination view. At 1, 2 and 4 bits, where a byte holds whole codes, a block no smaller
than its row groups' byte tables (groups x 256 x 8/b values) is decoded through them
instead: one index_select folds each dictionary into the values of every byte, and one
more looks every stored byte up (as the uniform scheme's decode does).
"""

from __future__ import annotations

import math

import numpy as np
import torch

MAX_BITS = 8
DEFAULT_OUTLIER_SHARE = 0.005  # measured: 0.1 % -> 0.5 % -> 2 % (module main)
DEFAULT_GROUP = 8  # rows per dictionary in a store (measured: 1, 8, a whole block)


def outliers_per_row(cols: int, share: float) -> int:
    return math.ceil(share * cols) if share > 0 else 0


def _ceil4(n: int) -> int:
    return -(-n // 4) * 4


def block_bytes(rows: int, cols: int, bits: int, share: float = DEFAULT_OUTLIER_SHARE,
                group: int = 1) -> int:
    n = outliers_per_row(cols, share)
    return _ceil4(rows * math.ceil(cols * bits / 8)) + -(-rows // group) * 4 * 2 ** bits + \
        _ceil4(2 * rows * n) + 4 * rows * n


def _words(bits: int) -> tuple[int, int, int]:
    """(G bytes of whole codes, word bytes P >= G holding them, codes per word)."""
    G = bits // math.gcd(bits, 8)
    return G, (1 if G == 1 else 4 if G <= 3 else 8), 8 * G // bits


def decode_work(rows: int, cols: int, bits: int, share: float = DEFAULT_OUTLIER_SHARE
                ) -> tuple[int, int, int, int, int]:
    """Elements of the decode workspace for one block, in DecodeWork's order: (int32
    words, int32 codes, fp32 values, uint8 padded bytes / 4 rounded up, int64 outlier
    indices). Words of 8 bytes (5 and 7 bits) count twice."""
    G, P, per = _words(bits)
    groups = -(-cols // per)
    words = rows * groups * (2 if P == 8 else 1)
    codes = rows * groups * per
    return words, codes * (2 if P == 8 else 1), codes, \
        -(-rows * groups * P // 4) if P > 1 else 0, rows * outliers_per_row(cols, share)


def error_bound(matrix: np.ndarray, bits: int, share: float = DEFAULT_OUTLIER_SHARE,
                group: int = 1) -> np.ndarray:
    """Per group of rows, the bound on the RMS error over its non-outliers:
    (max - min) / 2^(b+1)."""
    keep = ~_outlier_mask(np.asarray(matrix, dtype=np.float64), share)
    w = np.where(keep, matrix, np.nan)
    return np.array([(np.nanmax(w[r:r + group]) - np.nanmin(w[r:r + group]))
                     for r in range(0, w.shape[0], group)]) / 2.0 ** (bits + 1)


def _check(bits: int, cols: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"dictionary bitwidths are 1..{MAX_BITS}, got {bits}")
    if cols > 65535:
        raise ValueError(f"{cols} columns: outlier indices are uint16")


def _outlier_mask(w: np.ndarray, share: float) -> np.ndarray:
    n = outliers_per_row(w.shape[1], share)
    mask = np.zeros(w.shape, dtype=bool)
    if n:
        far = np.argpartition(-np.abs(w - w.mean(axis=1, keepdims=True)), n - 1, axis=1)[:, :n]
        np.put_along_axis(mask, far, True, axis=1)
    return mask


def quantize(matrix: np.ndarray, bits: int, share: float = DEFAULT_OUTLIER_SHARE,
             group: int = 1, hessian: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """fp32 [rows, cols] -> (codes uint8 [rows, cols], dictionaries fp32
    [ceil(rows / group), 2^b], outlier columns uint16 [rows, n], outlier values fp32
    [rows, n]). With `hessian` (the block's X^T X, runtime/gptq.py) the codes are chosen
    with error compensation and the outliers keep their compensated values; without, each
    weight takes its nearest centroid."""
    import kmeans1d

    w = np.asarray(matrix, dtype=np.float64)
    rows, cols = w.shape
    _check(bits, cols)
    k = 2 ** bits
    mask = _outlier_mask(w, share)
    n = outliers_per_row(cols, share)
    codes = np.zeros((rows, cols), dtype=np.uint8)
    dicts = np.zeros((-(-rows // group), k), dtype=np.float32)
    out_cols = np.zeros((rows, n), dtype=np.uint16)
    out_vals = np.zeros((rows, n), dtype=np.float32)
    for g in range(dicts.shape[0]):
        rs = slice(g * group, (g + 1) * group)
        keep = w[rs][~mask[rs]]
        if keep.size:
            # kmeans1d needs at least k points: repeat the group's own values if fewer
            points = keep if keep.size >= k else np.resize(keep, k)
            _, centroids = kmeans1d.cluster(points, k)
            c = np.sort(np.asarray(centroids, dtype=np.float32))
            dicts[g] = c
            mid = (c[1:].astype(np.float64) + c[:-1]) / 2
            block = codes[rs]
            block[~mask[rs]] = np.searchsorted(mid, keep)
    if hessian is not None:
        from runtime.gptq import compensate

        table = np.repeat(dicts, group, axis=0)[:rows].astype(np.float64)
        mids = (table[:, 1:] + table[:, :-1]) / 2
        r = np.arange(rows)

        def choose(col: np.ndarray, j: int) -> np.ndarray:
            idx = (col[:, None] > mids).sum(axis=1)  # the nearest centroid (sorted)
            codes[:, j] = np.where(mask[:, j], 0, idx)
            return np.where(mask[:, j], col, table[r, idx])  # an outlier: exact

        w = compensate(w, hessian, choose)
    for r in range(rows):
        idx = np.flatnonzero(mask[r])
        out_cols[r] = idx
        out_vals[r] = w[r, idx]
    return codes, dicts, out_cols, out_vals


def dequantize_np(codes: np.ndarray, dicts: np.ndarray, out_cols: np.ndarray,
                  out_vals: np.ndarray, group: int = 1) -> np.ndarray:
    rows = np.repeat(dicts, group, axis=0)[:codes.shape[0]]
    out = np.take_along_axis(rows, codes.astype(np.int64), axis=1)
    np.put_along_axis(out, out_cols.astype(np.int64), out_vals, axis=1)
    return out.astype(np.float32)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes uint8 [rows, cols] < 2^b -> [rows, ceil(cols b / 8)] uint8, little-endian bits."""
    rows, cols = codes.shape
    bitplanes = np.unpackbits(codes[:, :, None], axis=2, bitorder="little")[:, :, :bits]
    stream = bitplanes.reshape(rows, cols * bits)
    return np.packbits(stream, axis=1, bitorder="little")


def encode_block(matrix: np.ndarray, bits: int, share: float = DEFAULT_OUTLIER_SHARE,
                 group: int = 1, hessian: np.ndarray | None = None) -> bytes:
    codes, dicts, out_cols, out_vals = quantize(matrix, bits, share, group, hessian)
    packed = pack_codes(codes, bits).tobytes()
    idx = out_cols.astype("<u2").tobytes()
    return b"".join([packed, bytes(_ceil4(len(packed)) - len(packed)),
                     dicts.astype("<f4").tobytes(), idx, bytes(_ceil4(len(idx)) - len(idx)),
                     out_vals.astype("<f4").tobytes()])


def parse_block(raw: bytes, rows: int, cols: int, bits: int,
                share: float = DEFAULT_OUTLIER_SHARE, group: int = 1
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The packed block back to (codes, dictionaries, outlier columns, outlier values),
    with numpy: the reference the torch decoder is tested against."""
    n, k, row_bytes = outliers_per_row(cols, share), 2 ** bits, math.ceil(cols * bits / 8)
    packed = np.frombuffer(raw, np.uint8, rows * row_bytes).reshape(rows, row_bytes)
    stream = np.unpackbits(packed, axis=1, bitorder="little")[:, :cols * bits]
    codes = (stream.reshape(rows, cols, bits).astype(np.int64) << np.arange(bits)).sum(axis=2)
    pos = _ceil4(rows * row_bytes)
    groups = -(-rows // group)
    dicts = np.frombuffer(raw, "<f4", groups * k, pos).reshape(groups, k)
    pos += 4 * groups * k
    out_cols = np.frombuffer(raw, "<u2", rows * n, pos).reshape(rows, n)
    pos += _ceil4(2 * rows * n)
    out_vals = np.frombuffer(raw, "<f4", rows * n, pos).reshape(rows, n)
    return codes.astype(np.uint8), dicts, out_cols, out_vals


_OFFSETS: dict[tuple[int, int, int, int], torch.Tensor] = {}
_SHIFTS: dict[int, torch.Tensor] = {}
_TABLES: dict[tuple[int, int, int], torch.Tensor] = {}
_BYTE_OFFSETS: dict[tuple[int, int], torch.Tensor] = {}


def decode_into(out: torch.Tensor, buf: torch.Tensor, rows: int, cols: int, bits: int,
                share: float = DEFAULT_OUTLIER_SHARE, group: int = 1, work=None) -> None:
    """Decode one packed block (uint8 tensor `buf`, exactly block_bytes long) into `out`,
    any view of rows x cols elements whose last dimension is cols. With `work` (a
    runtime.quant.DecodeWork sized by decode_work) nothing is allocated but two small
    per-shape constants, cached."""
    from runtime.quant import take

    if buf.numel() != block_bytes(rows, cols, bits, share, group):
        raise ValueError(f"a {rows}x{cols} block at {bits} bits is "
                         f"{block_bytes(rows, cols, bits, share, group)} bytes, got {buf.numel()}")
    G, P, per = _words(bits)
    n, k, row_bytes = outliers_per_row(cols, share), 2 ** bits, math.ceil(cols * bits / 8)
    groups = -(-cols // per)
    width = groups * per
    # the codes, G bytes at a time, as little-endian words of P bytes
    packed = buf[:rows * row_bytes].view(rows, row_bytes)
    wtype = torch.int64 if P == 8 else torch.int32
    if P == 1:
        words = take(work and work.packed, rows * groups, torch.int32).view(rows, groups)
        words.copy_(packed)
    else:
        pad = take(work and work.bytes, rows * groups * P, torch.uint8).view(rows, groups, P)
        pad.zero_()
        if groups * G == row_bytes:
            pad[..., :G].copy_(packed.view(rows, groups, G))
        else:  # the last group is short: byte j of every group, then zeros
            for j in range(G):
                pad[:, :len(range(j, row_bytes, G)), j].copy_(packed[:, j::G])
        words = pad.view(wtype).view(rows, groups)
    pos = _ceil4(rows * row_bytes)
    n_groups = -(-rows // group)
    dicts = buf[pos:pos + 4 * n_groups * k].view(torch.float32)
    pos += 4 * n_groups * k
    values = take(work and work.values, rows * width, torch.float32)
    if P == 1 and per > 1 and n_groups * 256 * per <= rows * width:
        # a byte holds whole codes: each row group's dictionary folded into a table of the
        # values of every byte (no larger than the block), looked up one byte at a time
        key = (bits, n_groups, k)
        if key not in _TABLES:
            chunk = torch.arange(256, dtype=torch.int32)
            codes = (chunk[:, None] >> (torch.arange(per, dtype=torch.int32) * bits)) & (k - 1)
            _TABLES[key] = (torch.arange(n_groups, dtype=torch.int32).view(-1, 1, 1) * k +
                            codes).view(-1)
        table = take(work and work.indices.view(torch.float32), n_groups * 256 * per,
                     torch.float32)
        torch.index_select(dicts, 0, _TABLES[key], out=table)
        if (rows, group) not in _BYTE_OFFSETS:
            _BYTE_OFFSETS[rows, group] = (torch.arange(rows, dtype=torch.int32) // group *
                                          256).view(rows, 1)
        words.add_(_BYTE_OFFSETS[rows, group])
        torch.index_select(table.view(-1, per), 0, words.view(-1), out=values.view(-1, per))
    else:
        codes = take(work and (work.indices.view(torch.int64) if P == 8 else work.indices),
                     rows * width, wtype).view(rows, groups, per)
        if bits not in _SHIFTS:
            _SHIFTS[bits] = torch.arange(per, dtype=torch.int64) * bits
        torch.bitwise_right_shift(words.unsqueeze(-1), _SHIFTS[bits].to(wtype), out=codes)
        codes.bitwise_and_(k - 1)
        key = (rows, group, k, width)
        if key not in _OFFSETS:  # each row's dictionary: its group's place in the table
            _OFFSETS[key] = (torch.arange(rows) // group * k).to(wtype).view(rows, 1)
        flat = codes.view(rows, width)
        flat.add_(_OFFSETS[key])
        torch.index_select(dicts, 0, flat.view(-1), out=values)
    values = values.view(rows, width)
    if n:
        idx = take(work and work.longs, rows * n, torch.int64).view(rows, n)
        idx.copy_(buf[pos:pos + 2 * rows * n].view(torch.int16).view(rows, n))
        if cols > 32767:
            idx.bitwise_and_(0xFFFF)
        pos += _ceil4(2 * rows * n)
        values.scatter_(1, idx, buf[pos:pos + 4 * rows * n].view(torch.float32).view(rows, n))
    src = values[:, :cols]
    out.copy_(src.unflatten(0, out.shape[:-1]) if out.dim() > 2 else src)


def decode_block(raw: bytes | memoryview, rows: int, cols: int, bits: int,
                 share: float = DEFAULT_OUTLIER_SHARE, group: int = 1) -> torch.Tensor:
    """The fp32 block [rows, cols] from its packed bytes (the layout above)."""
    expected = block_bytes(rows, cols, bits, share, group)
    if len(raw) != expected:
        raise ValueError(f"a {rows}x{cols} block at {bits} bits is {expected} bytes, got "
                         f"{len(raw)}")
    buf = torch.frombuffer(bytearray(raw) if isinstance(raw, bytes) else raw, dtype=torch.uint8)
    out = torch.empty(rows, cols)
    decode_into(out, buf, rows, cols, bits, share, group)
    return out
