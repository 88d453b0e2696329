"""Quantisation schemes side by side: MiniLM's uniform store against its dictionary store
(`elasticplan shard --scheme dict`: 2-5 bits as a codebook per block and a scale per row
with 0.5 % exact outliers, 6 and 8 bits uniform), in one run, each with its own measured
profile.

1. Per bitwidth, the whole model at that bitwidth (every shard): fidelity and accuracy on
   the 1,000 held-out test tweets with their standard errors, the stored bytes of all
   shards, and the decode time of one head and one FFN slice into the executor's scratch
   with its preallocated workspace, both schemes' side by side (the median of 9 rounds of
   --decodes decodes each, one thread, benchmarks.common.time_alternated).
2. The exact plan for MiniLM on the phone (problems/scenarios/minilm-phone.yaml) at
   --targets x --buffers, planned on each scheme's profile at equal memory (the
   dictionary plan's memory budget is the uniform plan's predicted peak), both
   submodels run on the test split.

    python -m benchmarks.quant_schemes [--targets 12,17] [--buffers 0,2] [--decodes 200]

Needs both stores (`make shards`) and both profiles (problems/models/minilm-l6.yaml,
minilm-l6-dict.yaml, through problems/scenarios/minilm-phone*.yaml). Writes quant_schemes_bits.csv and quant_schemes_plans.csv.
"""

from __future__ import annotations

import argparse

from benchmarks.common import EXACT, SCHEMES, out_path, start, time_alternated, write_csv
from elasticplan.cli import number_list
from elasticplan.problem.loader import load_scenario
from elasticplan.problem.spec import FULL_PRECISION_BITS
from elasticplan.solvers import solve

MODULE = "benchmarks.quant_schemes"


