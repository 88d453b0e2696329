"""A llama checkpoint in the Hugging Face layout, checked in full when opened, giving the
same things as a GGUF file (runtime/sources/gguf_file.py): a `LlamaConfig`, the tensors as
fp32 numpy arrays under HF's llama names (read from the safetensors file on use), the
tokenizer and, when tokenizer_config.json has one, the chat template.

    config.json          model_type "llama": num_hidden_layers, hidden_size,
                         num_attention_heads, num_key_value_heads (default: the heads),
                         head_dim (default hidden / heads), intermediate_size, vocab_size,
                         max_position_embeddings, rms_norm_eps, rope_theta (or
                         rope_parameters.rope_theta; default 10000; rope type "default"
                         only), tie_word_embeddings (default false, as in
                         transformers), hidden_act "silu", no biases
    model.safetensors    every tensor the config implies, of its shape, floating point
    tokenizer.json       a `tokenizers` tokenizer whose ids fit the vocabulary

Every refusal is one line naming the file and the key or tensor (StoreError, exit 8).
Tiny random ones for tests: `python -m runtime.sources.tinyckpt DIR --family llama`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from elasticplan.errors import StoreError
from runtime.families.llama import LlamaConfig, tensor_shapes

MAX_DIM = 1 << 20
MAX_LAYERS = 1024
MAX_CONFIG_BYTES = 1 << 20


class _Keys:
    """Checked access to one JSON mapping; a refusal names the file and the key."""

    def __init__(self, data, file: Path, prefix: str = ""):
        if not isinstance(data, dict):
            raise StoreError(f"{file}: {prefix or 'the file'}: expected a mapping")
        self.data, self.file, self.prefix = data, file, prefix

    def err(self, key: str, message: str) -> StoreError:
        return StoreError(f"{self.file}: {self.prefix}{key}: {message}")

    def raw(self, key: str, required: bool = True):
        v = self.data.get(key)
        if v is None and required:
            raise self.err(key, "required key is missing")
        return v

    def integer(self, key: str, lo: int, hi: int, required: bool = True) -> int | None:
        v = self.raw(key, required)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise self.err(key, f"expected an integer in [{lo}, {hi}], got {v!r}")
        return v

    def number(self, key: str, hi: float = float("inf"), required: bool = True) -> float | None:
        v = self.raw(key, required)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= hi:
            raise self.err(key, f"expected a positive number (at most {hi}), got {v!r}")
        return float(v)

    def boolean(self, key: str, default: bool) -> bool:
        v = self.raw(key, required=False)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self.err(key, f"expected true or false, got {v!r}")
        return v


def read_config(path: Path, name: str) -> LlamaConfig:
    """config.json of a llama checkpoint, checked (each refusal names the file and key)."""
    file = path / "config.json"
    if not file.is_file():
        raise StoreError(f"{path}: no config.json here (a Hugging Face checkpoint directory "
                         f"holds config.json, model.safetensors and tokenizer.json)")
    try:
        if file.stat().st_size > MAX_CONFIG_BYTES:
            raise StoreError(f"{file}: larger than {MAX_CONFIG_BYTES} bytes: not a model config")
        data = json.loads(file.read_text(encoding="utf-8"))
    except OSError as e:
        raise StoreError(f"{file}: cannot read ({e.strerror or e})") from None
    except ValueError as e:
        raise StoreError(f"{file}: not valid JSON ({e})") from None
    f = _Keys(data, file)
    family = f.raw("model_type")
    if family != "llama":
        raise f.err("model_type", f"{family!r} is not a llama checkpoint")

    def dim(key: str, hi: int = MAX_DIM, required: bool = True) -> int | None:
        return f.integer(key, 1, hi, required)

    heads = dim("num_attention_heads")
    hidden = dim("hidden_size")
    kv_heads = dim("num_key_value_heads", required=False) or heads
    head_dim = dim("head_dim", required=False) or hidden // heads
    if heads % kv_heads:
        raise f.err("num_key_value_heads", f"{kv_heads} does not divide the {heads} query heads")
    if head_dim % 2:
        raise f.err("head_dim", f"{head_dim} is odd (rotary positions rotate pairs)")
    act = f.raw("hidden_act", required=False) or "silu"
    if act != "silu":
        raise f.err("hidden_act", f"{act!r} is not supported (SwiGLU with SiLU only)")
    for flag in ("attention_bias", "mlp_bias"):
        if f.raw(flag, required=False):
            raise f.err(flag, "biases are not supported (a llama has none)")
    theta = f.number("rope_theta", required=False)
    rope = f.raw("rope_parameters", required=False)
    if rope is not None:
        rope = _Keys(rope, file, "rope_parameters.")
        kind = rope.raw("rope_type", required=False) or "default"
        if kind != "default":
            raise rope.err("rope_type", f"{kind!r} is not supported (plain rotary positions)")
        theta = rope.number("rope_theta", required=False) or theta
    if f.raw("rope_scaling", required=False):
        raise f.err("rope_scaling", "rotary scaling is not supported")
    tied = f.boolean("tie_word_embeddings", default=False)  # transformers' llama default
    vocab = dim("vocab_size")

    def token_id(key: str) -> int | None:
        v = f.raw(key, required=False)
        if isinstance(v, list):  # eos_token_id may be a list: the first is the model's
            v = v[0] if v else None
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < vocab:
            raise f.err(key, f"{v!r} is not a token id in [0, {vocab})")
        return v

    try:
        return LlamaConfig(
            name=name, layers=dim("num_hidden_layers", MAX_LAYERS), hidden=hidden, heads=heads,
            kv_heads=kv_heads, head_dim=head_dim, ffn=dim("intermediate_size"), vocab=vocab,
            context=dim("max_position_embeddings", 1 << 24),
            rope_base=float(theta or 10000.0), eps=f.number("rms_norm_eps", hi=1.0),
            tied=tied, bos_id=token_id("bos_token_id"), eos_id=token_id("eos_token_id"),
            pad_id=token_id("pad_token_id"))
    except ValueError as e:
        raise StoreError(f"{file}: describes no model we can cut ({e})") from None


class _LazyTensors(Mapping):
    """HF name -> fp32 numpy array, read from the safetensors file on each access."""

    def __init__(self, owner: "HFLlama"):
        self._owner = owner

    def __getitem__(self, name: str) -> np.ndarray:
        return self._owner.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._owner.shapes)

    def __len__(self) -> int:
        return len(self._owner.shapes)


class HFLlama:
    """A Hugging Face llama checkpoint directory (see the module doc)."""

    def __init__(self, path: str | Path, name: str | None = None):
        from safetensors import SafetensorError, safe_open

        self.path = Path(path)
        self.config = read_config(self.path, name or self.path.name)
        self.file = self.path / "model.safetensors"
        if not self.file.is_file():
            raise StoreError(f"{self.path}: no model.safetensors here")
        self.shapes = tensor_shapes(self.config)
        try:
            with safe_open(str(self.file), framework="numpy") as st:
                present = set(st.keys())
                for tname, shape in self.shapes.items():
                    if tname not in present:
                        raise StoreError(f"{self.file}: tensor {tname!r} is missing (config.json "
                                         f"declares a {self.config.layers}-layer llama)")
                    got = tuple(st.get_slice(tname).get_shape())
                    if got != shape:
                        raise StoreError(f"{self.file}: tensor {tname!r} has shape {list(got)}, "
                                         f"config.json implies {list(shape)}")
                    dtype = st.get_slice(tname).get_dtype()
                    if dtype not in ("F32", "F16", "BF16", "F64"):
                        raise StoreError(f"{self.file}: tensor {tname!r} is {dtype}, not a "
                                         f"floating-point tensor")
        except SafetensorError as e:
            raise StoreError(f"{self.file}: not a readable safetensors file ({e})") from None
        except OSError as e:
            raise StoreError(f"{self.file}: cannot read ({e.strerror or e})") from None
        self._tokenizer = self._read_tokenizer()
        self.tensors: Mapping[str, np.ndarray] = _LazyTensors(self)

    def read(self, name: str) -> np.ndarray:
        """Tensor `name` as a new fp32 numpy array."""
        from safetensors import safe_open

        if name not in self.shapes:
            raise KeyError(f"{name!r} is not a tensor of {self.file}")
        with safe_open(str(self.file), framework="pt") as st:  # pt: numpy has no bf16
            return st.get_tensor(name).float().numpy().copy()

    def _read_tokenizer(self):
        from tokenizers import Tokenizer

        file = self.path / "tokenizer.json"
        if not file.is_file():
            raise StoreError(f"{self.path}: tokenizer.json is missing")
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises its own Exception subclass
            raise StoreError(f"{file}: not a readable tokenizer.json "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
                from None
        size = tok.get_vocab_size(with_added_tokens=True)
        if size > self.config.vocab:
            raise StoreError(f"{file}: {size} tokens do not fit the model's vocabulary of "
                             f"{self.config.vocab} (config.json vocab_size)")
        return tok

    def tokenizer(self):
        return self._tokenizer

    @property
    def chat_template(self) -> str | None:
        file = self.path / "tokenizer_config.json"
        if not file.is_file():
            return None
        try:
            v = json.loads(file.read_text()).get("chat_template")
        except (OSError, ValueError, AttributeError):
            return None
        return v if isinstance(v, str) else None
