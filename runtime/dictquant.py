"""Dictionary quantisation with outliers (after GOBO, MICRO 2020), the second scheme beside
runtime/quant.py's uniform one. Not yet a stored scheme: `python -m runtime.dictquant`
measures it against the uniform scheme on the whole model (docs/runtime.md).

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
per row), the dictionaries (ceil(rows / group) x 2^b fp32), the outliers' column
indices (rows x n uint16, ascending within a row), their values (rows x n fp32), with
n = outliers_per_row(cols, share). Its size depends only on the shape: `block_bytes`.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

MAX_BITS = 8
DEFAULT_OUTLIER_SHARE = 0.005  # measured: 0.1 % -> 0.5 % -> 2 % (module main)


def outliers_per_row(cols: int, share: float) -> int:
    return math.ceil(share * cols) if share > 0 else 0


def block_bytes(rows: int, cols: int, bits: int, share: float = DEFAULT_OUTLIER_SHARE,
                group: int = 1) -> int:
    n = outliers_per_row(cols, share)
    return rows * (math.ceil(cols * bits / 8) + 6 * n) + -(-rows // group) * 4 * 2 ** bits


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
             group: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """fp32 [rows, cols] -> (codes uint8 [rows, cols], dictionaries fp32
    [ceil(rows / group), 2^b], outlier columns uint16 [rows, n], outlier values fp32
    [rows, n])."""
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


def unpack_codes(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """[rows, ceil(cols b / 8)] uint8 -> codes int64 [rows, cols] (torch, for decoding).
    Whole codes fill lcm(b, 8) bits = G bytes (G = b / gcd(b, 8) <= 7, so a group fits
    an int64): each group is assembled from its G bytes, then its 8 G / b codes are cut
    out with one shift and mask each: G + 8 G / b vector operations a block, about as
    many as the uniform scheme's lookup-table decode."""
    rows, nbytes = packed.shape
    G = bits // math.gcd(bits, 8)
    per = 8 * G // bits
    groups = -(-cols // per)
    if groups * G != nbytes:
        full = torch.zeros(rows, groups * G, dtype=torch.uint8)
        full[:, :nbytes] = packed
        packed = full
    b = packed.view(rows, groups, G).to(torch.int64)
    g = b[..., 0].clone()
    for i in range(1, G):
        g |= b[..., i] << (8 * i)
    codes = torch.empty(rows, groups, per, dtype=torch.int64)
    mask = (1 << bits) - 1
    for k in range(per):
        torch.bitwise_and(g >> (k * bits), mask, out=codes[..., k])
    return codes.view(rows, groups * per)[:, :cols]


def encode_block(matrix: np.ndarray, bits: int, share: float = DEFAULT_OUTLIER_SHARE,
                 group: int = 1) -> bytes:
    codes, dicts, out_cols, out_vals = quantize(matrix, bits, share, group)
    return b"".join([pack_codes(codes, bits).tobytes(), dicts.astype("<f4").tobytes(),
                     out_cols.astype("<u2").tobytes(), out_vals.astype("<f4").tobytes()])


def decode_block(raw: bytes | memoryview, rows: int, cols: int, bits: int,
                 share: float = DEFAULT_OUTLIER_SHARE, group: int = 1) -> torch.Tensor:
    """The fp32 block [rows, cols] from its packed bytes (the layout above)."""
    expected = block_bytes(rows, cols, bits, share, group)
    if len(raw) != expected:
        raise ValueError(f"a {rows}x{cols} block at {bits} bits is {expected} bytes, got "
                         f"{len(raw)}")
    buf = torch.frombuffer(bytearray(raw) if isinstance(raw, bytes) else raw, dtype=torch.uint8)
    n, k, row_bytes = outliers_per_row(cols, share), 2 ** bits, math.ceil(cols * bits / 8)
    pos = rows * row_bytes
    codes = unpack_codes(buf[:pos].view(rows, row_bytes), bits, cols)
    groups = -(-rows // group)
    dicts = buf[pos:pos + 4 * groups * k].view(torch.float32).view(groups, k)
    dicts = dicts.repeat_interleave(group, dim=0)[:rows]
    pos += 4 * groups * k
    out_cols = buf[pos:pos + 2 * rows * n].view(torch.int16).view(rows, n).to(torch.int64) & 0xFFFF
    pos += 2 * rows * n
    out_vals = buf[pos:pos + 4 * rows * n].view(torch.float32).view(rows, n)
    out = torch.gather(dicts, 1, codes)
    out.scatter_(1, out_cols, out_vals)
    return out


def time_decode(bits_list: list[int], repeats: int = 300) -> int:
    """The mean time of `repeats` decodes after 20 warm-up ones, one torch thread, of
    decoding a random block of each MiniLM block shape: head in [96, 384], head out
    [384, 32], FFN in [128, 384], FFN out [384, 128]."""
    import time

    from runtime import quant

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    print(f"{'block':>9} {'bits':>4} {'dictionary ms':>13} {'uniform ms':>10} {'ratio':>6}")
    for rows, cols in ((96, 384), (384, 32), (128, 384), (384, 128)):
        m = rng.normal(size=(rows, cols)).astype(np.float32)
        for bits in bits_list:
            raw = memoryview(bytearray(encode_block(m, bits, 0.0, 8)))
            timings = [lambda: decode_block(raw, rows, cols, bits, 0.0, 8)]
            if bits in quant.QUANT_BITS:
                codes, scales = quant.quantize(m, bits)
                packed, sc = torch.from_numpy(quant.pack(codes, bits)), torch.from_numpy(scales)
                out = torch.empty(rows, cols)
                timings.append(lambda: quant.dequantize_into(out, packed, sc, bits))
            ms = []
            for fn in timings:
                for _ in range(20):
                    fn()
                t0 = time.perf_counter()
                for _ in range(repeats):
                    fn()
                ms.append((time.perf_counter() - t0) / repeats * 1e3)
            uniform = f"{ms[1]:>10.3f} {ms[0] / ms[1]:>6.2f}" if len(ms) > 1 else f"{'-':>10} {'-':>6}"
            print(f"{rows:>4}x{cols:<4} {bits:>4} {ms[0]:>13.3f} {uniform}")
    return 0


def main(argv=None) -> int:
    """Whole-model fidelity of MiniLM with every shard's blocks at one bitwidth, uniform
    (runtime/quant.py) against dictionary with outliers, on the first --texts test tweets."""
    import time

    from runtime import quant
    from runtime.model import LayerWeights, load_hf_tensors, model_dir, shard_from_hf
    from runtime.store import ShardStore
    from runtime.store import block_bytes as uniform_bytes
    from runtime.task import load_splits

    ap = argparse.ArgumentParser(prog="python -m runtime.dictquant", description=main.__doc__)
    ap.add_argument("--store", default="build/shards/minilm-l6")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--shares", default="0,0.005,0.02", help="outlier shares")
    ap.add_argument("--groups", default="1,8,10000", help="rows per dictionary (10000: a block)")
    ap.add_argument("--texts", type=int, default=300)
    ap.add_argument("--time-decode", action="store_true",
                    help="instead: time decoding one block of each MiniLM shape, this scheme "
                         "(per 8 rows, no outliers) against the uniform one, side by side")
    a = ap.parse_args(argv)
    if a.time_decode:
        return time_decode([int(b) for b in a.bits.split(",")])
    store = ShardStore(a.store)
    c = store.config
    tensors = load_hf_tensors(model_dir())
    enc = store.encoder()
    texts = list(load_splits().test.texts[:a.texts])
    tok = store.tokenizer(128)
    batches = [tok(texts[i:i + 50], pad_to=128) for i in range(0, len(texts), 50)]
    names = c.shard_names()
    shards = {(l, n): shard_from_hf(tensors, c, l, n) for l in range(c.layers) for n in names}

    def embed(round_trip) -> tuple[torch.Tensor, int]:
        layers, stored = [], 0
        for l in range(c.layers):
            w = LayerWeights(c, names)
            for n in names:
                m, b = shards[l, n]
                n_in = c.shard_in_rows(n)
                blocks = []
                for block in (m[:n_in], np.ascontiguousarray(m[n_in:].T)):
                    q, size = round_trip(block)
                    blocks.append(q)
                    stored += size
                w.put(n, torch.from_numpy(np.concatenate([blocks[0], blocks[1].T])),
                      torch.from_numpy(b))
            layers.append(w)
        with torch.inference_mode():
            return torch.cat([enc.forward(bt.ids, bt.mask, layers) for bt in batches]), stored

    ref, _ = embed(lambda x: (x, 4 * x.size))
    print(f"{'bits':>4} {'scheme':<28} {'fidelity':>8} {'weights MB':>10} {'s':>5}")
    for bits in (int(b) for b in a.bits.split(",")):
        def uniform(x, bits=bits):
            codes, scales = quant.quantize(x, bits)
            return quant.dequantize_np(codes, scales, bits), uniform_bytes(*x.shape, bits)

        runs = [("uniform per row", uniform)]
        for group in (int(g) for g in a.groups.split(",")):
            for share in (float(s) for s in a.shares.split(",")):
                def dictionary(x, bits=bits, share=share, group=group):
                    q = dequantize_np(*quantize(x, bits, share, group), group)
                    return q, block_bytes(*x.shape, bits, share, group)
                rows = "block" if group >= 10000 else f"{group} rows"
                runs.append((f"dict/{rows}, {share:.1%} outl.", dictionary))
        for label, fn in runs:
            t0 = time.monotonic()
            e, stored = embed(fn)
            fid = float((e * ref).sum(1).mean())
            print(f"{bits:>4} {label:<28} {fid:>8.4f} {stored / 1e6:>10.2f} "
                  f"{time.monotonic() - t0:>5.0f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
