"""The question a plan answers, asked of a device and a model: one frozen record, shared by
the scenario (elasticplan.problem.spec.Scenario) and the plan that answers it.

Every field's range is checked in one place, `BOUNDS` (field -> range, unit, meaning), when
a Question is made, however it is made: read from a scenario file or a plan file
(`Question.read`), from command-line flags (elasticplan.cli takes its flag types from the
same table) or built by a library call. What depends on the device or the model (a memory
budget below what every plan holds, a quantile that needs the device's measured spread) is
the scenario's to check.

The prefetch window's two facts, whether it binds and how many layers it spans, are
`window_binds` and `window_span`, for every module that needs them.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import Any

from elasticplan.errors import SpecError
from elasticplan.problem.limits import (
    MAX_BUFFER_MB,
    MAX_IMPORTANCE,
    MAX_LAYERS,
    MAX_MEMORY_MB,
    MAX_QUANTILE,
    MAX_SEQ_LEN,
    MAX_SHARDS_PER_LAYER,
    MAX_TARGET_MS,
    MAX_VARIANTS,
    bytes_of_mb,
)


class Objective(str, enum.Enum):
    MAX_IMPORTANCE = "max_importance"  # given the buffer budget, maximise importance
    MIN_BUFFER = "min_buffer"  # given an importance floor, minimise preloaded bytes
    MIN_MEMORY = "min_memory"  # given an importance floor, minimise the predicted peak memory
    MIN_LATENCY = "min_latency"  # internal: fastest schedule, used to explain infeasibility


FLOOR_OBJECTIVES = (Objective.MIN_BUFFER, Objective.MIN_MEMORY)  # they need an importance floor
# What a scenario file or a flag may ask for (min_latency is the planner's own question).
PUBLIC_OBJECTIVES = (Objective.MAX_IMPORTANCE, Objective.MIN_BUFFER, Objective.MIN_MEMORY)


@dataclass(frozen=True)
class Bound:
    """A field's range: a number (or an integer) in [low, high], or (low, high] when
    `open_low`; `unit` and `meaning` complete the message."""

    low: float
    high: float
    unit: str = ""
    open_low: bool = False
    integer: bool = False
    meaning: str = ""

    def problem(self, value: Any) -> str | None:
        """Why `value` is not in range, as the one message every reader of the field gives
        ("must be a number in (0, 1e+07] ms, got -1"); None if it is."""
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = number and isinstance(value, int) if self.integer else \
            number and (isinstance(value, int) or math.isfinite(value))
        if ok and (value > self.low if self.open_low else value >= self.low) and \
                value <= self.high:
            return None
        kind = "an integer" if self.integer else "a number"
        span = f"{'(' if self.open_low else '['}{self.low:g}, {self.high:g}]"
        unit = f" {self.unit}" if self.unit else ""
        meaning = f" ({self.meaning})" if self.meaning else ""
        shown = f"{value:g}" if isinstance(value, float) else _show(value)
        return f"must be {kind} in {span}{unit}{meaning}, got {shown}"


# Every range of the question, in one table.
BOUNDS: dict[str, Bound] = {
    "target_latency_ms": Bound(0, MAX_TARGET_MS, "ms", open_low=True),
    "preload_budget_mb": Bound(0, MAX_BUFFER_MB, "MB"),
    "min_shards_per_layer": Bound(0, MAX_SHARDS_PER_LAYER, "shards", integer=True),
    "importance_floor": Bound(0, MAX_IMPORTANCE * MAX_VARIANTS),
    "memory_budget_mb": Bound(0, MAX_MEMORY_MB, "MB", open_low=True),
    "prefetch_window": Bound(1, MAX_LAYERS, "layers", integer=True,
                             meaning="layers IO may run ahead of compute"),
    "latency_quantile": Bound(0.5, MAX_QUANTILE,
                              meaning="0.5: the median run meets the target"),
    "prompt_tokens": Bound(1, MAX_SEQ_LEN, "tokens", integer=True,
                           meaning="a decoder's prompt"),
    "answer_tokens": Bound(1, MAX_SEQ_LEN, "tokens", integer=True,
                           meaning="tokens a decoder generates"),
    "kv_bits": Bound(16, 32, "bits", integer=True, meaning="16 or 32: the KV cache's precision"),
    "target_ttft_ms": Bound(0, MAX_TARGET_MS, "ms", open_low=True,
                            meaning="a decoder's time to first token"),
    "query_tokens": Bound(1, MAX_SEQ_LEN, "tokens", integer=True,
                          meaning="distinct tokens per query a streamed embedding table is "
                                  "read for"),
}
KV_BITS = (16, 32)


@dataclass(frozen=True)
class Question:
    """What is asked (docs/formats.md, "Scenario"). Units are in the field names: MB = 10**6
    bytes. Made valid or not at all: each field in its `BOUNDS`, the objective one of
    `Objective`, an importance floor exactly when the objective uses one. Numbers are
    kept as floats (an integer target reads back as the same float from a plan)."""

    target_latency_ms: float
    preload_budget_mb: float
    min_shards_per_layer: int = 1
    objective: Objective = Objective.MAX_IMPORTANCE
    importance_floor: float | None = None
    memory_budget_mb: float | None = None  # bound on the predicted peak memory (None: none)
    prefetch_window: int | None = None  # layers IO may run ahead of compute (None: unbounded)
    latency_quantile: float = 0.5  # the quantile of the latency that must meet the target
    # A decoder's question (elasticplan.decoding): the prompt and the answer it generates;
    # target_latency_ms is then the time per output token, at the last one.
    prompt_tokens: int | None = None
    answer_tokens: int | None = None
    kv_bits: int | None = None  # the KV cache's precision (None: 32)
    target_ttft_ms: float | None = None  # a decoder's time to first token (None: unbounded)
    # An encoder's queries: the most distinct tokens one query has. A streamed embedding
    # table is read one row per distinct token, so a plan is priced for this many reads
    # (None: seq_len, every position its own row, which holds for any query).
    query_tokens: int | None = None

    def __post_init__(self) -> None:
        for name, bound in BOUNDS.items():
            value = getattr(self, name)
            if value is None and name in OPTIONAL:
                continue
            why = bound.problem(value)
            if why is not None:
                raise SpecError(None, name, why)
            if not bound.integer:
                object.__setattr__(self, name, float(value))
        if not isinstance(self.objective, Objective):
            raise SpecError(None, "objective", f"must be an Objective, got {self.objective!r}")
        if self.objective in FLOOR_OBJECTIVES and self.importance_floor is None:
            raise SpecError(None, "importance_floor",
                            f"objective {self.objective.value} needs an importance_floor")
        if self.objective == Objective.MAX_IMPORTANCE and self.importance_floor is not None:
            raise SpecError(None, "importance_floor", "only used with objectives min_buffer and "
                            "min_memory (remove it, or set objective)")
        if (self.prompt_tokens is None) != (self.answer_tokens is None):
            missing = "answer_tokens" if self.answer_tokens is None else "prompt_tokens"
            raise SpecError(None, missing, "a decoder's question gives prompt_tokens and "
                                           "answer_tokens together")
        if self.target_ttft_ms is not None and not self.decoding:
            raise SpecError(None, "target_ttft_ms", "only used by a decoder's question (with "
                                                    "prompt_tokens and answer_tokens)")
        if self.kv_bits is not None:
            if not self.decoding:
                raise SpecError(None, "kv_bits", "only used by a decoder's question (with "
                                                 "prompt_tokens and answer_tokens)")
            if self.kv_bits not in KV_BITS:
                raise SpecError(None, "kv_bits", f"must be 16 or 32, got {self.kv_bits}")
        if self.query_tokens is not None and self.decoding:
            raise SpecError(None, "query_tokens", "an encoder's question (a decoder's prompt "
                                                  "pass reads a row per prompt token)")

    # --- derived -------------------------------------------------------------------------

    @property
    def preload_budget_bytes(self) -> int:
        return bytes_of_mb(self.preload_budget_mb)

    @property
    def memory_budget_bytes(self) -> int | None:
        return None if self.memory_budget_mb is None else bytes_of_mb(self.memory_budget_mb)

    @property
    def decoding(self) -> bool:
        """Is this a decoder's question (token by token, elasticplan.decoding)?"""
        return self.prompt_tokens is not None

    @property
    def context_tokens(self) -> int:
        """The context the KV cache is sized for: prompt + answer (0 for an encoder)."""
        return (self.prompt_tokens or 0) + (self.answer_tokens or 0)

    @property
    def kv_cache_bits(self) -> int:
        return self.kv_bits or 32

    @property
    def memory_bounded(self) -> bool:
        """Does the question constrain or minimise the peak memory (so the program carries
        memory rows and may stream the embedding table)?"""
        return self.memory_budget_mb is not None or self.objective == Objective.MIN_MEMORY

    def replace(self, **changes) -> "Question":
        """The same question with some fields changed; checked again."""
        return dataclasses.replace(self, **changes)

    # --- JSON and files ------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The JSON form: every field in order, the objective by name, an absent value as
        null (a plan's `scenario` carries it); an encoder's question leaves out the
        decoder's fields, a decoder's the encoder's."""
        left_out = ENCODER_FIELDS if self.decoding else DECODER_FIELDS
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in left_out} | \
            {"objective": self.objective.value}

    @staticmethod
    def read(f, objectives=PUBLIC_OBJECTIVES,
             required=("target_latency_ms", "preload_budget_mb")) -> "Question":
        """The question's keys of a mapping read through `f` (elasticplan.problem.inputs.
        Fields: a scenario file, or a plan's `scenario`), each absent one at its default;
        errors name the file and the key path, in f's error class. The caller ends the
        mapping (f.done())."""
        values = {}
        for name in FIELDS:
            value = f.raw(name, required=name in required)
            if value is not None:
                values[name] = value
        if "objective" in values:
            allowed = [o.value for o in objectives]
            if values["objective"] not in allowed:
                raise f.err("objective", f"must be one of {', '.join(allowed)}, got "
                                         f"{_show(values['objective'])}")
            values["objective"] = Objective(values["objective"])
        try:
            return Question(**values)
        except SpecError as e:
            raise f.err(e.key_path, e.message) from None


FIELDS = tuple(f.name for f in dataclasses.fields(Question))
DECODER_FIELDS = ("prompt_tokens", "answer_tokens", "kv_bits", "target_ttft_ms")
ENCODER_FIELDS = ("query_tokens",)
OPTIONAL = frozenset(f.name for f in dataclasses.fields(Question) if f.default is None)
# What a Scenario reads through from its question (scenario.target_latency_ms).
READ_THROUGH = frozenset(FIELDS) | {"preload_budget_bytes", "memory_budget_bytes",
                                    "memory_bounded", "decoding", "context_tokens",
                                    "kv_cache_bits"}


def window_binds(window: int | None, layers: int) -> bool:
    """Whether a prefetch window of `window` layers holds IO back on a model of `layers`
    layers: it does unless it is unbounded (None) or as deep as the model (W + 1 >= L)."""
    return window is not None and window + 1 < layers


def window_span(window: int | None, layers: int) -> int:
    """How many consecutive layers can be in flight at once (read, waiting or computing):
    W + 1 for a binding window, else every layer."""
    return window + 1 if window_binds(window, layers) else layers


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."
