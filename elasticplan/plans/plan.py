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
from dataclasses import dataclass, fields

from elasticplan.costmodel import (
    EXECUTIONS,
    PIPELINED,
    UNBOUNDED,
    Layout,
    Memory,
    Pick,
    Selection,
    at_quantile,
    simulate,
)
from elasticplan.decoding import DecodeTimes, predict
from elasticplan.errors import PlanFormatError
from elasticplan.problem.inputs import Fields, load_json, show
from elasticplan.problem.limits import (
    MAX_LAYERS,
    MAX_PIECES,
    MAX_SHARDS_PER_LAYER,
)
from elasticplan.problem.outputs import write_text
from elasticplan.problem.question import Objective, Question
from elasticplan.problem.spec import Scenario

SCHEMA = "elasticplan.plan/1"
# The question's keys every plan records (the others came later, and read as their defaults).
PLAN_REQUIRES = ("target_latency_ms", "preload_budget_mb", "min_shards_per_layer", "objective")


class SolveStatus(str, enum.Enum):
    OPTIMAL = "optimal"  # proven optimal within the solver's stated relative gap tolerance
    FEASIBLE = "feasible"  # a valid plan; `gap` bounds how far from optimal (null: unknown)


@dataclass(frozen=True)
class ShardChoice:
    name: str
    bits: int
    preloaded: bool
    # streamed in this many pieces (a decoder's table: Shard.pieces); written when > 1
    pieces: int = 1


@dataclass(frozen=True)
class LayerPlan:
    index: int
    shards: tuple[ShardChoice, ...]
    io_start_ms: float
    io_end_ms: float
    compute_start_ms: float
    compute_end_ms: float


def _layer_dict(lp: LayerPlan) -> dict:
    """A layer's JSON form: its shards' `pieces` written only when above 1."""
    return {"index": lp.index,
            "shards": [{"name": c.name, "bits": c.bits, "preloaded": c.preloaded}
                       | ({"pieces": c.pieces} if c.pieces != 1 else {}) for c in lp.shards],
            "io_start_ms": lp.io_start_ms, "io_end_ms": lp.io_end_ms,
            "compute_start_ms": lp.compute_start_ms, "compute_end_ms": lp.compute_end_ms}


@dataclass(frozen=True)
class ScenarioRef:
    """Which question the plan answers: the scenario it was asked of (enough to reload and
    re-check it) and the question itself. Its JSON form is one mapping, the scenario's
    keys and then the question's (Question.to_dict); plans recorded before memory or
    quantiles were planned lack the later keys, which read as their defaults."""

    path: str | None
    sha256: str
    name: str
    model: str
    device: str
    question: Question

    def to_dict(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "name": self.name,
                "model": self.model, "device": self.device, **self.question.to_dict()}


EMBEDDINGS = ("resident", "streamed")  # where the token-embedding table lives


