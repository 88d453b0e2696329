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
x (a split of x would split the vertex). The HiGHS backend reads a solution back
(elasticplan.solvers.aggregated.highs.selection_of) and, should it hand over a non-vertex
x, re-solves the class's assignment at its vertex.

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
  memory        M + sum bytes * n[P] + sum kept * n + e (rows - table) <= budget - fixed
                (kept: a decoder's KV group's cache, held whatever its placement)
  floor         sum importance * x >= importance_floor       (min_buffer, min_memory)
A relaxation (`Relaxation`, for row generation) keeps only some latency rows, each a path
through the recurrence written on the counts (no I, C columns), and merges the layers its
rows treat alike into one block, whose classes span them; a block's count row asks
min_shards_per_layer per layer. The search over the program (elasticplan.solvers.
aggregated.search) grows a relaxation by the rows its plans miss, rounds an LP solution
down to a plan and fills it greedily.
The cost coefficients come from elasticplan.costmodel, the one cost model; the matrix
is built with numpy (no per-term Python objects), so an 80-layer x 64-shard x 8-bit
model builds in tens of milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
    simulate,
)
from elasticplan.decoding import timed_schedules
from elasticplan.problem.question import Objective, window_binds, window_span
from elasticplan.problem.spec import Scenario, with_table_rows
from elasticplan.solvers.margins import EXACT, Margins

STREAMED, PRELOADED = 0, 1
EITHER = 2  # u's third column: members at >= b bits, streamed or preloaded


@dataclass(frozen=True)
class CostClass:
    """Shards of one block of layers with identical costs at every bitwidth."""

    block: int
    layers: tuple[int, ...]  # per member, its layer
    members: tuple[int, ...]  # per member, its shard index in that layer
    read_ms: np.ndarray  # [B] a member's reads at each bitwidth, as the recurrence charges them
    compute_ms: np.ndarray  # [B, 2] a member's compute, streamed and preloaded (costmodel)
    bytes: np.ndarray  # [B] int64
    importance: np.ndarray  # [members, B]
    kept_bytes: int = 0  # a member's Shard.kept_bytes (a decoder's KV group: its cache)
    ring_bytes: np.ndarray | None = None  # [B] int64, what a streamed member holds of the
    # IO ring (Shard.ring_bytes: two pieces of a table read in pieces); None: its bytes

    @property
    def streamed_bytes(self) -> np.ndarray:
        return self.bytes if self.ring_bytes is None else self.ring_bytes


def per_layer(scenario: Scenario) -> list[tuple[int, ...]]:
    return [(li,) for li in range(len(scenario.model.layers))]


def cost_classes(scenario: Scenario, blocks: list[tuple[int, ...]] | None = None
                 ) -> list[list[CostClass]]:
    """Per block of layers (default: each layer its own), its shards grouped by
    (flops, bytes, kept bytes, and their flops in every timed pass), in order of first
    member. A timed pass with embedding rows reads them as the last layer's part (a
    decoder's table) stores them, so that part is a class of its own."""
    device, model = scenario.device, scenario.model
    B = len(model.bitwidths)
    beside = reads_beside(PIPELINED, scenario.prefetch_window)
    timed = [t.model for t in scenario.timed_passes]
    own = len(model.layers) - 1 if any(m.embedding_rows for m in timed) else None
    out = []
    for gi, block in enumerate(blocks or per_layer(scenario)):
        groups: dict[tuple, list[tuple[int, int]]] = {}
        for li in block:
            for si, s in enumerate(model.layers[li].shards):
                key = (s.flops, s.bytes, s.kept_bytes, s.pieces, s.rows,
                       tuple(m.layers[li].shards[si].flops for m in timed),
                       (li, si) if li == own else None)
                groups.setdefault(key, []).append((li, si))
        classes = []
        for members in groups.values():
            rep = model.layers[members[0][0]].shards[members[0][1]]
            classes.append(CostClass(
                block=gi, layers=tuple(li for li, _ in members),
                members=tuple(si for _, si in members),
                read_ms=np.array([charged_read_ms(device, model, rep, b, beside)
                                  for b in range(B)]),
                compute_ms=np.array([[charged_compute_ms(device, model, rep, b, True, beside),
                                      charged_compute_ms(device, model, rep, b)]
                                     for b in range(B)]),
                bytes=np.array(rep.bytes, dtype=np.int64),
                importance=np.array([model.layers[li].shards[si].importance
                                     for li, si in members]),
                kept_bytes=rep.kept_bytes,
                ring_bytes=None if rep.pieces == 1 else
                np.array([rep.ring_bytes(b) for b in range(B)], dtype=np.int64)))
        out.append(classes)
    return out


