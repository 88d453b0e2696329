"""The problem as frozen, typed data.

Built only by elasticplan.problem.loader (from YAML) or by tests/generators that go
through the same validating constructors. Units are in the field names:
MB = 10**6 bytes, GB/s = 10**9 bytes per second, GFLOP/s = 10**9 flop/s.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass

from elasticplan.errors import SpecError

FULL_PRECISION_BITS = 32

# Physical ranges (docs/formats.md, "Limits and ranges"): values outside them are refused
# at load, so that no solver ever sees a number it would misread.
MIN_BANDWIDTH_MB_S = 1e-3  # 1 KB/s: slower overflows no time, but is no storage
MAX_BANDWIDTH_MB_S = 1e6  # 1 TB/s
MAX_LATENCY_US = 1e6  # one second per read request
MIN_GFLOPS = 1e-3
MAX_GFLOPS = 1e7  # 10 PFLOP/s
MAX_OVERHEAD_MS = 1e4
MIN_DEQUANT_GB_S = 1e-6
MAX_DEQUANT_GB_S = 1e4
MAX_NS_PER_WEIGHT = 1e6  # a millisecond per weight
MAX_QUANTILE = 0.999
MAX_SPREAD = 1.0  # a stage's relative spread (rms of log measured / predicted)
MAX_MEMORY_MB = 1e9  # 1 PB
MAX_SEQ_LEN = 1 << 20
MAX_LAYERS = 10_000
MAX_SHARDS_PER_LAYER = 10_000
MAX_VARIANTS = 500_000  # layers x shards x bitwidths: what the planner is sized for (docs)
MAX_FLOPS = 1e18
MAX_SHARD_BYTES = 1 << 40  # 1 TiB
MAX_IMPORTANCE = 1e6
MAX_TARGET_MS = 1e7
MAX_BUFFER_MB = MAX_MEMORY_MB


class Objective(str, enum.Enum):
    MAX_IMPORTANCE = "max_importance"  # given the buffer budget, maximise importance
    MIN_BUFFER = "min_buffer"  # given an importance floor, minimise preloaded bytes
    MIN_MEMORY = "min_memory"  # given an importance floor, minimise the predicted peak memory
    MIN_LATENCY = "min_latency"  # internal: fastest schedule, used to explain infeasibility


FLOOR_OBJECTIVES = (Objective.MIN_BUFFER, Objective.MIN_MEMORY)  # they need an importance floor


QUANT_SCHEMES = ("uniform", "dict")  # how shards below 32 bits are stored (runtime/store.py)


@dataclass(frozen=True)
class Device:
    """A device's storage and compute (docs/formats.md, "Device"). The compute terms of a
    layer that runs: layer_overhead_ms + per shard (shard_overhead_ms + flops / gflops
    + for a quantised shard its stored bytes / dequant_gb_s and its weights x
    dequant_ns_per_weight[bits]); per query, embed_ms before the first layer computes and
    pool_ms after the last; and a layer whose compute waits for its reads starts wake_ms
    after they end (the compute thread's wake-up). The terms a device file leaves out are 0
    (None: no per-byte dequantisation term)."""

    name: str
    bandwidth_mb_s: float  # sequential read bandwidth of the storage
    latency_us: float  # fixed cost of each read request
    gflops: float  # effective throughput for shard math
    layer_overhead_ms: float  # fixed compute per executed layer (norms, residuals, biases)
    dequant_gb_s: float | None  # dequantisation throughput, on stored bytes of quantised shards
    memory_mb: float  # memory the app may use (every term of a plan's predicted peak)
    shard_overhead_ms: float = 0.0  # fixed compute per executed shard
    dequant_ns_per_weight: tuple[tuple[int, float], ...] = ()  # (bits, ns per weight), sorted
    embed_ms: float = 0.0  # per query: the embedding lookup, before layer 0 computes
    pool_ms: float = 0.0  # per query: pooling, after the last layer
    wake_ms: float = 0.0  # a layer that waits for its reads starts computing this long after
    spread: "Spread | None" = None  # measured run-to-run spread per stage (calibrate)

    def dequant_ns(self, bits: int) -> float | None:
        """ns per weight to dequantise a shard stored at `bits` (None: no per-weight term)."""
        for b, ns in self.dequant_ns_per_weight:
            if b == bits:
                return ns
        return None


@dataclass(frozen=True)
class Spread:
    """Relative spread of each stage: the root mean square of log(measured / predicted) over
    the calibration runs, each predicted out of sample (model error and run-to-run noise
    together), and how many runs it was measured on."""

    io: float
    compute: float
    runs: int


@dataclass(frozen=True)
class Shard:
    name: str
    kind: str  # e.g. "head" or "ffn"; informational, used by the greedy baseline's ordering
    flops: float  # flop to run this shard at the profile's seq_len
    bytes: tuple[int, ...]  # stored size per bitwidth, aligned with ModelProfile.bitwidths
    importance: tuple[float, ...]  # importance per bitwidth; a dropped shard contributes 0
    weights: int | None = None  # weight elements (what dequantisation works on); None: unknown


@dataclass(frozen=True)
class Layer:
    shards: tuple[Shard, ...]

    def shard_index(self, name: str) -> int | None:
        for i, s in enumerate(self.shards):
            if s.name == name:
                return i
        return None


@dataclass(frozen=True)
class ModelProfile:
    name: str
    seq_len: int
    bitwidths: tuple[int, ...]  # strictly increasing; 32 means full precision (no dequantisation)
    layers: tuple[Layer, ...]
    resident_bytes: int = 0  # always-resident weights (norms, biases, embeddings not in a table)
    synthetic: bool = False  # importance values are synthetic, not measured
    # Memory terms that do not depend on the shards chosen (docs/design.md, "Memory"):
    embedding_rows: int = 0  # token-embedding table in the shard store (0: none, all resident)
    embedding_row_bytes: int = 0  # stored bytes of one row of it
    activation_bytes: int = 0  # the encoder's activations at seq_len, batch 1
    scratch_bytes: int = 0  # compute scratch: one shard at full precision
    # Where the runtime finds the model (a measured profile of a user's checkpoint says;
    # absolute paths, or None: the packaged MiniLM's defaults). Not part of the program.
    store_path: str | None = None
    task_head_path: str | None = None
    # The quantisation scheme each bitwidth was measured in ((bits, "dict"), ...; absent:
    # "uniform"): the runtime refuses a store that keeps a bitwidth another way.
    schemes: tuple[tuple[int, str], ...] = ()

    @property
    def embedding_table_bytes(self) -> int:
        return self.embedding_rows * self.embedding_row_bytes

    @property
    def embedding_query_bytes(self) -> int:
        """Bytes of the rows one query reads when the table is streamed (one per token)."""
        return self.seq_len * self.embedding_row_bytes if self.embedding_rows else 0

    def bit_index(self, bits: int) -> int | None:
        try:
            return self.bitwidths.index(bits)
        except ValueError:
            return None

    @property
    def max_importance(self) -> float:
        """The largest importance of any shard at any bitwidth (0 for an all-zero profile)."""
        return max((max(s.importance) for layer in self.layers for s in layer.shards),
                   default=0.0)

    @property
    def n_shards(self) -> int:
        return sum(len(layer.shards) for layer in self.layers)

    @property
    def fixed_memory_bytes(self) -> int:
        """What every plan holds whatever it chooses: resident weights, activations, compute
        scratch, and the embedding table or, streamed, one query's rows of it (the less)."""
        table = min(self.embedding_table_bytes, self.embedding_query_bytes) \
            if self.embedding_rows else 0
        return self.resident_bytes + self.activation_bytes + self.scratch_bytes + table


def bytes_of_mb(mb: float) -> int:
    """Whole bytes in `mb` MB (10**6 bytes each), robust to the float's last digit."""
    return int(mb * 1e6 + 1e-6)


@dataclass(frozen=True)
class Scenario:
    """A device + a model + the planning question. `content_hash` covers the
    device, model and scenario contents as loaded (not the file bytes), so a
    plan can detect that its inputs changed. Construction validates the fields that
    relate to each other (SpecError naming `source` and the key), so every way of
    building one -- the loader, `with_overrides`, a test -- is checked alike."""

    name: str
    device: Device
    model: ModelProfile
    target_latency_ms: float
    preload_budget_mb: float
    min_shards_per_layer: int = 1
    objective: Objective = Objective.MAX_IMPORTANCE
    importance_floor: float | None = None
    source: str | None = None  # path of the scenario file, if loaded from one
    content_hash: str = ""
    files: tuple[str, ...] = ()  # every file it was loaded from (no command may write onto them)
    memory_budget_mb: float | None = None  # bound on the predicted peak memory (None: none)
    prefetch_window: int | None = None  # layers IO may run ahead of compute (None: unbounded)
    latency_quantile: float = 0.5  # the quantile of the latency that must meet the target

    def __post_init__(self) -> None:
        file = self.source
        if not (_finite(self.target_latency_ms) and 0 < self.target_latency_ms <= MAX_TARGET_MS):
            raise SpecError(file, "target_latency_ms", f"must be a number in (0, "
                            f"{MAX_TARGET_MS:g}], got {self.target_latency_ms!r}")
        if not (_finite(self.preload_budget_mb) and 0 <= self.preload_budget_mb <= MAX_BUFFER_MB):
            raise SpecError(file, "preload_budget_mb", f"must be a number in [0, "
                            f"{MAX_BUFFER_MB:g}], got {self.preload_budget_mb!r}")
        if isinstance(self.min_shards_per_layer, bool) or \
                not isinstance(self.min_shards_per_layer, int) or self.min_shards_per_layer < 0:
            raise SpecError(file, "min_shards_per_layer",
                            f"must be an integer >= 0, got {self.min_shards_per_layer!r}")
        if not isinstance(self.objective, Objective):
            raise SpecError(file, "objective", f"must be an Objective, got {self.objective!r}")
        if self.importance_floor is not None and not (
                _finite(self.importance_floor) and self.importance_floor >= 0):
            raise SpecError(file, "importance_floor",
                            f"must be a finite number >= 0, got {self.importance_floor!r}")
        if self.prefetch_window is not None and (
                isinstance(self.prefetch_window, bool) or not isinstance(self.prefetch_window, int)
                or not 1 <= self.prefetch_window <= MAX_LAYERS):
            raise SpecError(file, "prefetch_window", f"must be an integer in [1, {MAX_LAYERS}] "
                            f"(layers IO may run ahead of compute) or absent for unbounded, got "
                            f"{self.prefetch_window!r}")
        q = self.latency_quantile
        if not (_finite(q) and 0.5 <= q <= MAX_QUANTILE):
            raise SpecError(file, "latency_quantile", f"must be a number in [0.5, "
                            f"{MAX_QUANTILE:g}] (0.5: the median run meets the target), "
                            f"got {q!r}")
        if q > 0.5 and self.device.spread is None:
            raise SpecError(file, "latency_quantile",
                            f"{q:g} needs the run-to-run spread of device "
                            f"{self.device.name!r}, which its file does not give (`spread`: "
                            f"measure it with `elasticplan calibrate`), or latency_quantile 0.5")
        if self.memory_budget_mb is not None:
            if not (_finite(self.memory_budget_mb) and 0 < self.memory_budget_mb <= MAX_MEMORY_MB):
                raise SpecError(file, "memory_budget_mb", f"must be a number in (0, "
                                f"{MAX_MEMORY_MB:g}], got {self.memory_budget_mb!r}")
            if self.memory_budget_mb > self.device.memory_mb:
                raise SpecError(file, "memory_budget_mb",
                                f"{self.memory_budget_mb:g} MB exceeds the device's memory_mb "
                                f"{self.device.memory_mb:g}")
            fixed = self.model.fixed_memory_bytes
            if self.memory_budget_bytes < fixed:
                raise SpecError(file, "memory_budget_mb",
                                f"{self.memory_budget_mb:g} MB is below what every plan of model "
                                f"{self.model.name!r} holds: {fixed / 1e6:.6g} MB (resident "
                                f"weights, activations, compute scratch and the embedding "
                                f"rows)")
        cap_mb = self.memory_cap_bytes / 1e6
        if self.preload_budget_bytes > self.memory_cap_bytes:
            raise SpecError(file, "preload_budget_mb",
                            f"{self.preload_budget_mb:g} MB does not fit in the device's memory_mb "
                            f"{self.device.memory_mb:g} less the model's resident_bytes "
                            f"{self.model.resident_bytes / 1e6:g} MB ({cap_mb:g} MB left)")
        for li, layer in enumerate(self.model.layers):
            if self.min_shards_per_layer > len(layer.shards):
                raise SpecError(file, "min_shards_per_layer",
                                f"{self.min_shards_per_layer} exceeds the {len(layer.shards)} "
                                f"shards of layer {li} of model {self.model.name!r}")
        if self.device.dequant_ns_per_weight:
            # A per-weight dequantisation term must cover every quantised bitwidth and know
            # every shard's weights: else a plan would decode for free, silently.
            missing = [b for b in self.model.bitwidths
                       if b < FULL_PRECISION_BITS and self.device.dequant_ns(b) is None]
            if missing:
                raise SpecError(file, "device.compute.dequant_ns_per_weight",
                                f"device {self.device.name!r} has no dequantisation cost for "
                                f"{', '.join(map(str, missing))} bits, which model "
                                f"{self.model.name!r} stores (calibrate the device on a store "
                                f"with these bitwidths, or give them)")
            for li, layer in enumerate(self.model.layers):
                for si, s in enumerate(layer.shards):
                    if s.weights is None:
                        raise SpecError(file, f"model.layers[{li}].shards[{si}].weights",
                                        f"model {self.model.name!r} does not give its shards' "
                                        f"weights, which device {self.device.name!r}'s "
                                        f"dequant_ns_per_weight needs (regenerate the profile)")
        if self.objective in FLOOR_OBJECTIVES and self.importance_floor is None:
            raise SpecError(file, "importance_floor",
                            f"objective {self.objective.value} needs an importance_floor")
        if self.objective == Objective.MAX_IMPORTANCE and self.importance_floor is not None:
            raise SpecError(file, "importance_floor", "only used with objectives min_buffer and "
                            "min_memory (remove it, or set objective)")

    @property
    def preload_budget_bytes(self) -> int:
        return bytes_of_mb(self.preload_budget_mb)

    @property
    def memory_budget_bytes(self) -> int | None:
        return None if self.memory_budget_mb is None else bytes_of_mb(self.memory_budget_mb)

    @property
    def memory_bounded(self) -> bool:
        """Does the question constrain or minimise the peak memory (so the program carries
        memory rows and may stream the embedding table)?"""
        return self.memory_budget_mb is not None or self.objective == Objective.MIN_MEMORY

    @property
    def memory_cap_bytes(self) -> int:
        """Most bytes the preload buffer may ever hold: the device memory less resident weights."""
        return max(0, bytes_of_mb(self.device.memory_mb) - self.model.resident_bytes)

    def with_overrides(self, **changes) -> "Scenario":
        """Same inputs, another question (target, budget, objective, floor). Validated again."""
        return dataclasses.replace(self, **changes)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
