"""A llama model into the shard store: `elasticplan shard --checkpoint DIR` (a Hugging Face
llama directory) and `shard --gguf FILE`, on the tiny random llama. The store's decoder in
fp32 is the source's decoder exactly; a quantised or dropped shard is what the store's
decoder of the variant and the family's own cut give; the index records the family, the
llama shape and the chat template; refusals name what is wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from elasticplan.cli import main
from runtime.families.llama import Decoder, LayerWeights, cut_shard
from runtime.schemes.base import FP32
from runtime.sources.llama_source import open_gguf, open_hf_llama
from runtime.sources.tiny_llama import CHAT_TEMPLATE, write_tiny_llama
from runtime.store import ShardStore
from tests.test_gguf_source import write_gguf

PROMPTS = ["the cat sat on the mat", "where is the hat"]


def cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama-store")
    ckpt = write_tiny_llama(root / "ckpt")
    assert cli("shard", "--checkpoint", ckpt, "--out", root / "store") == 0
    return ckpt, root / "store"


def _batch(tok, texts):
    enc = [tok.encode(t).ids for t in texts]
    n = max(map(len, enc))
    ids = torch.full((len(enc), n), 2, dtype=torch.int64)
    mask = torch.zeros(len(enc), n, dtype=torch.bool)
    for i, e in enumerate(enc):
        ids[i, :len(e)], mask[i, :len(e)] = torch.tensor(e), True
    return ids, mask


def test_the_store_of_a_llama_checkpoint_is_its_model(built):
    ckpt, store_dir = built
    src = open_hf_llama(ckpt)
    store = ShardStore(store_dir)
    assert store.config.to_dict() == src.config.to_dict() and store.config.family == "llama"
    assert store.index.chat_template == CHAT_TEMPLATE
    assert store.bitwidths == (2, 3, 4, 6, 8, 32)
    tok = store.text_tokenizer()
    for t in PROMPTS + ["ünïcödé 🙂 and <|im_start|>"]:
        assert tok.encode(t).ids == src.tokenizer.encode(t).ids
    ids, mask = _batch(tok, PROMPTS)
    with torch.inference_mode():
        want = Decoder.from_tensors(src.config, src.tensors, context=32).prefill(ids, mask)
        got = store.decoder(context=32).prefill(ids, mask)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert store.verify() == []


def test_a_quantised_or_dropped_shard_is_the_familys_cut_of_it(built):
    """Layer 1 with group0 at 4 bits and ffn2 dropped: the store's decoder equals a decoder
    whose layer holds the store's decoded group0 and the family's own cut of the rest, and
    differs from the full model (the negative control)."""
    ckpt, store_dir = built
    src = open_hf_llama(ckpt)
    store = ShardStore(store_dir)
    c = store.config
    bits = [{n: FP32 for n in c.shard_names()} for _ in range(c.layers)]
    bits[1]["group0"] = 4
    del bits[1]["ffn2"]
    names = list(bits[1])
    w = LayerWeights(c, names)
    for n in names:
        m = store.load(1, n, 4)[0] if n == "group0" else \
            torch.from_numpy(cut_shard(src.tensors, c, 1, n)[0])
        w.put(n, m)
    full = Decoder.from_tensors(c, src.tensors, context=32)
    expected = Decoder(c, full.r, [full.layers[0], w], context=32)
    ids, mask = _batch(store.text_tokenizer(), PROMPTS)
    with torch.inference_mode():
        got = store.decoder(bits, context=32).prefill(ids, mask)
        want = expected.prefill(ids, mask)
        ref = full.prefill(ids, mask)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert (got - ref).abs().max() > 1e-3
    # the 4-bit group is its fp32 cut within the uniform scheme's bound (max|w_row| / 2^4)
    fp32 = cut_shard(src.tensors, c, 1, "group0")[0]
    k = c.shard_in_rows("group0")
    err = (store.load(1, "group0", 4)[0].numpy() - fp32)[:k]
    assert np.sqrt((err ** 2).mean(axis=1)).max() <= np.abs(fp32[:k]).max() / 16


def test_a_gguf_file_gives_the_same_store_as_its_checkpoint(built, tmp_path):
    """The tiny llama as a llama.cpp GGUF (F32 tensors): `shard --gguf` writes the same shard
    files and resident tensors as the checkpoint's store; a rebuild keeps every file."""
    _, store_dir = built
    gguf = write_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "from-gguf"
    assert cli("shard", "--gguf", gguf, "--name", "ckpt", "--out", out) == 0
    a, b = ShardStore(store_dir), ShardStore(out)
    assert b.config.family == "llama" and b.index.chat_template == CHAT_TEMPLATE
    for (name, e) in a.index.files.items():
        assert b.index.files[name].sha256 == e.sha256, name
    ids, mask = _batch(b.text_tokenizer(), PROMPTS)
    with torch.inference_mode():
        torch.testing.assert_close(b.decoder(context=32).prefill(ids, mask),
                                   a.decoder(context=32).prefill(ids, mask),
                                   rtol=1e-5, atol=1e-5)  # (eps is fp32 in a GGUF)
    before = json.loads((out / "index.json").read_text())
    assert cli("shard", "--gguf", gguf, "--name", "ckpt", "--out", out) == 0
    assert json.loads((out / "index.json").read_text()) == before
    assert open_gguf(gguf).describe().startswith("tiny, llama, 2 layers x 4 heads (2 KV")


