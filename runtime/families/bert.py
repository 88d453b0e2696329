"""BERT (model_type "bert"): the default encoder family, and the base the other encoder
families change in a few places. MiniLM is a BERT."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from elasticplan.problem.inputs import Fields

MAX_DIM = 1 << 16  # largest hidden / FFN / vocabulary size a checkpoint may declare
MAX_CHECKPOINT_LAYERS = 256


class Bert:
    """A BERT-style encoder's checkpoint: config.json keys, tensor names, position ids."""

    name: ClassVar[str] = "bert"
    # a layer's tensors (Hugging Face layout): part -> name under the layer's prefix
    layer_prefix: ClassVar[str] = "encoder.layer.{layer}."
    layer_names: ClassVar[dict[str, str]] = {
        "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
        "o": "attention.output.dense", "ln1": "attention.output.LayerNorm",
        "ffn_in": "intermediate.dense", "ffn_out": "output.dense", "ln2": "output.LayerNorm"}
    task_prefix: ClassVar[str] = "bert."  # before every tensor of a classifier's checkpoint
    activation_key: ClassVar[str] = "hidden_act"
    heads_key: ClassVar[str] = "num_attention_heads"
    default_pad_id: ClassVar[int] = 0

    def shape(self, f: "Fields") -> dict:
        """The architecture's shape and LayerNorm epsilon from config.json (checked; a
        refusal names the key), as Config fields."""
        shape = dict(layers=f.integer("num_hidden_layers", minimum=1,
                                      maximum=MAX_CHECKPOINT_LAYERS),
                     hidden=f.integer("hidden_size", minimum=1, maximum=MAX_DIM),
                     heads=f.integer(self.heads_key, minimum=1, maximum=MAX_DIM),
                     ffn=f.integer("intermediate_size", minimum=1, maximum=MAX_DIM),
                     type_vocab=f.integer("type_vocab_size", minimum=0, maximum=MAX_DIM),
                     eps=f.number("layer_norm_eps", positive=True, maximum=1.0))
        pad = f.integer("pad_token_id", minimum=0, maximum=MAX_DIM, required=False)
        kind = f.raw("position_embedding_type", required=False) or "absolute"
        if kind != "absolute":
            raise f.err("position_embedding_type", f"{kind!r} is not supported (only "
                                                   f"absolute position embeddings)")
        for flag in ("is_decoder", "add_cross_attention"):
            if f.raw(flag, required=False):
                raise f.err(flag, "decoders are not supported (an encoder only)")
        return shape | {"pad_id": self.default_pad_id if pad is None else pad}

    def first_position(self, c) -> int:
        """The first position id a sequence of config `c` (runtime.families.encoder.Config)
        uses."""
        return 0

    def positions(self, ids: torch.Tensor, c) -> torch.Tensor:
        """Position ids for token ids [B, n] or [n]: 0..n-1."""
        return torch.arange(ids.shape[-1])
