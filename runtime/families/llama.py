"""A llama-architecture decoder in pure torch (fp32), elastic like the encoder: any layer
runs with any subset of its shards. No I/O: the tensors come from a source
(runtime/sources/gguf_file.py for GGUF files, runtime/sources/hf_llama.py for Hugging Face
checkpoints), always under Hugging Face's llama names, in Hugging Face's orientation
([out, in] for every projection) and Hugging Face's rotary convention (within a head the
first half of the dimensions rotates with the second half, `rotate_half`; llama.cpp's
GGUF files interleave pairs instead, and the GGUF source undoes that for Wq and Wk).

The model: token embeddings; per layer a pre-norm attention half (RMSNorm, Wq/Wk/Wv,
rotary positions, grouped-query softmax attention over a KV cache, Wo, residual) and a
pre-norm SwiGLU FFN half (RMSNorm, down(silu(gate x) * up x), residual); a final RMSNorm
and the LM head (the embedding table, when tied: a matmul with the whole table per token).

Shards, as matrices in memory ([rows, hidden], fp32; no biases: a llama has none, so a
shard's bias has length 0):
- KV group g ("group{g}"): the q_per_kv = heads / kv_heads query heads that share K/V head
  g. Matrix [(2 q_per_kv + 2) head_dim, hidden] = Wq's rows of its q_per_kv heads, Wk's
  rows of head g, Wv's rows of head g, then Wo's columns of its query heads as rows.
  in_rows = (q_per_kv + 2) head_dim (what feeds from the layer input). Dropping a group
  drops its query heads, its K/V head and its part of the KV cache.
- FFN slice s of `ffn_slice` neurons ("ffn{s}"): matrix [3 f, hidden] = gate rows, up
  rows, then down's columns as rows; in_rows = 2 f. The slice count is a choice
  (`LlamaConfig.ffn_slices`, default ffn / 128 when 128 divides the FFN size: 12 slices of
  128 for SmolLM2-135M).
Resident (always in memory, fp32): the embedding table (which is also the LM head when the
embeddings are tied; an untied LM head is resident too), each layer's input_layernorm and
post_attention_layernorm weights, the final norm.

A layer whose half has no shards is the identity for that half (its norm is skipped too:
it only feeds the half).

Padding: `Decoder.prefill(ids, mask)` takes any mask (left or right padding, or both):
positions count real tokens only (position = number of real tokens before it), a real token
attends to real tokens at or before its column, and padded columns never enter the cache's
attention. Decode steps append one column per sequence after the prompt's columns, so a
right-padded batch decodes correctly too (its padding columns stay masked). Outputs at
padded positions are finite but meaningless.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

FAMILY = "llama"
DEFAULT_SLICE = 128  # FFN neurons per slice when the FFN size allows it


@dataclass(frozen=True)
class LlamaConfig:
    """The llama architecture as the decoder needs it. `ffn_slice_count` 0 means the
    default cut (ffn / 128 slices when 128 divides ffn, else one slice per query head when
    that divides it, else one slice)."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    context: int
    rope_base: float
    eps: float
    tied: bool = True
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    ffn_slice_count: int = 0

    @property
    def family(self) -> str:
        return FAMILY

    def __post_init__(self):
        for key in ("layers", "hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab",
                    "context"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.heads % self.kv_heads:
            raise ValueError(f"{self.kv_heads} KV heads do not divide {self.heads} heads")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} is odd (rotary pairs need it even)")
        if self.ffn % self.ffn_slices:
            raise ValueError(f"{self.ffn_slices} FFN slices do not divide the FFN size {self.ffn}")

    @property
    def q_per_kv(self) -> int:
        return self.heads // self.kv_heads

    @property
    def groups(self) -> int:
        return self.kv_heads

    @property
    def ffn_slices(self) -> int:
        if self.ffn_slice_count:
            return self.ffn_slice_count
        if self.ffn % DEFAULT_SLICE == 0:
            return self.ffn // DEFAULT_SLICE
        if self.ffn % self.heads == 0:
            return self.heads
        return 1

    @property
    def ffn_slice(self) -> int:
        return self.ffn // self.ffn_slices

    def shard_names(self) -> list[str]:
        return [f"group{g}" for g in range(self.groups)] + \
               [f"ffn{s}" for s in range(self.ffn_slices)]

    def shard_rows(self, name: str) -> int:
        kind, _ = self.parse(name)
        return (2 * self.q_per_kv + 2) * self.head_dim if kind == "group" else 3 * self.ffn_slice

    def shard_in_rows(self, name: str) -> int:
        """Rows of the shard matrix that feed from the layer input (Wq/Wk/Wv; gate and up);
        the rest are output-projection columns (Wo; down)."""
        kind, _ = self.parse(name)
        return (self.q_per_kv + 2) * self.head_dim if kind == "group" else 2 * self.ffn_slice

    def parse(self, name: str) -> tuple[str, int]:
        """'group2' -> ('group', 2); 'ffn11' -> ('ffn', 11); anything else ValueError."""
        for kind, count in (("group", self.groups), ("ffn", self.ffn_slices)):
            if name.startswith(kind) and name[len(kind):].isdigit():
                i = int(name[len(kind):])
                if i < count:
                    return kind, i
        raise ValueError(f"not a shard of this model: {name!r} (group0..group{self.groups - 1}, "
                         f"ffn0..ffn{self.ffn_slices - 1})")

    def to_dict(self) -> dict:
        return {"family": FAMILY, "layers": self.layers, "hidden": self.hidden,
                "heads": self.heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "ffn": self.ffn, "vocab": self.vocab, "context": self.context,
                "rope_base": self.rope_base, "eps": self.eps, "tied": self.tied,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id,
                "ffn_slices": self.ffn_slices}

    @staticmethod
    def from_dict(d: dict, name: str) -> "LlamaConfig":
        d = dict(d)
        d.pop("family", None)
        d["ffn_slice_count"] = d.pop("ffn_slices", 0)
        return LlamaConfig(name=name, **d)


