"""The integer program, written once and solver-neutral (docs/programs.md, "The plain program").

Variables (booleans, per layer l, shard s, bitwidth b):
  q[l,s,b] = 1  the shard runs at bitwidth b and is streamed from storage
  p[l,s,b] = 1  the shard runs at bitwidth b and is held in the preload buffer
  (the textbook form's x = q + p and p <= x; splitting x this way keeps every cost
   coefficient non-negative, which makes conservative integer rounding exact to state)
  y[l]     = 1  layer l runs (only when min_shards_per_layer = 0; otherwise y = 1)
  e        = 1  the embedding table is streamed, one query's rows at a time (only when
                memory is bounded and the model has a table; otherwise it is resident)
With an unbounded prefetch window there are no time variables: the pipeline's recurrence
(F = end of reads, C = end of compute) unrolls exactly into one knapsack row per layer
(see the latency rows below). A window W couples a layer's reads to the compute of layer
l-W-1, and the unrolled form would need a row per path; so then F[l] and C[l] are
continuous variables with one row per edge of the recurrence (window rows below), which
is exact because every coefficient of the max-plus system is non-negative. The internal
min_latency objective has one continuous variable, Z >= the latency. When memory is
bounded, M (bytes) >= the streamed bytes of every W+1 consecutive layers (window_bytes
rows) and the memory row bounds the predicted peak (elasticplan.costmodel.memory_of).

Each backend lowers `Program.rows` as they are; CP-SAT first goes through
elasticplan.solvers.plain.scaling. The cost coefficients are the cost model's (elasticplan.costmodel).
"""

from __future__ import annotations

import enum
from collections import defaultdict
from dataclasses import dataclass

from elasticplan.costmodel import (
    PIPELINED,
    Layout,
    Pick,
    Selection,
    charged_compute_ms,
    charged_read_ms,
    embedding_read_ms,
    memory_constants,
    reads_beside,
    shard_read_ms,
)
from elasticplan.errors import InvalidArgument
from elasticplan.problem.question import Objective, window_binds, window_span
from elasticplan.problem.spec import Scenario, with_table_rows


class Unit(str, enum.Enum):
    COUNT = "count"
    BYTES = "bytes"
    TIME_MS = "ms"
    IMPORTANCE = "importance"


@dataclass(frozen=True)
class Row:
    """sum(coef * var) <sense> rhs, in one unit. sense is "<=" or ">="."""

    label: str
    unit: Unit
    terms: tuple[tuple[str, float], ...]
    sense: str
    rhs: float


@dataclass(frozen=True)
class Program:
    scenario: Scenario
    bools: tuple[str, ...]
    times: tuple[str, ...]  # continuous, >= 0, in ms
    time_horizon_ms: float  # no time variable needs to exceed this
    rows: tuple[Row, ...]
    objective: tuple[tuple[str, float], ...]
    maximize: bool
    objective_unit: Unit
    q: dict  # (l, s, b) -> variable name
    p: dict  # (l, s, b) -> variable name
    byte_vars: tuple[str, ...] = ()  # continuous, >= 0, in bytes (M)
    byte_horizon: int = 0  # no byte variable needs to exceed this
    embed_var: str | None = None  # e, when the program chooses where the table lives
    objective_offset: float = 0.0  # the objective's constant part (min_memory: fixed terms)

    def layout(self, value) -> Layout:
        """The layout of a solution: the scenario's window, the table where e says."""
        stream = self.embed_var is not None and value(self.embed_var) > 0.5
        return Layout(self.scenario.prefetch_window, stream)

    def selection(self, value) -> Selection:
        """Read a solution back: `value(name)` gives a variable's value (rounded here)."""
        layers = defaultdict(list)
        for key, name in self.q.items():
            if value(name) > 0.5:
                layers[key[0]].append(Pick(key[1], key[2], False))
        for key, name in self.p.items():
            if value(name) > 0.5:
                layers[key[0]].append(Pick(key[1], key[2], True))
        n = len(self.scenario.model.layers)
        # Read order inside a layer: by shard index (the runtime streams in plan order).
        return tuple(tuple(sorted(layers[li], key=lambda pk: pk.shard)) for li in range(n))

    def assignment(self, selection: Selection, layout: Layout = Layout()) -> dict[str, int]:
        """The booleans of a selection (the tests check rows with it); unset ones are 0."""
        values = {name: 0 for name in self.bools}
        if self.embed_var is not None:
            values[self.embed_var] = int(layout.stream_embeddings)
        for li, picks in enumerate(selection):
            if picks and f"y[{li}]" in values:
                values[f"y[{li}]"] = 1
            for pk in picks:
                table = self.p if pk.preloaded else self.q
                values[table[li, pk.shard, pk.bit]] = 1
        return values


