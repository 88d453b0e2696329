"""The problem as frozen, typed data.

Built only by elasticplan.loader (from YAML) or by tests/generators that go
through the same validating constructors. Units are in the field names:
MB = 10**6 bytes, GB/s = 10**9 bytes per second, GFLOP/s = 10**9 flop/s.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

FULL_PRECISION_BITS = 32


class Objective(str, enum.Enum):
    MAX_IMPORTANCE = "max_importance"  # given the buffer budget, maximise importance
    MIN_BUFFER = "min_buffer"  # given an importance floor, minimise preloaded bytes
    MIN_LATENCY = "min_latency"  # internal: fastest schedule, used to explain infeasibility


@dataclass(frozen=True)
class Device:
    name: str
    bandwidth_mb_s: float  # sequential read bandwidth of the storage
    latency_us: float  # fixed cost of each read request
    gflops: float  # effective throughput for shard math
    layer_overhead_ms: float  # fixed compute per executed layer (norms, residuals, biases)
    dequant_gb_s: float  # dequantisation throughput, on stored bytes of quantised shards
    memory_mb: float  # memory the app may use (resident weights + preload buffer)


@dataclass(frozen=True)
class Shard:
    name: str
    kind: str  # e.g. "head" or "ffn"; informational, used by the greedy baseline's ordering
    flops: float  # flop to run this shard at the profile's seq_len
    bytes: tuple[int, ...]  # stored size per bitwidth, aligned with ModelProfile.bitwidths
    importance: tuple[float, ...]  # importance per bitwidth; a dropped shard contributes 0


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
    resident_bytes: int = 0  # embeddings and other always-resident weights
    synthetic: bool = False  # importance values are synthetic, not measured

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


@dataclass(frozen=True)
class Scenario:
    """A device + a model + the planning question. `content_hash` covers the
    device, model and scenario contents as loaded (not the file bytes), so a
    plan can detect that its inputs changed."""

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

    @property
    def preload_budget_bytes(self) -> int:
        return int(self.preload_budget_mb * 1e6 + 1e-6)

    @property
    def memory_cap_bytes(self) -> int:
        """Most bytes the preload buffer may ever hold: the device memory less resident weights."""
        return max(0, int(self.device.memory_mb * 1e6 + 1e-6) - self.model.resident_bytes)

    def with_overrides(self, **changes) -> "Scenario":
        """Same inputs, another question (target, budget, objective, floor). Validated again."""
        from elasticplan.loader import validate_scenario_fields

        updated = dataclasses.replace(self, **changes)
        validate_scenario_fields(updated)
        return updated
