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

from runtime.families.encoder import Config, LayerWeights, load_hf_tensors, resident_names, shard_from_hf
from runtime.sources.tinyckpt import SHAPE, tiny_config, write_checkpoint


def tiny_checkpoint(path, family: str, seed: int = 0) -> None:
    write_checkpoint(path, family, seed=seed, pooling=None)


ORACLES = {"bert": "BertModel", "distilbert": "DistilBertModel", "roberta": "RobertaModel"}


def our_hidden_states(path, ids: torch.Tensor, mask: torch.Tensor, drop: str | None = None
                      ) -> torch.Tensor:
    """Our encoder's last hidden state, every shard of every layer at fp32 (but `drop`, in
    layer 0), built from the checkpoint's tensors (the store's cut: one shard per head, one
    per FFN slice)."""
    from runtime.families.encoder import Encoder

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
    with pytest.raises(StoreError, match=r"config.json: model_type: 'gpt2' is not supported"):
        Config.from_hf(tmp_path)