# --- tensor names (Hugging Face llama) -----------------------------------------------

LAYER_TENSORS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
                 "post_attention_layernorm")


def layer_name(layer: int, part: str) -> str:
    """'model.layers.{layer}.{part}.weight' (part as in LAYER_TENSORS)."""
    return f"model.layers.{layer}.{part}.weight"


def tensor_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model uses, by its Hugging Face name, in HF orientation."""
    d, hd = c.hidden, c.head_dim
    out = {"model.embed_tokens.weight": (c.vocab, d)}
    for l in range(c.layers):
        out.update({layer_name(l, "self_attn.q_proj"): (c.heads * hd, d),
                    layer_name(l, "self_attn.k_proj"): (c.kv_heads * hd, d),
                    layer_name(l, "self_attn.v_proj"): (c.kv_heads * hd, d),
                    layer_name(l, "self_attn.o_proj"): (d, c.heads * hd),
                    layer_name(l, "mlp.gate_proj"): (c.ffn, d),
                    layer_name(l, "mlp.up_proj"): (c.ffn, d),
                    layer_name(l, "mlp.down_proj"): (d, c.ffn),
                    layer_name(l, "input_layernorm"): (d,),
                    layer_name(l, "post_attention_layernorm"): (d,)})
    out["model.norm.weight"] = (d,)
    if not c.tied:
        out["lm_head.weight"] = (c.vocab, d)
    return out


def resident_names(c: LlamaConfig) -> dict[str, str]:
    """Resident tensors: name in the model -> Hugging Face name."""
    names = {"embed": "model.embed_tokens.weight"}
    for l in range(c.layers):
        names[f"l{l}.attn_norm"] = layer_name(l, "input_layernorm")
        names[f"l{l}.ffn_norm"] = layer_name(l, "post_attention_layernorm")
    names["norm"] = "model.norm.weight"
    if not c.tied:
        names["lm_head"] = "lm_head.weight"
    return names


def cut_shard(tensors: Mapping[str, np.ndarray], c: LlamaConfig, layer: int, name: str
              ) -> tuple[np.ndarray, np.ndarray]:
    """One shard (matrix [rows, hidden] fp32, bias of length 0) out of the HF tensors."""
    kind, i = c.parse(name)
    if kind == "group":
        hd, qk = c.head_dim, c.q_per_kv
        q = slice(i * qk * hd, (i + 1) * qk * hd)
        kv = slice(i * hd, (i + 1) * hd)
        parts = [tensors[layer_name(layer, "self_attn.q_proj")][q],
                 tensors[layer_name(layer, "self_attn.k_proj")][kv],
                 tensors[layer_name(layer, "self_attn.v_proj")][kv],
                 tensors[layer_name(layer, "self_attn.o_proj")][:, q].T]
    else:
        r = slice(i * c.ffn_slice, (i + 1) * c.ffn_slice)
        parts = [tensors[layer_name(layer, "mlp.gate_proj")][r],
                 tensors[layer_name(layer, "mlp.up_proj")][r],
                 tensors[layer_name(layer, "mlp.down_proj")][:, r].T]
    matrix = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
    return matrix, np.zeros(0, np.float32)


# --- a layer's elastic weights -------------------------------------------------------

class Slot(NamedTuple):
    """Where one shard lives inside a layer's fused weights (views, no copies)."""

    inp: torch.Tensor  # group [(q_per_kv + 2) head_dim, hidden]; ffn [2, f, hidden] (gate, up)
    out: torch.Tensor  # output block, original orientation: group [hidden, q_per_kv head_dim]; ffn [hidden, f]
    bias: torch.Tensor  # length 0 (a llama has no biases)


