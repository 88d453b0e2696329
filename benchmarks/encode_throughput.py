"""Encoding a user's texts through a plan, against transformers: texts/s, peak memory and
the embeddings' cosine to the fp32 model.

MiniLM-L6's 1,000 held-out test tweets (runtime/sources/task.py), one torch thread each:
- hold-in-memory and the exact plan within --memory-mb (10 MB; every window tried, as
  `elasticplan solve --memory-mb 10 --window auto`), both on this machine's calibrated
  device with storage emulated at --bandwidth (benchmarks/common.calibrated_scenario),
  each through a session (runtime/session.py: the executor `run` measures, one query per
  text, padded to the plan's 128 tokens, in chunks of 64 as `elasticplan encode` does);
- transformers' BertModel on the packaged checkpoint (test-only dependency), mean-pooled
  and normalised: one text at a time (no padding) and in batches of 32 (padded to the
  longest).
Each runs in a fresh process and writes its embeddings as `elasticplan encode` does (.npy,
chunk by chunk: nothing held but one chunk): its peak memory is VmHWM above a baseline
taken after the imports and a throwaway run (runtime.measurement.memprobe's method; a
session measures itself that way; transformers' throwaway model has random weights, so
that none of the model file's pages are mapped before the baseline). Cosine: to the fp32 model rebuilt from the store (the reference
`evaluate` uses), mean and min over the texts. The machine's load average is printed
before and after (other work shares this VM's two cores).

    python -m benchmarks.encode_throughput [--texts 1000] [--memory-mb 10] [--bandwidth 200]
                                           [--out-dir D]

Writes encode_throughput.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import EXACT, ROOT, STORE, calibrated_scenario, out_path, runtime_inputs, start, write_csv

MODULE = "benchmarks.encode_throughput"
COLUMNS = ["config", "texts", "seconds", "texts_per_s", "latency_median_ms", "latency_p95_ms",
           "predicted_latency_ms", "predicted_peak_mb", "executor_peak_mb", "process_peak_mb",
           "process_vs_predicted", "cosine_fp32_mean", "cosine_fp32_min", "truncated"]
BATCH = 32


def _texts(n: int) -> list[str]:
    from runtime.sources.task import load_splits

    return list(load_splits().test.texts[:n])


def _transformers(random_weights: bool = False):
    """The packaged MiniLM in transformers (eager attention): tokenizer and BertModel; with
    `random_weights`, the same architecture randomly initialised (nothing read from the
    model file: a warm-up that leaves none of its pages mapped)."""
    import torch
    import transformers

    from runtime.families.encoder import model_dir

    torch.set_num_threads(1)
    path = str(model_dir())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    if random_weights:
        config = transformers.AutoConfig.from_pretrained(path)
        config._attn_implementation = "eager"
        return tok, transformers.BertModel(config).eval()
    return tok, transformers.BertModel.from_pretrained(path, attn_implementation="eager").eval()


def _transformers_encode(tok, model, texts: list[str], batch: int, seq_len: int) -> np.ndarray:
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            b = tok(texts[i:i + batch], padding=True, truncation=True, max_length=seq_len,
                    return_tensors="pt")
            h = model(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1))
    return torch.cat(out).numpy()


def _stream(encode, texts: list[str], hidden: int, path: str) -> float:
    """Encode the texts in chunks as `elasticplan encode` does, each chunk written to `path`
    as it comes (.npy; nothing held but one chunk); the seconds it took."""
    from elasticplan.problem.outputs import write_bytes
    from runtime.encode import CHUNK, npy_bytes

    chunks = (texts[i:i + CHUNK] for i in range(0, len(texts), CHUNK))
    t0 = time.perf_counter()
    write_bytes(path, npy_bytes(encode, chunks, len(texts), hidden, lambda n: None))
    return time.perf_counter() - t0


def child(kind: str, plan: str | None, n: int, seq_len: int, emb_path: str) -> dict:
    """One configuration in this (fresh) process: its embeddings to `emb_path`, its figures
    returned."""
    from runtime.encode import warm_writer
    from runtime.measurement.memprobe import release, status_bytes

    texts = _texts(n)
    hidden = 384
    warm_writer(".npy", hidden, None)
    if kind == "plan":
        from runtime.session import open_session

        with open_session(plan, store=STORE, head=False) as s:  # baseline taken inside
            seconds = _stream(s.encode, texts, hidden, emb_path)
            st = s.stats()
        return {"seconds": seconds, "latency_median_ms": st.latency_median_ms,
                "latency_p95_ms": st.latency_p95_ms,
                "predicted_latency_ms": st.predicted_latency_ms,
                "predicted_peak_mb": st.predicted_peak_bytes / 1e6,
                "executor_peak_mb": st.measured_peak_bytes / 1e6,
                "process_peak_mb": st.process_peak_bytes / 1e6, "truncated": st.truncated}
    batch = 1 if kind == "transformers-1" else BATCH
    # throwaway: imports, kernels, code pages (random weights: a throwaway load of the
    # file would leave its pages mapped, and the real load would then cost nothing)
    tok, model = _transformers(random_weights=True)
    _transformers_encode(tok, model, texts[:batch], batch, seq_len)
    del model
    release()
    base = status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    tok, model = _transformers()
    seconds = _stream(lambda chunk: _transformers_encode(tok, model, chunk, batch, seq_len),
                      texts, hidden, emb_path)
    peak = status_bytes("VmHWM") - base
    truncated = sum(len(tok(t)["input_ids"]) > seq_len for t in texts)
    return {"seconds": seconds, "process_peak_mb": peak / 1e6, "truncated": truncated}


def _run_child(kind: str, plan: Path | None, n: int, seq_len: int, emb: Path) -> dict:
    argv = [sys.executable, "-m", MODULE, "--child", kind, "--texts", str(n), "--seq-len",
            str(seq_len), "--emb", str(emb)] + (["--plan", str(plan)] if plan else [])
    out = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{kind} failed: {out.stderr.strip()[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _load_avg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=1000, help="test tweets to encode")
    ap.add_argument("--memory-mb", type=float, default=10.0, help="the memory-bounded plan's budget")
    ap.add_argument("--bandwidth", type=float, default=200.0, help="emulated storage, MB/s")
    ap.add_argument("--time-limit", type=float, default=60.0, help="the bounded solve's limit, s")
    ap.add_argument("--out-dir", help="default out/bench")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--plan", help=argparse.SUPPRESS)
    ap.add_argument("--emb", help=argparse.SUPPRESS)
    ap.add_argument("--seq-len", type=int, default=128, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.plan, a.texts, a.seq_len, a.emb)))
        return 0
    from elasticplan.plans.baselines import baseline_plan
    from elasticplan.solvers import solve_any_window
    from runtime.profiling.profile import Profiler

    start(MODULE, argv)
    print(f"# load average (1, 5, 15 min) at the start: {_load_avg()}")
    t0 = time.monotonic()
    store, _, queries = runtime_inputs(3)
    sc, _ = calibrated_scenario(a.bandwidth, store=store, queries=queries)
    seq_len = sc.model.seq_len
    texts = _texts(a.texts)
    prof = Profiler(store, texts, np.zeros(len(texts), np.int64), None, seq_len)
    reference = np.empty((len(texts), store.config.hidden), np.float32)
    reference[prof.order] = prof.reference.numpy()
    rows = []
    with tempfile.TemporaryDirectory(prefix="elasticplan-encode-bench-") as tmp:
        hold = Path(tmp) / "hold.plan.json"
        baseline_plan(sc, "hold-in-memory").save(hold)
        bounded = Path(tmp) / "mem.plan.json"
        plan, _ = solve_any_window(sc.with_overrides(memory_budget_mb=a.memory_mb), EXACT,
                                   time_limit_s=a.time_limit)
        plan.save(bounded)
        print(f"# {a.bandwidth:g} MB/s calibrated device ({sc.device.name}); {len(texts)} test "
              f"tweets, one torch thread; the {a.memory_mb:g} MB plan: window {plan.window}, "
              f"embeddings {plan.embeddings}, {plan.n_shards} shards")
        configs = [("hold-in-memory", "plan", hold), (f"{a.memory_mb:g} MB plan", "plan", bounded),
                   ("transformers, 1 text/call", "transformers-1", None),
                   (f"transformers, {BATCH} texts/call", "transformers-32", None)]
        print(f"{'config':<28} {'texts/s':>8} {'median ms':>9} {'p95 ms':>7} {'pred ms':>7} "
              f"{'pred MB':>8} {'process MB':>10} {'vs pred':>8} {'cos fp32':>8} {'min':>7}")
        for label, kind, path in configs:
            emb_path = Path(tmp) / f"{kind}-{len(rows)}.npy"
            r = _run_child(kind, path, len(texts), seq_len, emb_path)
            emb = np.load(emb_path)
            cos = (emb * reference).sum(1) / (np.linalg.norm(emb, axis=1)
                                              * np.linalg.norm(reference, axis=1))
            row = {"config": label, "texts": len(texts), **r,
                   "texts_per_s": len(texts) / r["seconds"],
                   "cosine_fp32_mean": float(cos.mean()), "cosine_fp32_min": float(cos.min())}
            if "predicted_peak_mb" in r:
                row["process_vs_predicted"] = r["process_peak_mb"] / r["predicted_peak_mb"] - 1
            rows.append(row)

            def f(key, fmt, width):
                v = row.get(key)
                return (format(v, fmt) if v is not None else "-").rjust(width)
            print(f"{label:<28} {f('texts_per_s', '.2f', 8)} {f('latency_median_ms', '.2f', 9)} "
                  f"{f('latency_p95_ms', '.2f', 7)} {f('predicted_latency_ms', '.2f', 7)} "
                  f"{f('predicted_peak_mb', '.3f', 8)} {f('process_peak_mb', '.3f', 10)} "
                  f"{f('process_vs_predicted', '+.1%', 8)} {f('cosine_fp32_mean', '.5f', 8)} "
                  f"{f('cosine_fp32_min', '.4f', 7)}", flush=True)
    print("# process MB: VmHWM above a baseline after imports and a throwaway run (fresh "
          "process each); pred MB: the plan's predicted peak; latency: per query, arrival to "
          "pooled embedding (a plan's queries are padded to 128 tokens)")
    print(f"# load average (1, 5, 15 min) at the end: {_load_avg()}")
    write_csv(out_path("encode_throughput.csv", a.out_dir), rows, COLUMNS)
    print(f"# {time.monotonic() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