def decode_ms(stores: dict, bits: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Per scheme, ms to decode layer 0's head0 and ffn0 at `bits` into the executor's
    scratch with its store's workspace, the stores' decodes timed side by side
    (time_alternated)."""
    import torch

    from runtime.families.encoder import Slot, shard_scratch_floats
    from runtime.schemes import uniform
    from runtime.store import decode_into

    calls = []
    for store in stores.values():
        work = uniform.DecodeWork(*store.decode_buffers()[0])
        scratch = torch.zeros(shard_scratch_floats(store.config))
        for name in ("head0", "ffn0"):
            v = store.variant(0, name, bits)
            raw = memoryview(store.read(v))
            w = scratch[:v.rows * v.cols].view(v.rows, v.cols)
            slot = Slot(w[:v.in_rows], w[v.in_rows:].t(), scratch[v.rows * v.cols:][:v.bias])
            calls.append(lambda v=v, raw=raw, slot=slot, work=work: decode_into(v, raw, slot,
                                                                                 work))
    ms = time_alternated(calls, repeats)
    return {scheme: (ms[2 * i], ms[2 * i + 1]) for i, scheme in enumerate(stores)}


def per_bitwidth(stores, splits, repeats: int) -> list[dict]:
    print(f"{'bits':>4} {'scheme':<8} {'fidelity':>15} {'accuracy':>13} {'shards MB':>9} "
          f"{'head ms':>7} {'ffn ms':>7}")
    rows = []
    bitwidths = sorted(set(stores["uniform"].bitwidths) | set(stores["dict"].bitwidths))
    for bits in bitwidths:
        having = {scheme: store for scheme, store in stores.items() if bits in store.bitwidths}
        decoded = decode_ms(having, bits, repeats) if bits != FULL_PRECISION_BITS else {}
        for scheme, store in stores.items():
            if bits not in store.bitwidths:
                continue
            ev = splits[scheme].evaluate_uniform(bits)
            total = sum(store.variant(l, n, bits).nbytes for l in range(store.config.layers)
                        for n in store.config.shard_names())
            head, ffn = decoded[scheme] if bits != FULL_PRECISION_BITS else (0.0, 0.0)
            stored = store.scheme_of(bits) if bits != FULL_PRECISION_BITS else "fp32"
            rows.append({"bits": bits, "scheme": scheme, "stored_as": stored,
                         "fidelity": ev.fidelity, "fidelity_stderr": ev.fidelity_stderr,
                         "accuracy": ev.accuracy, "accuracy_stderr": ev.accuracy_stderr,
                         "shard_mb": total / 1e6, "head_decode_ms": head,
                         "ffn_decode_ms": ffn})
            print(f"{bits:>4} {scheme + ('*' if stored != scheme and bits < 32 else ''):<8} "
                  f"{ev.fidelity:>7.4f} +-{ev.fidelity_stderr:.4f} {ev.accuracy:>6.3f} "
                  f"+-{ev.accuracy_stderr:.3f} {total / 1e6:>9.2f} {head:>7.3f} {ffn:>7.3f}",
                  flush=True)
    print("# * kept uniform in the dictionary store (6 and 8 bits)")
    return rows


def plans(scenario, profiles, splits, targets, buffers, gap, time_limit_s) -> list[dict]:
    print(f"\n# the exact plan ({EXACT}, gap {gap:g}) on each scheme's profile, equal memory "
          f"(the dictionary plan's budget: the uniform plan's predicted peak)")
    print(f"{'target':>6} {'buf':>4} {'scheme':<8} {'status':<8} {'peak MB':>7} "
          f"{'kept (quant)':>12} {'fidelity':>15} {'accuracy':>13}")
    rows = []
    for target in targets:
        for buffer in buffers:
            budget = None
            for scheme in ("uniform", "dict"):
                sc = scenario.with_overrides(model=profiles[scheme],
                                             target_latency_ms=target, preload_budget_mb=buffer,
                                             memory_budget_mb=budget)
                plan = solve(sc, EXACT, time_limit_s=time_limit_s, relative_gap=gap)
                peak = plan.memory.peak_bytes
                if budget is None:
                    budget = peak / 1e6
                ev = splits[scheme].evaluate(plan)
                quant = sum(c.bits < FULL_PRECISION_BITS for lp in plan.layers for c in lp.shards)
                rows.append({"target_ms": target, "buffer_mb": buffer, "scheme": scheme,
                             "status": plan.status.value, "gap": plan.gap,
                             "objective": plan.objective, "peak_mb": peak / 1e6,
                             "shards": plan.n_shards, "quantised": quant,
                             "fidelity": ev.fidelity, "fidelity_stderr": ev.fidelity_stderr,
                             "accuracy": ev.accuracy, "accuracy_stderr": ev.accuracy_stderr})
                print(f"{target:>6g} {buffer:>4g} {scheme:<8} {plan.status.value:<8} "
                      f"{peak / 1e6:>7.2f} {f'{plan.n_shards} ({quant})':>12} "
                      f"{ev.fidelity:>7.4f} +-{ev.fidelity_stderr:.4f} {ev.accuracy:>6.3f} "
                      f"+-{ev.accuracy_stderr:.3f}", flush=True)
            u, d = rows[-2], rows[-1]
            print(f"{'':>6} {'':>4} dict - uniform: accuracy {d['accuracy'] - u['accuracy']:+.3f}"
                  f", fidelity {d['fidelity'] - u['fidelity']:+.4f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    from runtime.profiling.submodel import TestSplit
    from runtime.store import ShardStore

    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", type=number_list, default=[12.0, 17.0])
    ap.add_argument("--buffers", type=number_list, default=[0.0, 2.0])
    ap.add_argument("--decodes", type=int, default=200)
    ap.add_argument("--gap", type=float, default=1e-4)
    ap.add_argument("--time-limit", type=float, default=10.0)
    ap.add_argument("--out-dir")
    a = ap.parse_args(argv)
    start(MODULE, argv)
    scenario = load_scenario(SCHEMES["uniform"][1])
    profiles = {k: load_scenario(phone).model for k, (_, phone, _) in SCHEMES.items()}
    stores = {k: ShardStore(store) for k, (store, _, _) in SCHEMES.items()}
    splits = {k: TestSplit(stores[k], head) for k, (_, _, head) in SCHEMES.items()}
    bit_rows = per_bitwidth(stores, splits, a.decodes)
    write_csv(out_path("quant_schemes_bits.csv", a.out_dir), bit_rows, list(bit_rows[0]))
    plan_rows = plans(scenario, profiles, splits, a.targets, a.buffers, a.gap, a.time_limit)
    write_csv(out_path("quant_schemes_plans.csv", a.out_dir), plan_rows, list(plan_rows[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
