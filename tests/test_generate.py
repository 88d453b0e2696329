"""`elasticplan generate` on the tiny random llama: a decoder plan solved from a decoder's
question answers a prompt through the decode executor, its report compares every figure
with the plan's, a hold-in-memory plan answers exactly as transformers' greedy decoding
does, and bad input is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from elasticplan.cli import main
from runtime.sources.tiny_llama import write_tiny_llama
from runtime.store import ShardStore

ROOT = Path(__file__).resolve().parent.parent
DEVICE = ROOT / "problems/devices/phone-ufs31.yaml"
PROMPTS = ["the cat sat on the mat", "where is the hat"]


def cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny llama's store, its measured profile (with its table), and a decoder's
    question on it: 96 prompt tokens, 8 answer tokens."""
    root = tmp_path_factory.mktemp("generate")
    ckpt = write_tiny_llama(root / "ckpt")
    store = root / "store"
    assert cli("shard", "--checkpoint", ckpt, "--out", store) == 0
    profile = root / "profile.yaml"
    assert cli("profile", "--store", store, "--out", profile, "--cache", root / "cache",
               "--texts", 2, "--max-tokens", 8) == 0
    sc = root / "question.yaml"
    sc.write_text(yaml.safe_dump({
        "name": "tiny-decoding", "device": str(DEVICE), "model": str(profile),
        "prompt_tokens": 96, "answer_tokens": 8, "target_latency_ms": 1000,
        "preload_budget_mb": 100, "min_shards_per_layer": 1}))
    return root, ckpt, store, sc


def _oracle(ckpt: Path, ids: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of `ids`, n tokens (EOS included when it comes)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt),
                                                              attn_implementation="eager")
    model.eval()
    cfg = json.loads((ckpt / "config.json").read_text())
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             eos_token_id=cfg["eos_token_id"], pad_token_id=cfg["eos_token_id"])
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_hold_in_memory_answers_as_transformers_does(tiny, prompt, tmp_path, capsys):
    from runtime.measurement.generate import prompt_ids

    _, ckpt, store, sc = tiny
    plan, out = tmp_path / "him.json", tmp_path / "report.json"
    assert cli("baseline", "hold-in-memory", sc, "-o", plan) == 0
    assert cli("generate", plan, "--prompt", prompt, "--chat", "--max-new-tokens", 6,
               "--json", out) == 0
    report = json.loads(out.read_text())
    ids = prompt_ids(ShardStore(store), prompt, chat=True)
    assert report["prompt_tokens"] == len(ids)
    assert report["tokens"] == _oracle(ckpt, ids, 6)
    assert report["agreement"]["equal"] == report["agreement"]["of"] == len(report["tokens"])
    printed = capsys.readouterr().out
    assert report["text"] in printed and "time to first token" in printed


def test_a_budgeted_plan_streams_and_reports_every_figure(tiny, tmp_path):
    _, _, store, sc = tiny
    plan, out = tmp_path / "plan.json", tmp_path / "report.json"
    hold = tmp_path / "him.json"
    assert cli("baseline", "hold-in-memory", sc, "-o", hold) == 0
    peak = json.loads(hold.read_text())["memory"]["peak_bytes"]
    # a third of hold-in-memory's preload as buffer, and less memory than it holds: the
    # plan must stream
    assert cli("solve", sc, "--buffer-mb", 0.1, "--memory-mb", 0.97 * peak / 1e6,
               "--window", 1, "-o", plan) == 0
    p = json.loads(plan.read_text())
    assert any(not c["preloaded"] for lp in p["layers"] for c in lp["shards"])
    assert cli("generate", plan, "--prompt", PROMPTS[0], "--max-new-tokens", 5, "--json",
               out) == 0
    r = json.loads(out.read_text())
    assert len(r["tokens"]) == len(r["steps"]) + 1 <= 5
    for stage in ("total", "io", "compute", "head"):
        assert r["first"][stage]["predicted_ms"] > 0 and r["first"][stage]["measured_ms"] > 0
    assert r["memory_predicted"]["peak_bytes"] == p["memory"]["peak_bytes"]
    # the executor holds exactly what the plan predicts, its ring at most full
    assert r["memory_measured"]["allocated_bytes"] == p["memory"]["peak_bytes"]
    assert r["memory_measured"]["peak_bytes"] <= r["memory_measured"]["allocated_bytes"]
    assert r["memory_measured"]["kv_cache_bytes"] == p["memory"]["kept_bytes"]


