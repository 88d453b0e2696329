"""DistilBERT (model_type "distilbert"): BERT's layer with other tensor and config.json
names, and no token-type embeddings."""

from __future__ import annotations

from typing import ClassVar

from runtime.families import MAX_CHECKPOINT_LAYERS, MAX_DIM
from runtime.families.bert import Bert


class DistilBert(Bert):
    name: ClassVar[str] = "distilbert"
    layer_prefix: ClassVar[str] = "transformer.layer.{layer}."
    layer_names: ClassVar[dict[str, str]] = {
        "q": "attention.q_lin", "k": "attention.k_lin", "v": "attention.v_lin",
        "o": "attention.out_lin", "ln1": "sa_layer_norm", "ffn_in": "ffn.lin1",
        "ffn_out": "ffn.lin2", "ln2": "output_layer_norm"}
    task_prefix: ClassVar[str] = "distilbert."
    activation_key: ClassVar[str] = "activation"
    heads_key: ClassVar[str] = "n_heads"

    def shape(self, f) -> dict:
        return dict(layers=f.integer("n_layers", minimum=1, maximum=MAX_CHECKPOINT_LAYERS),
                    hidden=f.integer("dim", minimum=1, maximum=MAX_DIM),
                    heads=f.integer(self.heads_key, minimum=1, maximum=MAX_DIM),
                    ffn=f.integer("hidden_dim", minimum=1, maximum=MAX_DIM), type_vocab=0,
                    eps=1e-12, pad_id=f.integer("pad_token_id", minimum=0, maximum=MAX_DIM,
                                                required=False) or 0)
