"""The range every weight must lie in, checked wherever weights enter: a checkpoint when it
is sharded (runtime/families/encoder.py), a store's resident tensors and every variant
when it is loaded (runtime/store.py and each scheme's `check`, runtime/schemes/)."""

from __future__ import annotations

import numpy as np

# The largest weight magnitude a checkpoint or a store may hold (fp16's largest finite
# value): no trained encoder comes near it, and with weights inside it the fp32 forward
# pass cannot overflow at any shape the store accepts. A NaN, an infinity or a larger
# value is refused when a checkpoint is sharded and when a store's resident tensors or a
# variant are loaded.
MAX_WEIGHT = 65504.0


# first_bad looks at this many values at a time: its temporaries (their magnitudes and a
# mask) stay ~0.3 MB whatever the array (a 113 MB fp32 table checked at once held two
# more table-sized arrays at the process's peak).
CHECK_CHUNK = 1 << 16


def first_bad(values: np.ndarray, bound: float = MAX_WEIGHT) -> tuple[int, float] | None:
    """(flat index, value) of the first NaN, infinity or magnitude above `bound` in
    `values`, or None."""
    v = np.asarray(values).ravel()
    for start in range(0, v.size, CHECK_CHUNK):
        part = v[start:start + CHECK_CHUNK]
        bad = ~(np.abs(part) <= bound)  # (NaN compares false)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            return start + i, float(part[i])
    return None


def out_of_range(values: np.ndarray, what: str, bound: float = MAX_WEIGHT) -> str | None:
    """Why `values` may not be used as weights (a NaN, an infinity, or a magnitude above
    `bound`, with the first offending index), or None when they may."""
    bad = first_bad(values, bound)
    if bad is None:
        return None
    i, v = bad
    return (f"{what} holds {v:g} at flat index {i}" +
            ("" if not np.isfinite(v) else f", beyond ±{bound:g} (the largest weight accepted)"))
