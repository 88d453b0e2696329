"""Our encoder against an implementation that is not ours: `transformers`' BertModel on a
tiny random BERT checkpoint written here in the Hugging Face layout (config.json and
model.safetensors, HF tensor names), at fp32. The checkpoint is made from numpy random
numbers with `safetensors`, not by transformers, so the oracle only reads it.
`transformers` is a pinned test-only dependency (pyproject.toml, extra `test`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from runtime.model import Config, LayerWeights, load_hf_tensors, resident_names, shard_from_hf

TINY = {"vocab_size": 97, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 40, "type_vocab_size": 2,
        "layer_norm_eps": 1e-12, "hidden_act": "gelu", "model_type": "bert",
        "architectures": ["BertModel"], "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0}


def tiny_bert(path, seed: int = 0) -> None:
    """A random BERT checkpoint: every tensor BertModel has, in its names and shapes."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    d, f, V = TINY["hidden_size"], TINY["intermediate_size"], TINY["vocab_size"]

    def w(*shape, scale=0.2):
        return (rng.normal(size=shape) * scale).astype(np.float32)

    def ln(prefix):
        return {f"{prefix}.weight": 1 + w(d, scale=0.1), f"{prefix}.bias": w(d, scale=0.1)}

    t = {"embeddings.word_embeddings.weight": w(V, d),
         "embeddings.position_embeddings.weight": w(TINY["max_position_embeddings"], d),
         "embeddings.token_type_embeddings.weight": w(TINY["type_vocab_size"], d),
         **ln("embeddings.LayerNorm")}
    for l in range(TINY["num_hidden_layers"]):
        p = f"encoder.layer.{l}."
        for name in ("query", "key", "value"):
            t[f"{p}attention.self.{name}.weight"] = w(d, d)
            t[f"{p}attention.self.{name}.bias"] = w(d)
        t[f"{p}attention.output.dense.weight"] = w(d, d)
        t[f"{p}attention.output.dense.bias"] = w(d)
        t.update(ln(f"{p}attention.output.LayerNorm"))
        t[f"{p}intermediate.dense.weight"] = w(f, d)
        t[f"{p}intermediate.dense.bias"] = w(f)
        t[f"{p}output.dense.weight"] = w(d, f)
        t[f"{p}output.dense.bias"] = w(d)
        t.update(ln(f"{p}output.LayerNorm"))
    t["pooler.dense.weight"], t["pooler.dense.bias"] = w(d, d), w(d)
    save_file(t, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(TINY))


def our_hidden_states(path, ids: torch.Tensor, mask: torch.Tensor, drop: str | None = None
                      ) -> torch.Tensor:
    """Our encoder's last hidden state, every shard of every layer at fp32 (but `drop`, in
    layer 0), built from the checkpoint's tensors (the store's cut: one shard per head, one
    per FFN slice)."""
    from runtime.model import Encoder

    c = Config.from_hf(path)
    t = load_hf_tensors(path)
    resident = {k: torch.from_numpy(t[v]) for k, v in resident_names(c).items()}
    enc = Encoder(c, resident)
    names = c.shard_names()
    layers = []
    for l in range(c.layers):
        kept = [n for n in names if not (l == 0 and n == drop)]
        lw = LayerWeights(c, kept)
        for n in kept:
            m, b = shard_from_hf(t, c, l, n)
            lw.put(n, torch.from_numpy(m), torch.from_numpy(b))
        layers.append(lw)
    with torch.inference_mode():
        x = enc.embed(ids)
        for l, lw in enumerate(layers):
            x = enc.layer(l, x, mask, lw)
    return x


@pytest.mark.parametrize("seed", [0, 1])
def test_our_bert_layers_equal_transformers_bert_model(tmp_path, seed):
    tiny_bert(tmp_path, seed)
    rng = np.random.default_rng(seed + 10)
    ids = torch.from_numpy(rng.integers(0, TINY["vocab_size"], size=(3, 17)))
    mask = torch.ones(3, 17, dtype=torch.bool)
    mask[1, 11:] = False  # padded sequences: masked keys must not leak into attention
    mask[2, 5:] = False
    oracle = transformers.BertModel.from_pretrained(str(tmp_path), attn_implementation="eager")
    oracle.eval()
    with torch.inference_mode():
        theirs = oracle(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    ours = our_hidden_states(tmp_path, ids, mask)
    valid = mask.unsqueeze(-1).expand_as(ours)
    assert torch.allclose(ours[valid], theirs[valid], atol=2e-5, rtol=1e-5)
    # the comparison can fail: one head fewer in the first layer is far from the oracle
    dropped = our_hidden_states(tmp_path, ids, mask, drop="head1")
    assert (dropped - theirs)[valid].abs().max() > 1e-2
