"""The dictionary scheme (runtime/dictquant.py) against the uniform one, block by block and
on the whole model, over its parameters (bitwidth, outlier share, rows per dictionary):

    python -m benchmarks.dictquant [--bits 2,3,4] [--shares 0,0.005,0.02] [--groups 1,8,10000]
    python -m benchmarks.dictquant --time-decode [--bits 2,3,4,5,6,8]

The first quantises every block of every shard in memory and runs MiniLM on the first
--texts test tweets (fidelity and stored bytes per configuration); the second times one
decode of each MiniLM block shape, both schemes side by side. The stores' own comparison
is benchmarks.quant_schemes.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from runtime.dictquant import (
    DEFAULT_GROUP,
    DEFAULT_OUTLIER_SHARE,
    block_bytes,
    decode_into,
    decode_work,
    dequantize_np,
    encode_block,
    quantize,
)


def time_decode(bits_list: list[int], repeats: int = 300, share: float = DEFAULT_OUTLIER_SHARE,
                group: int = DEFAULT_GROUP) -> int:
    """The mean time of `repeats` decodes after 20 warm-up ones, one torch thread, of
    decoding a random block of each MiniLM block shape into a strided destination (as the
    executor does), with preallocated workspaces: head in [96, 384], head out [384, 32],
    FFN in [128, 384], FFN out [384, 128]; this scheme (the store's: per `group` rows,
    `share` outliers) beside the uniform one."""
    import time

    from runtime import quant

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    print(f"{'block':>9} {'bits':>4} {'dictionary ms':>13} {'uniform ms':>10} {'ratio':>6}")
    for rows, cols in ((96, 384), (384, 32), (128, 384), (384, 128)):
        m = rng.normal(size=(rows, cols)).astype(np.float32)
        out = torch.empty(cols, rows).t()  # a transposed view, as an output block's slot
        for bits in bits_list:
            raw = torch.frombuffer(bytearray(encode_block(m, bits, share, group)),
                                   dtype=torch.uint8)
            work = quant.DecodeWork(*decode_work(rows, cols, bits, share))
            timings = [lambda: decode_into(out, raw, rows, cols, bits, share, group, work)]
            if bits in quant.QUANT_BITS:
                from elasticplan.archgen import decode_work as uniform_work

                codes, scales = quant.quantize(m, bits)
                packed, sc = torch.from_numpy(quant.pack(codes, bits)), torch.from_numpy(scales)
                uwork = quant.DecodeWork(*uniform_work(rows, cols, bits))
                timings.append(lambda: quant.dequantize_into(out, packed, sc, bits, uwork))
            ms = []
            for fn in timings:
                for _ in range(20):
                    fn()
                t0 = time.perf_counter()
                for _ in range(repeats):
                    fn()
                ms.append((time.perf_counter() - t0) / repeats * 1e3)
            uniform = f"{ms[1]:>10.3f} {ms[0] / ms[1]:>6.2f}" if len(ms) > 1 else f"{'-':>10} {'-':>6}"
            print(f"{rows:>4}x{cols:<4} {bits:>4} {ms[0]:>13.3f} {uniform}", flush=True)
    return 0


def main(argv=None) -> int:
    """Whole-model fidelity of MiniLM with every shard's blocks at one bitwidth, uniform
    (runtime/quant.py) against dictionary with outliers, on the first --texts test tweets."""
    import time

    from runtime import quant
    from runtime.model import LayerWeights, load_hf_tensors, model_dir, shard_from_hf
    from runtime.store import UNIFORM, ShardStore
    from runtime.task import load_splits

    ap = argparse.ArgumentParser(prog="python -m benchmarks.dictquant", description=main.__doc__)
    ap.add_argument("--store", default="build/shards/minilm-l6")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--shares", default="0,0.005,0.02", help="outlier shares")
    ap.add_argument("--groups", default="1,8,10000", help="rows per dictionary (10000: a block)")
    ap.add_argument("--texts", type=int, default=300)
    ap.add_argument("--compensate", action="store_true",
                    help="also each dictionary configuration with error-compensated rounding "
                         "(runtime/gptq.py, on the first 512 train tweets), as the store does")
    ap.add_argument("--time-decode", action="store_true",
                    help="instead: time decoding one block of each MiniLM shape, this scheme "
                         "(per 8 rows, no outliers) against the uniform one, side by side")
    a = ap.parse_args(argv)
    from benchmarks.common import start

    start("benchmarks.dictquant", argv)
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

    H = None
    if a.compensate:
        from runtime import gptq
        from runtime.checkpoint import ReferenceModel

        H = gptq.hessians(ReferenceModel(), list(
            load_splits().train.texts[:gptq.CALIBRATION_TEXTS]))

    def embed(round_trip) -> tuple[torch.Tensor, int]:
        layers, stored = [], 0
        for l in range(c.layers):
            w = LayerWeights(c, names)
            for n in names:
                m, b = shards[l, n]
                n_in = c.shard_in_rows(n)
                blocks = []
                hs = gptq.shard_hessians(H, l, n) if H else (None, None)
                for block, h in zip((m[:n_in], np.ascontiguousarray(m[n_in:].T)), hs):
                    q, size = round_trip(block, h)
                    blocks.append(q)
                    stored += size
                w.put(n, torch.from_numpy(np.concatenate([blocks[0], blocks[1].T])),
                      torch.from_numpy(b))
            layers.append(w)
        with torch.inference_mode():
            return torch.cat([enc.forward(bt.ids, bt.mask, layers) for bt in batches]), stored

    ref, _ = embed(lambda x, h: (x, 4 * x.size))
    print(f"{'bits':>4} {'scheme':<28} {'fidelity':>8} {'weights MB':>10} {'s':>5}")
    for bits in (int(b) for b in a.bits.split(",")):
        def uniform(x, h, bits=bits):
            codes, scales = quant.quantize(x, bits)
            return quant.dequantize_np(codes, scales, bits), UNIFORM.block_bytes(*x.shape, bits)

        runs = [("uniform per row", uniform)]
        for group in (int(g) for g in a.groups.split(",")):
            for share in (float(s) for s in a.shares.split(",")):
                def dictionary(x, h, bits=bits, share=share, group=group, use=False):
                    q = dequantize_np(*quantize(x, bits, share, group, h if use else None),
                                      group)
                    return q, block_bytes(*x.shape, bits, share, group)
                rows = "block" if group >= 10000 else f"{group} rows"
                runs.append((f"dict/{rows}, {share:.1%} outl.", dictionary))
                if H:
                    runs.append((f"dict/{rows}, {share:.1%}, compens.",
                                 lambda x, h, f=dictionary: f(x, h, use=True)))
        for label, fn in runs:
            t0 = time.monotonic()
            e, stored = embed(fn)
            fid = float((e * ref).sum(1).mean())
            print(f"{bits:>4} {label:<28} {fid:>8.4f} {stored / 1e6:>10.2f} "
                  f"{time.monotonic() - t0:>5.0f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