def objective_value(objective: Objective, schedule) -> float:
    """A plan's objective, in its own unit, from the cost model's schedule."""
    return {Objective.MAX_IMPORTANCE: schedule.importance,
            Objective.MIN_BUFFER: float(schedule.preload_bytes),
            Objective.MIN_MEMORY: float(schedule.memory.peak_bytes),
            Objective.MIN_LATENCY: schedule.latency_ms}[objective]


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
    # How it runs and what it holds (docs/formats.md). Plans recorded before memory was
    # planned have neither: their window is unbounded, the table resident, memory None.
    window: int | None = None
    embeddings: str = "resident"
    memory: Memory | None = None
    # The latency at the scenario's latency_quantile (what meets the target), when above 0.5.
    quantile_latency_ms: float | None = None
    # A decoder's plan (elasticplan.decoding): time to first token, the last and the mean
    # time per output token (predicted_latency_ms is the last), the KV cache.
    decoding: DecodeTimes | None = None
    schema: str = SCHEMA

    @property
    def layout(self) -> Layout:
        return Layout(self.window, self.embeddings == "streamed")

    @property
    def planned_latency_ms(self) -> float:
        """The latency that must meet the target: at the scenario's latency quantile when
        it is above 0.5, else the predicted (median) latency."""
        return self.predicted_latency_ms if self.quantile_latency_ms is None \
            else self.quantile_latency_ms

    # --- building ------------------------------------------------------------------

    @staticmethod
    def from_selection(scenario: Scenario, selection: Selection, *, solver: str,
                       status: SolveStatus, gap: float | None, solve_seconds: float,
                       execution: str = PIPELINED, layout: Layout = UNBOUNDED) -> "Plan":
        """Lower a solver's shard choices into a plan; times and memory come from the cost
        model."""
        schedule = simulate(scenario, selection, execution, layout)
        model = scenario.model
        layers = tuple(
            LayerPlan(index=li,
                      shards=tuple(ShardChoice(model.layers[li].shards[p.shard].name,
                                               model.bitwidths[p.bit], p.preloaded,
                                               1 if p.preloaded else
                                               model.layers[li].shards[p.shard].pieces)
                                   for p in picks),
                      io_start_ms=t.io_start_ms, io_end_ms=t.io_end_ms,
                      compute_start_ms=t.compute_start_ms, compute_end_ms=t.compute_end_ms)
            for li, (picks, t) in enumerate(zip(selection, schedule.layers)))
        objective = objective_value(scenario.objective, schedule)
        ref = ScenarioRef(path=scenario.source, sha256=scenario.content_hash,
                          name=scenario.name, model=model.name, device=scenario.device.name,
                          question=scenario.question)
        quantile = at_quantile(scenario)
        return Plan(scenario=ref, solver=solver, status=status, gap=gap,
                    solve_seconds=solve_seconds, objective=objective,
                    importance=schedule.importance, predicted_latency_ms=schedule.latency_ms,
                    preload_bytes=schedule.preload_bytes, streamed_bytes=schedule.streamed_bytes,
                    layers=layers, execution=execution, window=layout.window,
                    embeddings=EMBEDDINGS[layout.stream_embeddings], memory=schedule.memory,
                    quantile_latency_ms=None if quantile is scenario else
                    simulate(quantile, selection, execution, layout).latency_ms,
                    decoding=predict(scenario, selection, layout)
                    if scenario.question.decoding else None)

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

    def to_dict(self, plan_path: str | os.PathLike | None = None) -> dict:
        """The plan's JSON form (docs/formats.md), built field by field (dataclasses.asdict
        deep-copies every number: a fleet's parent spent most of its time there)."""
        data = {"schema": self.schema}
        for f in fields(self):
            if f.name != "schema":
                data[f.name] = getattr(self, f.name)
        data["scenario"] = self.scenario.to_dict()
        data["status"] = self.status.value
        data["layers"] = [_layer_dict(lp) for lp in self.layers]
        if self.memory is not None:
            data["memory"] = self.memory.to_dict()
        if self.decoding is None:
            del data["decoding"]
        else:
            data["decoding"] = self.decoding.to_dict()
        # The scenario path is stored relative to the plan file, so the pair can move together.
        if plan_path is not None and self.scenario.path is not None:
            data["scenario"]["path"] = os.path.relpath(
                os.path.abspath(self.scenario.path), os.path.dirname(os.path.abspath(plan_path)))
        return data

    def to_json(self, plan_path: str | os.PathLike | None = None) -> str:
        return json.dumps(self.to_dict(plan_path), indent=1, allow_nan=False)  # strict

    def save(self, path: str | os.PathLike, *, inputs=(), follow_links: bool = True) -> None:
        """Write the plan atomically; refuses to write onto any of `inputs`."""
        write_text(path, self.to_json(path) + "\n", inputs=inputs, follow_links=follow_links)

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
    def from_dict(data, file: str = "<plan>", path: str = "") -> "Plan":
        """Read a plan strictly: every field of its type and range, no unknown keys; errors
        name the file and the key path (PlanFormatError)."""
        f = Fields(data, file, path, "a plan", PlanFormatError)
        schema = f.string("schema")
        if schema != SCHEMA:
            raise f.err("schema", f"expected {SCHEMA!r}, got {show(schema)}")
        q = f.mapping("scenario", "the question the plan answers")
        ref = ScenarioRef(path=q.string("path", required=False), sha256=q.string("sha256"),
                          name=q.string("name"), model=q.string("model"),
                          device=q.string("device"),
                          question=Question.read(q, objectives=tuple(Objective),
                                                 required=PLAN_REQUIRES))
        q.done()
        solver = f.string("solver")
        status = SolveStatus(_choice(f, "status", [s.value for s in SolveStatus]))
        gap = f.number("gap", minimum=0, required=False)
        solve_seconds = f.number("solve_seconds", minimum=0)
        objective = f.number("objective", minimum=0)
        importance = f.number("importance", minimum=0)
        latency = f.number("predicted_latency_ms", minimum=0)
        preload = f.integer("preload_bytes", minimum=0)
        streamed = f.integer("streamed_bytes", minimum=0)
        execution = _choice(f, "execution", list(EXECUTIONS), default=PIPELINED)
        window = f.integer("window", minimum=0, maximum=MAX_LAYERS, required=False)
        embeddings = _choice(f, "embeddings", list(EMBEDDINGS), default="resident")
        terms = f.mapping("memory", "the predicted memory by term", required=False)
        memory = None if terms is None else _memory(terms)
        quantile_latency = f.number("quantile_latency_ms", minimum=0, required=False)
        times = f.mapping("decoding", "a decoder plan's predicted times", required=False)
        decoding = None if times is None else _decoding(times)
        if decoding is not None and memory is None:  # every decoder plan was made with one
            raise f.err("memory", "missing: a decoder's plan records its predicted memory "
                                  "by term")
        raw_layers = f.sequence("layers")
        if len(raw_layers) > MAX_LAYERS:
            raise f.err("layers", f"{len(raw_layers)} layers; at most {MAX_LAYERS}")
        layers = tuple(_layer(raw, file, f"{f.key('layers')}[{li}]")
                       for li, raw in enumerate(raw_layers))
        f.done()
        return Plan(scenario=ref, solver=solver, status=status, gap=gap,
                    solve_seconds=solve_seconds, objective=objective, importance=importance,
                    predicted_latency_ms=latency, preload_bytes=preload, streamed_bytes=streamed,
                    layers=layers, execution=execution, window=window, embeddings=embeddings,
                    memory=memory, quantile_latency_ms=quantile_latency, decoding=decoding)