# The plain program's latency rows are dense (layers^2 x shards terms): above this many
# booleans, building it takes longer than solving the aggregated program (measured on
# Llama-2-70B: CP-SAT 26 s and CBC 89 s to give up at a 5 s limit, HiGHS 2 s).
PLAIN_MAX_BOOLS = 20_000


def n_bools(scenario: Scenario) -> int:
    """Booleans of the plain program: q and p per shard and bitwidth."""
    model = scenario.model
    return 2 * model.n_shards * len(model.bitwidths)


def build(scenario: Scenario) -> Program:
    """Data, variables, constraints, objective, in that order. Refuses models whose plain
    program exceeds PLAIN_MAX_BOOLS (InvalidArgument: the aggregated program is the way)."""
    if n_bools(scenario) > PLAIN_MAX_BOOLS:
        raise InvalidArgument(
            f"model {scenario.model.name!r} needs {n_bools(scenario):,} booleans in the plain "
            f"per-shard program (cpsat, cbc), more than the {PLAIN_MAX_BOOLS:,} they are sized "
            f"for; use --solver highs, which solves the aggregated program")
    b = _Rows(scenario)
    b.variables()
    for li in range(b.L):
        b.layer_rows(li)
    for k in range(len(b.passes)):
        if b.chained:
            b.window_rows(k)
        else:
            b.unrolled_rows(k)
    b.budget_rows()
    return b.program()


