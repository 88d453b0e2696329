"""`elasticplan generate`: a decoder plan answering a prompt token by token through the
decode executor (runtime/decoding.py), every prediction checked against measurement.

The plan's choices become the executor's picks (its last layer is the table); the
executor is opened for the plan's context (prompt_tokens + answer_tokens: the KV cache,
the prompt buffers) and window, on storage emulated at the scenario's device or this
machine's own. The answer streams as it is produced. The report compares, pass by pass,
what the cost model predicts for this prompt's length and these positions
(elasticplan.decoding.answer_schedules) with the executor's traces: time to first token,
each decode step (median and last), and per stage (IO, layer compute, the LM head); the
plan's predicted memory by term with the executor's own accounting, and the process's
peak above its baseline (VmHWM after the answer less VmRSS before the executor existed,
the peak reset at that point; before it, a throwaway executor of the same plan answers the
same prompt with two tokens (a prompt pass and one step), so that torch's kernels, thread
pools and code pages, and the BLAS's packing buffers that the prompt pass's matrix
products take (MKL's sgemm: 4.5 MB allocated at its first product of a many-row prompt
and kept for the process, 0.64 MB of it touched at a 12-token prompt, 0.75 MB at 64; a
2-token warm-up did not take them),
are in the process already, as in any warm process and as `run`'s probe does with the
same queries: runtime/measurement/memprobe.py); and, when asked, the answer's agreement
with the full fp32 model's greedy answer to the same prompt.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from typing import Callable

import torch

from elasticplan.costmodel import Schedule
from elasticplan.decoding import answer_schedules
from elasticplan.errors import InvalidArgument
from elasticplan.plans.plan import Plan
from elasticplan.problem.inputs import not_unicode
from elasticplan.problem.spec import Scenario
from runtime.decoding import DecodeExecutor, GenerateResult, PassTrace, ShardPick, TablePick
from runtime.measurement.memprobe import release, status_bytes
from runtime.store import ShardStore


def picks_of(plan: Plan) -> tuple[list[list[ShardPick]], TablePick]:
    """A decoder plan's choices as the executor takes them: per layer its shards, and the
    table (the plan's last layer, one part; streamed, in the pieces the plan says)."""
    *layers, table = plan.layers
    (t,) = table.shards
    return ([[ShardPick(c.name, c.bits, c.preloaded) for c in lp.shards] for lp in layers],
            TablePick(t.bits, t.preloaded, t.pieces))


def prompt_ids(store: ShardStore, text: str, chat: bool) -> list[int]:
    """The prompt's token ids: the text, or with `chat` the text as a user's message
    through the store's chat template (as transformers renders it)."""
    from runtime.sources.gguf_file import render_chat_template

    if not text.strip():
        raise InvalidArgument("--prompt is empty: give the text to answer")
    why = not_unicode(text)
    if why:  # an argument not in UTF-8 reaches Python as lone surrogates
        raise InvalidArgument(f"--prompt {why} (is it UTF-8?)")
    if chat:
        template = store.index.chat_template
        if template is None:
            raise InvalidArgument(f"{store.path}: --chat: the store keeps no chat template "
                                  f"(its source had none); give the prompt as plain text")
        text = render_chat_template(template, [{"role": "user", "content": text}],
                                    where=f"{store.path}: chat template")
    return store.text_tokenizer().encode(text).ids


@dataclass(frozen=True)
class Stage:
    """One stage's time, predicted and measured (ms)."""

    predicted_ms: float
    measured_ms: float

    @property
    def error_pct(self) -> float:
        return 100.0 * (self.measured_ms / self.predicted_ms - 1.0) if self.predicted_ms \
            else 0.0

    def to_dict(self) -> dict:
        return {"predicted_ms": self.predicted_ms, "measured_ms": self.measured_ms,
                "error_pct": self.error_pct}


@dataclass(frozen=True)
class PassStages:
    """A pass's stages: its total (start to token), its reads (the layers' and the
    table's, as the IO channel's busy time), the layers' compute and the LM head's."""

    total: Stage
    io: Stage
    compute: Stage
    head: Stage

    @property
    def work(self) -> Stage:
        """The compute thread's whole pass: the layers and the LM head."""
        return Stage(self.compute.predicted_ms + self.head.predicted_ms,
                     self.compute.measured_ms + self.head.measured_ms)

    def to_dict(self) -> dict:
        return {k: getattr(self, k).to_dict() for k in ("total", "io", "compute", "head")}


def pass_stages(predicted: Schedule, measured: PassTrace) -> PassStages:
    """A pass's stages, the cost model's schedule (its last layer the table) against the
    executor's trace."""
    *layers, head = predicted.layers
    busy = lambda ts: sum(t.io_ms for t in ts)  # noqa: E731  (the channel's)
    work = lambda ts: sum(t.compute_ms for t in ts)  # noqa: E731  (the compute thread's)
    return PassStages(
        total=Stage(predicted.latency_ms, measured.latency_ms),
        io=Stage(busy(predicted.layers), busy([*measured.layers, measured.head])),
        compute=Stage(work(layers), work(measured.layers)),
        head=Stage(work([head]), work([measured.head])))


@dataclass(frozen=True)
class GenerateReport:
    plan: str
    prompt_tokens: int
    tokens: list[int]
    text: str
    stop: str
    first: PassStages  # the prompt pass: time to first token
    steps: list[PassStages]  # every decode step
    memory_predicted: dict  # the plan's Memory by term (costmodel.Memory.to_dict)
    memory_measured: dict  # the executor's DecodeMemory.to_dict
    process_above_baseline_bytes: int
    agreement: dict | None  # with the full fp32 model's greedy answer

    @property
    def step_median(self) -> Stage:
        return Stage(statistics.median(s.total.predicted_ms for s in self.steps),
                     statistics.median(s.total.measured_ms for s in self.steps))

    def to_dict(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items()
               if k not in ("first", "steps")}
        out["first"] = self.first.to_dict()
        out["steps"] = [s.to_dict() for s in self.steps]
        out["step_median"] = self.step_median.to_dict() if self.steps else None
        return out


WARM_TOKENS = 2  # the throwaway answer before the baseline: the same prompt, this many tokens


def _baseline() -> int:
    """VmRSS with freed memory returned, and the peak reset to it (Linux), as the fresh
    process probe of `run` takes it (runtime/measurement/memprobe.py)."""
    release()
    base = status_bytes("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return base


def generate(plan: Plan, plan_path: str, scenario: Scenario, store: ShardStore,
             prompt: list[int], *, max_new_tokens: int | None, emulate: bool,
             threads: int | None, on_token: Callable[[int], None] | None = None,
             compare: bool = True, warm_reads: bool = False
             ) -> tuple[GenerateResult, GenerateReport]:
    """Answer `prompt` (token ids) as `plan` says and compare every figure with the plan's
    (`warm_reads`: DecodeExecutor's, with emulated storage)."""
    q = scenario.question
    if warm_reads and not emulate:
        raise InvalidArgument("--warm-reads paces page-cache reads by the emulated device; with "
                              "--no-emulate this machine's storage is read cold")
    if not q.decoding:
        raise InvalidArgument(f"{plan_path}: the plan answers an encoder's question, not a "
                              f"decoder's (no prompt_tokens/answer_tokens): use `run`")
    if q.kv_cache_bits != 32:
        raise InvalidArgument(f"{plan_path}: the plan holds its KV cache at {q.kv_cache_bits} "
                              f"bits; the decode executor keeps it in fp32 (kv_bits 32): "
                              f"solve with kv_bits 32 to run it")
    if len(prompt) > q.prompt_tokens:
        raise InvalidArgument(f"the prompt is {len(prompt)} tokens, longer than the "
                              f"{q.prompt_tokens} the plan was made for (its prompt_tokens); "
                              f"shorten it or solve for a longer prompt")
    if max_new_tokens is None:
        max_new_tokens = q.answer_tokens
    if not 1 <= max_new_tokens <= q.answer_tokens:
        raise InvalidArgument(f"--max-new-tokens must be in [1, {q.answer_tokens}] (the "
                              f"plan's answer_tokens), got {max_new_tokens}")
    picks, table = picks_of(plan)

    def executor() -> DecodeExecutor:
        return DecodeExecutor(store, picks, table, context=q.context_tokens,
                              window=plan.window, device=scenario.device if emulate else None,
                              threads=threads, prompt_tokens=q.prompt_tokens,
                              warm_reads=warm_reads)

    with executor() as warm:  # kernels, pools, code pages, BLAS buffers: before the baseline
        warm.generate(prompt, WARM_TOKENS, eos_id=None)
    del warm
    base = _baseline()
    with executor() as ex:
        result = ex.generate(prompt, max_new_tokens, on_token)
    above = status_bytes("VmHWM") - base
    selection = plan.selection(scenario)
    first, steps = answer_schedules(scenario, selection, plan.layout, len(prompt),
                                    [p.position for p in result.passes[1:]])
    agreement = _agreement(store, prompt, result.tokens) if compare else None
    text = store.text_tokenizer().decode(result.tokens)
    report = GenerateReport(
        plan=plan_path, prompt_tokens=len(prompt), tokens=result.tokens, text=text,
        stop=result.stop, first=pass_stages(first, result.passes[0]),
        steps=[pass_stages(s, m) for s, m in zip(steps, result.passes[1:])],
        memory_predicted=plan.memory.to_dict(), memory_measured=result.memory.to_dict(),
        process_above_baseline_bytes=above, agreement=agreement)
    return result, report


def _agreement(store: ShardStore, prompt: list[int], tokens: list[int]) -> dict:
    """The full fp32 model's greedy answer to the same prompt, as long: the tokens equal
    position by position, and the common prefix."""
    full = store.decoder(context=len(prompt) + len(tokens) + 1)
    ref = full.greedy(torch.tensor([prompt]), max_new_tokens=len(tokens),
                      eos_id=store.config.eos_id)[0]
    same = sum(a == b for a, b in zip(tokens, ref))
    prefix = next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b),
                  min(len(tokens), len(ref)))
    return {"full_model_tokens": ref, "equal": same, "of": len(tokens),
            "common_prefix": prefix}


