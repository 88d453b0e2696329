"""The search over the aggregated program (elasticplan.solvers.aggregated.program), solver-
neutral: row generation (`grow`: the rows a relaxed program's plan misses; docs/programs.md,
"Row generation"), rounding an LP solution down to a plan (`round_down`) and improving a
plan greedily (`fill`). Every check here is the cost model's (elasticplan.costmodel)."""

from __future__ import annotations

import numpy as np

from elasticplan.costmodel import (
    PIPELINED,
    Layout,
    Pick,
    Schedule,
    Selection,
    charged_compute_ms,
    charged_read_ms,
    critical_path,
    embedding_read_ms,
    path_ms,
    reads_beside,
    simulate,
)
from elasticplan.decoding import timed_ok, timed_schedules
from elasticplan.problem.question import Objective
from elasticplan.problem.spec import Scenario, with_table_rows
from elasticplan.solvers.aggregated.program import (
    PRELOADED,
    STREAMED,
    MatrixProgram,
    Relaxation,
    class_picks,
    relaxable,
)
from elasticplan.solvers.margins import EXACT, Margins


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
                    (budget is None or s.memory.peak_bytes <= budget) and \
                    timed_ok(sc, selection, layout):
                if relaxable(sc) and sc.objective == Objective.MAX_IMPORTANCE:
                    selection = fill(sc, selection, layout, margins)
                return selection, layout
    return None


def grow_by_rounding(program: MatrixProgram, values: np.ndarray,
                     margins: Margins = EXACT) -> Relaxation | None:
    """`grow` for the plan that rounds a relaxed program's LP solution down (round_down's
    first rule), or None if it misses no row. A layer that plan leaves short of
    min_shards_per_layer (a block's count row asks its layers' shards together, and the
    LP may take them all from some of its layers) gets a block of its own, as from a MIP's
    plan; growing from the LP, which costs milliseconds, spares the MIPs of the rounds
    that would only find those layers (SmolLM2 at 32 MB: the first round's MIP, over
    three blocks, took 4 s)."""
    selection = _rounded(program, values, cumulative=True, short=True)
    return grow(program, selection, program.layout(values), margins)


def _rounded(program: MatrixProgram, values: np.ndarray, cumulative: bool,
             short: bool = False) -> Selection | None:
    """The counts rounded down (module docstring of round_down), members to bitwidths by
    their x; None if a layer is left short of min_shards_per_layer, unless `short`."""
    need = 0 if short else program.scenario.min_shards_per_layer
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
            for layer, pick in class_picks(c, chosen, counts):
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
    reads = [t.io_ready_ms - t.io_start_ms for t in schedule.layers]  # as charged
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
    timed = [set(kept) for kept in relax.timed]
    if timed and not short:  # a timed pass reads its rows as the table (a part) stores them
        for kept, t, s in zip(timed, sc.timed_passes, timed_schedules(sc, selection, layout)):
            path = _missed(s, layout, margins.latency_rhs(t.target_ms) - d.pool_ms, d)
            if path is not None:
                kept.add(path)
    grown = Relaxation(frozenset(paths), relax.alone | short,
                       tuple(frozenset(kept) for kept in timed))
    return None if grown == relax else grown


def _missed(schedule: Schedule, layout: Layout, limit: float, device) -> tuple[int, ...] | None:
    """A timed pass's critical path if it runs past `limit` (its target less pool_ms)."""
    reads = [t.io_ready_ms - t.io_start_ms for t in schedule.layers]  # as charged
    work = [t.compute_end_ms - t.compute_start_ms for t in schedule.layers]
    start = schedule.layers[0].io_start_ms  # its rows' read (the channel starts there)
    path = critical_path(schedule.layers, layout.window, start, device.embed_ms, device.wake_ms)
    total = path_ms(path, reads, work, start, device.embed_ms, device.wake_ms)
    return path if total > limit + 1e-9 else None