@pytest.mark.parametrize("args, needle", [
    (["--scheme", "dict"], "uniform scheme"),
    (["--pooling", "mean"], "--pooling"),
])
def test_llama_store_refusals(built, tmp_path, capsys, args, needle):
    ckpt, _ = built
    out = tmp_path / "bad"
    assert cli("shard", "--checkpoint", ckpt, "--out", out, *args) != 0
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (out / "index.json").exists()


def test_two_model_sources_are_refused(built, capsys):
    ckpt, _ = built
    assert cli("shard", "--checkpoint", ckpt, "--model", "smollm2-135m") == 2
    assert "give one model source" in capsys.readouterr().err


def test_decoder_profile_measures_next_token_kl(built, tmp_path, capsys):
    """`elasticplan profile` of a llama store: a planner-readable profile whose importance is
    max(0, KL(dropped) - KL(b)); a cached measurement equals the KL computed directly from
    the store's whole decoder with that one change (not through the kept layer inputs); a
    rerun measures nothing new."""
    import torch.nn.functional as F

    from elasticplan.problem.loader import parse_model, read_yaml
    from runtime.profiling.decoder_profile import scored, token_batches
    from runtime.profiling.profile import DROP
    from runtime.sources.task import load_splits

    _, store_dir = built
    out = tmp_path / "tiny.yaml"
    args = ("profile", "--store", store_dir, "--out", out, "--cache", tmp_path / "cache",
            "--texts", 4, "--max-tokens", 16)
    assert cli(*args) == 0
    profile = parse_model(read_yaml(out), str(out))
    raw = json.loads(out.with_name("tiny.measurements.json").read_text())
    ms = {(m["layer"], m["shard"], m["variant"]): m for m in raw["measurements"]}
    store = ShardStore(store_dir)
    assert len(ms) == store.config.layers * len(store.config.shard_names()) * 6
    for l, layer in enumerate(profile.layers):
        for s in layer.shards:
            drop = ms[l, s.name, DROP]["kl"]
            assert s.importance[-1] == pytest.approx(drop, rel=1e-5)
            assert all(0 <= i <= s.importance[-1] * (1 + 1e-5) for i in s.importance)
    assert -1 <= raw["additivity"]["spearman"] <= 1
    # one measurement recomputed the plain way: layer 1's group1 at 2 bits
    c = store.config
    bits = [{n: FP32 for n in c.shard_names()} for _ in range(c.layers)]
    bits[1]["group1"] = 2
    batches = token_batches(store, list(load_splits().calibration.texts[:4]), 16, 8)
    kl = n = 0.0
    with torch.inference_mode():
        for ids, mask in batches:
            ref = F.log_softmax(store.decoder(context=16).prefill(ids, mask)[scored(mask)], -1)
            got = F.log_softmax(store.decoder(bits, context=16).prefill(ids, mask)[scored(mask)],
                                -1)
            kl += float((ref.exp() * (ref - got)).sum())
            n += int(scored(mask).sum())
    assert ms[1, "group1", 2]["kl"] == pytest.approx(kl / n, rel=1e-4, abs=1e-7)
    assert ms[1, "group1", 2]["kl"] > 0
    capsys.readouterr()
    assert cli(*args) == 0
    assert "0 to measure" in capsys.readouterr().out


