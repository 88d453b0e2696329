"""Our encoder against an implementation that is not ours: `transformers`' BertModel,
DistilBertModel and RobertaModel on tiny random checkpoints written here in the Hugging
Face layout (config.json and model.safetensors, each family's tensor names), at fp32. The checkpoint is made from numpy random
numbers with `safetensors`, not by transformers, so the oracle only reads it.
`transformers` is a pinned test-only dependency (pyproject.toml, extra `test`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from runtime.model import Config, LayerWeights, load_hf_tensors, resident_names, shard_from_hf

SHAPE = {"layers": 3, "hidden": 32, "heads": 4, "ffn": 64, "vocab": 97, "positions": 40}


def tiny_config(family: str) -> dict:
    """config.json of a tiny checkpoint of the family, in its own keys."""
    d = SHAPE
    if family == "distilbert":
        return {"model_type": "distilbert", "architectures": ["DistilBertModel"],
                "n_layers": d["layers"], "dim": d["hidden"], "n_heads": d["heads"],
                "hidden_dim": d["ffn"], "vocab_size": d["vocab"],
                "max_position_embeddings": d["positions"], "activation": "gelu",
                "dropout": 0.0, "attention_dropout": 0.0, "sinusoidal_pos_embds": False,
                "pad_token_id": 0}
    return {"model_type": family, "architectures": [f"{'Bert' if family == 'bert' else 'Roberta'}Model"],
            "num_hidden_layers": d["layers"], "hidden_size": d["hidden"],
            "num_attention_heads": d["heads"], "intermediate_size": d["ffn"],
            "vocab_size": d["vocab"], "max_position_embeddings": d["positions"],
            "type_vocab_size": 2 if family == "bert" else 1, "layer_norm_eps": 1e-12 if family == "bert" else 1e-5,
            "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0, "pad_token_id": 0 if family == "bert" else 1}


def tiny_checkpoint(path, family: str, seed: int = 0) -> None:
    """A random checkpoint of the family: every tensor its base model has, in its names and
    shapes (BERT and RoBERTa: encoder.layer.N..., DistilBERT: transformer.layer.N...)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    d, f, V = SHAPE["hidden"], SHAPE["ffn"], SHAPE["vocab"]

    def w(*shape, scale=0.2):
        return (rng.normal(size=shape) * scale).astype(np.float32)

    def ln(prefix):
        return {f"{prefix}.weight": 1 + w(d, scale=0.1), f"{prefix}.bias": w(d, scale=0.1)}

    def linear(name, out, inp):
        return {f"{name}.weight": w(out, inp), f"{name}.bias": w(out)}

    t = {"embeddings.word_embeddings.weight": w(V, d),
         "embeddings.position_embeddings.weight": w(SHAPE["positions"], d),
         **ln("embeddings.LayerNorm")}
    if family != "distilbert":
        t["embeddings.token_type_embeddings.weight"] = \
            w(tiny_config(family)["type_vocab_size"], d)
    for l in range(SHAPE["layers"]):
        if family == "distilbert":
            p = f"transformer.layer.{l}."
            for name in ("q_lin", "k_lin", "v_lin", "out_lin"):
                t.update(linear(f"{p}attention.{name}", d, d))
            t.update({**ln(f"{p}sa_layer_norm"), **linear(f"{p}ffn.lin1", f, d),
                      **linear(f"{p}ffn.lin2", d, f), **ln(f"{p}output_layer_norm")})
            continue
        p = f"encoder.layer.{l}."
        for name in ("query", "key", "value"):
            t.update(linear(f"{p}attention.self.{name}", d, d))
        t.update({**linear(f"{p}attention.output.dense", d, d),
                  **ln(f"{p}attention.output.LayerNorm"),
                  **linear(f"{p}intermediate.dense", f, d), **linear(f"{p}output.dense", d, f),
                  **ln(f"{p}output.LayerNorm")})
    if family != "distilbert":
        t.update(linear("pooler.dense", d, d))
    save_file(t, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(tiny_config(family)))


ORACLES = {"bert": "BertModel", "distilbert": "DistilBertModel", "roberta": "RobertaModel"}


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


@pytest.mark.parametrize("family", sorted(ORACLES))
@pytest.mark.parametrize("seed", [0, 1])
def test_our_layers_equal_the_transformers_model(tmp_path, family, seed):
    """Each family's tiny checkpoint: our encoder's last hidden state equals transformers'
    on a padded batch (RoBERTa's padding token and position offset included)."""
    tiny_checkpoint(tmp_path, family, seed)
    pad = tiny_config(family)["pad_token_id"]
    rng = np.random.default_rng(seed + 10)
    ids = torch.from_numpy(rng.integers(2, SHAPE["vocab"], size=(3, 17)))
    mask = torch.ones(3, 17, dtype=torch.bool)
    mask[1, 11:] = False  # padded sequences: masked keys must not leak into attention
    mask[2, 5:] = False
    ids[~mask] = pad
    oracle = getattr(transformers, ORACLES[family]).from_pretrained(
        str(tmp_path), attn_implementation="eager")
    oracle.eval()
    with torch.inference_mode():
        theirs = oracle(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    ours = our_hidden_states(tmp_path, ids, mask)
    valid = mask.unsqueeze(-1).expand_as(ours)
    assert torch.allclose(ours[valid], theirs[valid], atol=2e-5, rtol=1e-5)
    # the comparison can fail: one head fewer in the first layer is far from the oracle
    dropped = our_hidden_states(tmp_path, ids, mask, drop="head1")
    assert (dropped - theirs)[valid].abs().max() > 1e-2


def test_an_unsupported_architecture_is_refused_naming_the_field(tmp_path):
    from elasticplan.errors import StoreError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(StoreError, match=r"config.json: model_type 'gpt2' is not supported"):
        Config.from_hf(tmp_path)
