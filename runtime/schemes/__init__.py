"""Quantisation schemes: how the store keeps a shard's blocks below 32 bits.

Each scheme is a small frozen dataclass (runtime/schemes/base.py's `Scheme`) in a module of
its own, registered below by the name the store index records for each file. The store,
the executor and the commands ask the interface, never a name; adding a scheme is a new
module here and one line in REGISTRY (docs/extending.md). The registry imports a scheme's
module only when it is used, so that commands that need no scheme do not load torch.
"""

from __future__ import annotations

import importlib

# name -> (module, class, one line for --help); the first is the default scheme: what fp32
# (raw) and a store file that names no scheme are kept in
REGISTRY = {
    "uniform": ("runtime.schemes.uniform", "Uniform", "per row, 2/3/4/6/8 bits"),
    "dict": ("runtime.schemes.dictionary", "Dictionary",
             "2/3/4/5 bits as a codebook per block and a scale per row + 0.5 %% exact "
             "outliers, 6/8 bits uniform"),
    "group": ("runtime.schemes.group", "Grouped",
              "2/3/4/6/8 bits affine per 32 weights of a row (fp16 step and minimum), as "
              "GGUF's blocks"),
}
DEFAULT_NAME = next(iter(REGISTRY))


def scheme_class(name: str):
    """The registered scheme class of this name (ValueError if there is none)."""
    if name not in REGISTRY:
        raise ValueError(f"{name!r} is not a quantisation scheme (known: {', '.join(REGISTRY)})")
    module, cls, _ = REGISTRY[name]
    return getattr(importlib.import_module(module), cls)


def all_schemes() -> dict:
    """Every registered scheme class by name."""
    return {name: scheme_class(name) for name in REGISTRY}


def create(name: str, **options):
    """A registered scheme from its name and command-line options (None: not given);
    ValueError says what is wrong."""
    return scheme_class(name).create(**options)
