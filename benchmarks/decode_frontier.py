"""The decoding frontier: a decoder's answer quality against its measured memory peak, at a
fixed per-token target, the exact plan beside greedy and the uniform baselines.

    python -m benchmarks.decode_frontier [--scenario problems/scenarios/smollm2-phone.yaml]
        [--bandwidths 200,1000] [--memory-mb 24,32,48,64,96,128] [--target-ms T]
        [--windows unbounded,2] [--time-limit 8] [--texts 32] [--new-tokens 6] [--rounds 3]
        [--warm-reads] [--quick]

On a decoder's scenario, with its device's storage at each of --bandwidths MB/s
(dataclasses.replace of the device), the per-token target T (default: 2x hold-in-memory's
predicted per-token latency on the scenario's device; it reads nothing, so that is the
same at every bandwidth) and, at each --memory-mb budget M (the preload budget M too, so
that only memory binds):
- the exact max-importance plan (HiGHS): solved at each of --windows (each with
  --time-limit), the best kept, ties to the least predicted peak and then the shallower
  window, as elasticplan.solvers.solve_any_window chooses among every window (which would
  take 31 solves per question here);
- the greedy plan (STI's, solver "greedy"), its window chosen likewise;
- the uniform baselines (elasticplan/plans/baselines.py) that fit M and T as predicted:
  hold-in-memory-B (every shard and the table resident at B bits), uniform-B (every shard
  and the table streamed at B bits, unbounded window) and uniform-B with window 1 (the
  streamed one that holds least while still overlapping reads with compute), for every
  stored B (--quick: the lowest and the highest).
Hold-in-memory in fp32 runs too: the reference for latency.

Every distinct plan is then
- evaluated on --texts held-out test tweets (the test split; each cut to 48 tokens),
  teacher-forced beside the full model: next-token KL, top-1 agreement and perplexity,
  each with its standard error over texts (runtime/profiling/decoder_profile.py
  evaluate_bits, the call `elasticplan evaluate` makes for a decoder plan, which reads
  64 texts: --texts 64 for its figures). Plans with the same shards and bitwidths share
  one evaluation;
- measured through the decode executor in a fresh process (benchmarks/decode_baselines.py
  probe: the memprobe method), storage emulated at the bandwidth, answering one prompt
  with --new-tokens greedy tokens: the executor's peak (its own accounting) and the
  process's (VmHWM above its baseline), and that answer's times (fresh_ttft_ms,
  fresh_token_ms in the CSV); then timed again, every plan's executor open in this
  process and the answers interleaved over --rounds rounds (3), so that the machine's
  drift falls on every plan alike: the time to first token and the median per-token
  latency the rows and the goals report. A plan that reads nothing is measured once for
  every bandwidth.

Prints one row per plan, then whether the goals hold, measured: at --goal-memory-mb (48)
on --goal-bandwidth (1000) MB/s, the exact plan's top-1 agreement with the full model at
least --goal-top1 (0.95) and its per-token latency within --goal-factor (2) x
hold-in-memory's; and at every budget and bandwidth the exact plan ahead (lower KL) of
greedy and of every uniform baseline that fits the same budget and target.
Writes decode_frontier.csv and decode_frontier.png (top-1 agreement and KL against the
executor's measured peak, one series per method and bandwidth).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.common import EXACT, GREEDY, out_path, pyplot, save_figure, start, write_csv
from benchmarks.decode_baselines import (
    DEFAULT_SCENARIO,
    PROMPT,
    at_bandwidth,
    decoder_store,
    probe,
    prompt_of,
)

MODULE = "benchmarks.decode_frontier"
UNBOUNDED = "unbounded"


def window_list(text: str) -> list[int | None]:
    """'unbounded,2' -> [None, 2]."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if part == UNBOUNDED:
            out.append(None)
        elif part.isdigit() and int(part) >= 1:
            out.append(int(part))
        else:
            raise argparse.ArgumentTypeError(f"expected 'unbounded' or layers >= 1, got {part!r}")
    return out


def best_over_windows(question, solver: str, windows, time_limit: float):
    """The best plan of `solver` over these windows (solve_any_window's order: the most
    importance, then the least predicted peak, then the shallower window), with the
    question it answers; (None, why) when no window gave one."""
    from elasticplan.errors import ElasticplanError
    from elasticplan.solvers import solve

    found, why = [], None
    L = len(question.model.layers)
    for w in windows:
        q = question.with_overrides(prefetch_window=w)
        try:
            found.append((solve(q, solver, time_limit_s=time_limit), q))
        except ElasticplanError as e:
            why = f"{type(e).__name__}: {e}"
    if not found:
        return None, why
    return max(found, key=lambda pq: (round(pq[0].importance, 12), -pq[0].memory.peak_bytes,
                                      -(L if pq[0].window is None else pq[0].window))), None