def format_report(r: GenerateReport) -> str:
    def line(name: str, s: Stage) -> str:
        return (f"{name:<22} predicted {s.predicted_ms:9.2f} ms  measured {s.measured_ms:9.2f} "
                f"ms  {s.error_pct:+6.1f}%")

    lines = [f"{r.plan}: {r.prompt_tokens} prompt tokens, {len(r.tokens)} generated "
             f"({r.stop})", line("time to first token", r.first.total)]
    for name in ("io", "compute", "head"):
        lines.append(line(f"  prompt pass {name}", getattr(r.first, name)))
    if r.steps:
        lines.append(line("per token (median)", r.step_median))
        last = r.steps[-1]
        lines.append(line("per token (last)", last.total))
        for name in ("io", "compute", "head"):
            s = Stage(statistics.median(getattr(x, name).predicted_ms for x in r.steps),
                      statistics.median(getattr(x, name).measured_ms for x in r.steps))
            lines.append(line(f"  step {name} (median)", s))
    p, m = r.memory_predicted, r.memory_measured
    lines.append(f"memory: predicted peak {p['peak_bytes'] / 1e6:.3f} MB; executor "
                 f"{m['allocated_bytes'] / 1e6:.3f} MB allocated, {m['peak_bytes'] / 1e6:.3f} "
                 f"MB at its peak ({100 * (m['peak_bytes'] / p['peak_bytes'] - 1):+.2f}%); "
                 f"process {r.process_above_baseline_bytes / 1e6:.3f} MB above its baseline "
                 f"({100 * (r.process_above_baseline_bytes / p['peak_bytes'] - 1):+.1f}%)")
    if r.agreement is not None:
        a = r.agreement
        lines.append(f"answer: {a['equal']}/{a['of']} tokens equal to the full fp32 model's "
                     f"greedy answer (first {a['common_prefix']} identical)")
    return "\n".join(lines)
