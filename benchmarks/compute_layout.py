"""Fused layer vs shard by shard: what each compute layout costs in time and memory.

    python -m benchmarks.compute_layout [--repeat N]

The same full-precision and 8-bit MiniLM layers, one query at the profiled seq_len, one
torch thread, both layouts in the same run (interleaved, median of N):
- fused: every shard of the layer decoded into one fused fp32 slot (runtime.families.encoder
  LayerWeights), then four matmuls (Encoder.layer) -- the scratch is a whole layer;
- sharded: each shard decoded in turn into one shard-sized scratch and applied at once
  (Encoder.head / ffn_slice in a preallocated Workspace) -- the runtime's layout.
Prints per layout the median compute ms per layer and the scratch + activation bytes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import runtime_inputs, start
from runtime.families.encoder import LayerWeights, Slot, Workspace, parse_shard_name, shard_scratch_floats
from runtime.store import decode_into


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compute_layout",
                                description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=30)
    a = p.parse_args(argv)
    start("benchmarks.compute_layout", argv)
    store, _, queries = runtime_inputs(1)
    c, batch = store.config, queries[0]
    enc = store.encoder()
    names = c.shard_names()
    print(f"{'bits':>4} {'layout':<8} {'ms/layer':>9} {'scratch MB':>10} {'activations MB':>14}")
    for bits in (32, 8):
        variants = [store.variant(0, n, bits) for n in names]
        raws = [store.read(v) for v in variants]
        fused = LayerWeights(c, names)
        ws = Workspace(c, 1, batch.ids.shape[1])
        scratch = torch.zeros(shard_scratch_floats(c))
        times = {"fused": [], "sharded": []}
        with torch.inference_mode():
            x0 = enc.embed(batch.ids)
            for _ in range(a.repeat):
                t = time.perf_counter()
                for v, raw in zip(variants, raws):
                    decode_into(v, raw, fused.slot(v.name))
                enc.layer(0, x0, batch.mask, fused)
                times["fused"].append(time.perf_counter() - t)
                t = time.perf_counter()
                enc.embed_into(ws, batch.ids, batch.mask)
                for part in ("attn", "ffn"):
                    enc.layer_start(ws, 0, part)
                    for v, raw in zip(variants, raws):
                        head = parse_shard_name(v.name)[0] == "head"
                        if head != (part == "attn"):
                            continue
                        w = scratch[:v.rows * v.cols].view(v.rows, v.cols)
                        b = scratch[v.rows * v.cols:v.rows * v.cols + v.bias]
                        decode_into(v, raw, Slot(w[:v.in_rows], w[v.in_rows:].t(), b))
                        (enc.head if head else enc.ffn_slice)(ws, w[:v.in_rows], w[v.in_rows:], b)
                    enc.layer_end(ws, 0, part)
                times["sharded"].append(time.perf_counter() - t)
        n = batch.ids.shape[1]
        fused_bytes = sum(t.nbytes for t in (fused.attn_in, fused.attn_out, fused.attn_bias,
                                             fused.ffn_in, fused.ffn_out, fused.ffn_bias))
        # the fused layer's own temporaries: Q/K/V, scores (+ softmax), context, FFN units
        fused_act = 4 * n * (3 * c.hidden + 2 * c.heads * n + 2 * c.hidden + 2 * c.ffn)
        for layout, nbytes, act in (("fused", fused_bytes, fused_act),
                                    ("sharded", scratch.numel() * 4, ws.nbytes)):
            print(f"{bits:>4} {layout:<8} {statistics.median(times[layout]) * 1e3:>9.3f} "
                  f"{nbytes / 1e6:>10.3f} {act / 1e6:>14.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