def quality_key(plan) -> tuple:
    return tuple((lp.index, c.name, c.bits) for lp in plan.layers for c in lp.shards)


def measure_key(plan, bandwidth: float) -> tuple:
    where = tuple((lp.index, c.name, c.bits, c.preloaded) for lp in plan.layers
                  for c in lp.shards)
    return where, plan.window, bandwidth if plan.streamed_bytes else None


class Measurer:
    """Quality (one evaluation per submodel) and executor/process measurements (one per
    plan and bandwidth; once when it reads nothing), cached."""

    def __init__(self, store, ids: list[int], new_tokens: int, texts: list[str], tmp: Path,
                 warm_reads: bool = False):
        self.store, self.ids, self.new_tokens, self.texts, self.tmp = \
            store, ids, new_tokens, texts, tmp
        self.warm_reads = warm_reads
        self.quality: dict[tuple, object] = {}
        self.runs: dict[tuple, dict] = {}
        self.plans: dict[tuple, tuple] = {}  # measure key -> (plan, device)
        self.times: dict[tuple, tuple[float, float]] = {}  # -> (first token, per token) ms

    def evaluate(self, plan):
        """`elasticplan evaluate`'s measurement of a decoder plan (runtime/commands.py
        _evaluate_decoder): its shards at their bitwidths, its last layer the table."""
        from runtime.profiling.decoder_profile import evaluate_bits

        key = quality_key(plan)
        if key not in self.quality:
            *layers, table = plan.layers
            (choice,) = table.shards
            bits = [{c.name: c.bits for c in lp.shards} for lp in layers]
            self.quality[key] = evaluate_bits(self.store, bits, self.texts,
                                              table_bits=choice.bits)
        return self.quality[key]

    def run(self, plan, device) -> dict:
        key = measure_key(plan, device.bandwidth_mb_s)
        if key not in self.runs:
            path = self.tmp / f"plan{len(self.runs)}.json"
            plan.save(path)
            self.runs[key] = probe(path, self.store, self.ids, self.new_tokens, device,
                                   self.warm_reads)
            self.plans[key] = (plan, device)
        return self.runs[key]

    def time_interleaved(self, rounds: int) -> None:
        """Every measured plan answers again in this process, its executor open
        throughout and the plans' answers interleaved, --rounds rounds after a warm-up
        (benchmarks/decode_prediction.py measure): the times the rows report, so that a
        change in this VM's speed falls on every plan alike (measured one after another in
        fresh processes, plans minutes apart met machines a third apart in speed)."""
        import statistics

        from benchmarks.decode_prediction import measure

        keys = list(self.plans)
        plans = [(plan, plan.scenario.question, device)
                 for plan, device in (self.plans[k] for k in keys)]
        for key, runs in zip(keys, measure(plans, self.store, self.ids, self.new_tokens,
                                           rounds, self.warm_reads)):
            self.times[key] = (statistics.median(r.ttft_ms for r in runs),
                               statistics.median(statistics.median(r.step_ms) for r in runs))


def row_of(method: str, bandwidth: float, budget, target: float, plan, m: Measurer,
           device) -> dict:
    import statistics

    ev, run = m.evaluate(plan), m.run(plan, device)
    # measured_*: filled in by timed() from the interleaved rounds; fresh_*: the probe's
    return {"measure_key": measure_key(plan, device.bandwidth_mb_s),
        "method": method, "solver": plan.solver, "bandwidth_mb_s": bandwidth,
        "memory_budget_mb": budget, "target_ms": target, "status": plan.status.value,
        "gap": plan.gap, "window": UNBOUNDED if plan.window is None else plan.window,
        "importance": plan.importance, "shards": plan.n_shards,
        "table_bits": plan.layers[-1].shards[0].bits,
        "table_held": plan.layers[-1].shards[0].preloaded,
        "predicted_peak_mb": plan.memory.peak_bytes / 1e6,
        "executor_peak_mb": run["executor_peak_bytes"] / 1e6,
        "process_peak_mb": run["peak_above_baseline_bytes"] / 1e6,
        "predicted_token_ms": plan.decoding.last_token_ms,
        "measured_token_ms": None,
        "fresh_token_ms": statistics.median(run["step_ms"]),
        "predicted_ttft_ms": plan.decoding.ttft_ms, "measured_ttft_ms": None,
        "fresh_ttft_ms": run["ttft_ms"],
        "kl": ev.kl, "kl_se": ev.kl_stderr, "top1": ev.top1, "top1_se": ev.top1_stderr,
        "perplexity": ev.perplexity, "perplexity_se": ev.perplexity_stderr,
        "fp32_perplexity": ev.fp32_perplexity, "texts": ev.texts, "positions": ev.positions,
    }


