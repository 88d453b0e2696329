"""Dequantisation speed of the quantisation schemes side by side, per bitwidth, on the
blocks a SmolLM2 layer's shards are made of.

    python -m benchmarks.dequant_speed [--repeats 20] [--schemes uniform,group] [--out-dir D]

For each bitwidth and each block shape (an FFN slice's input block [2 x 128, 576] and its
output block [576, 128]; a KV group's input block [320, 576] and output block [576, 192];
a 256-row chunk of the embedding table [256, 576]; and a 1536 x 576 block), random normal
weights are encoded by each scheme and decoded into an fp32 block with the scheme's
preallocated workspace (DecodeWork), as the executor does. Timed side by side
(benchmarks.common.time_alternated: one thread, 9 rounds of --repeats decodes each, the
median); reported in ns per weight, and the ratio of each scheme to the first. Writes
dequant_speed.csv.
"""

from __future__ import annotations

import argparse

from benchmarks.common import out_path, start, time_alternated, write_csv

MODULE = "benchmarks.dequant_speed"
SHAPES = {"ffn slice in": (256, 576), "ffn slice out": (576, 128), "kv group in": (320, 576),
          "kv group out": (576, 192), "table chunk": (256, 576), "1536 x 576": (1536, 576)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=20, help="decodes per round")
    ap.add_argument("--schemes", default="uniform,group", help="registered schemes")
    ap.add_argument("--out-dir")
    a = ap.parse_args(argv)
    start(MODULE, argv)
    import numpy as np
    import torch

    from runtime.schemes import create
    from runtime.schemes.base import DecodeWork

    schemes = [create(n) for n in a.schemes.split(",")]
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'bits':>4} {'block':<14}" + "".join(f"{s.name + ' ns/w':>14}" for s in schemes)
          + "".join(f"{s.name + '/' + schemes[0].name:>16}" for s in schemes[1:]))
    for bits in (2, 3, 4, 6, 8):
        for label, (r, c) in SHAPES.items():
            w = (rng.normal(size=(r, c)) * 0.02).astype(np.float32)
            calls = []
            for s in schemes:
                coder = s.coder(bits)
                buf = torch.frombuffer(bytearray(coder.encode_blocks([w], bits, [None])),
                                       dtype=torch.uint8)
                work = DecodeWork(*coder.decode_work(((r, c),), bits))
                out = torch.empty(r, c)
                calls.append(lambda coder=coder, buf=buf, out=out, work=work, r=r, c=c:
                             coder.decode_into([out], buf, ((r, c),), bits, work))
            ms = time_alternated(calls, a.repeats)
            ns = [m * 1e6 / (r * c) for m in ms]
            row = {"bits": bits, "block": label, "rows": r, "cols": c}
            row.update({f"{s.name}_ns_per_weight": round(v, 4) for s, v in zip(schemes, ns)})
            rows.append(row)
            print(f"{bits:>4} {label:<14}" + "".join(f"{v:>14.3f}" for v in ns)
                  + "".join(f"{v / ns[0]:>16.2f}" for v in ns[1:]))
    write_csv(out_path("dequant_speed.csv", a.out_dir), rows,
              ["bits", "block", "rows", "cols"] + [f"{s.name}_ns_per_weight" for s in schemes])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
