"""The plan: plain, versioned, JSON-serialisable data; the contract with every consumer.

A plan carries the question it answers (scenario path + content hash + the effective
target, budget and objective), the solver, its status and gap, and per layer the
shards that run with their bitwidth and preload flag and the predicted schedule.
"""

from __future__ import annotations

import enum
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from elasticplan.costmodel import EXECUTIONS, PIPELINED, Pick, Selection, simulate
from elasticplan.errors import PlanFormatError
from elasticplan.spec import Objective, Scenario

SCHEMA = "elasticplan.plan/1"


class SolveStatus(str, enum.Enum):
    OPTIMAL = "optimal"  # proven optimal within the solver's stated relative gap tolerance
    FEASIBLE = "feasible"  # a valid plan; `gap` bounds how far from optimal (null: unknown)


@dataclass(frozen=True)
class ShardChoice:
    name: str
    bits: int
    preloaded: bool


@dataclass(frozen=True)
class LayerPlan:
    index: int
    shards: tuple[ShardChoice, ...]
    io_start_ms: float
    io_end_ms: float
    compute_start_ms: float
    compute_end_ms: float


@dataclass(frozen=True)
class ScenarioRef:
    """Which question the plan answers: enough to reload and re-check it."""

    path: str | None
    sha256: str
    name: str
    model: str
    device: str
    target_latency_ms: float
    preload_budget_mb: float
    min_shards_per_layer: int
    objective: str
    importance_floor: float | None