class _Rows:
    """The program as it is built, section by section (`build` calls them in turn); rows
    are appended in order, each with the terms of one variable merged."""

    def __init__(self, scenario: Scenario):
        self.scenario = scenario
        self.device, self.model = scenario.device, scenario.model
        self.L, self.B = len(self.model.layers), len(self.model.bitwidths)
        self.skippable = scenario.min_shards_per_layer == 0
        self.window = scenario.prefetch_window
        self.chained = window_binds(self.window, self.L)  # time variables
        self.beside = reads_beside(PIPELINED, self.window)  # reads overlap compute
        self.embed = "e" if scenario.memory_bounded and self.model.embedding_rows else None
        self.t_emb = embedding_read_ms(self.device, self.model)
        self.embed_read = [(self.embed, self.t_emb)] if self.embed else []
        self.limit = scenario.target_latency_ms - self.device.pool_ms  # every latency row's bound
        self.rows: list[Row] = []
        # The passes whose latency is bounded: the scenario's model, then its timed passes
        # (a decoder's prompt pass): (variable tag, model, bound of its latency rows).
        self.passes = [("", self.model, self.limit)] + [
            (str(k + 1), t.model, t.target_ms - self.device.pool_ms)
            for k, t in enumerate(scenario.timed_passes)]
        # per layer: its reads' terms and its compute's constant part; per pass, per layer,
        # its compute's terms
        self.io_terms, self.fixed_compute = [], []
        self.comp_terms: list[list] = [[] for _ in self.passes]

    def row(self, label, unit, terms, sense, rhs) -> None:
        merged = defaultdict(float)
        for var, coef in terms:
            merged[var] += coef
        self.rows.append(Row(label, unit, tuple((v, c) for v, c in merged.items() if c != 0),
                             sense, float(rhs)))

    # --- variables ---------------------------------------------------------------------

    def variables(self) -> None:
        sc, L, B = self.scenario, self.L, self.B
        self.q, self.p, self.bools = {}, {}, []
        for li, layer in enumerate(self.model.layers):
            for si in range(len(layer.shards)):
                for b in range(B):
                    self.q[li, si, b] = f"q[{li},{si},{b}]"
                    self.p[li, si, b] = f"p[{li},{si},{b}]"
                    self.bools += [self.q[li, si, b], self.p[li, si, b]]
            if self.skippable:
                self.bools.append(f"y[{li}]")
        if self.embed:
            self.bools.append(self.embed)
        self.times = ["Z"] if sc.objective == Objective.MIN_LATENCY else []
        if self.chained:
            for tag, _, _ in self.passes:
                self.times += [f"F{tag}[{li}]" for li in range(L)] + \
                    [f"C{tag}[{li}]" for li in range(L)]
        self.byte_vars = ("M",) if sc.memory_bounded else ()
        d = self.device
        self.horizon = max([self.t_emb if self.embed else 0.0] + [
            embedding_read_ms(d, m) for _, m, _ in self.passes[1:]]) + d.embed_ms + \
            d.pool_ms + L * d.wake_ms

    # --- constraints -------------------------------------------------------------------

    def layer_rows(self, li: int) -> None:
        """Layer li's count rows (pick, and in_layer and nonempty or min_shards), and the
        terms of its reads and compute, for the latency rows."""
        device, model, B, q, p, row = self.device, self.model, self.B, self.q, self.p, self.row
        layer = model.layers[li]
        run = [(q[li, si, b], p[li, si, b]) for si in range(len(layer.shards)) for b in range(B)]
        # pick[l,s]: each shard runs at most once, at one bitwidth:  sum_b q + p <= 1
        for si in range(len(layer.shards)):
            row(f"pick[{li},{si}]", Unit.COUNT,
                [(q[li, si, b], 1) for b in range(B)] + [(p[li, si, b], 1) for b in range(B)],
                "<=", 1)
        if self.skippable:
            y = f"y[{li}]"
            # shard runs only in a running layer (sum_b q+p <= y); a running layer has a shard
            for si in range(len(layer.shards)):
                row(f"in_layer[{li},{si}]", Unit.COUNT,
                    [(q[li, si, b], 1) for b in range(B)] + [(p[li, si, b], 1) for b in range(B)]
                    + [(y, -1)], "<=", 0)
            row(f"nonempty[{li}]", Unit.COUNT, [(v, 1) for pair in run for v in pair] + [(y, -1)],
                ">=", 0)
            overhead_terms, overhead_rhs = [(y, device.layer_overhead_ms)], 0.0
        else:
            # min_shards[l]: sum (q + p) >= min_shards_per_layer
            row(f"min_shards[{li}]", Unit.COUNT, [(v, 1) for pair in run for v in pair], ">=",
                self.scenario.min_shards_per_layer)
            overhead_terms, overhead_rhs = [], device.layer_overhead_ms

        # (a shard read in pieces, the table, is the last layer: its reads are charged less
        # their overlap with its compute, elasticplan.costmodel.charged_read_ms)
        self.io_terms.append([(q[li, si, b], charged_read_ms(device, model, s, b, self.beside))
                              for si, s in enumerate(layer.shards) for b in range(B)])
        self.fixed_compute.append(overhead_rhs)
        longest = 0.0
        for k, (_, pass_model, _) in enumerate(self.passes):
            shards = pass_model.layers[li].shards
            comp = {(si, b): charged_compute_ms(device, pass_model, s, b, True, self.beside)
                    for si, s in enumerate(shards) for b in range(B)}
            held = {(si, b): charged_compute_ms(device, pass_model, s, b)
                    for si, s in enumerate(shards) for b in range(B)}
            self.comp_terms[k].append([(q[li, si, b], c) for (si, b), c in comp.items()]
                                      + [(p[li, si, b], c) for (si, b), c in held.items()]
                                      + overhead_terms)
            read = lambda s, b: max(shard_read_ms(device, pass_model, s, b),  # noqa: E731
                                    charged_read_ms(device, pass_model, s, b, self.beside))
            longest = max(longest, sum(max(read(s, b) + comp[si, b] for b in range(B))
                                       for si, s in enumerate(shards)))
        self.horizon += device.layer_overhead_ms + longest

    def start_reads(self, k: int) -> list:
        """Pass k's reads before its first layer: the query's embedding rows when e (the
        scenario's model); a timed pass's rows when the table, the last layer, is streamed
        (elasticplan.problem.spec.TimedPass)."""
        if not k:
            return self.embed_read
        model = self.passes[k][1]
        if not model.embedding_rows:
            return []
        last = self.L - 1  # the table, one part: its rows read as its bitwidth stores them
        return [(self.q[last, 0, b], embedding_read_ms(self.device, with_table_rows(model, b)))
                for b in range(self.B)]

    def window_rows(self, k: int = 0) -> None:
        """A binding window, for pass k (its variables tagged, F1[l]; the internal
        min_latency's Z bounds pass 0, a timed pass keeps its target): one row per edge of
        the recurrence (F, C continuous, ms):
          io[l]:      F[l] - F[l-1] - io[l] >= 0   (e * t_emb for l = 0: the query's rows)
          gate[l]:    F[l] - C[l-W-1] - io[l] >= 0 (l > W: the window is full until then)
          ready[l]:   C[l] - F[l] - c[l] >= 0
          order[l]:   C[l] - C[l-1] - c[l] >= 0
          latency:    C[L-1] <= T   (min_latency: Z - C[L-1] >= 0)"""
        device, row, window, L = self.device, self.row, self.window, self.L
        tag, _, limit = self.passes[k]
        io_terms, comp_terms, fixed_compute = self.io_terms, self.comp_terms[k], self.fixed_compute
        start = self.start_reads(k)
        neg = lambda terms: [(v, -c) for v, c in terms]  # noqa: E731
        for li in range(L):
            F, C = f"F{tag}[{li}]", f"C{tag}[{li}]"
            prev = [(f"F{tag}[{li - 1}]", -1)] if li else neg(start)
            row(f"io{tag}[{li}]", Unit.TIME_MS, [(F, 1)] + prev + neg(io_terms[li]), ">=", 0)
            if li > window:
                row(f"gate{tag}[{li}]", Unit.TIME_MS,
                    [(F, 1), (f"C{tag}[{li - window - 1}]", -1)] + neg(io_terms[li]), ">=", 0)
            row(f"ready{tag}[{li}]", Unit.TIME_MS, [(C, 1), (F, -1)] + neg(comp_terms[li]),
                ">=", fixed_compute[li] + device.wake_ms)
            if li:
                row(f"order{tag}[{li}]", Unit.TIME_MS, [(C, 1), (f"C{tag}[{li - 1}]", -1)]
                    + neg(comp_terms[li]), ">=", fixed_compute[li])
            elif device.embed_ms:
                # order[0]: C[0] - e t_emb - c[0] >= embed_ms (the embedding computes first)
                row(f"order{tag}[0]", Unit.TIME_MS, [(C, 1)] + neg(start)
                    + neg(comp_terms[li]), ">=", fixed_compute[li] + device.embed_ms)
        last = f"C{tag}[{L - 1}]"
        if self.scenario.objective == Objective.MIN_LATENCY and not k:
            row("latency", Unit.TIME_MS, [("Z", 1), (last, -1)], ">=", device.pool_ms)
        else:
            row(f"latency{tag}", Unit.TIME_MS, [(last, 1)], "<=", limit)

    def unrolled_rows(self, k: int = 0) -> None:
        """An unbounded window, for pass k (rows tagged as in window_rows): the recurrence C[l] = max(F[l] + wake, C[l-1]) + c[l] unrolls to
          latency = max over l of ( F[l] + wake + sum_{k>=l} c[k] ),
          F[l] = e t_emb + sum_{k<=l} io[k],
        so "latency <= T" is exactly one row per layer over the booleans:
        latency[l]: e t_emb + sum_{k<=l} io[k] + sum_{k>=l} c[k] <= T - wake.
        With an embedding time, one more row: latency[embed]: e t_emb + embed_ms + sum c[k]
        <= T. (pool_ms is a constant of every row: T is the target less it.)"""
        device, row, L = self.device, self.row, self.L
        tag, _, limit = self.passes[k]
        io_terms, comp_terms, fixed_compute = self.io_terms, self.comp_terms[k], self.fixed_compute
        start = self.start_reads(k)
        for li in list(range(L)) + (["embed"] if device.embed_ms else []):
            if li == "embed":
                terms = start + [t for j in range(L) for t in comp_terms[j]]
                constant = sum(fixed_compute) + device.embed_ms
            else:
                terms = start + [t for j in range(li + 1) for t in io_terms[j]]
                terms += [t for j in range(li, L) for t in comp_terms[j]]
                constant = sum(fixed_compute[li:]) + device.wake_ms
            if self.scenario.objective == Objective.MIN_LATENCY and not k:
                # Z >= the same sum for every l; minimise Z.
                row(f"latency[{li}]", Unit.TIME_MS, [("Z", 1)] + [(v, -c) for v, c in terms],
                    ">=", constant + device.pool_ms)
            else:
                row(f"latency{tag}[{li}]", Unit.TIME_MS, terms, "<=", limit - constant)

    def budget_rows(self) -> None:
        """The buffer row; with memory bounded, the arena's windows and the memory row; the
        importance floor. Keeps the objective's terms."""
        sc, model, B, q, p, row = self.scenario, self.model, self.B, self.q, self.p, self.row
        self.preloads = [(p[key], model.layers[key[0]].shards[key[1]].bytes[key[2]])
                         for key in p]
        self.importance = [(var, model.layers[key[0]].shards[key[1]].importance[key[2]])
                           for table in (q, p) for key, var in table.items()]
        # buffer: sum bytes * p <= budget
        row("buffer", Unit.BYTES, self.preloads, "<=", sc.preload_budget_bytes)
        self.memory = []
        if self.byte_vars:
            # window_bytes[l]: M - sum_{k=l..l+W} bytes * q[k] >= 0  (the IO arena)
            streams = [[(q[li, si, b], s.ring_bytes(b)) for si, s in enumerate(layer.shards)
                        for b in range(B)] for li, layer in enumerate(model.layers)]
            span = window_span(self.window, self.L)
            for li in range(self.L - span + 1):
                row(f"window_bytes[{li}]", Unit.BYTES,
                    [("M", 1)] + [(v, -c) for k in range(li, li + span) for v, c in streams[k]],
                    ">=", 0)
            # memory: M + preload + kept + e (rows - table) <= budget - the fixed terms
            fixed, stream_delta = memory_constants(model)
            # + kept bytes (q + p): a decoder's KV groups hold their cache wherever they live
            kept = [(table[key], model.layers[key[0]].shards[key[1]].kept_bytes)
                    for table in (q, p) for key in table
                    if model.layers[key[0]].shards[key[1]].kept_bytes]
            self.memory = [("M", 1.0)] + self.preloads + kept + \
                ([(self.embed, stream_delta)] if self.embed else [])
            if sc.memory_budget_bytes is not None:
                row("memory", Unit.BYTES, self.memory, "<=", sc.memory_budget_bytes - fixed)
        if sc.importance_floor is not None:
            # floor: sum importance * (q + p) >= importance_floor
            row("importance_floor", Unit.IMPORTANCE, self.importance, ">=", sc.importance_floor)

    # --- objective and the program -----------------------------------------------------

    def program(self) -> Program:
        sc, model = self.scenario, self.model
        objective, maximize, unit = {
            Objective.MAX_IMPORTANCE: (self.importance, True, Unit.IMPORTANCE),
            Objective.MIN_BUFFER: (self.preloads, False, Unit.BYTES),
            Objective.MIN_MEMORY: (self.memory, False, Unit.BYTES),
            Objective.MIN_LATENCY: ([("Z", 1.0)], False, Unit.TIME_MS),
        }[sc.objective]
        return Program(scenario=sc, bools=tuple(self.bools), times=tuple(self.times),
                       time_horizon_ms=self.horizon, rows=tuple(self.rows),
                       objective=tuple(objective), maximize=maximize, objective_unit=unit,
                       q=self.q, p=self.p, byte_vars=self.byte_vars,
                       byte_horizon=sum(max(s.bytes) for layer in model.layers
                                        for s in layer.shards),
                       embed_var=self.embed,
                       objective_offset=float(memory_constants(model)[0])
                       if sc.objective == Objective.MIN_MEMORY else 0.0)
