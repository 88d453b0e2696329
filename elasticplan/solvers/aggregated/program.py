"""The aggregated program: counts per cost class, with an exact assignment of shards.

Shards of one layer that cost the same (equal flops and equal bytes at every bitwidth,
e.g. all heads, or all FFN slices) differ only in importance. So the program's integer
variables are counts, not per-shard booleans:

  u[c,b,S] in {0..|c|}   members of cost class c streamed at bitwidth index >= b
  u[c,b,E] in {0..|c|}   members of cost class c at bitwidth index >= b, either placement
  u[c,b,P], n[c,b,S|P]   preloaded at >= b (u[E] - u[S]); at exactly b (u[b] - u[b+1])
                         (continuous, integral whenever the integer u are)
  x[c,s,b] in [0, 1]     member s of class c runs at bitwidth b   (continuous)
  y[l]     in {0, 1}     layer l runs (only when min_shards_per_layer = 0)
  I[l], C[l] >= 0        end of layer l's reads; compute of layers l..L-1 (continuous, ms);
                         with a binding prefetch window W, C[l] is the end of layer l's compute
  e        in {0, 1}     the embedding table is streamed (memory bounded, model has a table)
  M        >= 0          bytes: the IO arena (memory bounded only)

Latency, buffer and the minimum shard count depend on the counts only; importance on
which shard gets which bitwidth, the x. For fixed integer counts the x live in a
transportation polytope (shards on one side, bitwidths on the other, "dropped" as
slack: pick and link rows below), whose vertices are integral. So integral counts
with continuous x are exact: every vertex of the program with integral n has integral
x (a split of x would split the vertex). `selection` reads a solution back and, should
a solver hand over a non-vertex x, re-solves the class's assignment at its vertex.

The rows, each with its one-line math:
  pick[s]       sum_b x[c,s,b] <= 1                          (a shard runs at most once)
  link[c,b]     sum_s x[c,s,b] - n[c,b,S] - n[c,b,P] = 0     (the counts are the x's)
  at_least[c,b] n[c,b,.] - u[c,b,.] + u[c,b+1,.] = 0         (per placement)
  either[c,b]   u[c,b,E] - u[c,b,S] - u[c,b,P] = 0
  count[l]      sum n[l] >= min_shards_per_layer             (or, skippable: n <= |c| y,
                                                              sum n >= y)
  io[l]         I[l] - I[l-1] - sum read_ms * n[S] = 0       (one channel, layer order)
  compute[l]    C[l] - C[l+1] - sum compute_ms * n = overhead
  latency[l]    I[l] + C[l] <= T                             (the unrolled recurrence of
                                                              elasticplan.solvers.plain.program)
  (a binding window W replaces io, compute and latency by the recurrence's edges:
  io[l] I[l] - I[l-1] - reads >= 0, gate[l] I[l] - C[l-W-1] - reads >= 0,
  ready[l] C[l] - I[l] - c[l] >= 0, order[l] C[l] - C[l-1] - c[l] >= 0, C[L-1] <= T;
  I[-1] is e * the embedding rows' read time in both forms)
  buffer        sum bytes * n[P] <= budget
  window_bytes  M - sum bytes * n[S] over layers l..l+W >= 0  (memory bounded only)
  memory        M + sum bytes * n[P] + e (rows - table) <= budget - fixed terms
  floor         sum importance * x >= importance_floor       (min_buffer, min_memory)
A relaxation (`Relaxation`, for row generation) keeps only some latency rows, each a path
through the recurrence written on the counts (no I, C columns), and merges the layers its
rows treat alike into one block, whose classes span them; a block's count row asks
min_shards_per_layer per layer. `grow` adds the rows a relaxed plan misses.
The cost coefficients come from elasticplan.costmodel, the one cost model; the matrix
is built with numpy (no per-term Python objects), so an 80-layer x 64-shard x 8-bit
model builds in tens of milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import highspy
import numpy as np

from elasticplan.costmodel import (
    Layout,
    Pick,
    Schedule,
    Selection,
    critical_path,
    embedding_read_ms,
    memory_constants,
    path_ms,
    read_ms,
    shard_compute_ms,
    simulate,
)
from elasticplan.problem.question import Objective, window_binds, window_span
from elasticplan.problem.spec import Scenario
from elasticplan.solvers.aggregated.highs_model import new_highs, pass_model
from elasticplan.solvers.margins import EXACT, Margins

STREAMED, PRELOADED = 0, 1
EITHER = 2  # u's third column: members at >= b bits, streamed or preloaded


@dataclass(frozen=True)
class CostClass:
    """Shards of one block of layers with identical costs at every bitwidth."""

    block: int
    layers: tuple[int, ...]  # per member, its layer
    members: tuple[int, ...]  # per member, its shard index in that layer
    read_ms: np.ndarray  # [B] one read of a member at each bitwidth
    compute_ms: np.ndarray  # [B] a member's compute (flops + dequantisation)
    bytes: np.ndarray  # [B] int64
    importance: np.ndarray  # [members, B]


def per_layer(scenario: Scenario) -> list[tuple[int, ...]]:
    return [(li,) for li in range(len(scenario.model.layers))]


def cost_classes(scenario: Scenario, blocks: list[tuple[int, ...]] | None = None
                 ) -> list[list[CostClass]]:
    """Per block of layers (default: each layer its own), its shards grouped by
    (flops, bytes), in order of first member."""
    device, model = scenario.device, scenario.model
    B = len(model.bitwidths)
    out = []
    for gi, block in enumerate(blocks or per_layer(scenario)):
        groups: dict[tuple, list[tuple[int, int]]] = {}
        for li in block:
            for si, s in enumerate(model.layers[li].shards):
                groups.setdefault((s.flops, s.bytes), []).append((li, si))
        classes = []
        for members in groups.values():
            rep = model.layers[members[0][0]].shards[members[0][1]]
            classes.append(CostClass(
                block=gi, layers=tuple(li for li, _ in members),
                members=tuple(si for _, si in members),
                read_ms=np.array([read_ms(device, rep.bytes[b]) for b in range(B)]),
                compute_ms=np.array([shard_compute_ms(device, model, rep, b) for b in range(B)]),
                bytes=np.array(rep.bytes, dtype=np.int64),
                importance=np.array([model.layers[li].shards[si].importance
                                     for li, si in members])))
        out.append(classes)
    return out


@dataclass(frozen=True)
class Relaxation:
    """The rows a relaxed program keeps. A latency row is a path through the schedule's
    recurrence (elasticplan.costmodel.critical_path): per layer, 1 if the path takes its
    reads, 2 its compute, 3 both; the path's sum, with the embedding rows' read, is at
    most the latency of any plan, so `sum <= target` holds for every feasible plan. The
    unrolled rows of an unbounded window are the paths "reads of 0..l, compute of l..L-1".
    `alone` are the layers kept out of any block (a layer short of min_shards_per_layer)."""

    paths: frozenset[tuple[int, ...]]
    alone: frozenset[int] = frozenset()

    def blocks(self, num_layers: int) -> list[tuple[int, ...]]:
        """Layers that every kept row treats alike, as blocks (in order of first layer);
        a block need not be contiguous."""
        paths = sorted(self.paths)
        groups: dict[tuple, list[int]] = {}
        for li in range(num_layers):
            key = (tuple(p[li] for p in paths), li if li in self.alone else -1)
            groups.setdefault(key, []).append(li)
        return [tuple(g) for g in groups.values()]


def relaxable(scenario: Scenario) -> bool:
    """Whether `build` can keep only some rows: every layer runs (min_shards_per_layer
    >= 1: a layer's fixed overhead is a constant of every path through it) and the
    prefetch window does not bind (the IO arena's one window holds every layer, so it
    tells no layers apart). Measured on binding windows (MiniLM, 9 MB, window 1): the
    paths a plan misses split every layer from the next within two rounds, and each
    round's dense path rows solved slower than the whole program's recurrence. Nor is
    min_latency (its plan presses every latency row at once: Llama-2-70B took four rounds,
    3.9 s, against the whole program's 0.45 s)."""
    window, L = scenario.prefetch_window, len(scenario.model.layers)
    return scenario.min_shards_per_layer > 0 and not window_binds(window, L) and \
        scenario.objective != Objective.MIN_LATENCY


def first_relaxation(scenario: Scenario) -> Relaxation | None:
    """Where row generation starts: the IO-bound path (every layer's reads, then the last
    layer's compute) and the compute-bound path (the first layer's reads, then every
    layer's compute), the two latency rows the LP duals show binding. None if the
    scenario is not `relaxable`."""
    if not relaxable(scenario):
        return None
    L = len(scenario.model.layers)
    return Relaxation(frozenset({tuple([1] * (L - 1) + [3]), tuple([3] + [2] * (L - 1))}))


@dataclass
class MatrixProgram:
    """`row_lower <= A x <= row_upper`, `col_lower <= x <= col_upper`, some x integer;
    optimise `cost . x`. A in coordinate form (rows, cols, vals). Per-block arrays are
    indexed by block (`blocks`; with every latency row kept, a block is one layer)."""

    scenario: Scenario
    classes: list[list[CostClass]]
    col_lower: np.ndarray
    col_upper: np.ndarray
    col_integer: np.ndarray  # bool
    cost: np.ndarray
    maximize: bool
    row_lower: np.ndarray
    row_upper: np.ndarray
    a_rows: np.ndarray
    a_cols: np.ndarray
    a_vals: np.ndarray
    n_col: list  # per block, per class: int array [B, 2] of column indices (STREAMED, PRELOADED)
    u_col: list  # per block, per class: [B, 3], members at >= b bits: streamed (integer),
    # preloaded, either (integer)
    x_col: list  # per block, per class: int array [members, B]
    y_col: np.ndarray | None  # [L], when layers may be skipped (blocks are layers then)
    io_col: np.ndarray  # [blocks]  I[g]
    comp_col: np.ndarray  # [blocks]  C[g]: compute of blocks g.., or (chained) end of g's compute
    z_col: int | None  # min_latency only
    objective_scale: float  # cost = objective_scale * (the objective in its own unit - offset)
    chained: bool = False  # a binding prefetch window: forward time columns
    e_col: int | None = None  # the embedding table is streamed
    m_col: int | None = None  # the IO arena's bytes
    objective_offset: float = 0.0  # the objective's constant part (min_memory: fixed terms)
    blocks: list[tuple[int, ...]] | None = None  # None: one block per layer
    relaxation: Relaxation | None = None  # the rows kept; None: the whole program

    def layout(self, values: np.ndarray) -> Layout:
        stream = self.e_col is not None and values[self.e_col] > 0.5
        return Layout(self.scenario.prefetch_window, bool(stream))

    @property
    def num_cols(self) -> int:
        return len(self.col_lower)

    def csc(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Column-wise compressed (start, index, value) of A."""
        order = np.lexsort((self.a_rows, self.a_cols))
        start = np.zeros(self.num_cols + 1, dtype=np.int64)
        np.cumsum(np.bincount(self.a_cols, minlength=self.num_cols), out=start[1:])
        return start, self.a_rows[order], self.a_vals[order]

    # --- reading back ------------------------------------------------------------------

    def selection(self, values: np.ndarray) -> Selection:
        """Shard choices of a solution. Counts are rounded; per class an integral x says
        which member takes which bitwidth. A fractional x (a solver may return a
        non-vertex optimum) is not rounded: the class's assignment is re-solved exactly
        for the counts, which can only match or beat the fractional x's importance."""
        layers: list[list[Pick]] = [[] for _ in self.scenario.model.layers]
        for gi, classes in enumerate(self.classes):
            for ci, c in enumerate(classes):
                counts = np.rint(values[self.n_col[gi][ci]]).astype(np.int64)  # [B, 2]
                x = values[self.x_col[gi][ci]]  # [members, B]
                chosen = np.where(x.max(axis=1) > 0.5, x.argmax(axis=1), -1)
                if np.abs(x - np.rint(x)).max() > 1e-6 or not _matches(chosen, counts.sum(axis=1)):
                    chosen = best_assignment(c.importance, counts.sum(axis=1))
                for li, pick in _class_picks(c, chosen, counts):
                    layers[li].append(pick)
        return tuple(tuple(sorted(picks, key=lambda p: p.shard)) for picks in layers)

    def solution_of(self, selection: Selection, layout: Layout | None = None) -> np.ndarray:
        """The complete column vector of a selection: counts, x, y, e, M and the I/C chain
        from the cost model's schedule (elasticplan.costmodel.simulate)."""
        layout = layout or Layout(self.scenario.prefetch_window)
        v = np.zeros(self.num_cols)
        where = {(li, si): (gi, ci, k) for gi, classes in enumerate(self.classes)
                 for ci, c in enumerate(classes)
                 for k, (li, si) in enumerate(zip(c.layers, c.members))}
        for li, picks in enumerate(selection):
            for p in picks:
                gi, ci, k = where[(li, p.shard)]
                v[self.n_col[gi][ci][p.bit, PRELOADED if p.preloaded else STREAMED]] += 1
                v[self.x_col[gi][ci][k, p.bit]] = 1
            if picks and self.y_col is not None:
                v[self.y_col[li]] = 1
        for n_l, u_l in zip(self.n_col, self.u_col):
            for n, u in zip(n_l, u_l):
                at_least = np.cumsum(v[n][::-1], axis=0)[::-1]
                v[u[:, :2]] = at_least
                v[u[:, EITHER]] = at_least.sum(axis=1)
        schedule = simulate(self.scenario, selection, layout=layout)
        comp = np.array([t.compute_end_ms - t.compute_start_ms for t in schedule.layers])
        if self.relaxation is None:  # the time columns (one block per layer)
            v[self.io_col] = [t.io_end_ms for t in schedule.layers]
            if self.chained:
                v[self.comp_col] = [t.compute_end_ms for t in schedule.layers]
            else:
                v[self.comp_col] = np.cumsum(comp[::-1])[::-1]
        if self.e_col is not None:
            v[self.e_col] = float(layout.stream_embeddings)
        if self.m_col is not None:
            v[self.m_col] = schedule.memory.working_peak_bytes - self.scenario.model.scratch_bytes
        if self.z_col is not None:
            v[self.z_col] = schedule.latency_ms
        return v


def _class_picks(c: CostClass, chosen: np.ndarray, counts: np.ndarray
                 ) -> list[tuple[int, Pick]]:
    """(layer, pick) of a class's members: `chosen` per member a bitwidth index (-1:
    dropped), `counts` [B, 2] how many at each bitwidth are streamed and preloaded.
    Members at one bitwidth cost the same, so the first n[P] of them (by index) are
    preloaded."""
    picks = []
    for b in range(counts.shape[0]):
        for k, m in enumerate(np.flatnonzero(chosen == b)):
            picks.append((c.layers[m], Pick(c.members[m], b, bool(k < counts[b, PRELOADED]))))
    return picks


def _matches(chosen: np.ndarray, per_bit: np.ndarray) -> bool:
    return bool(np.array_equal(np.bincount(chosen[chosen >= 0], minlength=len(per_bit)),
                               per_bit))


def best_assignment(importance: np.ndarray, per_bit: np.ndarray) -> np.ndarray:
    """Which member takes which bitwidth, given how many run at each: the max-importance
    transportation problem, solved exactly (its LP optimum at a vertex is integral).
    Returns per member the bitwidth index, -1 for dropped."""
    m, B = importance.shape
    if int(per_bit.sum()) > m:
        raise ValueError(f"{int(per_bit.sum())} shards asked of a class of {m}")
    h = new_highs()
    col = np.arange(m * B)
    # column x[k,b] sits in row k (member k runs at most once) and row m+b (exactly
    # per_bit[b] members at b)
    csc = (np.arange(0, 2 * m * B + 1, 2), np.stack([col // B, m + col % B], axis=1).reshape(-1),
           np.ones(2 * m * B))
    # Costs scaled to ~1e6: HiGHS's dual tolerance (1e-7, absolute) would otherwise accept
    # a vertex up to ~1e-7 of importance short of the best (seen: a floor missed by 1.6e-8).
    top = float(np.abs(importance).max())
    factor = 1e6 / top if top > 1e-200 else 1.0
    pass_model(h, csc, maximize=True, cost=importance.reshape(-1) * factor,
               col_lower=np.zeros(m * B),
               col_upper=np.ones(m * B),
               row_lower=np.concatenate([np.zeros(m), per_bit]),
               row_upper=np.concatenate([np.ones(m), per_bit]))
    h.setOptionValue("solver", "simplex")  # a basic (vertex) solution, hence integral
    h.run()
    if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        raise RuntimeError(f"assignment LP: {h.modelStatusToString(h.getModelStatus())}")
    x = np.asarray(h.getSolution().col_value).reshape(m, B)
    if np.abs(x - np.rint(x)).max() > 1e-6:
        raise RuntimeError("assignment LP returned a fractional vertex")
    return np.where(x.max(axis=1) > 0.5, x.argmax(axis=1), -1)


def build(scenario: Scenario, margins: Margins = EXACT,
          relaxation: Relaxation | None = None) -> MatrixProgram:
    """Data, variables, constraints, objective. Latency rows are tightened by
    `margins` (elasticplan.solvers.margins) for floating-point backends.

    With a `relaxation` (for a `relaxable` scenario), only its rows are kept: its paths
    as latency rows written on the counts (no time columns), its arena windows, and one
    count row per block. Layers that every kept row treats alike merge into one block,
    whose shards of equal cost form one class: near-ties between layers, which keep a
    branch and bound from closing, are gone. Its bound holds for the whole program; its
    plan holds for the scenario if `grow` finds no row it misses."""
    importance_scale = margins.importance_scale
    device, model = scenario.device, scenario.model
    L, B = len(model.layers), len(model.bitwidths)
    if relaxation is not None and not relaxable(scenario):
        raise ValueError(f"scenario {scenario.name!r} cannot be relaxed (aggregate.relaxable)")
    blocks = relaxation.blocks(L) if relaxation is not None else None
    layers_of = blocks or per_layer(scenario)
    classes = cost_classes(scenario, blocks)
    G = len(classes)
    skippable = scenario.min_shards_per_layer == 0
    budget = scenario.preload_budget_bytes
    window = scenario.prefetch_window
    timed = relaxation is None  # the whole program: time columns I, C per layer
    chained = timed and window_binds(window, L)

    # --- variables ---------------------------------------------------------------------
    lower, upper, integer = [], [], []

    def columns(count, lo, hi, is_int):
        start = len(lower)
        lower.extend(np.broadcast_to(lo, count).tolist())
        upper.extend(np.broadcast_to(hi, count).tolist())
        integer.extend([is_int] * count)
        return np.arange(start, start + count)

    n_col, u_col, x_col = [], [], []
    for classes_l in classes:
        n_l, u_l, x_l = [], [], []
        for c in classes_l:
            size = len(c.members)
            # A class member at b fits the buffer at most budget // bytes[b] times.
            pre_cap = np.minimum(size, budget // np.maximum(c.bytes, 1))
            hi = np.stack([np.full(B, size), pre_cap], axis=1).astype(float)
            n_l.append(columns(2 * B, 0.0, hi.reshape(-1), False).reshape(B, 2))
            at_least = np.minimum(np.cumsum(hi[::-1], axis=0)[::-1], size)
            u = np.empty((B, 3), dtype=np.int64)  # streamed, preloaded, either
            u[:, STREAMED] = columns(B, 0.0, at_least[:, STREAMED], True)
            u[:, PRELOADED] = columns(B, 0.0, at_least[:, PRELOADED], False)
            u[:, EITHER] = columns(B, 0.0, np.minimum(at_least.sum(axis=1), size), True)
            u_l.append(u)
            x_l.append(columns(size * B, 0.0, 1.0, False).reshape(size, B))
        n_col.append(n_l)
        u_col.append(u_l)
        x_col.append(x_l)
    y_col = columns(L, 0.0, 1.0, True) if skippable else None
    io_col = columns(G if timed else 0, 0.0, np.inf, False)
    comp_col = columns(G if timed else 0, 0.0, np.inf, False)
    z_col = int(columns(1, 0.0, np.inf, False)[0]) \
        if scenario.objective == Objective.MIN_LATENCY else None
    e_col = int(columns(1, 0.0, 1.0, True)[0]) \
        if scenario.memory_bounded and model.embedding_rows else None
    m_col = int(columns(1, 0.0, np.inf, False)[0]) if scenario.memory_bounded else None
    t_emb = embedding_read_ms(device, model)

    # --- constraints -------------------------------------------------------------------
    r_idx, c_idx, vals, r_lo, r_hi = [], [], [], [], []

    def add_rows(cols: np.ndarray, coefs: np.ndarray, lo, hi):
        """Rows given as a [rows, k] block of columns and coefficients."""
        cols = np.atleast_2d(cols)
        coefs = np.broadcast_to(coefs, cols.shape)
        first = len(r_lo)
        rows = first + np.repeat(np.arange(cols.shape[0]), cols.shape[1])
        r_idx.append(rows)
        c_idx.append(cols.reshape(-1))
        vals.append(np.asarray(coefs, dtype=float).reshape(-1))
        r_lo.extend(np.broadcast_to(lo, cols.shape[0]).tolist())
        r_hi.extend(np.broadcast_to(hi, cols.shape[0]).tolist())

    inf = np.inf
    overhead = device.layer_overhead_ms
    limit = margins.latency_rhs(scenario.target_latency_ms) - device.pool_ms  # every row's T
    for li, classes_l in enumerate(classes):
        ns = [n.reshape(-1) for n in n_col[li]]
        for ci, c in enumerate(classes_l):
            n, u, x = n_col[li][ci], u_col[li][ci], x_col[li][ci]
            # at_least[b]: n[b] - u[b] + u[b+1] = 0 (per placement; u[B] = 0)
            placed = u[:, :2]
            if B > 1:
                add_rows(np.stack([n[:-1].reshape(-1), placed[:-1].reshape(-1),
                                   placed[1:].reshape(-1)], axis=1),
                         np.array([1.0, -1.0, 1.0]), 0.0, 0.0)
            add_rows(np.stack([n[-1], placed[-1]], axis=1), np.array([1.0, -1.0]), 0.0, 0.0)
            # either[b]: u[b,E] - u[b,S] - u[b,P] = 0
            add_rows(u[:, [EITHER, STREAMED, PRELOADED]], np.array([1.0, -1.0, -1.0]), 0.0, 0.0)
            # pick[s]: sum_b x[s,b] <= 1
            add_rows(x, 1.0, -inf, 1.0)
            # link[c,b]: sum_s x[s,b] - n[b,S] - n[b,P] = 0
            add_rows(np.concatenate([x.T, n], axis=1),
                     np.concatenate([np.ones(x.T.shape), -np.ones(n.shape)], axis=1), 0.0, 0.0)
            if skippable:
                # in_layer[c]: sum n[c] - |c| y[l] <= 0
                add_rows(np.append(n.reshape(-1), y_col[li]),
                         np.append(np.ones(n.size), -len(c.members)), -inf, 0.0)
        all_n = np.concatenate(ns)
        if skippable:
            # nonempty[l]: sum n[l] - y[l] >= 0
            add_rows(np.append(all_n, y_col[li]), np.append(np.ones(all_n.size), -1.0), 0.0, inf)
        elif scenario.min_shards_per_layer > 0:
            # count[g]: sum n[g] >= min_shards_per_layer x (layers in block g)
            add_rows(all_n, 1.0, float(scenario.min_shards_per_layer * len(layers_of[li])), inf)
        if not timed:
            continue  # a relaxation's latency rows are its paths, below
        # io[l]: I[l] - I[l-1] - sum read_ms n[S] = 0   (I[-1] = e t_emb)
        streamed = np.concatenate([n[:, STREAMED] for n in n_col[li]])
        reads = np.concatenate([c.read_ms for c in classes_l])
        before = ([io_col[li - 1]], [-1.0]) if li else \
            (([e_col], [-t_emb]) if e_col is not None else ([], []))
        cols = [io_col[li], *streamed, *before[0]]
        coefs = [1.0, *(-reads), *before[1]]
        add_rows(np.array(cols), np.array(coefs), 0.0, np.inf if chained else 0.0)
        comp = np.concatenate([np.repeat(c.compute_ms, 2) for c in classes_l])
        fixed = 0.0 if skippable else overhead
        work_cols, work_coefs = list(all_n), list(-comp)
        if skippable:
            work_cols.append(y_col[li])
            work_coefs.append(-overhead)
        if chained:
            # gate[l]: I[l] - C[l-W-1] - sum read_ms n[S] >= 0  (the window is full until then)
            if li > window:
                add_rows(np.array([io_col[li], *streamed, comp_col[li - window - 1]]),
                         np.array([1.0, *(-reads), -1.0]), 0.0, inf)
            # ready[l]: C[l] - I[l] - c[l] >= overhead + wake_ms;
            # order[l]: C[l] - C[l-1] - c[l] >= overhead
            for other, wake in [(io_col[li], device.wake_ms)] + \
                    ([(comp_col[li - 1], 0.0)] if li else []):
                add_rows(np.array([comp_col[li], other, *work_cols]),
                         np.array([1.0, -1.0, *work_coefs]), fixed + wake, inf)
            if not li and device.embed_ms:
                # order[0]: C[0] - e t_emb - c[0] >= overhead + embed_ms (the embedding first)
                add_rows(np.array([comp_col[0], *work_cols] + ([e_col] if e_col is not None
                                                               else [])),
                         np.array([1.0, *work_coefs] + ([-t_emb] if e_col is not None else [])),
                         fixed + device.embed_ms, inf)
            continue
        # compute[l]: C[l] - C[l+1] - sum compute_ms n (- overhead y) = overhead (or 0)
        cols = [comp_col[li], *work_cols] + ([comp_col[li + 1]] if li + 1 < L else [])
        coefs = [1.0, *work_coefs] + ([-1.0] if li + 1 < L else [])
        add_rows(np.array(cols), np.array(coefs), fixed, fixed)
        if z_col is None:
            # latency[l]: I[l] + C[l] <= T - wake_ms
            add_rows(np.array([io_col[li], comp_col[li]]), 1.0, -inf, limit - device.wake_ms)
        else:
            # latency[l]: Z - I[l] - C[l] >= pool_ms + wake_ms
            add_rows(np.array([z_col, io_col[li], comp_col[li]]), np.array([1.0, -1.0, -1.0]),
                     device.pool_ms + device.wake_ms, inf)
        if not li and device.embed_ms:
            # latency[embed]: C[0] + e t_emb <= T - embed_ms  (Z - ... >= embed_ms + pool_ms)
            cols = [comp_col[0]] + ([e_col] if e_col is not None else [])
            coefs = [1.0] + ([t_emb] if e_col is not None else [])
            if z_col is None:
                add_rows(np.array(cols), np.array(coefs), -inf, limit - device.embed_ms)
            else:
                add_rows(np.array([z_col, *cols]), np.array([1.0, *(-np.array(coefs))]),
                         device.embed_ms + device.pool_ms, inf)

    for path in sorted(relaxation.paths) if relaxation is not None else ():
        # path[p]: e t_emb + sum over the path's reads and compute (+ overheads, + embed_ms
        # when it starts at the embedding) <= T  (min_latency: Z - the same >= its constant)
        cols, coefs = [], []
        fixed = (0.0 if path[0] & 1 else device.embed_ms) + \
            device.wake_ms * sum(m == 3 for m in path)
        for gi, block in enumerate(layers_of):
            mark = path[block[0]]  # alike for every layer of a block
            if mark & 2:
                fixed += overhead * len(block)
            for ci, c in enumerate(classes[gi]):
                coef = np.zeros((B, 2))
                if mark & 1:
                    coef[:, STREAMED] += c.read_ms
                if mark & 2:
                    coef += c.compute_ms[:, None]
                cols.append(n_col[gi][ci].reshape(-1))
                coefs.append(coef.reshape(-1))
        if e_col is not None:
            cols.append(np.array([e_col]))
            coefs.append(np.array([t_emb]))
        cols, coefs = np.concatenate(cols), np.concatenate(coefs)
        if z_col is None:
            add_rows(cols, coefs, -inf, limit - fixed)
        else:
            add_rows(np.append(z_col, cols), np.append(1.0, -coefs), fixed + device.pool_ms, inf)
    if chained:
        # latency: C[L-1] <= T  (min_latency: Z - C[L-1] >= pool_ms)
        if z_col is None:
            add_rows(np.array([comp_col[L - 1]]), 1.0, -inf, limit)
        else:
            add_rows(np.array([z_col, comp_col[L - 1]]), np.array([1.0, -1.0]), device.pool_ms,
                     inf)
    pre_cols = np.concatenate([n[:, PRELOADED] for nl in n_col for n in nl])
    pre_bytes = np.concatenate([c.bytes for cl in classes for c in cl]).astype(float)
    all_x = np.concatenate([x.reshape(-1) for xl in x_col for x in xl])
    all_imp = np.concatenate([c.importance.reshape(-1) for cl in classes for c in cl])
    # buffer: sum bytes n[P] <= budget
    add_rows(pre_cols, pre_bytes, -inf, float(budget))
    fixed_memory = 0.0
    if m_col is not None:
        # window_bytes[l]: M - sum bytes n[S] over layers l..l+W >= 0
        # (a relaxation's window holds every layer: it is kept whole, over its blocks)
        span = window_span(window, L)
        block_cols = [np.concatenate([n[:, STREAMED] for n in n_col[gi]]) for gi in range(G)]
        block_bytes = [np.concatenate([c.bytes for c in cl]).astype(float) for cl in classes]
        for k in range(L - span + 1):
            inside = [gi for gi, block in enumerate(layers_of) if k <= block[0] < k + span]
            add_rows(np.concatenate([[m_col], *(block_cols[gi] for gi in inside)]),
                     np.concatenate([[1.0], *(-block_bytes[gi] for gi in inside)]), 0.0, inf)
        # memory: M + sum bytes n[P] + e (rows - table) <= budget - fixed terms
        fixed, stream_delta = memory_constants(model)
        mem_cols = np.concatenate([[m_col], pre_cols] + ([[e_col]] if e_col is not None else []))
        mem_coefs = np.concatenate([[1.0], pre_bytes] + (
            [[float(stream_delta)]] if e_col is not None else []))
        fixed_memory = float(fixed)
        if scenario.memory_budget_bytes is not None:
            add_rows(mem_cols, mem_coefs, -inf, scenario.memory_budget_bytes - fixed_memory)
    if scenario.importance_floor is not None:
        # floor: sum importance x >= importance_floor
        add_rows(all_x, all_imp * importance_scale, margins.floor_rhs(scenario.importance_floor),
                 inf)

    # --- objective ---------------------------------------------------------------------
    cost = np.zeros(len(lower))
    if scenario.objective == Objective.MAX_IMPORTANCE:
        cost[all_x] = all_imp * importance_scale
        maximize, scale = True, importance_scale
    elif scenario.objective == Objective.MIN_BUFFER:
        cost[pre_cols] = pre_bytes
        maximize, scale = False, 1.0
    elif scenario.objective == Objective.MIN_MEMORY:
        cost[mem_cols] = mem_coefs
        maximize, scale = False, 1.0
    else:
        cost[z_col] = 1.0
        maximize, scale = False, 1.0

    return MatrixProgram(
        scenario=scenario, classes=classes,
        col_lower=np.array(lower), col_upper=np.array(upper),
        col_integer=np.array(integer, dtype=bool), cost=cost, maximize=maximize,
        row_lower=np.array(r_lo), row_upper=np.array(r_hi),
        a_rows=np.concatenate(r_idx).astype(np.int64), a_cols=np.concatenate(c_idx).astype(np.int64),
        a_vals=np.concatenate(vals), n_col=n_col, u_col=u_col, x_col=x_col, y_col=y_col,
        io_col=io_col, comp_col=comp_col, z_col=z_col, objective_scale=scale, chained=chained, e_col=e_col,
        m_col=m_col, objective_offset=fixed_memory
        if scenario.objective == Objective.MIN_MEMORY else 0.0, blocks=blocks, relaxation=relaxation)


def round_down(program: MatrixProgram, values: np.ndarray, margins: Margins = EXACT
               ) -> tuple[Selection, Layout] | None:
    """A feasible plan from a fractional solution (the LP relaxation), or None.

    First try: per class and placement, the number of members at bitwidth >= b is
    rounded down (a member whose count was split between two bitwidths takes the lower
    one instead of being dropped), then checked against the cost model's sums. Fallback:
    every count rounded down, which only shortens reads and compute and shrinks the
    buffer, so the latency and buffer rows still hold. None if a layer then falls below
    min_shards_per_layer. Members go to bitwidths in order of their x. The plan's distance
    from the relaxation's bound is the caller's proven gap. Where the table lives follows
    the relaxation's e, else the other place if only that one fits."""
    sc = program.scenario
    first = program.layout(values)
    layouts = [first] if program.e_col is None else \
        [first, Layout(first.window, not first.stream_embeddings)]
    budget = sc.memory_budget_bytes
    for cumulative in (True, False):
        selection = _rounded(program, values, cumulative)
        if selection is None:
            continue
        for layout in layouts:
            s = simulate(sc, selection, layout=layout)
            if s.latency_ms <= sc.target_latency_ms and \
                    s.preload_bytes <= sc.preload_budget_bytes and \
                    (budget is None or s.memory.peak_bytes <= budget):
                if relaxable(sc) and sc.objective == Objective.MAX_IMPORTANCE:
                    selection = fill(sc, selection, layout, margins)
                return selection, layout
    return None


def grow_by_rounding(program: MatrixProgram, values: np.ndarray,
                     margins: Margins = EXACT) -> Relaxation | None:
    """`grow` for the plan that rounds a relaxed program's LP solution down (round_down's
    first rule), or None if it misses no row (or a layer is left short)."""
    selection = _rounded(program, values, cumulative=True)
    if selection is None:
        return None
    return grow(program, selection, program.layout(values), margins)


def _rounded(program: MatrixProgram, values: np.ndarray, cumulative: bool) -> Selection | None:
    need = program.scenario.min_shards_per_layer
    layers: list[list[Pick]] = [[] for _ in program.scenario.model.layers]
    for li, classes in enumerate(program.classes):
        for ci, c in enumerate(classes):
            frac = values[program.n_col[li][ci]]  # [B, 2]
            if cumulative:  # floor of the counts at >= b, from the top bitwidth down
                at_least = np.floor(np.cumsum(frac[::-1], axis=0)[::-1] + 1e-6)
                counts = (at_least - np.vstack([at_least[1:], np.zeros((1, 2))]))
                counts = np.maximum(counts, 0).astype(np.int64)
            else:
                counts = np.floor(frac + 1e-6).astype(np.int64)
            per_bit = counts.sum(axis=1)
            x = values[program.x_col[li][ci]]
            chosen = np.full(len(c.members), -1)
            # Highest bitwidths first: each takes its members with the most x at >= b.
            x_at_least = np.cumsum(x[:, ::-1], axis=1)[:, ::-1]
            for b in range(len(per_bit) - 1, -1, -1):
                if per_bit[b] == 0:
                    continue
                order = np.lexsort((-c.importance[:, b], -x_at_least[:, b]))
                chosen[[k for k in order if chosen[k] < 0][:per_bit[b]]] = b
            for layer, pick in _class_picks(c, chosen, counts):
                layers[layer].append(pick)
    if any(len(picks) < need for picks in layers):
        return None
    return tuple(tuple(sorted(picks, key=lambda p: p.shard)) for picks in layers)


def grow(program: MatrixProgram, selection: Selection, layout: Layout,
         margins: Margins = EXACT) -> Relaxation | None:
    """The relaxation with the rows a relaxed program's plan misses added, or None if it
    meets them all (then it is a plan of the scenario): the plan's critical path if it
    runs past the target (min_latency: past the kept paths' longest), a layer short of
    min_shards_per_layer."""
    relax = program.relaxation
    if relax is None:
        return None
    sc = program.scenario
    schedule = simulate(sc, selection, layout=layout)
    reads = [t.io_end_ms - t.io_start_ms for t in schedule.layers]
    work = [t.compute_end_ms - t.compute_start_ms for t in schedule.layers]
    start = embedding_read_ms(sc.device, sc.model) if layout.stream_embeddings else 0.0

    d = sc.device

    def total(path):
        return path_ms(path, reads, work, start, d.embed_ms, d.wake_ms)

    paths = set(relax.paths)
    if sc.objective == Objective.MIN_LATENCY:
        limit = max(total(p) for p in relax.paths)
    else:
        limit = margins.latency_rhs(sc.target_latency_ms) - sc.device.pool_ms
    critical = critical_path(schedule.layers, layout.window, start, d.embed_ms, d.wake_ms)
    if total(critical) > limit + 1e-9:
        paths.add(critical)
    short = {li for li, picks in enumerate(selection) if len(picks) < sc.min_shards_per_layer}
    grown = Relaxation(frozenset(paths), relax.alone | short)
    return None if grown == relax else grown


def fill(scenario: Scenario, selection: Selection, layout: Layout,
         margins: Margins = EXACT) -> Selection:
    """A feasible plan improved greedily (max importance; every layer runs and the window
    does not bind, so the latency rows are the unrolled ones and each layer's overhead is
    a constant): while some shard can move to an option of more importance (another
    bitwidth, streamed or preloaded, or run at all) with every latency row, the buffer
    and the memory budget still met, the move that gains the most is made. Vectorised
    over every shard and option; a move changes row l by its read time if l >= its layer
    and by its compute if l <= its layer."""
    device, model = scenario.device, scenario.model
    B = len(model.bitwidths)
    shards = [(li, si, s) for li, layer in enumerate(model.layers)
              for si, s in enumerate(layer.shards)]
    N, O = len(shards), 2 * B + 1  # option 0: dropped; 1 + 2b + p: bitwidth b, placement p
    read = np.zeros((N, O))
    comp = np.zeros((N, O))
    pre = np.zeros((N, O))
    stream = np.zeros((N, O))
    imp = np.zeros((N, O))
    for n, (li, si, s) in enumerate(shards):
        for b in range(B):
            o = 1 + 2 * b
            comp[n, o:o + 2] = shard_compute_ms(device, model, s, b)
            imp[n, o:o + 2] = s.importance[b]
            read[n, o + STREAMED] = read_ms(device, s.bytes[b])
            stream[n, o + STREAMED] = s.bytes[b]
            pre[n, o + PRELOADED] = s.bytes[b]
    layer_of = np.array([li for li, _, _ in shards])
    index = {(li, si): n for n, (li, si, _) in enumerate(shards)}
    current = np.zeros(N, dtype=np.int64)
    for li, picks in enumerate(selection):
        for p in picks:
            current[index[(li, p.shard)]] = 1 + 2 * p.bit + (PRELOADED if p.preloaded else 0)
    schedule = simulate(scenario, selection, layout=layout)
    rows = np.array(row_values(schedule))
    limit = margins.latency_rhs(scenario.target_latency_ms) - device.pool_ms
    rows += device.wake_ms  # each unrolled row waits for its layer's reads once
    # the embedding's row: the compute thread's start, then every layer's compute
    embed_row = (embedding_read_ms(device, model) if layout.stream_embeddings else 0.0) \
        + device.embed_ms + sum(t.compute_end_ms - t.compute_start_ms for t in schedule.layers)
    preload, peak = float(schedule.preload_bytes), float(schedule.memory.peak_bytes)
    budget = scenario.memory_budget_bytes
    members = np.arange(N)
    while True:
        d_read = read - read[members, current][:, None]
        d_comp = comp - comp[members, current][:, None]
        d_pre = pre - pre[members, current][:, None]
        d_stream = stream - stream[members, current][:, None]
        gain = imp - imp[members, current][:, None]
        before = np.concatenate([[-np.inf], np.maximum.accumulate(rows)[:-1]])[layer_of]
        after = np.concatenate([np.maximum.accumulate(rows[::-1])[::-1][1:], [-np.inf]])[layer_of]
        ok = (gain > 0) & (before[:, None] + d_comp <= limit) & \
            (rows[layer_of][:, None] + d_read + d_comp <= limit) & \
            (after[:, None] + d_read <= limit) & (embed_row + d_comp <= limit) & \
            (preload + d_pre <= scenario.preload_budget_bytes)
        if budget is not None:  # the arena holds every streamed byte (unbounded window)
            ok &= peak + d_pre + d_stream <= budget
        if not ok.any():
            break
        n, o = np.unravel_index(np.argmax(np.where(ok, gain, -np.inf)), ok.shape)
        j = layer_of[n]
        rows[j:] += d_read[n, o]
        rows[:j + 1] += d_comp[n, o]
        embed_row += d_comp[n, o]
        preload += d_pre[n, o]
        peak += d_pre[n, o] + d_stream[n, o]
        current[n] = o
    layers: list[list[Pick]] = [[] for _ in model.layers]
    for n, (li, si, _) in enumerate(shards):
        if current[n]:
            b, p = divmod(int(current[n]) - 1, 2)
            layers[li].append(Pick(si, b, p == PRELOADED))
    return tuple(tuple(picks) for picks in layers)


def row_values(schedule: Schedule) -> list[float]:
    """Per layer l, the unrolled latency row l of a schedule: the end of layer l's reads
    plus the compute of layers l..L-1 (the latency, under an unbounded window, is their
    max)."""
    work = [t.compute_end_ms - t.compute_start_ms for t in schedule.layers]
    after = np.cumsum(work[::-1])[::-1]
    return [t.io_end_ms + float(c) for t, c in zip(schedule.layers, after)]
