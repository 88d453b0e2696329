"""BERT (model_type "bert"): the default encoder family, and the base the other encoder
families change in a few places. MiniLM is a BERT."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from runtime.families import MAX_CHECKPOINT_LAYERS, MAX_DIM

if TYPE_CHECKING:
    from elasticplan.problem.inputs import Fields


class Bert:
    """A BERT-style encoder's checkpoint: config.json keys, tensor names, position ids."""

    name: ClassVar[str] = "bert"
    decoder: ClassVar[bool] = False  # an encoder: a sentence embedding per text
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

    # --- what the store asks of every family -------------------------------------------

    def config_from_index(self, cf: "Fields", model: str):
        """The model's config as a store index records it (`config`: checked, a refusal
        names the key)."""
        from runtime.families.encoder import POOLINGS, Config

        config = Config.from_dict(
            {k: cf.integer(k, minimum=1, maximum=1 << 20)
             for k in ("layers", "hidden", "heads", "ffn", "vocab", "max_positions")}
            | {"type_vocab": cf.integer("type_vocab", minimum=0, maximum=1 << 20),
               "eps": cf.number("eps", positive=True, maximum=1.0), "family": self.name,
               "pad_id": cf.integer("pad_id", minimum=0, maximum=1 << 30, required=False) or 0,
               "pooling": cf.string("pooling", required=False) or "mean",
               "normalize": cf.boolean("normalize", default=True)}, model)
        if config.pooling not in POOLINGS:
            raise cf.err("pooling", f"must be one of {', '.join(POOLINGS)}, got "
                                    f"{config.pooling!r}")
        return config

    def resident_names(self, c) -> dict[str, str]:
        """Resident tensors: name in the store -> name in the checkpoint."""
        from runtime.families.encoder import resident_names

        return resident_names(c)

    def cut_shard(self, tensors, c, layer: int, name: str) -> tuple[np.ndarray, np.ndarray]:
        """One shard (matrix [rows, hidden], bias) fp32, cut from the checkpoint's tensors."""
        from runtime.families.encoder import shard_from_hf

        return shard_from_hf(tensors, c, layer, name)

    def layer_weights(self, c, names: list[str]):
        """An empty layer of these shards, each with its slot (filled by the store)."""
        from runtime.families.encoder import LayerWeights

        return LayerWeights(c, names)

    # --- encoder specifics ---------------------------------------------------------------

    def first_position(self, c) -> int:
        """The first position id a sequence of config `c` (runtime.families.encoder.Config)
        uses."""
        return 0

    def positions(self, ids: torch.Tensor, c) -> torch.Tensor:
        """Position ids for token ids [B, n] or [n]: 0..n-1."""
        return torch.arange(ids.shape[-1])