class LayerWeights:
    """The elastic weights of one layer: the selected KV groups and FFN slices, fused.

    Groups: `attn_in` [G, (q_per_kv + 2) head_dim, hidden] (per kept group: its Wq rows, Wk
    rows, Wv rows), `attn_out` [hidden, G q_per_kv head_dim] (Wo's columns of the kept
    heads, in Wo's orientation). FFN slices: `ffn_in` [2, S f, hidden] (gate rows, then up
    rows of the kept slices), `ffn_out` [hidden, S f] (down's columns). Groups and slices
    are kept in the order given. Allocation is uninitialised: every slot must be filled.
    """

    def __init__(self, c: LlamaConfig, names: list[str]):
        self.config = c
        self.names = list(names)
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"duplicate shard in {self.names}")
        self.groups = [n for n in self.names if c.parse(n)[0] == "group"]
        self.slices = [n for n in self.names if c.parse(n)[0] == "ffn"]
        G, S = len(self.groups), len(self.slices)
        hd, qk, f = c.head_dim, c.q_per_kv, c.ffn_slice
        self.attn_in = torch.empty(G, (qk + 2) * hd, c.hidden)
        self.attn_out = torch.empty(c.hidden, G * qk * hd)
        self.ffn_in = torch.empty(2, S * f, c.hidden)
        self.ffn_out = torch.empty(c.hidden, S * f)
        self._no_bias = torch.empty(0)

    def slot(self, name: str) -> Slot:
        c = self.config
        kind, _ = c.parse(name)
        if kind == "group":
            i = self.groups.index(name)
            w = c.q_per_kv * c.head_dim
            return Slot(self.attn_in[i], self.attn_out[:, i * w:(i + 1) * w], self._no_bias)
        i = self.slices.index(name)
        r = slice(i * c.ffn_slice, (i + 1) * c.ffn_slice)
        return Slot(self.ffn_in[:, r], self.ffn_out[:, r], self._no_bias)

    def put(self, name: str, matrix: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Copy a shard (matrix [rows, hidden] as cut_shard cuts it; bias of length 0)."""
        if bias is not None and bias.numel():
            raise ValueError(f"{name}: a llama shard has no bias (got {bias.numel()} values)")
        slot = self.slot(name)
        n_in = self.config.shard_in_rows(name)
        if tuple(matrix.shape) != (self.config.shard_rows(name), self.config.hidden):
            raise ValueError(f"{name}: matrix of shape {list(matrix.shape)}, expected "
                             f"{[self.config.shard_rows(name), self.config.hidden]}")
        slot.inp.copy_(matrix[:n_in].reshape(slot.inp.shape))
        slot.out.copy_(matrix[n_in:].t())

    @property
    def empty(self) -> bool:
        return not self.names

    @property
    def kept_groups(self) -> list[int]:
        return [self.config.parse(n)[1] for n in self.groups]

    @staticmethod
    def full(c: LlamaConfig, tensors: Mapping[str, np.ndarray], layer: int,
             names: list[str] | None = None) -> "LayerWeights":
        """The layer with `names` (default: every shard) cut from the HF tensors."""
        names = c.shard_names() if names is None else names
        w = LayerWeights(c, names)
        for n in names:
            w.put(n, torch.from_numpy(cut_shard(tensors, c, layer, n)[0]))
        return w


def load_resident(tensors: Mapping[str, np.ndarray], c: LlamaConfig) -> dict[str, torch.Tensor]:
    """The resident tensors (resident_names) as fp32 torch tensors."""
    return {k: torch.from_numpy(np.ascontiguousarray(tensors[v], np.float32))
            for k, v in resident_names(c).items()}


# --- the model -----------------------------------------------------------------------

def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm in fp32: w * x / sqrt(mean(x^2) + eps)."""
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope_tables(c: LlamaConfig, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [positions, head_dim] in HF's convention (each frequency twice: the
    first half of a head's dimensions pairs with the second half), fp32, computed as
    transformers computes them (inverse frequencies in fp32, position x frequency)."""
    inv_freq = 1.0 / (c.rope_base ** (torch.arange(0, c.head_dim, 2, dtype=torch.float)
                                      / c.head_dim))
    freqs = torch.arange(positions, dtype=torch.float)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., n, head_dim] rotated: x cos + rotate_half(x) sin (cos, sin broadcast)."""
    h = x.shape[-1] // 2
    rot = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
    return x * cos + rot * sin


class KVCache:
    """Per layer, the keys (after rotation) and values of each kept KV group:
    k[l], v[l] [B, G_l, context, head_dim], preallocated; `mask` [B, context] says which
    columns hold real tokens; `used` columns are filled; `lengths` [B] counts the real
    tokens of each sequence (the next token's position). `empty(*shape)` makes each fp32
    k and v tensor (default torch.empty; the decode executor cuts them from its own
    mapping: runtime.decode_layers.Arena)."""

    def __init__(self, c: LlamaConfig, layers: list[LayerWeights], batch: int, context: int,
                 empty: Callable[..., torch.Tensor] = torch.empty):
        self.batch, self.context = batch, context
        self.k, self.v = [], []
        for w in layers:
            G = len(w.groups)
            self.k.append(empty(batch, G, context, c.head_dim) if G else None)
            self.v.append(empty(batch, G, context, c.head_dim) if G else None)
        self.mask = torch.zeros(batch, context, dtype=torch.bool)
        self.used = 0
        self.lengths = torch.zeros(batch, dtype=torch.int64)

    @property
    def nbytes(self) -> int:
        return 4 * sum(t.numel() for t in self.k + self.v if t is not None)


class Decoder:
    """Resident weights, the per-layer elastic weights and a KV cache of `context`
    columns (default: the model's context). `prefill` starts a batch, `decode_step` adds
    one token per sequence; both return logits."""

    def __init__(self, c: LlamaConfig, resident: dict[str, torch.Tensor],
                 layers: list[LayerWeights], context: int | None = None):
        if len(layers) != c.layers:
            raise ValueError(f"expected {c.layers} layers, got {len(layers)}")
        self.config = c
        self.r = resident
        self.layers = layers
        self.context = c.context if context is None else int(context)
        if not 1 <= self.context:
            raise ValueError(f"context must be >= 1, got {context}")
        self.cos, self.sin = rope_tables(c, self.context)
        self.head = resident.get("lm_head", resident["embed"])
        self.scale = 1.0 / math.sqrt(c.head_dim)
        self.cache: KVCache | None = None

    # --- the two halves of a layer ------------------------------------------------------

    def _attention(self, l: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   cos_k: torch.Tensor, sin_k: torch.Tensor, cols: slice,
                   mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, n, d] -> the attention output [B, n, d] of layer l's kept groups. Writes the
        new keys (rotated) and values into cache columns `cols` and attends over columns
        [0, cols.stop); mask [B, 1, 1, n, cols.stop] True = may attend (None: all may). cos/sin
        [B, 1, 1, n, hd] rotate the queries [B, G, q_per_kv, n, hd], cos_k/sin_k
        [B, 1, n, hd] the keys [B, G, n, hd]."""
        c, w, cache = self.config, self.layers[l], self.cache
        B, n, d = x.shape
        G, qk, hd = len(w.groups), c.q_per_kv, c.head_dim
        h = rms_norm(x, self.r[f"l{l}.attn_norm"], c.eps)
        y = torch.matmul(h.view(B * n, d), w.attn_in.view(-1, d).t()).view(B, n, G, qk + 2, hd)
        q = apply_rope(y[:, :, :, :qk].permute(0, 2, 3, 1, 4), cos, sin)
        cache.k[l][:, :, cols] = apply_rope(y[:, :, :, qk].transpose(1, 2), cos_k, sin_k)
        cache.v[l][:, :, cols] = y[:, :, :, qk + 1].transpose(1, 2)
        k = cache.k[l][:, :, :cols.stop]
        v = cache.v[l][:, :, :cols.stop]
        scores = torch.matmul(q.reshape(B, G, qk * n, hd), k.transpose(2, 3)).mul_(self.scale)
        scores = scores.view(B, G, qk, n, -1)
        if mask is not None:
            scores.masked_fill_(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).view(B, G, qk * n, -1)
        ctx = torch.matmul(probs, v).view(B, G, qk, n, hd).permute(0, 3, 1, 2, 4)
        return torch.matmul(ctx.reshape(B * n, G * qk * hd), w.attn_out.t()).view(B, n, d)

    def _ffn(self, l: int, x: torch.Tensor) -> torch.Tensor:
        c, w = self.config, self.layers[l]
        B, n, d = x.shape
        h = rms_norm(x, self.r[f"l{l}.ffn_norm"], c.eps)
        y = torch.matmul(h.view(B * n, d), w.ffn_in.view(-1, d).t())
        m = y.shape[1] // 2
        act = F.silu(y[:, :m]).mul_(y[:, m:])
        return torch.matmul(act, w.ffn_out.t()).view(B, n, d)

    def _run(self, x: torch.Tensor, positions: torch.Tensor, cols: slice,
             mask: torch.Tensor | None, start: int = 0,
             record: list | None = None) -> torch.Tensor:
        """x (the input of layer `start`) through layers start.. and the final norm;
        `record` receives each of those layers' input."""
        cos = self.cos[positions][:, None, None]  # [B, 1, 1, n, hd]
        sin = self.sin[positions][:, None, None]
        cos_k, sin_k = cos[:, :, 0], sin[:, :, 0]  # [B, 1, n, hd]
        for l in range(start, len(self.layers)):
            w = self.layers[l]
            if record is not None:
                record.append(x)
            if w.groups:
                x = x + self._attention(l, x, cos, sin, cos_k, sin_k, cols, mask)
            if w.slices:
                x = x + self._ffn(l, x)
        return rms_norm(x, self.r["norm"], self.config.eps)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The LM head: x [..., d] -> [..., vocab] (the whole table, every token)."""
        return torch.matmul(x, self.head.t())

    def set_table(self, table: torch.Tensor) -> None:
        """Run with this token-embedding table [vocab, hidden] (e.g. a stored variant at b
        bits, dequantised): every embedding lookup, and the LM head when it is tied (an
        untied LM head stays as it is). The resident dict given is not changed."""
        c = self.config
        if tuple(table.shape) != (c.vocab, c.hidden) or table.dtype != torch.float32:
            raise ValueError(f"an embedding table must be fp32 [{c.vocab}, {c.hidden}], got "
                             f"{table.dtype} {list(table.shape)}")
        self.r = {**self.r, "embed": table}
        if "lm_head" not in self.r:
            self.head = table

    # --- prompt and decode ----------------------------------------------------------------

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor | None = None, *,
                last_only: bool = False, chunk: int | None = None) -> torch.Tensor:
        """Start a batch: ids [B, n] (int64), mask [B, n] bool (True = real token; left or
        right padding; default all real). Fills the KV cache's first n columns and returns
        the logits [B, n, vocab], or with `last_only` each sequence's last real token's
        logits [B, vocab]. With `chunk`, the prompt runs `chunk` columns at a time, each
        chunk through every layer, attending to the cache's earlier columns: the attention
        scores held are [B, heads, chunk, n] instead of [B, heads, n, n] (SmolLM2 at 8,192
        tokens: 2.4 GB at once, 75 MB in chunks of 256)."""
        B, n = ids.shape
        if mask is None:
            mask = torch.ones(B, n, dtype=torch.bool)
        mask = mask.to(torch.bool)
        if n > self.context:
            raise ValueError(f"prompt of {n} columns exceeds the cache's {self.context}")
        if not bool(mask.any(1).all()):
            raise ValueError("every sequence needs at least one real token")
        if ids.min() < 0 or ids.max() >= self.config.vocab:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab})")
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if self.cache is None or self.cache.batch != B or \
                self.cache.mask.is_inference() != torch.is_inference_mode_enabled():
            # (a cache made under inference mode cannot be written outside it)
            self.cache = KVCache(self.config, self.layers, B, self.context)
        cache = self.cache
        cache.mask.zero_()
        cache.mask[:, :n] = mask
        cache.used = n
        counts = mask.long().cumsum(1)
        cache.lengths = counts[:, -1].clone()
        positions = (counts - 1).clamp_(min=0)
        col = torch.arange(n)
        hidden = torch.empty(B, n, self.config.hidden) if chunk and chunk < n else None
        for s in range(0, n, chunk or n):
            e = min(n, s + (chunk or n))
            # column j attends column i <= j when i is real; and itself (a padded column's
            # row must not be empty; it feeds nothing real)
            rows = col[s:e, None]
            allowed = ((col[None, :e] <= rows)[None] & mask[:, None, :e]) | \
                (col[None, :e] == rows)[None]
            x = self._run(self.r["embed"][ids[:, s:e]], positions[:, s:e], slice(s, e),
                          allowed[:, None, None])
            if hidden is not None:
                hidden[:, s:e] = x
        x = x if hidden is None else hidden
        if last_only:
            last = n - 1 - torch.flip(mask, [1]).long().argmax(1)
            return self.logits(x[torch.arange(B), last])
        return self.logits(x)

    def teacher_forced(self, ids: torch.Tensor, mask: torch.Tensor, *, start: int = 0,
                       x: torch.Tensor | None = None, record: list | None = None
                       ) -> torch.Tensor:
        """A whole batch at once, as for scoring text (ids [B, n], mask [B, n], right
        padding): the final hidden states [B, n, hidden] before the LM head. From layer
        `start` with `x` its input [B, n, hidden] (default: the embeddings, from layer 0);
        `record` (a list) receives each layer's input from `start` on. A fresh KV cache is
        used (the layers' kept groups may have changed since the last call)."""
        B, n = ids.shape
        if n > self.context:
            raise ValueError(f"{n} columns exceed the decoder's context of {self.context}")
        mask = mask.to(torch.bool)
        self.cache = KVCache(self.config, self.layers, B, n)
        self.cache.mask[:, :n] = mask
        self.cache.used = n
        counts = mask.long().cumsum(1)
        self.cache.lengths = counts[:, -1].clone()
        positions = (counts - 1).clamp_(min=0)
        col = torch.arange(n)
        allowed = ((col[None, :] <= col[:, None])[None] & mask[:, None, :]) | \
            torch.eye(n, dtype=torch.bool)[None]
        x = self.r["embed"][ids] if x is None else x
        return self._run(x, positions, slice(0, n), allowed[:, None, None], start, record)

    def decode_step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """One token per sequence (token_ids [B]) after the prompt and earlier steps;
        returns the logits [B, vocab] of the next token."""
        cache = self.cache
        if cache is None:
            raise ValueError("decode_step before prefill")
        B = cache.batch
        token_ids = token_ids.reshape(-1)
        if token_ids.numel() != B:
            raise ValueError(f"expected {B} token ids, got {token_ids.numel()}")
        t = cache.used
        if t >= self.context:
            raise ValueError(f"the KV cache is full ({self.context} columns)")
        cache.mask[:, t] = True
        positions = cache.lengths.view(B, 1)
        x = self.r["embed"][token_ids.view(B, 1)]
        # a batch without padding attends to every column: no mask to apply
        mask = None if bool(cache.mask[:, :t + 1].all()) else cache.mask[:, None, None, None, :t + 1]
        x = self._run(x, positions, slice(t, t + 1), mask)
        cache.used = t + 1
        cache.lengths = cache.lengths + 1
        return self.logits(x[:, 0])

    @torch.inference_mode()
    def greedy(self, ids: torch.Tensor, mask: torch.Tensor | None = None,
               max_new_tokens: int = 32, eos_id: int | None = None) -> list[list[int]]:
        """Greedy continuations: per sequence the new tokens, ending at (and including)
        `eos_id` when it comes."""
        B = ids.shape[0]
        logits = self.prefill(ids, mask, last_only=True)
        out: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1)
            for i in range(B):
                if not done[i]:
                    out[i].append(int(nxt[i]))
                    done[i] = eos_id is not None and int(nxt[i]) == eos_id
            if all(done) or step == max_new_tokens - 1:
                break
            logits = self.decode_step(nxt)
        return out

    @staticmethod
    def from_tensors(c: LlamaConfig, tensors: Mapping[str, np.ndarray],
                     shards: dict[int, list[str]] | None = None,
                     context: int | None = None) -> "Decoder":
        """A decoder from HF tensors: every shard, or per layer the shards in `shards`
        (a layer not named keeps all)."""
        shards = shards or {}
        layers = [LayerWeights.full(c, tensors, l, shards.get(l)) for l in range(c.layers)]
        return Decoder(c, load_resident(tensors, c), layers, context)


class Llama:
    """The llama family as the store and the registry (runtime.families) ask for it: its
    config as a store index records it, its resident tensors, its shard cut and its
    per-layer weights."""

    name = FAMILY
    decoder = True  # a causal LM: next-token logits, a KV cache

    def config_from_index(self, cf, model: str) -> LlamaConfig:
        """`config` of a store index (checked; a refusal names the key)."""
        dims = {k: cf.integer(k, minimum=1, maximum=1 << 24)
                for k in ("layers", "hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab",
                          "context")}
        ids = {k: cf.integer(k, minimum=0, maximum=1 << 24, required=False)
               for k in ("bos_id", "eos_id", "pad_id")}
        try:
            return LlamaConfig(name=model, **dims, **ids,
                               rope_base=cf.number("rope_base", positive=True),
                               eps=cf.number("eps", positive=True, maximum=1.0),
                               tied=cf.boolean("tied"),
                               ffn_slice_count=cf.integer("ffn_slices", minimum=1,
                                                          maximum=1 << 16))
        except ValueError as e:
            raise cf.err("layers", f"not a llama shape: {e}") from None

    def resident_names(self, c: LlamaConfig) -> dict[str, str]:
        return resident_names(c)

    def cut_shard(self, tensors, c: LlamaConfig, layer: int, name: str
                  ) -> tuple[np.ndarray, np.ndarray]:
        return cut_shard(tensors, c, layer, name)

    def layer_weights(self, c: LlamaConfig, names: list[str]) -> LayerWeights:
        return LayerWeights(c, names)