def class_compute(device, model, c: CostClass, beside: bool = True) -> np.ndarray:
    """A class member's compute [B, 2] (STREAMED, PRELOADED) priced on `model` (a timed
    pass's, whose layers and shards are the class's model's); its members must cost alike."""
    shards = [model.layers[li].shards[si] for li, si in zip(c.layers, c.members)]
    if len({s.flops for s in shards}) != 1:
        raise ValueError("a cost class's members cost differently in a timed pass")
    return np.array([[charged_compute_ms(device, model, shards[0], b, True, beside),
                      charged_compute_ms(device, model, shards[0], b)]
                     for b in range(len(model.bitwidths))])


@dataclass(frozen=True)
class Relaxation:
    """The rows a relaxed program keeps. A latency row is a path through the schedule's
    recurrence (elasticplan.costmodel.critical_path): per layer, 1 if the path takes its
    reads, 2 its compute, 3 both; the path's sum, with the embedding rows' read, is at
    most the latency of any plan, so `sum <= target` holds for every feasible plan. The
    unrolled rows of an unbounded window are the paths "reads of 0..l, compute of l..L-1".
    `alone` are the layers kept out of any block (a layer short of min_shards_per_layer).
    `timed` are the paths kept for each of the scenario's timed passes (a decoder's prompt
    pass: Scenario.timed_passes, in order), whose sums are that pass's latency and bound
    by its target."""

    paths: frozenset[tuple[int, ...]]
    alone: frozenset[int] = frozenset()
    timed: tuple[frozenset[tuple[int, ...]], ...] = ()

    def blocks(self, num_layers: int) -> list[tuple[int, ...]]:
        """Layers that every kept row (of every pass) treats alike, as blocks (in order of
        first layer); a block need not be contiguous."""
        paths = sorted(self.paths) + [p for kept in self.timed for p in sorted(kept)]
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
    3.9 s, against the whole program's 0.45 s). A timed pass (a decoder's time to first
    token) keeps paths of its own (Relaxation.timed)."""
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
    first = frozenset({tuple([1] * (L - 1) + [3]), tuple([3] + [2] * (L - 1))})
    return Relaxation(first, timed=tuple(first for _ in scenario.timed_passes))


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
    # the timed passes' I and C columns ([L] each), in Scenario.timed_passes' order
    pass_cols: tuple[tuple[np.ndarray, np.ndarray], ...] = ()
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
        if self.relaxation is None:  # the time columns (one block per layer), every pass
            timed = timed_schedules(self.scenario, selection, layout)
            for (io_col, comp_col), sched in zip(((self.io_col, self.comp_col),
                                                  *self.pass_cols), [schedule, *timed]):
                v[io_col] = [t.io_end_ms for t in sched.layers]
                if self.chained:
                    v[comp_col] = [t.compute_end_ms for t in sched.layers]
                else:
                    work = np.array([t.compute_end_ms - t.compute_start_ms
                                     for t in sched.layers])
                    v[comp_col] = np.cumsum(work[::-1])[::-1]
        if self.e_col is not None:
            v[self.e_col] = float(layout.stream_embeddings)
        if self.m_col is not None:
            v[self.m_col] = schedule.memory.working_peak_bytes - self.scenario.model.scratch_bytes
        if self.z_col is not None:
            v[self.z_col] = schedule.latency_ms
        return v


def class_picks(c: CostClass, chosen: np.ndarray, counts: np.ndarray
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


def build(scenario: Scenario, margins: Margins = EXACT,
          relaxation: Relaxation | None = None) -> MatrixProgram:
    """Data, variables, constraints, objective. Latency rows are tightened by
    `margins` (elasticplan.solvers.margins) for floating-point backends.

    With a `relaxation` (for a `relaxable` scenario), only its rows are kept: its paths
    as latency rows written on the counts (no time columns), its arena windows, and one
    count row per block. Layers that every kept row treats alike merge into one block,
    whose shards of equal cost form one class: near-ties between layers, which keep a
    branch and bound from closing, are gone. Its bound holds for the whole program; its
    plan holds for the scenario if `grow` (elasticplan.solvers.aggregated.search) finds no
    row it misses."""
    if relaxation is not None and not relaxable(scenario):
        raise ValueError(f"scenario {scenario.name!r} cannot be relaxed (program.relaxable)")
    m = _Matrix(scenario, margins, relaxation)
    m.variables()
    for gi in range(len(m.classes)):
        m.class_rows(gi)
        if m.timed:
            m.time_rows(gi)
    m.path_rows()
    m.budget_rows()
    return m.program()


class _Matrix:
    """The program as it is built: columns and rows appended in order, in coordinate form
    (the order is the program's: a solver's answer may depend on it). `build` calls the
    sections in turn; each writes the rows its comment names (the module docstring)."""

    def __init__(self, scenario: Scenario, margins: Margins, relaxation: Relaxation | None):
        self.scenario, self.margins, self.relaxation = scenario, margins, relaxation
        self.device, self.model = scenario.device, scenario.model
        self.L, self.B = len(self.model.layers), len(self.model.bitwidths)
        self.blocks = relaxation.blocks(self.L) if relaxation is not None else None
        self.layers_of = self.blocks or per_layer(scenario)
        self.classes = cost_classes(scenario, self.blocks)
        self.skippable = scenario.min_shards_per_layer == 0
        self.window = scenario.prefetch_window
        self.timed = relaxation is None  # the whole program: time columns I, C per layer
        self.chained = self.timed and window_binds(self.window, self.L)
        self.t_emb = embedding_read_ms(self.device, self.model)
        # every latency row's T
        self.limit = margins.latency_rhs(scenario.target_latency_ms) - self.device.pool_ms
        # The bounded passes: the scenario's model, then its timed passes (a decoder's
        # prompt pass), each (model, its latency rows' bound); per pass, block and class,
        # a member's compute [B, 2] (the classes are the model's: a timed pass's model has
        # its layers, shards and bitwidths, and members of a class cost alike in it too).
        self.passes = [(self.model, self.limit)] + [
            (t.model, margins.latency_rhs(t.target_ms) - self.device.pool_ms)
            for t in scenario.timed_passes]
        self.pass_compute = [[[c.compute_ms for c in cl] for cl in self.classes]] + [
            [[class_compute(self.device, m, c, reads_beside(PIPELINED, self.window))
              for c in cl] for cl in self.classes]
            for m, _ in self.passes[1:]]
        self.lower, self.upper, self.integer = [], [], []
        self.r_idx, self.c_idx, self.vals, self.r_lo, self.r_hi = [], [], [], [], []

    def columns(self, count, lo, hi, is_int) -> np.ndarray:
        start = len(self.lower)
        self.lower.extend(np.broadcast_to(lo, count).tolist())
        self.upper.extend(np.broadcast_to(hi, count).tolist())
        self.integer.extend([is_int] * count)
        return np.arange(start, start + count)

    def rows(self, cols: np.ndarray, coefs, lo, hi) -> None:
        """Rows given as a [rows, k] block of columns and coefficients."""
        cols = np.atleast_2d(cols)
        coefs = np.broadcast_to(coefs, cols.shape)
        first = len(self.r_lo)
        self.r_idx.append(first + np.repeat(np.arange(cols.shape[0]), cols.shape[1]))
        self.c_idx.append(cols.reshape(-1))
        self.vals.append(np.asarray(coefs, dtype=float).reshape(-1))
        self.r_lo.extend(np.broadcast_to(lo, cols.shape[0]).tolist())
        self.r_hi.extend(np.broadcast_to(hi, cols.shape[0]).tolist())

    # --- variables ---------------------------------------------------------------------

    def variables(self) -> None:
        sc, B, columns = self.scenario, self.B, self.columns
        budget = sc.preload_budget_bytes
        self.n_col, self.u_col, self.x_col = [], [], []
        for classes_l in self.classes:
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
            self.n_col.append(n_l)
            self.u_col.append(u_l)
            self.x_col.append(x_l)
        G = len(self.classes)
        self.y_col = columns(self.L, 0.0, 1.0, True) if self.skippable else None
        self.io_cols, self.comp_cols = [], []
        for _ in self.passes:  # I and C per bounded pass (the scenario's model first)
            self.io_cols.append(columns(G if self.timed else 0, 0.0, np.inf, False))
            self.comp_cols.append(columns(G if self.timed else 0, 0.0, np.inf, False))
        self.io_col, self.comp_col = self.io_cols[0], self.comp_cols[0]
        self.z_col = int(columns(1, 0.0, np.inf, False)[0]) \
            if sc.objective == Objective.MIN_LATENCY else None
        self.e_col = int(columns(1, 0.0, 1.0, True)[0]) \
            if sc.memory_bounded and self.model.embedding_rows else None
        self.m_col = int(columns(1, 0.0, np.inf, False)[0]) if sc.memory_bounded else None

    # --- constraints -------------------------------------------------------------------

    def class_rows(self, li: int) -> None:
        """Block li's classes (at_least, either, pick, link; in_layer when skippable) and
        its count row (nonempty when skippable)."""
        B, add_rows, inf = self.B, self.rows, np.inf
        ns = [n.reshape(-1) for n in self.n_col[li]]
        for ci, c in enumerate(self.classes[li]):
            n, u, x = self.n_col[li][ci], self.u_col[li][ci], self.x_col[li][ci]
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
            if self.skippable:
                # in_layer[c]: sum n[c] - |c| y[l] <= 0
                add_rows(np.append(n.reshape(-1), self.y_col[li]),
                         np.append(np.ones(n.size), -len(c.members)), -inf, 0.0)
        all_n = np.concatenate(ns)
        need = self.scenario.min_shards_per_layer
        if self.skippable:
            # nonempty[l]: sum n[l] - y[l] >= 0
            add_rows(np.append(all_n, self.y_col[li]), np.append(np.ones(all_n.size), -1.0),
                     0.0, inf)
        elif need > 0:
            # count[g]: sum n[g] >= min_shards_per_layer x (layers in block g)
            add_rows(all_n, 1.0, float(need * len(self.layers_of[li])), inf)

    def time_rows(self, li: int) -> None:
        """Layer li's time rows (the whole program: a block is a layer), for every bounded
        pass: its io row, then the recurrence's edges under a binding window, else its
        compute and latency rows."""
        for k in range(len(self.passes)):
            self._pass_time_rows(li, k)

    def _start(self, k: int) -> tuple[list, list]:
        """Pass k's reads before its first layer, as (columns, coefficients): the query's
        embedding rows when e (pass 0); a timed pass's rows when the table, the last
        layer's one part, is streamed (elasticplan.problem.spec.TimedPass)."""
        if not k:
            return ([self.e_col], [self.t_emb]) if self.e_col is not None else ([], [])
        model = self.passes[k][0]
        if not model.embedding_rows:
            return [], []
        # the table, the last layer's one part (a class of its own, cost_classes): rows
        # read as its bitwidth stores them
        (gi,) = [gi for gi, block in enumerate(self.layers_of) if self.L - 1 in block]
        (n,) = [n for n, c in zip(self.n_col[gi], self.classes[gi]) if self.L - 1 in c.layers]
        return list(n[:, STREAMED]), [embedding_read_ms(self.device, with_table_rows(model, b))
                                      for b in range(self.B)]

    def _pass_time_rows(self, li: int, k: int) -> None:
        device, classes_l, add_rows, inf = self.device, self.classes[li], self.rows, np.inf
        io_col, comp_col = self.io_cols[k], self.comp_cols[k]
        y_col, chained, window = self.y_col, self.chained, self.window
        overhead = device.layer_overhead_ms
        all_n = np.concatenate([n.reshape(-1) for n in self.n_col[li]])
        # io[l]: I[l] - I[l-1] - sum read_ms n[S] = 0   (I[-1]: the reads before layer 0)
        streamed = np.concatenate([n[:, STREAMED] for n in self.n_col[li]])
        reads = np.concatenate([c.read_ms for c in classes_l])
        start_cols, start_coefs = self._start(k)
        before = ([io_col[li - 1]], [-1.0]) if li else (start_cols, [-c for c in start_coefs])
        cols = [io_col[li], *streamed, *before[0]]
        coefs = [1.0, *(-reads), *before[1]]
        add_rows(np.array(cols), np.array(coefs), 0.0, np.inf if chained else 0.0)
        comp = np.concatenate([c.reshape(-1) for c in self.pass_compute[k][li]])
        fixed = 0.0 if self.skippable else overhead
        work_cols, work_coefs = list(all_n), list(-comp)
        if self.skippable:
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
                # order[0]: C[0] - start - c[0] >= overhead + embed_ms (the embedding first)
                add_rows(np.array([comp_col[0], *work_cols, *start_cols]),
                         np.array([1.0, *work_coefs, *(-np.array(start_coefs))]),
                         fixed + device.embed_ms, inf)
            return
        self._unrolled_rows(li, k, work_cols, work_coefs, fixed)

    def _unrolled_rows(self, li: int, k: int, work_cols: list, work_coefs: list,
                       fixed: float) -> None:
        """Layer li's compute row and its unrolled latency row (and the embedding's, after
        layer 0), for an unbounded window, in pass k (the internal min_latency's Z bounds
        pass 0; a timed pass keeps its target)."""
        device, add_rows, inf, L = self.device, self.rows, np.inf, self.L
        io_col, comp_col = self.io_cols[k], self.comp_cols[k]
        z_col = self.z_col if not k else None
        limit = self.passes[k][1]
        start_cols, start_coefs = self._start(k)
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
            # latency[embed]: C[0] + start <= T - embed_ms  (Z - ... >= embed_ms + pool_ms)
            cols = [comp_col[0], *start_cols]
            coefs = [1.0, *start_coefs]
            if z_col is None:
                add_rows(np.array(cols), np.array(coefs), -inf, limit - device.embed_ms)
            else:
                add_rows(np.array([z_col, *cols]), np.array([1.0, *(-np.array(coefs))]),
                         device.embed_ms + device.pool_ms, inf)

    def path_rows(self) -> None:
        """A relaxation's latency rows, one per path of each pass, written on the counts;
        and the binding window's last row, C[L-1] <= T."""
        device, add_rows, inf = self.device, self.rows, np.inf
        z_col = self.z_col
        relaxation = self.relaxation
        kept = () if relaxation is None else (relaxation.paths, *relaxation.timed)
        for k, paths in enumerate(kept):
            limit = self.passes[k][1]
            start_cols, start_coefs = self._start(k)
            for path in sorted(paths):
                self._path_row(k, path, limit, start_cols, start_coefs)
        if self.chained:
            for k, (_, pass_limit) in enumerate(self.passes):
                last = self.comp_cols[k][self.L - 1]
                # latency: C[L-1] <= T  (min_latency, pass 0: Z - C[L-1] >= pool_ms)
                if z_col is None or k:
                    add_rows(np.array([last]), 1.0, -inf, pass_limit)
                else:
                    add_rows(np.array([z_col, last]), np.array([1.0, -1.0]), device.pool_ms,
                             inf)

    def _path_row(self, k: int, path: tuple[int, ...], limit: float, start_cols: list,
                  start_coefs: list) -> None:
        # path[p]: the pass's start reads (e t_emb; a timed pass's table rows) + sum over
        # the path's reads and compute (+ overheads, + embed_ms when it starts at the
        # embedding) <= T  (min_latency, pass 0: Z - the same >= its constant)
        device, add_rows, inf, B = self.device, self.rows, np.inf, self.B
        z_col = self.z_col if not k else None
        overhead = device.layer_overhead_ms
        cols, coefs = [], []
        fixed = (0.0 if path[0] & 1 else device.embed_ms) + \
            device.wake_ms * sum(m == 3 for m in path)
        for gi, block in enumerate(self.layers_of):
            mark = path[block[0]]  # alike for every layer of a block
            if mark & 2:
                fixed += overhead * len(block)
            for ci, c in enumerate(self.classes[gi]):
                coef = np.zeros((B, 2))
                if mark & 1:
                    coef[:, STREAMED] += c.read_ms
                if mark & 2:
                    coef += self.pass_compute[k][gi][ci]
                cols.append(self.n_col[gi][ci].reshape(-1))
                coefs.append(coef.reshape(-1))
        cols.append(np.asarray(start_cols, dtype=np.int64))
        coefs.append(np.asarray(start_coefs, dtype=float))
        cols, where = np.unique(np.concatenate(cols), return_inverse=True)
        coefs = np.bincount(where, weights=np.concatenate(coefs))  # the table's read twice
        if z_col is None:
            add_rows(cols, coefs, -inf, limit - fixed)
        else:
            add_rows(np.append(z_col, cols), np.append(1.0, -coefs), fixed + device.pool_ms, inf)

    def budget_rows(self) -> None:
        """The buffer row; with memory bounded, the arena's windows and the memory row; the
        importance floor. Keeps what the objective needs."""
        sc, add_rows, inf, L = self.scenario, self.rows, np.inf, self.L
        classes, n_col, m_col, e_col = self.classes, self.n_col, self.m_col, self.e_col
        self.pre_cols = np.concatenate([n[:, PRELOADED] for nl in n_col for n in nl])
        self.pre_bytes = np.concatenate([c.bytes for cl in classes for c in cl]).astype(float)
        self.all_x = np.concatenate([x.reshape(-1) for xl in self.x_col for x in xl])
        self.all_imp = np.concatenate([c.importance.reshape(-1) for cl in classes for c in cl])
        # buffer: sum bytes n[P] <= budget
        add_rows(self.pre_cols, self.pre_bytes, -inf, float(sc.preload_budget_bytes))
        self.fixed_memory = 0.0
        self.mem_cols = self.mem_coefs = None
        if m_col is not None:
            # window_bytes[l]: M - sum bytes n[S] over layers l..l+W >= 0
            # (a relaxation's window holds every layer: it is kept whole, over its blocks)
            span = window_span(self.window, L)
            block_cols = [np.concatenate([n[:, STREAMED] for n in n_col[gi]])
                          for gi in range(len(classes))]
            block_bytes = [np.concatenate([c.streamed_bytes for c in cl]).astype(float)
                           for cl in classes]
            for k in range(L - span + 1):
                inside = [gi for gi, block in enumerate(self.layers_of) if k <= block[0] < k + span]
                add_rows(np.concatenate([[m_col], *(block_cols[gi] for gi in inside)]),
                         np.concatenate([[1.0], *(-block_bytes[gi] for gi in inside)]), 0.0, inf)
            # memory: M + sum bytes n[P] + kept n + e (rows - table) <= budget - fixed terms
            fixed, stream_delta = memory_constants(self.model)
            # + kept bytes on either placement (a decoder's KV groups hold their cache)
            kept = [(n.reshape(-1), np.full(n.size, float(c.kept_bytes)))
                    for nl, cl in zip(n_col, classes) for n, c in zip(nl, cl) if c.kept_bytes]
            self.mem_cols = np.concatenate([[m_col], self.pre_cols] + [k[0] for k in kept]
                                           + ([[e_col]] if e_col is not None else []))
            self.mem_coefs = np.concatenate([[1.0], self.pre_bytes] + [k[1] for k in kept] + (
                [[float(stream_delta)]] if e_col is not None else []))
            if kept:  # n[P] has both its bytes and its kept bytes: one entry per column
                self.mem_cols, where = np.unique(self.mem_cols, return_inverse=True)
                self.mem_coefs = np.bincount(where, weights=self.mem_coefs)
            self.fixed_memory = float(fixed)
            if sc.memory_budget_bytes is not None:
                add_rows(self.mem_cols, self.mem_coefs, -inf,
                         sc.memory_budget_bytes - self.fixed_memory)
        if sc.importance_floor is not None:
            # floor: sum importance x >= importance_floor
            add_rows(self.all_x, self.all_imp * self.margins.importance_scale,
                     self.margins.floor_rhs(sc.importance_floor), inf)

    # --- objective and the program -----------------------------------------------------

    def program(self) -> MatrixProgram:
        sc = self.scenario
        importance_scale = self.margins.importance_scale
        cost = np.zeros(len(self.lower))
        if sc.objective == Objective.MAX_IMPORTANCE:
            cost[self.all_x] = self.all_imp * importance_scale
            maximize, scale = True, importance_scale
        elif sc.objective == Objective.MIN_BUFFER:
            cost[self.pre_cols] = self.pre_bytes
            maximize, scale = False, 1.0
        elif sc.objective == Objective.MIN_MEMORY:
            cost[self.mem_cols] = self.mem_coefs
            maximize, scale = False, 1.0
        else:
            cost[self.z_col] = 1.0
            maximize, scale = False, 1.0
        return MatrixProgram(
            scenario=sc, classes=self.classes,
            col_lower=np.array(self.lower), col_upper=np.array(self.upper),
            col_integer=np.array(self.integer, dtype=bool), cost=cost, maximize=maximize,
            row_lower=np.array(self.r_lo), row_upper=np.array(self.r_hi),
            a_rows=np.concatenate(self.r_idx).astype(np.int64),
            a_cols=np.concatenate(self.c_idx).astype(np.int64),
            a_vals=np.concatenate(self.vals), n_col=self.n_col, u_col=self.u_col,
            x_col=self.x_col, y_col=self.y_col, io_col=self.io_col, comp_col=self.comp_col,
            z_col=self.z_col, objective_scale=scale, chained=self.chained, e_col=self.e_col,
            m_col=self.m_col,
            objective_offset=self.fixed_memory if sc.objective == Objective.MIN_MEMORY else 0.0,
            blocks=self.blocks, relaxation=self.relaxation,
            pass_cols=tuple(zip(self.io_cols[1:], self.comp_cols[1:])))
