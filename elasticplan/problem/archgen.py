"""Model profiles computed exactly from a transformer's architecture.

Shards (STI's vertical cut): for the encoders, one per attention head and one per FFN
slice of ffn_dim / heads neurons, so each layer has 2 x heads shards. Decoder LLMs (the
problem zoo at LLM scale) set the cut explicitly: `attn_shards` attention shards (each a
group of query heads with its key/value heads; with grouped-query attention one shard is
one KV group) and `ffn_shards` FFN slices of ffn_dim / ffn_shards neurons.

Stored layout of a shard at b bits (the layout the shard store writes), two blocks, each
quantised per output channel:
- head h: the input block [3 * d_head, hidden] (Wq, Wk, Wv rows of the head), the output
  block [hidden, d_head] (Wo's columns of the head, as in Wo), then the 3 * d_head
  Q/K/V biases in fp32;
- FFN slice of f neurons: the input block [f, hidden] (W1 rows), the output block
  [hidden, f] (W2's columns), then the f W1 biases in fp32;
- decoders: an attention shard of q query heads and k KV heads has the input block
  [(q + 2k) d_head, hidden] and the output block [hidden, q d_head]; a gated (SwiGLU)
  FFN slice has the input block [2f, hidden] (gate and up rows) and the output block
  [hidden, f]; no biases;
- b = 32: each block in fp32; b = 16: fp16, no scales. Other b: each block row packed
  at b bits, padded to a whole byte, plus one fp32 scale per row (symmetric per-row
  quantisation).
Everything else is resident: for the encoders embeddings, layer norms and the Wo and W2
biases in fp32; for the decoders the token embedding, the LM head and the RMSNorm gains
in fp16.

Flops at seq_len n (multiply-add = 2 flop; softmax, norms and biases are in the
device's per-layer overhead):
- head: Q, K, V and O projections 8 n hidden d_head, scores and weighted sum 4 n^2 d_head
  (a decoder's attention shard: 2 n x its projection weights + 4 n^2 d_head per query
  head; causal masking is not discounted)
- FFN slice: 4 n hidden f (gated: 6 n hidden f)
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

DEFAULT_BITWIDTHS = (2, 3, 4, 6, 8, 32)
LLM_BITWIDTHS = (2, 3, 4, 5, 6, 7, 8, 16)  # 16 = fp16, as the checkpoints ship

# Synthetic fidelity of a shard quantised to b bits, relative to fp32, before a per-shard
# sensitivity exponent; shaped after the measured MiniLM figures (docs/runtime.md: 8-bit ~lossless, 2-bit unusable).
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
    kv_heads: int = 0  # grouped-query attention: key/value heads; 0 = heads (multi-head)
    attn_shards: int = 0  # attention shards per layer; 0 = one per head
    ffn_shards: int = 0  # FFN slices per layer; 0 = as many as heads
    gated_ffn: bool = False  # SwiGLU FFN (gate, up and down projections)
    decoder: bool = False  # LLaMA-style: no biases, RMSNorm, untied LM head, fp16 resident

    @property
    def d_head(self) -> int:
        return self.hidden // self.heads

    @property
    def n_attn(self) -> int:
        return self.attn_shards or self.heads

    @property
    def n_ffn(self) -> int:
        return self.ffn_shards or self.heads

    @property
    def ffn_slice(self) -> int:
        return self.ffn // self.n_ffn

    @property
    def q_per_shard(self) -> int:
        return self.heads // self.n_attn

    @property
    def kv_per_shard(self) -> int:
        return (self.kv_heads or self.heads) // self.n_attn


ARCHITECTURES = {
    "bert-base": Architecture("bert-base", 12, 768, 12, 3072, 30522, 512, 2,
                              description="BERT-base uncased (Devlin et al. 2019)"),
    "distilbert": Architecture("distilbert", 6, 768, 12, 3072, 30522, 512, 0,
                               description="DistilBERT base uncased (Sanh et al. 2019)"),
    "bert-large": Architecture("bert-large", 24, 1024, 16, 4096, 30522, 512, 2,
                               description="BERT-large uncased (Devlin et al. 2019)"),
    "minilm-l6": Architecture("minilm-l6", 6, 384, 12, 1536, 30522, 512, 2,
                              description="all-MiniLM-L6-v2 (sentence-transformers)"),
    # The problem zoo at LLM scale (prefill of 128 tokens); config.json figures of the
    # public checkpoints.
    "llama2-7b": Architecture("llama2-7b", 32, 4096, 32, 11008, 32000, 0, 0,
                              bitwidths=LLM_BITWIDTHS, attn_shards=32, ffn_shards=32,
                              gated_ffn=True, decoder=True,
                              description="Llama 2 7B (Touvron et al. 2023): 32 layers, "
                                          "hidden 4096, 32 heads, SwiGLU FFN 11008"),
    "llama2-70b": Architecture("llama2-70b", 80, 8192, 64, 28672, 32000, 0, 0,
                               bitwidths=LLM_BITWIDTHS, kv_heads=8, attn_shards=8,
                               ffn_shards=56, gated_ffn=True, decoder=True,
                               description="Llama 2 70B (Touvron et al. 2023): 80 layers, "
                                           "hidden 8192, 64 query heads in 8 KV groups, "
                                           "SwiGLU FFN 28672; shards: 8 KV groups and 56 "
                                           "FFN slices of 512 neurons"),
}


def matrix_bytes(rows: int, cols: int, bits: int) -> int:
    if bits >= 32:
        return rows * cols * 4
    if bits == 16:
        return rows * cols * 2
    return rows * math.ceil(cols * bits / 8) + rows * 4


def _attn_rows(a: Architecture) -> tuple[int, int]:
    """(input-block rows, output-block columns) of one attention shard."""
    return (a.q_per_shard + 2 * a.kv_per_shard) * a.d_head, a.q_per_shard * a.d_head


def head_bytes(a: Architecture, bits: int) -> int:
    rows_in, cols_out = _attn_rows(a)
    bias = 0 if a.decoder else rows_in * 4
    return matrix_bytes(rows_in, a.hidden, bits) + matrix_bytes(a.hidden, cols_out, bits) + bias


def ffn_bytes(a: Architecture, bits: int) -> int:
    rows_in = (2 if a.gated_ffn else 1) * a.ffn_slice
    bias = 0 if a.decoder else a.ffn_slice * 4
    return (matrix_bytes(rows_in, a.hidden, bits) + matrix_bytes(a.hidden, a.ffn_slice, bits)
            + bias)


def head_weights(a: Architecture) -> int:
    """Weight elements of one attention shard (its two blocks; biases not counted)."""
    rows_in, cols_out = _attn_rows(a)
    return rows_in * a.hidden + a.hidden * cols_out


def ffn_weights(a: Architecture) -> int:
    """Weight elements of one FFN slice (its two blocks; biases not counted)."""
    return ((2 if a.gated_ffn else 1) * a.ffn_slice + a.ffn_slice) * a.hidden


def head_flops(a: Architecture) -> int:
    n = a.seq_len
    rows_in, cols_out = _attn_rows(a)
    return 2 * n * a.hidden * (rows_in + cols_out) + 4 * n * n * a.d_head * a.q_per_shard


def ffn_flops(a: Architecture) -> int:
    return (6 if a.gated_ffn else 4) * a.seq_len * a.hidden * a.ffn_slice


def resident_bytes(a: Architecture) -> int:
    if a.decoder:  # token embedding + untied LM head + 2 RMSNorms per layer + final, fp16
        return 2 * (2 * a.vocab * a.hidden + (2 * a.layers + 1) * a.hidden)
    embeddings = (a.vocab + a.max_positions + a.type_vocab) * a.hidden + 2 * a.hidden
    per_layer = 6 * a.hidden  # Wo bias, W2 bias, two layer norms (gain + bias)
    return 4 * (embeddings + a.layers * per_layer)


def decode_work(rows: int, cols: int, bits: int) -> tuple[int, int, int, int, int]:
    """Elements of the runtime's dequantisation workspace for one stored block [rows, cols]
    at `bits` (runtime/schemes/uniform.py, lookup tables), in runtime.schemes.uniform.DecodeWork's order:
    (int32 copies of the packed bytes, for widths that straddle bytes; int32 table
    indices; fp32 table values; byte words, int64 indices: both 0, the dictionary
    scheme's)."""
    if bits >= 16:
        return 0, 0, 0, 0, 0
    if 8 % bits == 0:  # a byte holds whole values: one index per byte
        nbytes = rows * math.ceil(cols * bits / 8)
        return 0, nbytes, nbytes * (8 // bits), 0, 0
    groups = -(-cols // (24 // bits))  # 24-bit groups, split into two 12-bit indices
    return rows * groups * 3, rows * groups * 2, rows * groups * 2 * (12 // bits), 0, 0


def work_bytes(work: tuple[int, ...]) -> int:
    """Bytes of a DecodeWork of these sizes (int32/fp32 elements, 4-byte words, int64s)."""
    return 4 * sum(work[:4]) + 8 * work[4]


def decode_buffers(a: Architecture) -> tuple[tuple[int, ...], int]:
    """The runtime's decode buffers: the dequantisation workspace (elements, the largest of
    every stored block at every quantised bitwidth) and the bounce buffer (bytes, the
    largest quantised shard)."""
    rows_in, cols_out = _attn_rows(a)
    f = a.ffn // a.n_ffn
    blocks = [(rows_in, a.hidden), (a.hidden, cols_out),
              ((2 if a.gated_ffn else 1) * f, a.hidden), (a.hidden, f)]
    quantised = [b for b in a.bitwidths if b < 16]
    work = tuple(max((decode_work(r, c, b)[k] for r, c in blocks for b in quantised), default=0)
                 for k in range(5))
    bounce = max((max(head_bytes(a, b), ffn_bytes(a, b)) for b in quantised), default=0)
    return work, bounce


def memory_terms(a: Architecture, seq_len: int,
                 decode: tuple[tuple[int, ...], int] | None = None) -> dict:
    """The model profile's fixed memory terms (docs/design.md, "Memory") for the encoders'
    runtime (runtime/executor.py), which computes a layer shard by shard, every buffer
    preallocated:
    - the word-embedding table, streamable by rows (fp32);
    - scratch: one shard's fp32 weights (the largest), the decode target every quantised
      shard is dequantised into in turn;
    - activations of one query (batch 1) at seq_len, fp32: hidden state and accumulator
      [n, hidden], one head's Q/K/V [n, 3 d_head], scores [n, n] and context [n, d_head],
      one FFN slice's units twice [n, f], the mask [n]; the dequantisation workspace of
      the largest block (decode_work); and a bounce buffer of the largest quantised
      shard, for a shard whose bytes wrap around the end of the IO ring.
    `decode`: the decode buffers of a store whose scheme is not uniform
    (runtime.store.ShardStore.decode_buffers)."""
    n, d, dh = seq_len, a.hidden, a.d_head
    f = a.ffn // a.n_ffn
    work, bounce = decode or decode_buffers(a)
    scratch = max(_shard_fp32(a, "head"), _shard_fp32(a, "ffn"))
    workspace = 4 * (2 * n * d + 3 * n * dh + n * n + n * dh + 2 * n * f + n)
    return {"embedding_rows": a.vocab, "embedding_row_bytes": 4 * a.hidden,
            "activation_bytes": workspace + work_bytes(work) + bounce, "scratch_bytes": scratch}


def _shard_fp32(a: Architecture, kind: str) -> int:
    """fp32 bytes of one shard as the runtime decodes it: matrix rows x hidden + biases."""
    if kind == "head":
        return 4 * (4 * a.d_head * a.hidden + 3 * a.d_head)
    f = a.ffn // a.n_ffn
    return 4 * (2 * f * a.hidden + f)


def synthetic_importance(a: Architecture, seed: int | None = None) -> np.ndarray:
    """[layers, 2*heads, bitwidths] importance; fp32 importances sum to 1. Later layers
    weigh more (as measured for MiniLM); each shard has its own quantisation sensitivity."""
    if seed is None:
        seed = int.from_bytes(hashlib.sha256(a.name.encode()).digest()[:4], "little")
    rng = np.random.default_rng(seed)
    n = a.n_attn + a.n_ffn
    depth = 1.0 + 1.5 * np.arange(a.layers) / max(1, a.layers - 1)
    base = rng.lognormal(0.0, 0.6, size=(a.layers, n)) * depth[:, None]
    base /= base.sum()
    sensitivity = rng.uniform(0.5, 2.0, size=(a.layers, n))
    quality = np.array([1.0 if b >= 16 else _SYNTHETIC_QUALITY.get(b, 1.0) for b in a.bitwidths])
    return base[:, :, None] * quality[None, None, :] ** sensitivity[:, :, None]


def architecture_dict(a: Architecture) -> dict:
    """The free-form `architecture` block of a model profile."""
    out = {"layers": a.layers, "hidden": a.hidden, "heads": a.heads, "ffn": a.ffn,
           "ffn_slice": a.ffn_slice, "vocab": a.vocab, "max_positions": a.max_positions,
           "type_vocab": a.type_vocab}
    if a.decoder:
        out.update(kv_heads=a.kv_heads or a.heads, attn_shards=a.n_attn, ffn_shards=a.n_ffn,
                   gated_ffn=a.gated_ffn, decoder=True)
    return out


def profile_dict(a: Architecture) -> dict:
    """The model-profile mapping (as written to YAML) for an architecture."""
    imp = synthetic_importance(a)
    layers = []
    for li in range(a.layers):
        shards = []
        attn = "kvgroup" if a.kv_per_shard < a.q_per_shard else "head"
        for h in range(a.n_attn):
            shards.append({"name": f"{attn}{h}", "kind": "head", "flops": head_flops(a),
                           "weights": head_weights(a),
                           "bytes": [head_bytes(a, b) for b in a.bitwidths],
                           "importance": [float(f"{v:.6g}") for v in imp[li, h]]})
        for f in range(a.n_ffn):
            shards.append({"name": f"ffn{f}", "kind": "ffn", "flops": ffn_flops(a),
                           "weights": ffn_weights(a),
                           "bytes": [ffn_bytes(a, b) for b in a.bitwidths],
                           "importance": [float(f"{v:.6g}") for v in imp[li, a.n_attn + f]]})
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
        **memory_fields(a),
        "layers": layers,
    }


def memory_fields(a: Architecture, decode: tuple[tuple[int, ...], int] | None = None) -> dict:
    """A profile's `resident_bytes` and `memory` block. An encoder's word-embedding table
    is streamable by rows (memory_terms), so it is not in resident_bytes; the decoders
    (planner only, no runtime) keep every non-shard weight resident."""
    if a.decoder:
        return {"resident_bytes": resident_bytes(a)}
    terms = memory_terms(a, a.seq_len, decode)
    table = terms["embedding_rows"] * terms["embedding_row_bytes"]
    return {"resident_bytes": resident_bytes(a) - table, "memory": terms}