def _decoding(m: Fields) -> DecodeTimes:
    times = DecodeTimes(**{k: m.number(k, minimum=0) for k in
                           ("ttft_ms", "last_token_ms", "mean_token_ms")},
                        kv_cache_bytes=m.integer("kv_cache_bytes", minimum=0))
    m.done()
    return times


def _memory(m: Fields) -> Memory:
    terms = {k: m.integer(k, minimum=0) for k in
             ("resident_bytes", "preload_bytes", "working_peak_bytes", "activation_bytes")}
    memory = Memory(**terms, kept_bytes=m.integer("kept_bytes", minimum=0, required=False) or 0)
    peak = m.integer("peak_bytes", minimum=0)
    if peak != memory.peak_bytes:
        raise m.err("peak_bytes", f"{peak} is not the sum of the terms ({memory.peak_bytes})")
    m.done()
    return memory


def _choice(f: Fields, key: str, allowed: list[str], default: str | None = None) -> str:
    v = f.string(key, required=default is None)
    if v is None:
        return default
    if v not in allowed:
        raise f.err(key, f"expected one of {', '.join(allowed)}, got {show(v)}")
    return v


def _layer(raw, file: str, path: str) -> LayerPlan:
    lf = Fields(raw, file, path, "a layer of the plan", PlanFormatError)
    index = lf.integer("index", minimum=0, maximum=MAX_LAYERS)
    raw_shards = lf.sequence("shards", allow_empty=True)
    if len(raw_shards) > MAX_SHARDS_PER_LAYER:
        raise lf.err("shards", f"{len(raw_shards)} shards; at most {MAX_SHARDS_PER_LAYER}")
    shards = []
    for si, c in enumerate(raw_shards):
        cf = Fields(c, file, f"{lf.key('shards')}[{si}]", "a shard choice", PlanFormatError)
        shards.append(ShardChoice(cf.string("name"), cf.integer("bits", minimum=1, maximum=32),
                                  cf.boolean("preloaded"),
                                  cf.integer("pieces", minimum=1, maximum=MAX_PIECES,
                                             required=False) or 1))
        cf.done()
    times = {k: lf.number(k, minimum=0) for k in
             ("io_start_ms", "io_end_ms", "compute_start_ms", "compute_end_ms")}
    lf.done()
    return LayerPlan(index=index, shards=tuple(shards), **times)


def gap_to_bound(value: float, bound: float) -> float | None:
    """|bound - value| / |value|: how far a plan may be from the optimum, given a proven bound
    (0 when both are 0); None (unknown) when the solver proved no finite bound (HiGHS stopped
    before its first dual bound reports it as infinite)."""
    if not (math.isfinite(value) and math.isfinite(bound)):
        return None
    gap = abs(bound - value) / max(abs(value), 1e-9) if value or bound else 0.0
    return gap if math.isfinite(gap) else None


def read_json(path: str | os.PathLike, what: str):
    """A JSON document (a plan or plan table) within the input limits, or a PlanFormatError
    naming the file."""
    return load_json(path, what=what, error=PlanFormatError)


def _replace_scenario_path(plan: Plan, path: str) -> Plan:
    from dataclasses import replace

    return replace(plan, scenario=replace(plan.scenario, path=path))
