"""Integer scaling for CP-SAT, in one place, with its rounding bounded.

CP-SAT needs integer coefficients. Times become ticks of `tick_ns` nanoseconds
(default 10 ns); importance is multiplied by `IMPORTANCE_UNITS / max importance`.
Bytes and counts are already integers.

Rounding is *conservative* in every constraint: for a row `sum a*x <= b` over
booleans x the scaled row uses ceil(a*s) and floor(b*s) (for `>=`, floor and
ceil), so every integer solution of the scaled program satisfies the exact
program: a CP-SAT plan never breaks the latency target, the buffer or the
importance floor because of rounding. The price is bounded: per row, the scaled
left side exceeds the exact one by less than one unit per boolean that is 1,
plus one for the right side. On the latency chain that is at most
(streamed shards + 2 x running shards + 2 x layers) ticks, i.e. under 20 us
for BERT-large at 10 ns. Time variables are integers in ticks with coefficient
+-1, so they need no rounding.

The objective is rounded to the nearest integer (it decides nothing about
feasibility); with IMPORTANCE_UNITS = 1e9 the objective of a plan with n
running shards is off by at most n * 0.5e-9 of the largest shard importance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from elasticplan.solvers.margins import importance_top
from elasticplan.solvers.plain.program import Program, Row, Unit

IMPORTANCE_UNITS = 1e9
DEFAULT_TICK_NS = 10.0


@dataclass(frozen=True)
class IntRow:
    label: str
    terms: tuple[tuple[str, int], ...]
    sense: str
    rhs: int


@dataclass(frozen=True)
class IntProgram:
    program: Program
    tick_ms: float
    importance_scale: float
    rows: tuple[IntRow, ...]
    objective: tuple[tuple[str, int], ...]
    time_horizon: int  # upper bound for every time variable, in ticks
    objective_offset: int = 0  # the objective's constant part, in its units


def scale_row(row: Row, scale: float, exact_vars: frozenset[str]) -> IntRow:
    """Conservative rounding of one row; `exact_vars` (time variables, already in
    ticks) keep their coefficient, which must be integral."""
    up = row.sense == "<="  # for <= round coefficients up and the bound down; >= the reverse
    terms = []
    for var, coef in row.terms:
        if var in exact_vars:
            if coef != int(coef):
                raise ValueError(f"{row.label}: time variable {var} has non-integral coef {coef}")
            terms.append((var, int(coef)))
        else:
            terms.append((var, math.ceil(coef * scale) if up else math.floor(coef * scale)))
    rhs = math.floor(row.rhs * scale) if up else math.ceil(row.rhs * scale)
    return IntRow(row.label, tuple(terms), row.sense, rhs)


def to_integers(program: Program, tick_ns: float = DEFAULT_TICK_NS) -> IntProgram:
    tick_ms = tick_ns * 1e-6
    model = program.scenario.model
    importance_scale = IMPORTANCE_UNITS / importance_top(model) if model.max_importance > 0 \
        else 1.0
    scales = {Unit.COUNT: 1.0, Unit.BYTES: 1.0, Unit.TIME_MS: 1.0 / tick_ms,
              Unit.IMPORTANCE: importance_scale}
    exact = frozenset(program.times) | frozenset(program.byte_vars)
    rows = tuple(scale_row(r, scales[r.unit], exact) for r in program.rows)
    obj_scale = scales[program.objective_unit]
    objective = tuple((v, int(c) if v in exact else round(c * obj_scale))
                      for v, c in program.objective)
    n_bools = len(program.bools)
    horizon = math.ceil(program.time_horizon_ms / tick_ms) + n_bools + 2 * len(program.times) + 1
    return IntProgram(program, tick_ms, importance_scale, rows, objective, horizon,
                      round(program.objective_offset * obj_scale))


def earliest_times(ip: IntProgram, bools: dict[str, int]) -> dict[str, int]:
    """Smallest integer times (ticks) that satisfy the scaled time rows for fixed booleans.

    The rows are built in layer order, so one pass propagates F and C forward; the
    result is the scaled program's own schedule (the tests measure its rounding error
    against the exact cost model with it)."""
    exact = frozenset(ip.program.times)
    times = {t: 0 for t in ip.program.times}
    for r in ip.rows:
        if r.sense != ">=":
            continue
        own = [(v, c) for v, c in r.terms if v in exact and c > 0]
        if len(own) != 1 or own[0][1] != 1:
            continue
        target = own[0][0]
        rest = sum(c * (times[v] if v in exact else bools[v]) for v, c in r.terms if v != target)
        times[target] = max(times[target], r.rhs - rest)
    return times


def satisfies(ip: IntProgram, values: dict[str, int]) -> list[str]:
    """Labels of the scaled rows that `values` violates (empty: feasible)."""
    bad = []
    for r in ip.rows:
        lhs = sum(c * values[v] for v, c in r.terms)
        if (r.sense == "<=" and lhs > r.rhs) or (r.sense == ">=" and lhs < r.rhs):
            bad.append(r.label)
    return bad