def timed(row: dict, m: Measurer) -> dict:
    """The row with its interleaved times (Measurer.time_interleaved), its key dropped."""
    out = dict(row)
    out["measured_ttft_ms"], out["measured_token_ms"] = m.times[out.pop("measure_key")]
    return out


def print_header() -> None:
    print(f"{'method':<26} {'MB/s':>5} {'budget':>6} {'window':>9} {'table':>6} "
          f"{'peak pred':>9} {'executor':>9} {'process':>8} {'tok pred':>8} {'meas':>8} "
          f"{'KL':>14} {'top-1':>13} {'ppl':>8}")


def print_row(r: dict) -> None:
    budget = "-" if r["memory_budget_mb"] is None else f"{r['memory_budget_mb']:g}"
    table = f"{r['table_bits']}{'h' if r['table_held'] else 's'}"
    print(f"{r['method']:<26} {r['bandwidth_mb_s']:>5g} {budget:>6} {str(r['window']):>9} "
          f"{table:>6} {r['predicted_peak_mb']:>9.2f} {r['executor_peak_mb']:>9.2f} "
          f"{r['process_peak_mb']:>8.2f} {r['predicted_token_ms']:>8.2f} "
          f"{r['measured_token_ms']:>8.1f} {r['kl']:>7.4f}+-{r['kl_se']:<5.3f} "
          f"{r['top1']:>6.3f}+-{r['top1_se']:<5.3f} {r['perplexity']:>8.1f}", flush=True)


def uniform_candidates(question, bits, window1: bool = True) -> list[tuple[str, object]]:
    """(method, plan) of every uniform baseline at these bitwidths on this question's
    device (hold-in-memory-B, uniform-B unbounded and at window 1)."""
    from elasticplan.plans.baselines import HOLD_AT, UNIFORM, baseline_plan

    out = []
    for b in bits:
        out.append((f"{HOLD_AT}{b}", baseline_plan(question, f"{HOLD_AT}{b}")))
        out.append((f"{UNIFORM}{b}", baseline_plan(question, f"{UNIFORM}{b}")))
        if window1:
            out.append((f"{UNIFORM}{b} (window 1)",
                        baseline_plan(question, f"{UNIFORM}{b}", window=1)))
    return out


def fits(plan, budget_mb: float, target_ms: float) -> bool:
    return plan.memory.peak_bytes <= budget_mb * 1e6 and \
        plan.decoding.last_token_ms <= target_ms


def goals(rows: list[dict], hold: dict, a) -> list[str]:
    """The goals' verdicts, measured (lines to print)."""
    out = []
    at = [r for r in rows if r["method"] == "exact" and r["bandwidth_mb_s"] == a.goal_bandwidth
          and r["memory_budget_mb"] == a.goal_memory_mb]
    limit = a.goal_factor * hold["measured_token_ms"]
    if not at:
        out.append(f"goal 1: no exact plan at {a.goal_memory_mb:g} MB and {a.goal_bandwidth:g} "
                   f"MB/s (not asked, or none found): not shown")
    else:
        r = at[0]
        ok = r["top1"] >= a.goal_top1 and r["measured_token_ms"] <= limit
        out.append(
            f"goal 1 ({a.goal_memory_mb:g} MB, {a.goal_bandwidth:g} MB/s): top-1 agreement "
            f"{r['top1']:.3f} +- {r['top1_se']:.3f} (goal >= {a.goal_top1:g}), KL "
            f"{r['kl']:.3f} nats; per token {r['measured_token_ms']:.1f} ms measured against "
            f"{a.goal_factor:g} x hold-in-memory's {hold['measured_token_ms']:.1f} = "
            f"{limit:.1f} ms (predicted {r['predicted_token_ms']:.2f} against "
            f"{a.goal_factor:g} x {hold['predicted_token_ms']:.2f}); executor peak "
            f"{r['executor_peak_mb']:.2f} MB, process {r['process_peak_mb']:.2f} MB: "
            f"{'MET' if ok else 'NOT MET'}")
    wins = losses = ties = 0
    notes = []
    for r in (r for r in rows if r["method"] == "exact"):
        same = [o for o in rows if o["method"] != "exact" and o["method"] != "hold-in-memory"
                and o["bandwidth_mb_s"] == r["bandwidth_mb_s"]
                and o["memory_budget_mb"] == r["memory_budget_mb"]]
        for o in same:
            if r["kl"] < o["kl"]:
                wins += 1
            elif r["kl"] == o["kl"] == 0.0:  # both the full model: neither can be ahead
                ties += 1
                notes.append(f"  at {r['memory_budget_mb']:g} MB, {r['bandwidth_mb_s']:g} MB/s: "
                             f"exact and {o['method']} both measure KL 0 (the full model's "
                             f"next tokens exactly): a tie, not counted")
            else:
                losses += 1
                notes.append(f"  at {r['memory_budget_mb']:g} MB, {r['bandwidth_mb_s']:g} MB/s: "
                             f"exact KL {r['kl']:.4f} is not below {o['method']}'s "
                             f"{o['kl']:.4f}")
    out.append(f"goal 2: the exact plan has lower measured KL than {wins} of {wins + losses} "
               f"comparisons with greedy and the uniform baselines at the same budget, "
               f"bandwidth and target" + (f" ({ties} more tied at KL 0)" if ties else "")
               + f": {'MET' if wins and not losses else 'NOT MET'}")
    return out + notes


