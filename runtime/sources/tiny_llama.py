"""A tiny random llama checkpoint in the Hugging Face layout (what
`python -m runtime.sources.tinyckpt DIR --family llama` writes), for tests of the llama
family against transformers without a download. Nothing here imports transformers.

    config.json             model_type llama: 2 layers, hidden 64, 4 query heads sharing
                            2 KV heads (head_dim 16), FFN 96 (SwiGLU), vocabulary 320,
                            256 positions, RoPE base 10000, RMSNorm eps 1e-5, tied
                            embeddings, bos 1 / eos 2 / pad 2
    model.safetensors       every tensor of LlamaForCausalLM but the (tied) LM head,
                            numpy random numbers (scaled so that logits spread: greedy
                            choices are not near-ties)
    tokenizer.json          byte-level BPE made with `tokenizers`: 3 ChatML control tokens,
                            the 256 byte symbols, then ~40 hand-picked merges (< 320 ids)
    tokenizer_config.json   the chat template (ChatML, as SmolLM2's) and special tokens
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SHAPE = {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 96, "vocab": 320,
         "positions": 256}
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# merges over the byte-level alphabet ("Ġ" is the space byte); each join is a new token
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"),
          ("o", "n"), ("Ġ", "s"), ("r", "e"), ("a", "t"), ("e", "n"), ("Ġ", "c"),
          ("o", "r"), ("i", "s"), ("Ġ", "w"), ("e", "s"), ("Ġ", "o"), ("i", "t"),
          ("a", "n"), ("Ġ", "p"), ("in", "g"), ("Ġ", "f"), ("e", "d"), ("Ġ", "b"),
          ("Ġa", "n"), ("Ġan", "d"), ("o", "u"), ("a", "r"), ("Ġ", "m"), ("l", "l"),
          ("Ġ", "i"), ("Ġo", "f"), ("Ġ", "h"), ("Ġ", "d"), ("Ġi", "s"), ("Ġ", "Ġ"),
          ("ĠĠ", "ĠĠ"), ("Ċ", "Ċ"), ("Ġ", "1"), ("Ġw", "he")]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny random model<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_llama_config() -> dict:
    d = SHAPE
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "num_hidden_layers": d["layers"], "hidden_size": d["hidden"],
            "num_attention_heads": d["heads"], "num_key_value_heads": d["kv_heads"],
            "head_dim": d["hidden"] // d["heads"], "intermediate_size": d["ffn"],
            "vocab_size": d["vocab"], "max_position_embeddings": d["positions"],
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False,
            "mlp_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
            "eos_token_id": 2, "pad_token_id": 2, "torch_dtype": "float32"}


def tiny_llama_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """Every tensor of the tiny llama under HF names, random: embeddings N(0, 0.3^2), Wq,
    Wk, Wo and down N(0, 9/in) (sharp attention, layer outputs larger than the embedding:
    greedy continuations vary instead of repeating the last token, and the top two
    logits of 32 greedy steps stay >= 0.01 apart on the tests' prompts), Wv, gate and up
    N(0, 1/in), norm weights 1 + N(0, 0.1^2)."""
    rng = np.random.default_rng(seed)
    d, f, V = SHAPE["hidden"], SHAPE["ffn"], SHAPE["vocab"]
    hd = d // SHAPE["heads"]

    def w(out, inp, gain=1.0):
        return (rng.normal(size=(out, inp)) * (gain / np.sqrt(inp))).astype(np.float32)

    def norm():
        return (1 + 0.1 * rng.normal(size=d)).astype(np.float32)

    t = {"model.embed_tokens.weight": (0.3 * rng.normal(size=(V, d))).astype(np.float32)}
    for l in range(SHAPE["layers"]):
        p = f"model.layers.{l}."
        t.update({p + "self_attn.q_proj.weight": w(SHAPE["heads"] * hd, d, 3.0),
                  p + "self_attn.k_proj.weight": w(SHAPE["kv_heads"] * hd, d, 3.0),
                  p + "self_attn.v_proj.weight": w(SHAPE["kv_heads"] * hd, d),
                  p + "self_attn.o_proj.weight": w(d, SHAPE["heads"] * hd, 3.0),
                  p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
                  p + "mlp.down_proj.weight": w(d, f, 3.0),
                  p + "input_layernorm.weight": norm(),
                  p + "post_attention_layernorm.weight": norm()})
    t["model.norm.weight"] = norm()
    return t


def tiny_llama_tokenizer():
    """Byte-level BPE over the byte alphabet and MERGES, ChatML control tokens first."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    vocab = list(SPECIALS) + sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab += ["".join(m) for m in MERGES]
    assert len(vocab) == len(set(vocab)) and len(vocab) <= SHAPE["vocab"], len(vocab)
    tok = Tokenizer(BPE({v: i for i, v in enumerate(vocab)}, MERGES, dropout=None,
                        continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in SPECIALS])
    return tok


def write_tiny_llama(path: str | Path, seed: int = 0) -> Path:
    """The tiny llama checkpoint in directory `path` (created)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tiny_llama_tensors(seed), str(path / "model.safetensors"),
              metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(tiny_llama_config(), indent=1))
    tiny_llama_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIALS[1],
        "eos_token": SPECIALS[2], "pad_token": SPECIALS[2], "unk_token": None,
        "add_bos_token": False, "chat_template": CHAT_TEMPLATE}, indent=1))
    return path