def test_a_variant_whose_weights_are_fp32s_measures_as_the_full_model(built, monkeypatch):
    """The profiler's shortcut (a variant that decodes to the fp32 weights bit for bit, as a
    GGUF's Q4_1 layers do in the group scheme, is not run: KL 0, top-1 1) is what running it
    gives: the full model scored from any layer's kept input is exactly (0, 1)."""
    from runtime.profiling.decoder_profile import DecoderProfiler, token_batches
    from runtime.sources.task import load_splits

    store = ShardStore(built[1])
    batches = token_batches(store, list(load_splits().calibration.texts[:3]), 12, 8)
    profiler = DecoderProfiler(store, batches)
    for start in range(store.config.layers):
        layers = list(profiler.full)
        layers[start] = profiler.layer_with(start, {"group1": FP32})
        assert profiler.score(layers, start=start) == (0.0, 1.0)
    real = profiler.measure(1, "group1", 4)
    assert real.kl > 0 and (real.kl, real.top1) != (0.0, 1.0)  # a lossy variant is run
    fp32 = store.load(1, "group1", FP32)
    load = store.load
    monkeypatch.setattr(store, "load", lambda l, n, b: fp32 if (l, n) == (1, "group1")
                        else load(l, n, b))
    m = profiler.measure(1, "group1", 4)
    assert (m.layer, m.shard, m.variant, m.kl, m.top1) == (1, "group1", 4, 0.0, 1.0)


def test_evaluate_a_decoder_plan(built, tmp_path, capsys):
    """A plan on a llama store's profile (planned as for an encoder until decoders are
    planned token by token): `evaluate` reports KL, top-1 agreement and perplexity on the
    test tweets. Keeping every shard in fp32 is the full model (KL 0, agreement 1, the fp32
    perplexity); the all-2-bit baseline's KL equals the KL computed through the store's
    decoders with prefill (another code path than evaluate's)."""
    import torch.nn.functional as F

    from runtime.profiling.decoder_profile import EVAL_TEXTS, EVAL_TOKENS, scored, token_batches
    from runtime.sources.task import load_splits

    _, store_dir = built
    profile = tmp_path / "profile.yaml"
    assert cli("profile", "--store", store_dir, "--out", profile, "--cache", tmp_path / "c",
               "--texts", 2, "--max-tokens", 8) == 0
    sc = tmp_path / "sc.yaml"
    assert cli("scenario", "--store", store_dir, "--profile", profile, "--device",
               "problems/devices/phone-ufs31.yaml", "--target-ms", 50, "-o", sc) == 0
    results = {}
    for name in ("hold-in-memory", "uniform-2"):
        plan, out = tmp_path / f"{name}.json", tmp_path / f"{name}.ev.json"
        assert cli("baseline", name, sc, "-o", plan) == 0
        assert cli("evaluate", plan, "--json", out) == 0
        results[name] = json.loads(out.read_text())
    full = results["hold-in-memory"]
    assert full["kl"] == pytest.approx(0, abs=1e-6) and full["top1"] == 1.0
    assert full["perplexity"] == pytest.approx(full["fp32_perplexity"])
    assert full["predicted_kl"] == pytest.approx(0, abs=1e-9)  # nothing left out
    two = results["uniform-2"]
    assert two["kl"] > 10 * two["kl_stderr"] > 0 and two["top1"] < 1.0
    # the importance left out: every shard's single-shard 2-bit KL, summed (positive)
    assert two["predicted_kl"] > 0
    store = ShardStore(store_dir)
    c = store.config
    bits = [{n: 2 for n in c.shard_names()} for _ in range(c.layers)]
    kl = []
    with torch.inference_mode():
        for ids, mask in token_batches(store, list(load_splits().test.texts[:EVAL_TEXTS]),
                                       EVAL_TOKENS, 8):
            n = ids.shape[1]
            ref = F.log_softmax(store.decoder(context=n).prefill(ids, mask), -1)
            got = F.log_softmax(store.decoder(bits, context=n).prefill(ids, mask), -1)
            per = (ref.exp() * (ref - got)).sum(-1)
            kl += [float(per[i][scored(mask)[i]].mean()) * int(scored(mask)[i].sum())
                   for i in range(ids.shape[0])]
    assert two["kl"] == pytest.approx(sum(kl) / two["positions"], rel=1e-4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 3e38])