def test_bad_input_is_one_line_and_exit_2(tiny, tmp_path, capsys, store_dir):
    _, _, _, sc = tiny
    plan = tmp_path / "him.json"
    assert cli("baseline", "hold-in-memory", sc, "-o", plan) == 0
    capsys.readouterr()
    cases = [
        (["--prompt", "  "], "--prompt is empty"),
        (["--prompt", "the cat sat on the mat " * 16], "longer than the 96"),
        (["--prompt", "hi", "--max-new-tokens", 9], "--max-new-tokens must be in [1, 8]"),
        (["--prompt", "hi", "--no-emulate", "--warm-reads"], "with --no-emulate this machine"),
        (["--prompt", "caf\udce9"], "--prompt holds a lone surrogate (U+DCE9) at character 4"),
    ]
    for args, words in cases:
        assert cli("generate", plan, *args) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1
    half = tmp_path / "kv16.yaml"
    half.write_text(yaml.safe_dump({**yaml.safe_load(sc.read_text()), "kv_bits": 16}))
    kv16 = tmp_path / "kv16.json"
    assert cli("baseline", "hold-in-memory", half, "-o", kv16) == 0
    capsys.readouterr()
    assert cli("generate", kv16, "--prompt", "hi") == 2
    err = capsys.readouterr().err
    assert "keeps it in fp32" in err and err.count("\n") == 1
    assert cli("run", plan) == 2  # a decoder's plan is generate's
    err = capsys.readouterr().err
    assert "use `elasticplan generate`" in err and err.count("\n") == 1
    minilm = tmp_path / "minilm.json"
    assert cli("baseline", "hold-in-memory", ROOT / "problems/scenarios/minilm-phone.yaml",
               "-o", minilm) == 0
    capsys.readouterr()
    assert cli("generate", minilm, "--prompt", "hi") == 2
    err = capsys.readouterr().err
    assert "an encoder's question" in err and err.count("\n") == 1
    assert cli("generate", plan, "--prompt", "hi", "--store", store_dir) == 8
    err = capsys.readouterr().err
    assert "the store holds an encoder" in err and err.count("\n") == 1
    (tmp_path / "dir.json").mkdir()
    assert cli("generate", plan, "--prompt", "hi", "--json", tmp_path / "dir.json") == 11
    err = capsys.readouterr().err  # said before any token
    assert "not a regular file" in err and err.count("\n") == 1
    doc = json.loads(plan.read_text())
    doc["memory"] = None
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(doc))
    assert cli("generate", bare, "--prompt", "hi") == 2
    err = capsys.readouterr().err
    assert "memory: missing: a decoder's plan records its predicted memory" in err
    assert cli("calibrate", "--scenario", sc, "--warm-reads", "--out-dir", tmp_path / "c") == 2
    err = capsys.readouterr().err
    assert "--warm-reads calibrates a decoder's scenario on emulated storage" in err


def test_calibrate_on_a_decoder_writes_a_decoder_device_and_question(tiny, tmp_path):
    """`calibrate --scenario <a decoder's>` measures prompt passes and decode steps in the
    decode executor (runtime/decode_calibrate.py): the device gives a per-weight cost for
    every stored bitwidth, fp32 included, and the scenario it writes is the decoder's
    question on it, which solves and generates."""
    from elasticplan.problem.loader import load_scenario

    _, _, store, sc = tiny
    out = tmp_path / "cal"
    # storage slow enough that the emulated clock, not this host's cold reads, sets the IO
    assert cli("calibrate", "--scenario", sc, "--store", store, "--storage-mb-s", 20,
               "--storage-latency-us", 2000,
               "--plans", 8, "--repeats", 2, "--budget-s", 0, "--max-error-pct", 1000,
               "--out-dir", out) == 0
    device = yaml.safe_load((out / "device.yaml").read_text())
    bits = ShardStore(store).bitwidths
    assert sorted(device["compute"]["dequant_ns_per_weight"]) == sorted(bits)
    assert device["compute"]["pool_ms"] == 0
    header = (out / "device.yaml").read_text()
    assert "decode steps per run" in header and "ttft" in header
    calibrated = load_scenario(out / "scenario.yaml")
    q = calibrated.question
    assert (q.prompt_tokens, q.answer_tokens) == (96, 8)
    assert calibrated.device.dequant_ns(32) is not None
    plan = tmp_path / "plan.json"
    assert cli("solve", out / "scenario.yaml", "-o", plan) == 0
    assert cli("generate", plan, "--prompt", PROMPTS[1], "--max-new-tokens", 3,
               "--no-compare") == 0


def test_the_throwaway_answer_before_the_baseline_is_the_same_prompts(tiny, tmp_path,
                                                                        monkeypatch):
    """Before its baseline, `generate` answers the same prompt with a throwaway executor of
    the same plan (a prompt pass and a step: the prompt pass's kernels and the BLAS's
    packing buffers are the process's then, as in `run`'s probe), then the measured one
    answers it in full."""
    from runtime.decoding import DecodeExecutor
    from runtime.measurement.generate import WARM_TOKENS, prompt_ids

    _, _, store, sc = tiny
    plan = tmp_path / "him.json"
    assert cli("baseline", "hold-in-memory", sc, "-o", plan) == 0
    calls = []
    real = DecodeExecutor.generate

    def recorded(self, prompt, max_new_tokens, *a, **k):
        calls.append((list(prompt), max_new_tokens))
        return real(self, prompt, max_new_tokens, *a, **k)

    monkeypatch.setattr(DecodeExecutor, "generate", recorded)
    assert cli("generate", plan, "--prompt", PROMPTS[1], "--max-new-tokens", 4,
               "--no-compare") == 0
    ids = prompt_ids(ShardStore(store), PROMPTS[1], chat=False)
    assert calls == [(ids, WARM_TOKENS), (ids, 4)]
