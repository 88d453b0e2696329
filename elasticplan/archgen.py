"""Model profiles computed exactly from a transformer encoder's architecture.

Shards (STI's vertical cut): one per attention head, one per FFN slice of
ffn_dim / heads neurons, so each layer has 2 x heads shards.

Stored layout of a shard at b bits (the layout the shard store writes), two blocks, each
quantised per output channel:
- head h: the input block [3 * d_head, hidden] (Wq, Wk, Wv rows of the head), the output
  block [hidden, d_head] (Wo's columns of the head, as in Wo), then the 3 * d_head
  Q/K/V biases in fp32;
- FFN slice of f neurons: the input block [f, hidden] (W1 rows), the output block
  [hidden, f] (W2's columns), then the f W1 biases in fp32;
- b = 32: each block in fp32. b < 32: each block row packed at b bits, padded to a
  whole byte, plus one fp32 scale per row (symmetric per-row quantisation).
Everything else (embeddings, layer norms, the Wo and W2 biases) is resident, fp32.

Flops at seq_len n (multiply-add = 2 flop; softmax, norms and biases are in the
device's per-layer overhead):
- head: Q, K, V and O projections 8 n hidden d_head, scores and weighted sum 4 n^2 d_head
- FFN slice: 4 n hidden f
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

DEFAULT_BITWIDTHS = (2, 3, 4, 6, 8, 32)

# Synthetic fidelity of a shard quantised to b bits, relative to fp32, before a per-shard
# sensitivity exponent; shaped after RUNTIME-NOTES.md (8-bit ~lossless, 2-bit unusable).
_SYNTHETIC_QUALITY = {1: 0.05, 2: 0.3, 3: 0.75, 4: 0.9, 5: 0.95, 6: 0.985, 7: 0.993, 8: 0.998}


@dataclass(frozen=True)
class Architecture:
    name: str
    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    type_vocab: int
    seq_len: int = 128
    bitwidths: tuple[int, ...] = DEFAULT_BITWIDTHS
    description: str = ""

    @property
    def d_head(self) -> int:
        return self.hidden // self.heads

    @property
    def ffn_slice(self) -> int:
        return self.ffn // self.heads


ARCHITECTURES = {
    "bert-base": Architecture("bert-base", 12, 768, 12, 3072, 30522, 512, 2,
                              description="BERT-base uncased (Devlin et al. 2019)"),
    "distilbert": Architecture("distilbert", 6, 768, 12, 3072, 30522, 512, 0,
                               description="DistilBERT base uncased (Sanh et al. 2019)"),
    "bert-large": Architecture("bert-large", 24, 1024, 16, 4096, 30522, 512, 2,
                               description="BERT-large uncased (Devlin et al. 2019)"),
    "minilm-l6": Architecture("minilm-l6", 6, 384, 12, 1536, 30522, 512, 2,
                              description="all-MiniLM-L6-v2 (sentence-transformers)"),
}


def matrix_bytes(rows: int, cols: int, bits: int) -> int:
    if bits >= 32:
        return rows * cols * 4
    return rows * math.ceil(cols * bits / 8) + rows * 4


def head_bytes(a: Architecture, bits: int) -> int:
    return (matrix_bytes(3 * a.d_head, a.hidden, bits) + matrix_bytes(a.hidden, a.d_head, bits)
            + 3 * a.d_head * 4)


def ffn_bytes(a: Architecture, bits: int) -> int:
    return (matrix_bytes(a.ffn_slice, a.hidden, bits) + matrix_bytes(a.hidden, a.ffn_slice, bits)
            + a.ffn_slice * 4)


def head_flops(a: Architecture) -> int:
    n = a.seq_len
    return 8 * n * a.hidden * a.d_head + 4 * n * n * a.d_head


def ffn_flops(a: Architecture) -> int:
    return 4 * a.seq_len * a.hidden * a.ffn_slice


def resident_bytes(a: Architecture) -> int:
    embeddings = (a.vocab + a.max_positions + a.type_vocab) * a.hidden + 2 * a.hidden
    per_layer = 6 * a.hidden  # Wo bias, W2 bias, two layer norms (gain + bias)
    return 4 * (embeddings + a.layers * per_layer)


def synthetic_importance(a: Architecture, seed: int | None = None) -> np.ndarray:
    """[layers, 2*heads, bitwidths] importance; fp32 importances sum to 1. Later layers
    weigh more (as measured for MiniLM); each shard has its own quantisation sensitivity."""
    if seed is None:
        seed = int.from_bytes(hashlib.sha256(a.name.encode()).digest()[:4], "little")
    rng = np.random.default_rng(seed)
    n = 2 * a.heads
    depth = 1.0 + 1.5 * np.arange(a.layers) / max(1, a.layers - 1)
    base = rng.lognormal(0.0, 0.6, size=(a.layers, n)) * depth[:, None]
    base /= base.sum()
    sensitivity = rng.uniform(0.5, 2.0, size=(a.layers, n))
    quality = np.array([1.0 if b >= 16 else _SYNTHETIC_QUALITY.get(b, 1.0) for b in a.bitwidths])
    return base[:, :, None] * quality[None, None, :] ** sensitivity[:, :, None]


def architecture_dict(a: Architecture) -> dict:
    """The free-form `architecture` block of a model profile."""
    return {"layers": a.layers, "hidden": a.hidden, "heads": a.heads, "ffn": a.ffn,
            "ffn_slice": a.ffn_slice, "vocab": a.vocab, "max_positions": a.max_positions,
            "type_vocab": a.type_vocab}


def profile_dict(a: Architecture) -> dict:
    """The model-profile mapping (as written to YAML) for an architecture."""
    imp = synthetic_importance(a)
    layers = []
    for li in range(a.layers):
        shards = []
        for h in range(a.heads):
            shards.append({"name": f"head{h}", "kind": "head", "flops": head_flops(a),
                           "bytes": [head_bytes(a, b) for b in a.bitwidths],
                           "importance": [float(f"{v:.6g}") for v in imp[li, h]]})
        for f in range(a.heads):
            shards.append({"name": f"ffn{f}", "kind": "ffn", "flops": ffn_flops(a),
                           "bytes": [ffn_bytes(a, b) for b in a.bitwidths],
                           "importance": [float(f"{v:.6g}") for v in imp[li, a.heads + f]]})
        layers.append({"shards": shards})
    return {
        "name": a.name,
        "description": f"{a.description}; bytes and flops computed from the architecture by "
                       f"scripts/generate_profiles.py",
        "architecture": architecture_dict(a),
        "synthetic": True,
        "importance_metric": "synthetic: share of the fp32 model's total importance",
        "seq_len": a.seq_len,
        "bitwidths": list(a.bitwidths),
        "resident_bytes": resident_bytes(a),
        "layers": layers,
    }