def test_a_llama_with_non_finite_weights_is_refused_at_shard(tmp_path, capsys, bad):
    """A NaN, an infinity or an absurd weight in a layer-1 up projection: `shard` refuses
    the checkpoint naming the tensor (exit 8) and writes nothing."""
    from safetensors.numpy import load_file, save_file

    ckpt = write_tiny_llama(tmp_path / "ckpt")
    t = load_file(str(ckpt / "model.safetensors"))
    t["model.layers.1.mlp.up_proj.weight"][3, 5] = bad
    save_file(t, str(ckpt / "model.safetensors"))
    out = tmp_path / "store"
    assert cli("shard", "--checkpoint", ckpt, "--out", out) == 8
    err = capsys.readouterr().err
    assert "model.layers.1.mlp.up_proj.weight" in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("name,scheme", [("smollm2-135m", "uniform"),
                                         ("smollm2-135m-group", "group")])
def test_the_committed_smollm2_profile_is_its_store(name, scheme):
    """problems/models/smollm2-135m.yaml (measured by `elasticplan profile --store
    build/shards/smollm2-135m --texts 8 --max-tokens 16`) and smollm2-135m-group.yaml (the
    group store's) load as model profiles, hold every KV group and FFN slice of the 30
    layers with the bytes their scheme stores them in, importance bounded by the drop's KL,
    and the text and additivity they record; in the group scheme, where the GGUF's Q4_1
    layers come back exactly at 4, 6 and 8 bits, those variants' KL is 0 and their
    importance the drop's."""
    from pathlib import Path

    from elasticplan.problem.loader import parse_model, read_yaml
    from runtime.families.llama import LlamaConfig
    from runtime.profiling.profile import DROP
    from runtime.schemes import create
    from runtime.store import variant_bytes

    root = Path(__file__).resolve().parent.parent / "problems" / "models"
    data = read_yaml(root / f"{name}.yaml")
    profile = parse_model(data, f"{name}.yaml")
    coder = create(scheme)
    arch = dict(data["architecture"])
    arch.pop("family")
    c = LlamaConfig.from_dict(arch, "smollm2-135m")
    assert (c.layers, c.groups, c.ffn_slices) == (30, 3, 12)
    raw = json.loads((root / f"{name}.measurements.json").read_text())
    assert raw["text"]["split"] == "calibration" and raw["text"]["positions"] > 0
    assert 0.5 < raw["additivity"]["spearman"] <= 1
    kl = {(m["layer"], m["shard"], m["variant"]): m["kl"] for m in raw["measurements"]}
    for l, layer in enumerate(profile.layers):
        assert [s.name for s in layer.shards] == c.shard_names()
        for s in layer.shards:
            rows, k = c.shard_rows(s.name), c.shard_in_rows(s.name)
            assert list(s.bytes) == [variant_bytes(coder, rows, c.hidden, k, 0, b)
                                     for b in profile.bitwidths]
            assert s.importance[-1] == pytest.approx(kl[l, s.name, DROP], rel=1e-5)
            assert all(0 <= i <= s.importance[-1] * (1 + 1e-5) for i in s.importance)
            if scheme == "group":
                assert [kl[l, s.name, b] for b in (4, 6, 8)] == [0.0] * 3
                assert kl[l, s.name, 2] > 0