def plot(rows: list[dict], path: Path, command: str, target: float) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    series: dict[str, list[dict]] = {}
    for r in rows:  # hold-in-memory(-B) reads nothing: one series for every bandwidth
        name = r["method"] if r["method"].startswith("hold-in-memory") else \
            f"{r['method']}, {r['bandwidth_mb_s']:g} MB/s"
        series.setdefault(name, []).append(r)
    styles = {"exact": "o-", "greedy": "s--"}
    lowest = min(r["bandwidth_mb_s"] for r in rows)
    for name, pts in sorted(series.items()):
        seen, uniq = set(), []
        for p in sorted(pts, key=lambda p: p["executor_peak_mb"]):
            k = (p["executor_peak_mb"], p["top1"])
            if k not in seen:
                seen.add(k)
                uniq.append(p)
        style = styles.get(name.split(",")[0], "^" if name.startswith("uniform") else "D")
        if name == "hold-in-memory":
            style = "k*"
        # the lowest bandwidth hollow and larger: a plan the same at both shows as both
        hollow = "MB/s" in name and uniq[0]["bandwidth_mb_s"] == lowest
        marks = {"markersize": 8, "markerfacecolor": "none"} if hollow else {"markersize": 5}
        for ax, y in zip(axes, ("top1", "kl")):
            shown = [p for p in uniq if y == "top1" or p[y] > 0]  # (KL 0: the full model)
            ax.plot([p["executor_peak_mb"] for p in shown], [p[y] for p in shown], style,
                    label=name, **marks)
    axes[0].set_ylabel("top-1 agreement with the full model (held-out texts)")
    axes[1].set_ylabel("next-token KL to the full model (nats, log; 0 not drawn)")
    axes[1].set_yscale("log")
    from matplotlib.ticker import FuncFormatter

    for ax in axes:
        ax.set_xscale("log")
        for axis in (ax.xaxis, *([ax.yaxis] if ax is axes[1] else [])):
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(FuncFormatter(
                lambda v, _: f"{v:g}" if f"{v:g}"[0] in "235" else ""))
        ax.set_xlabel("measured peak memory (MB, executor; log)")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=6, loc="lower right")
    fig.suptitle(f"Decoding frontier: quality against measured memory at {target:.1f} ms per "
                 f"token (predicted)", fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    save_figure(fig, path, command)


def main(argv=None) -> int:
    from elasticplan.cli import number_list

    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default=str(DEFAULT_SCENARIO), help="a decoder's scenario")
    ap.add_argument("--store", help="the llama store (default: the one the profile names)")
    ap.add_argument("--bandwidths", type=number_list, default="200,1000", help="MB/s")
    ap.add_argument("--memory-mb", type=number_list, default="24,32,48,64,96,128")
    ap.add_argument("--target-ms", type=float,
                    help="per-token target (default: 2 x hold-in-memory's predicted)")
    ap.add_argument("--windows", type=window_list, default="unbounded,2",
                    help="prefetch windows the exact and greedy plans are solved at")
    ap.add_argument("--time-limit", type=float, default=8.0, help="per solve, s")
    ap.add_argument("--texts", type=int, default=32, help="held-out texts (evaluate: 64)")
    ap.add_argument("--new-tokens", type=int, default=6, help="tokens each measured answer")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--warm-reads", action="store_true",
                    help="the emulated storage read from the page cache at the device's pace "
                         "(a device faster than this machine's disk; runtime/decoding.py); "
                         "default: cold reads")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--goal-memory-mb", type=float, default=48.0)
    ap.add_argument("--goal-bandwidth", type=float, default=1000.0)
    ap.add_argument("--goal-top1", type=float, default=0.95)
    ap.add_argument("--goal-factor", type=float, default=2.0)
    ap.add_argument("--quick", action="store_true",
                    help="unbounded window, 4 texts, 3 tokens, 2 uniform bitwidths (tests)")
    ap.add_argument("--out-dir", help="default out/bench")
    a = ap.parse_args(argv)
    if a.quick:
        a.windows, a.texts, a.new_tokens, a.time_limit = [None], 4, 3, min(a.time_limit, 5.0)
        a.rounds = 1
    command = start(MODULE, argv)
    t0 = time.monotonic()
    from elasticplan.errors import ElasticplanError
    from elasticplan.plans.baselines import HOLD_IN_MEMORY, baseline_plan
    from elasticplan.problem.loader import load_scenario
    from runtime.sources.task import load_splits

    base = load_scenario(a.scenario)
    if not base.question.decoding:
        ap.error(f"{a.scenario}: not a decoder's scenario (no prompt_tokens/answer_tokens)")
    store = decoder_store(base, a.store)
    ids = prompt_of(store, a.prompt)
    hold_plan = baseline_plan(base, HOLD_IN_MEMORY)
    target = a.target_ms or round(2 * hold_plan.decoding.last_token_ms, 3)
    bits = list(base.model.bitwidths)
    if a.quick:
        bits = [bits[0], bits[-1]]
    print(f"# {base.name}: device {base.device.name}; per-token target {target:g} ms "
          f"({'given' if a.target_ms else '2 x hold-in-memory predicted'}); prompt "
          f"{len(ids)} tokens, {a.new_tokens} new; {a.texts} held-out texts; windows "
          f"{', '.join(UNBOUNDED if w is None else str(w) for w in a.windows)}; reads "
          f"{'warm (the page cache, at the device pace)' if a.warm_reads else 'cold'}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        m = Measurer(store, ids, a.new_tokens, list(load_splits().test.texts[:a.texts]),
                     Path(tmp), a.warm_reads)
        hold = row_of(HOLD_IN_MEMORY, base.device.bandwidth_mb_s, None, target, hold_plan, m,
                      base.device)
        for bw in a.bandwidths:
            sc = at_bandwidth(base, bw).with_overrides(target_latency_ms=target)
            candidates = uniform_candidates(sc, bits)
            for mb in a.memory_mb:
                try:
                    q = sc.with_overrides(memory_budget_mb=mb, preload_budget_mb=mb)
                except ElasticplanError as e:  # below what any plan holds, above the device
                    print(f"# {bw:g} MB/s, {mb:g} MB: not asked ({e})")
                    continue
                for method, solver in (("exact", EXACT), ("greedy", GREEDY)):
                    found, why = best_over_windows(q, solver, a.windows, a.time_limit)
                    if found is None:
                        print(f"# {method} at {bw:g} MB/s, {mb:g} MB: no plan ({why})")
                        continue
                    rows.append(row_of(method, bw, mb, target, found[0], m, sc.device))
                for method, plan in candidates:
                    if fits(plan, mb, target):
                        rows.append(row_of(method, bw, mb, target, plan, m, sc.device))
            left = [f"{name} ({p.memory.peak_bytes / 1e6:.1f} MB, "
                    f"{p.decoding.last_token_ms:.1f} ms)" for name, p in candidates
                    if not any(fits(p, mb, target) for mb in a.memory_mb)]
            if left:
                print(f"# {bw:g} MB/s: fit no budget and the target (predicted): "
                      + "; ".join(left))
        print(f"# {len(m.plans)} plans measured for memory; their times, interleaved in "
              f"{a.rounds} rounds:", flush=True)
        m.time_interleaved(a.rounds)
    hold, rows = timed(hold, m), [timed(r, m) for r in rows]
    print_header()
    for r in [hold] + rows:
        print_row(r)
    all_rows = [hold] + rows
    print()
    for line in goals(rows, hold, a):
        print(line)
    write_csv(out_path("decode_frontier.csv", a.out_dir), all_rows, list(all_rows[0]))
    plot(all_rows, out_path("decode_frontier.png", a.out_dir), command, target)
    print(f"# {len(m.quality)} submodels evaluated, {len(m.runs)} plans measured; "
          f"{time.monotonic() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