def fill(scenario: Scenario, selection: Selection, layout: Layout,
         margins: Margins = EXACT) -> Selection:
    """A feasible plan improved greedily (max importance; every layer runs and the window
    does not bind, so the latency rows are the unrolled ones and each layer's overhead is
    a constant): while some shard can move to an option of more importance (another
    bitwidth, streamed or preloaded, or run at all) with every latency row of every pass
    (the scenario's and its timed passes'), the buffer and the memory budget still met,
    the move that gains the most is made. Vectorised over every shard and option; a move
    changes row l by its read time if l >= its layer and by its compute if l <= its
    layer, and a timed pass's every row by its start (its rows' read, when the move is the
    table's and the pass has embedding rows)."""
    device, model = scenario.device, scenario.model
    B = len(model.bitwidths)
    shards = [(li, si, s) for li, layer in enumerate(model.layers)
              for si, s in enumerate(layer.shards)]
    N, O = len(shards), 2 * B + 1  # option 0: dropped; 1 + 2b + p: bitwidth b, placement p
    beside = reads_beside(PIPELINED, layout.window)
    read = np.zeros((N, O))
    pre = np.zeros((N, O))
    stream = np.zeros((N, O))
    kept = np.zeros((N, O))  # a decoder's KV group holds its cache at any option but dropped
    imp = np.zeros((N, O))
    for n, (li, si, s) in enumerate(shards):
        for b in range(B):
            o = 1 + 2 * b
            imp[n, o:o + 2] = s.importance[b]
            read[n, o + STREAMED] = charged_read_ms(device, model, s, b, beside)
            stream[n, o + STREAMED] = s.ring_bytes(b)
            pre[n, o + PRELOADED] = s.bytes[b]
            kept[n, o:o + 2] = s.kept_bytes
    layer_of = np.array([li for li, _, _ in shards])
    index = {(li, si): n for n, (li, si, _) in enumerate(shards)}
    current = np.zeros(N, dtype=np.int64)
    for li, picks in enumerate(selection):
        for p in picks:
            current[index[(li, p.shard)]] = 1 + 2 * p.bit + (PRELOADED if p.preloaded else 0)
    schedule = simulate(scenario, selection, layout=layout)
    passes = [_FillPass.of(scenario, model, shards, schedule, scenario.target_latency_ms,
                           embedding_read_ms(device, model) if layout.stream_embeddings
                           else 0.0, margins)]
    for t, s in zip(scenario.timed_passes, timed_schedules(scenario, selection, layout)):
        passes.append(_FillPass.of(scenario, t.model, shards, s, t.target_ms,
                                   s.layers[0].io_start_ms, margins))
    preload, peak = float(schedule.preload_bytes), float(schedule.memory.peak_bytes)
    budget = scenario.memory_budget_bytes
    members = np.arange(N)
    while True:
        d_read = read - read[members, current][:, None]
        d_pre = pre - pre[members, current][:, None]
        d_stream = stream - stream[members, current][:, None]
        d_kept = kept - kept[members, current][:, None]
        gain = imp - imp[members, current][:, None]
        ok = (gain > 0) & (preload + d_pre <= scenario.preload_budget_bytes)
        if budget is not None:  # the arena holds every streamed byte (unbounded window)
            ok &= peak + d_pre + d_stream + d_kept <= budget
        for f in passes:
            ok &= f.fits(current, d_read, layer_of)
        if not ok.any():
            break
        n, o = np.unravel_index(np.argmax(np.where(ok, gain, -np.inf)), ok.shape)
        for f in passes:
            f.move(current, n, o, d_read[n, o], layer_of[n])
        preload += d_pre[n, o]
        peak += d_pre[n, o] + d_stream[n, o] + d_kept[n, o]
        current[n] = o
    layers: list[list[Pick]] = [[] for _ in model.layers]
    for n, (li, si, _) in enumerate(shards):
        if current[n]:
            b, p = divmod(int(current[n]) - 1, 2)
            layers[li].append(Pick(si, b, p == PRELOADED))
    return tuple(tuple(picks) for picks in layers)


class _FillPass:
    """One pass's unrolled latency rows in `fill`: per layer l, the end of its reads plus
    the compute of layers l..L-1 (+ wake_ms), and the embedding's row (the pass's start,
    embed_ms, every layer's compute), each <= the pass's target less pool_ms; a shard's
    compute per option in this pass's model; the pass's start per option (nonzero only for
    a timed pass's table: its rows' read when it is streamed)."""

    def __init__(self, comp, start, rows, embed_row, limit):
        self.comp, self.start, self.rows, self.embed_row, self.limit = \
            comp, start, rows, embed_row, limit

    @staticmethod
    def of(scenario: Scenario, model, shards, schedule: Schedule, target_ms: float,
           start_ms: float, margins: Margins) -> "_FillPass":
        device = scenario.device
        N, B = len(shards), len(model.bitwidths)
        comp = np.zeros((N, 2 * B + 1))
        start = np.zeros((N, 2 * B + 1))
        head = len(model.layers) - 1
        beside = reads_beside(PIPELINED, scenario.prefetch_window)
        for n, (li, si, _) in enumerate(shards):
            s = model.layers[li].shards[si]
            for b in range(B):
                o = 1 + 2 * b
                comp[n, o + STREAMED] = charged_compute_ms(device, model, s, b, True, beside)
                comp[n, o + PRELOADED] = charged_compute_ms(device, model, s, b)
                if model is not scenario.model and li == head and model.embedding_rows:
                    start[n, o + STREAMED] = embedding_read_ms(device, with_table_rows(model, b))
        rows = np.array(row_values(schedule)) + device.wake_ms  # each waits for its reads once
        # the embedding's row: the compute thread's start, then every layer's compute
        embed_row = start_ms + device.embed_ms + \
            sum(t.compute_end_ms - t.compute_start_ms for t in schedule.layers)
        limit = margins.latency_rhs(target_ms) - device.pool_ms
        return _FillPass(comp, start, rows, embed_row, limit)

    def fits(self, current: np.ndarray, d_read: np.ndarray, layer_of: np.ndarray) -> np.ndarray:
        members = np.arange(len(current))
        d_comp = self.comp - self.comp[members, current][:, None]
        d_start = self.start - self.start[members, current][:, None]
        rows, limit = self.rows, self.limit
        before = np.concatenate([[-np.inf], np.maximum.accumulate(rows)[:-1]])[layer_of]
        after = np.concatenate([np.maximum.accumulate(rows[::-1])[::-1][1:], [-np.inf]])[layer_of]
        return (before[:, None] + d_comp + d_start <= limit) & \
            (rows[layer_of][:, None] + d_read + d_comp + d_start <= limit) & \
            (after[:, None] + d_read + d_start <= limit) & \
            (self.embed_row + d_comp + d_start <= limit)

    def move(self, current: np.ndarray, n: int, o: int, d_read: float, j: int) -> None:
        d_comp = self.comp[n, o] - self.comp[n, current[n]]
        d_start = self.start[n, o] - self.start[n, current[n]]
        self.rows[j:] += d_read
        self.rows[:j + 1] += d_comp
        self.rows += d_start
        self.embed_row += d_comp + d_start


def row_values(schedule: Schedule) -> list[float]:
    """Per layer l, the unrolled latency row l of a schedule: the end of layer l's reads
    plus the compute of layers l..L-1 (the latency, under an unbounded window, is their
    max)."""
    work = [t.compute_end_ms - t.compute_start_ms for t in schedule.layers]
    after = np.cumsum(work[::-1])[::-1]
    return [t.io_ready_ms + float(c) for t, c in zip(schedule.layers, after)]
