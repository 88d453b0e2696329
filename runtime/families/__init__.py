"""Model families: the architectures the runtime runs, each a small class in a module of
its own, registered below by the name a checkpoint's config.json gives as `model_type` and
the store index records as `config.family`.

A family says what differs between checkpoints of one kind of model: the config.json keys
of its shape, its tensor names, its embeddings' position ids, the prefix a task model's
checkpoint puts before the base model's tensors (runtime/families/base.py). The encoder
forward pass they share is runtime/families/encoder.py; nothing outside a family's own
module branches on its name. Adding one is a new module and one line in REGISTRY
(docs/extending.md).
"""

from __future__ import annotations

import importlib

# model_type -> (module, class); the first is the default (a config.json or store index
# that names no family)
REGISTRY = {
    "bert": ("runtime.families.bert", "Bert"),
    "distilbert": ("runtime.families.distilbert", "DistilBert"),
    "roberta": ("runtime.families.roberta", "Roberta"),
    "llama": ("runtime.families.llama", "Llama"),
}
DEFAULT_FAMILY = next(iter(REGISTRY))
MAX_DIM = 1 << 16  # largest hidden / FFN / vocabulary size a checkpoint may declare
MAX_CHECKPOINT_LAYERS = 256
_INSTANCES: dict = {}


def family(name: str):
    """The registered family of this name (ValueError if there is none)."""
    if name not in _INSTANCES:
        if name not in REGISTRY:
            raise ValueError(f"{name!r} is not supported (supported: {', '.join(REGISTRY)})")
        module, cls = REGISTRY[name]
        _INSTANCES[name] = getattr(importlib.import_module(module), cls)()
    return _INSTANCES[name]


def all_families() -> list:
    return [family(name) for name in REGISTRY]