@dataclass(frozen=True)
class Plan:
    scenario: ScenarioRef
    solver: str
    status: SolveStatus
    gap: float | None
    solve_seconds: float
    objective: float
    importance: float
    predicted_latency_ms: float
    preload_bytes: int
    streamed_bytes: int
    layers: tuple[LayerPlan, ...]
    # "pipelined" (every solved plan) or "sequential": all reads, then all compute (the
    # load-then-execute baseline). Absent in older plan files, which are all pipelined.
    execution: str = PIPELINED
    schema: str = SCHEMA

    # --- building ------------------------------------------------------------------

    @staticmethod
    def from_selection(scenario: Scenario, selection: Selection, *, solver: str,
                       status: SolveStatus, gap: float | None, solve_seconds: float,
                       execution: str = PIPELINED) -> "Plan":
        """Lower a solver's shard choices into a plan; times come from the cost model."""
        schedule = simulate(scenario, selection, execution)
        model = scenario.model
        layers = tuple(
            LayerPlan(index=li,
                      shards=tuple(ShardChoice(model.layers[li].shards[p.shard].name,
                                               model.bitwidths[p.bit], p.preloaded)
                                   for p in picks),
                      io_start_ms=t.io_start_ms, io_end_ms=t.io_end_ms,
                      compute_start_ms=t.compute_start_ms, compute_end_ms=t.compute_end_ms)
            for li, (picks, t) in enumerate(zip(selection, schedule.layers)))
        objective = {Objective.MAX_IMPORTANCE: schedule.importance,
                     Objective.MIN_BUFFER: float(schedule.preload_bytes),
                     Objective.MIN_LATENCY: schedule.latency_ms}[scenario.objective]
        ref = ScenarioRef(
            path=scenario.source, sha256=scenario.content_hash, name=scenario.name,
            model=model.name, device=scenario.device.name,
            target_latency_ms=scenario.target_latency_ms,
            preload_budget_mb=scenario.preload_budget_mb,
            min_shards_per_layer=scenario.min_shards_per_layer,
            objective=scenario.objective.value, importance_floor=scenario.importance_floor)
        return Plan(scenario=ref, solver=solver, status=status, gap=gap,
                    solve_seconds=solve_seconds, objective=objective,
                    importance=schedule.importance, predicted_latency_ms=schedule.latency_ms,
                    preload_bytes=schedule.preload_bytes, streamed_bytes=schedule.streamed_bytes,
                    layers=layers, execution=execution)

    def selection(self, scenario: Scenario) -> Selection:
        """Map names back to indices. Unknown names raise KeyError; the verifier reports them."""
        model = scenario.model
        out = []
        for lp, layer in zip(self.layers, model.layers):
            picks = []
            for c in lp.shards:
                si, bi = layer.shard_index(c.name), model.bit_index(c.bits)
                if si is None or bi is None:
                    raise KeyError(f"layer {lp.index}: shard {c.name!r} at {c.bits} bits")
                picks.append(Pick(si, bi, c.preloaded))
            out.append(tuple(picks))
        return tuple(out)

    @property
    def n_shards(self) -> int:
        return sum(len(lp.shards) for lp in self.layers)

    # --- JSON ----------------------------------------------------------------------

    def to_json(self, plan_path: str | os.PathLike | None = None) -> str:
        data = asdict(self)
        data["status"] = self.status.value
        # The scenario path is stored relative to the plan file, so the pair can move together.
        if plan_path is not None and self.scenario.path is not None:
            data["scenario"]["path"] = os.path.relpath(
                os.path.abspath(self.scenario.path), os.path.dirname(os.path.abspath(plan_path)))
        ordered = {"schema": data.pop("schema"), **data}
        return json.dumps(ordered, indent=1)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_json(path) + "\n", encoding="utf-8")

    @staticmethod
    def load(path: str | os.PathLike) -> "Plan":
        return Plan.from_dict(read_json(path, "plan"), str(path)).relative_to(path)

    def relative_to(self, file: str | os.PathLike) -> "Plan":
        """The plan with its scenario path, stored relative to `file`, made usable from here."""
        if self.scenario.path is None or os.path.isabs(self.scenario.path):
            return self
        return _replace_scenario_path(
            self, os.path.normpath(os.path.join(os.path.dirname(str(file)), self.scenario.path)))

    @staticmethod
    def from_dict(data, file: str = "<plan>") -> "Plan":
        if not isinstance(data, dict):
            raise PlanFormatError(f"{file}: expected a JSON object")
        if data.get("schema") != SCHEMA:
            raise PlanFormatError(f"{file}: schema: expected {SCHEMA!r}, got {data.get('schema')!r}")
        try:
            ref = ScenarioRef(**data["scenario"])
            layers = tuple(
                LayerPlan(index=int(lp["index"]),
                          shards=tuple(ShardChoice(str(c["name"]), int(c["bits"]),
                                                   bool(c["preloaded"])) for c in lp["shards"]),
                          io_start_ms=float(lp["io_start_ms"]), io_end_ms=float(lp["io_end_ms"]),
                          compute_start_ms=float(lp["compute_start_ms"]),
                          compute_end_ms=float(lp["compute_end_ms"]))
                for lp in data["layers"])
            plan = Plan(scenario=ref, solver=str(data["solver"]),
                        status=SolveStatus(data["status"]),
                        gap=None if data["gap"] is None else float(data["gap"]),
                        solve_seconds=float(data["solve_seconds"]),
                        objective=float(data["objective"]), importance=float(data["importance"]),
                        predicted_latency_ms=float(data["predicted_latency_ms"]),
                        preload_bytes=int(data["preload_bytes"]),
                        streamed_bytes=int(data["streamed_bytes"]), layers=layers,
                        execution=str(data.get("execution", PIPELINED)))
        except KeyError as e:
            raise PlanFormatError(f"{file}: missing key {e}") from None
        except (TypeError, ValueError) as e:
            raise PlanFormatError(f"{file}: malformed plan: {e}") from None
        if plan.execution not in EXECUTIONS:
            raise PlanFormatError(f"{file}: execution: expected one of {list(EXECUTIONS)}, got "
                                  f"{plan.execution!r}")
        for x in (plan.objective, plan.predicted_latency_ms):
            if not math.isfinite(x):
                raise PlanFormatError(f"{file}: non-finite number in plan")
        return plan


def gap_to_bound(value: float, bound: float) -> float:
    """|bound - value| / |value|: how far a plan may be from the optimum, given a proven bound
    (0 when both are 0)."""
    return abs(bound - value) / max(abs(value), 1e-9) if value or bound else 0.0


def read_json(path: str | os.PathLike, what: str):
    """A JSON document, or a PlanFormatError naming the file (plans and plan tables)."""
    file = str(path)
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlanFormatError(f"{file}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlanFormatError(f"{file}: not a readable JSON {what}: {e}") from None


def _replace_scenario_path(plan: Plan, path: str) -> Plan:
    from dataclasses import replace

    return replace(plan, scenario=replace(plan.scenario, path=path))
