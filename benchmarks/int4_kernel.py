"""A 4-bit group-scheme block times a vector, the ways the decode executor has done it and
the way torch's own int4 kernel for CPU would, side by side: how much a 4-bit layer's
compute shrinks, and what it costs in precision.

    python -m benchmarks.int4_kernel [--repeats 50] [--out-dir D]

For each of SmolLM2's block shapes (an FFN slice's input block [256, 576] and output block
[576, 128], a KV group's [320, 576] and [576, 192], a 1536 x 576 block), random normal
weights are quantised by the group scheme at 4 bits (its codes, fp16 steps and minima per
32 weights of a row, as the store keeps the GGUF file's Q4_1 blocks), and y = W x is
computed five ways, timed side by side (benchmarks.common.time_alternated: one thread,
9 rounds of --repeats calls each, the median):

- `decode + fp32`: the group scheme decodes the stored block into an fp32 block (its
  preallocated workspace), then torch.mv: what a 4-bit shard costs in the prompt pass,
  and cost in every pass before the kernel;
- `kernel`: the group scheme's own kernel (runtime/schemes/groupmv.py) on the stored
  bytes, fp32: what a decode step's 4-bit shard costs now;
- `fp32`: torch.mv on an fp32 block already in memory: what hold-in-memory costs;
- `int4 mm`: torch's `_weight_int4pack_mm_for_cpu` on the block packed once (its codes,
  and per group a scale = step and a zero = minimum + 8 steps, in bf16), x in bf16: what a
  store keeping that layout would cost;
- `pack + int4 mm`: the same, packing the integer codes each call
  (`_convert_weight_to_int4pack_for_cpu`): a lower bound of what a shard read in the
  store's own layout would pay every pass (unpacking its nibbles not counted).

Reported in ns per weight, and the kernel's and torch's int4 kernel's outputs against the
fp32 product of the same stored block (max |difference| / max |y|): float rounding, and
torch's bf16 rounding of x and of the group steps and minima. Writes int4_kernel.csv.
Nothing in the runtime uses torch's int4 kernel (docs/decoders.md, "The 4-bit kernel").
"""

from __future__ import annotations

import argparse

from benchmarks.common import out_path, start, time_alternated, write_csv

MODULE = "benchmarks.int4_kernel"
SHAPES = {"ffn slice in": (256, 576), "ffn slice out": (576, 128), "kv group in": (320, 576),
          "kv group out": (576, 192), "1536 x 576": (1536, 576)}
WAYS = ("decode + fp32", "kernel", "fp32", "int4 mm", "pack + int4 mm")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=50, help="calls per round")
    ap.add_argument("--out-dir")
    a = ap.parse_args(argv)
    start(MODULE, argv)
    import numpy as np
    import torch

    from runtime.schemes import create
    from runtime.schemes.base import DecodeWork
    from runtime.schemes.group import GROUP, quantize

    pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    coder = create("group").coder(4)
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'block':<14}" + "".join(f"{w + ' ns/w':>20}" for w in WAYS)
          + f"{'kernel rel. error':>19}{'int4 rel. error':>17}")
    for label, (n, k) in SHAPES.items():
        w = (rng.normal(size=(n, k)) * 0.02).astype(np.float32)
        stored = torch.frombuffer(bytearray(coder.encode_blocks([w], 4, [None])),
                                  dtype=torch.uint8)
        work = DecodeWork(*coder.decode_work(((n, k),), 4))
        out = torch.empty(n, k)
        x = torch.from_numpy(rng.normal(size=k).astype(np.float32))
        y = torch.empty(n)
        codes, steps, lows = quantize(w, 4)  # what the stored block holds
        q = torch.from_numpy(codes.astype(np.int32))
        steps32, lows32 = steps.astype(np.float32), lows.astype(np.float32)
        scales = torch.from_numpy(np.stack([steps32.T, (lows32 + 8 * steps32).T], axis=-1))
        scales = scales.to(torch.bfloat16).contiguous()  # [k / 32, n, 2]
        packed = pack(q, 1)
        xb = x.to(torch.bfloat16).view(1, k)
        held = torch.from_numpy(w)

        def decoded():
            coder.decode_into([out], stored, ((n, k),), 4, work)
            return torch.mv(out, x, out=y)

        block = coder.vector_rows(stored[:n * k // 2], stored[n * k // 2:], n, k, 4, work)
        y2 = torch.empty(n)
        calls = [decoded, lambda: block.mv_into(x, y2), lambda: torch.mv(held, x, out=y),
                 lambda: mm(xb, packed, GROUP, scales), lambda: mm(xb, pack(q, 1), GROUP, scales)]
        ms = time_alternated(calls, a.repeats)
        ns = [m * 1e6 / (n * k) for m in ms]
        exact = decoded().clone()  # the stored block's own fp32 product
        got = mm(xb, packed, GROUP, scales).view(-1).float()
        rel = float((got - exact).abs().max() / exact.abs().max())
        mine = float((block.mv_into(x, y2) - exact).abs().max() / exact.abs().max())
        print(f"{label:<14}" + "".join(f"{v:>20.4f}" for v in ns) + f"{mine:>19.2e}"
              + f"{rel:>17.2e}")
        rows.append({"block": label, "rows": n, "cols": k,
                     **{f"{w.replace(' + ', '_').replace(' ', '_')}_ns_per_weight": round(v, 4)
                        for w, v in zip(WAYS, ns)},
                     "kernel_rel_error": mine, "int4_rel_error": rel})
    write_csv(out_path("int4_kernel.csv", a.out_dir), rows, list(rows[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
