"""The submodel a plan selects, built without the executor or the torch decoders: the
oracle the runtime's output is checked against (tests/test_runtime.py,
tests/test_own_encoder.py)."""

from __future__ import annotations

import numpy as np
import torch

from runtime.families.encoder import LayerWeights, shard_from_hf
from runtime.schemes import dictionary, uniform
from runtime.sources.checkpoint import ReferenceModel
from runtime.store import ShardStore


def stored_dictionary(store: ShardStore, layer: int, name: str, bits: int) -> np.ndarray:
    """A dictionary variant's matrix from its stored bytes, parsed and looked up with numpy
    (independent of the torch decoder)."""
    v = store.variant(layer, name, bits)
    raw = bytes(store.read(v))
    blocks = [dictionary.dequantize_np(*parts) for parts in dictionary.parse_blocks(
        raw[:v.nbytes - 4 * v.bias], v.blocks(), bits, v.scheme.share)]
    return np.concatenate([blocks[0], blocks[1].T])


def oracle_layers(ref: ReferenceModel, model, selection, store: ShardStore | None = None):
    """Our reference path, independent of the executor and the torch decoders: each shard
    cut from the checkpoint and quantised and dequantised with numpy (uniform scheme), or
    its stored dictionary codes parsed and looked up with numpy (the dictionary scheme's
    rounding depends on calibration activations; `store` is needed only then), placed
    with LayerWeights.put."""
    c, layers = ref.config, []
    schemes = dict(model.schemes)
    for l, picks in enumerate(selection):
        names = [model.layers[l].shards[p.shard].name for p in picks]
        w = LayerWeights(c, names)
        for p, name in zip(picks, names):
            m, b = shard_from_hf(ref.tensors, c, l, name)
            bits = model.bitwidths[p.bit]
            if schemes.get(bits) == "dict":
                m = stored_dictionary(store, l, name, bits)
            elif bits != uniform.FP32:
                k = c.shard_in_rows(name)
                m = m.copy()
                m[:k] = uniform.dequantize_np(*uniform.quantize(m[:k], bits), bits)
                m[k:] = uniform.dequantize_np(*uniform.quantize(m[k:].T.copy(), bits), bits).T
            w.put(name, torch.from_numpy(m), torch.from_numpy(b))
        layers.append(w)
    return layers
