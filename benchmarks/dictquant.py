"""The dictionary scheme (runtime/schemes/dictionary.py) against the uniform one, block by block and
on the whole model, over its parameters (bitwidth, outlier share, rounding):

    python -m benchmarks.dictquant [--bits 2,3,4] [--shares 0,0.005,0.02] [--compensate]
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

from runtime.schemes.dictionary import (
    block_bytes,
    dequantize_np,
    quantize,
)


def time_decode(bits_list: list[int], repeats: int = 500) -> int:
    """Per shard, as the executor decodes it (runtime.store.decode_into: both blocks and the
    bias into a scratch matrix, the output block through a transposed view, with the
    store's preallocated DecodeWork): MiniLM's layer-0 head0 and ffn0, in the dictionary
    scheme (0.5 % outliers, nearest rounding) and the uniform one, alternated in rounds of
    `repeats` decodes (benchmarks.common.time_alternated: the median round of 9)."""
    from benchmarks.common import time_alternated
    from runtime.families.encoder import Slot, load_hf_tensors, model_dir, shard_from_hf
    from runtime.schemes.base import DecodeWork
    from runtime.schemes.dictionary import Dictionary
    from runtime.schemes.uniform import UNIFORM
    from runtime.sources.checkpoint import packaged
    from runtime.store import Variant, encode_variant
    from runtime.store import decode_into as decode_variant

    tensors = load_hf_tensors(model_dir())
    c = packaged().config
    print(f"{'shard':>6} {'bits':>4} {'dictionary ms':>13} {'uniform ms':>10} {'ratio':>6}")
    for name in ("head0", "ffn0"):
        m, b = shard_from_hf(tensors, c, 0, name)
        k = c.shard_in_rows(name)
        scratch = torch.empty(m.size + b.size)
        w = scratch[:m.size].view(*m.shape)
        slot = Slot(w[:k], w[k:].t(), scratch[m.size:])
        for bits in bits_list:
            calls = []
            for scheme in (Dictionary(), UNIFORM):
                if scheme.coder(bits) != scheme or bits not in scheme.bitwidths:
                    continue
                raw = encode_variant(scheme, m, k, b, bits)
                v = Variant(0, name, bits, "-", 0, len(raw), *m.shape, k, b.size, "-", scheme)
                work = DecodeWork(*scheme.decode_work(tuple(v.blocks()), bits))
                view = memoryview(bytearray(raw))
                calls.append(lambda v=v, view=view, work=work: decode_variant(v, view, slot,
                                                                              work))
            ms = time_alternated(calls, repeats)
            uniform = f"{ms[1]:>10.3f} {ms[0] / ms[1]:>6.2f}" if len(ms) > 1 else \
                f"{'-':>10} {'-':>6}"
            print(f"{name:>6} {bits:>4} {ms[0]:>13.3f} {uniform}", flush=True)
    return 0


def main(argv=None) -> int:
    """Whole-model fidelity of MiniLM with every shard's blocks at one bitwidth, uniform
    (runtime/schemes/uniform.py) against dictionary with outliers, on the first --texts test tweets."""
    import time

    from runtime.families.encoder import LayerWeights, load_hf_tensors, model_dir, shard_from_hf
    from runtime.schemes import uniform
    from runtime.schemes.uniform import UNIFORM
    from runtime.sources.task import load_splits
    from runtime.store import ShardStore

    ap = argparse.ArgumentParser(prog="python -m benchmarks.dictquant", description=main.__doc__)
    ap.add_argument("--store", default="build/shards/minilm-l6")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--shares", default="0,0.005,0.02", help="outlier shares")
    ap.add_argument("--texts", type=int, default=300)
    ap.add_argument("--compensate", action="store_true",
                    help="also each dictionary configuration with error-compensated rounding "
                         "(runtime/schemes/gptq.py, on the first 512 train tweets), as the store does")
    ap.add_argument("--time-decode", action="store_true",
                    help="instead: time decoding a head and an FFN slice as the executor "
                         "does, this scheme against the uniform one, side by side")
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
        from runtime.schemes import gptq
        from runtime.sources.checkpoint import ReferenceModel

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
        def per_row(x, h, bits=bits):
            codes, scales = uniform.quantize(x, bits)
            return uniform.dequantize_np(codes, scales, bits), UNIFORM.block_bytes(*x.shape, bits)

        runs = [("uniform per row", per_row)]
        for share in (float(s) for s in a.shares.split(",")):
            def dictionary(x, h, bits=bits, share=share, use=False):
                q = dequantize_np(*quantize(x, bits, share, h if use else None))
                return q, block_bytes(*x.shape, bits, share)
            runs.append((f"dict, {share:.1%} outliers", dictionary))
            if H:
                runs.append((f"dict, {share:.1%}, compensated",
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
