"""STI's own planner (Guo et al., ASPLOS 2023), the baseline every comparison runs beside.

1. Compute plan: the largest uniform submodel -- the first n layers, each keeping its m
   most important shards (importance at full precision) -- whose compute fits the
   target, on STI's premise that bitwidth barely changes compute (so it is costed at
   full precision, without dequantisation).
2. IO plan: one uniform base bitwidth for every shard, the highest for which the
   accumulated IO budget never goes negative. AIB[l] = (T - compute of layers l..L-1)
   - end of layer l's reads: the IO time that earlier layers' compute has freed. The
   preload buffer takes the first layers' shards (layer order, most important first)
   at the base bitwidth while they fit.
3. Upgrades: leftover budget is spent raising the most important shards to the highest
   bitwidth that keeps every AIB >= 0 (and a preloaded shard inside the buffer).

Where the paper leaves a gap, this reading fills it so:
- "largest" = most shards n*m; ties go to more layers. With min_shards_per_layer >= 1
  every layer must run, so n = L; with 0, depth may be trimmed (the last layers go).
- m may not exceed any kept layer's shard count; shard kinds (heads, FFN slices) are
  ranked together by importance.
- Our cost model charges dequantisation, which STI's premise ignores: if no base
  bitwidth keeps AIB >= 0 for (n, m), the next smaller submodel is tried.
- The buffer is filled as a prefix: it stops at the first shard that does not fit.
AIB >= 0 at every layer is exactly "latency <= T" under the cost model with an unbounded
window, since latency = max over l of (end of layer l's reads + compute of layers l..L-1);
with a prefetch window, or streamed embeddings, feasibility is the cost model's own
schedule (elasticplan.costmodel.pipeline). STI has no memory model: with a memory budget
every step also keeps the predicted peak within it, the table resident if a plan fits
so, else streamed; it does not minimise memory (min_memory needs an exact solver).
"""

from __future__ import annotations

import time

from elasticplan.costmodel import (
    PIPELINED,
    Layout,
    Pick,
    Selection,
    charged_compute_ms,
    charged_read_ms,
    embedding_read_ms,
    memory_of,
    pipeline,
    reads_beside,
)
from elasticplan.decoding import timed_ok
from elasticplan.errors import InvalidArgument, NoPlanFoundError, SolverTimeoutError
from elasticplan.plans.plan import Plan, SolveStatus
from elasticplan.problem.question import Objective
from elasticplan.problem.spec import Scenario

NAME = "greedy"


class _Pipeline:
    """Per-layer IO and compute sums of a selection, for O(L) feasibility checks."""

    def __init__(self, scenario: Scenario, picks: list[list[Pick]], layout: Layout):
        self.sc, self.picks, self.layout = scenario, picks, layout
        d, m = scenario.device, scenario.model
        self.beside = beside = reads_beside(PIPELINED, layout.window)
        # per layer: its bytes in the IO ring, its reads as the recurrence charges them
        self.streamed = [sum(m.layers[li].shards[p.shard].ring_bytes(p.bit) for p in ps
                             if not p.preloaded) for li, ps in enumerate(picks)]
        self.start = embedding_read_ms(d, m) if layout.stream_embeddings else 0.0
        self.io = [sum(charged_read_ms(d, m, m.layers[li].shards[p.shard], p.bit, beside)
                       for p in ps if not p.preloaded) for li, ps in enumerate(picks)]
        self.comp = [(d.layer_overhead_ms if ps else 0.0)
                     + sum(charged_compute_ms(d, m, m.layers[li].shards[p.shard], p.bit,
                                            not p.preloaded, beside) for p in ps)
                     for li, ps in enumerate(picks)]
        self.buffer = sum(m.layers[li].shards[p.shard].bytes[p.bit]
                          for li, ps in enumerate(picks) for p in ps if p.preloaded)
        # what the kept shards hold wherever they live (a decoder's KV cache): upgrades keep it
        self.kept = sum(m.layers[li].shards[p.shard].kept_bytes
                        for li, ps in enumerate(picks) for p in ps)

    def ok(self) -> bool:
        budget = self.sc.memory_budget_bytes
        if budget is not None and \
                memory_of(self.sc.model, self.layout, self.buffer, self.streamed,
                          self.kept).peak_bytes > budget:
            return False
        if self.sc.timed_passes and not timed_ok(self.sc, self.selection(), self.layout):
            return False
        d = self.sc.device
        if self.layout != Layout():
            times = pipeline(self.io, self.comp, window=self.layout.window, start_ms=self.start,
                             embed_ms=d.embed_ms, wake_ms=d.wake_ms)
            return times[-1].compute_end_ms + d.pool_ms <= self.sc.target_latency_ms
        return self.aib_ok()

    def selection(self) -> Selection:
        return tuple(tuple(ps) for ps in self.picks)

    def aib_ok(self) -> bool:
        d = self.sc.device
        target = self.sc.target_latency_ms - d.pool_ms
        remaining = sum(self.comp)
        if target - remaining - d.embed_ms < -1e-12:
            return False
        reads_end = d.wake_ms  # each row waits for its layer's reads once
        for io, comp in zip(self.io, self.comp):
            reads_end += io
            if target - remaining - reads_end < -1e-12:
                return False
            remaining -= comp
        return True

    def try_replace(self, li: int, k: int, new: Pick) -> bool:
        """Swap picks[li][k] for `new` if the pipeline and the buffer still hold."""
        d, m = self.sc.device, self.sc.model
        old = self.picks[li][k]
        shard = m.layers[li].shards[old.shard]

        def cost(p: Pick):
            nbytes = shard.bytes[p.bit]
            return (0.0 if p.preloaded else charged_read_ms(d, m, shard, p.bit, self.beside),
                    charged_compute_ms(d, m, shard, p.bit, not p.preloaded, self.beside),
                    nbytes if p.preloaded else 0,
                    0 if p.preloaded else shard.ring_bytes(p.bit))

        (io0, c0, b0, s0), (io1, c1, b1, s1) = cost(old), cost(new)
        if self.buffer - b0 + b1 > self.sc.preload_budget_bytes:
            return False
        self.io[li] += io1 - io0
        self.comp[li] += c1 - c0
        self.buffer += b1 - b0
        self.streamed[li] += s1 - s0
        if self.ok():
            self.picks[li][k] = new
            return True
        self.io[li] -= io1 - io0
        self.comp[li] -= c1 - c0
        self.buffer -= b1 - b0
        self.streamed[li] -= s1 - s0
        return False


def solve_greedy(scenario: Scenario, *, time_limit_s: float | None = None, threads: int = 1,
                 relative_gap: float = 0) -> Plan:
    """STI's plan. At the time limit the upgrades stop (the plan holds: each upgrade kept it
    feasible); a limit reached before any plan raises SolverTimeoutError."""
    del threads, relative_gap  # a heuristic: neither applies
    if scenario.objective == Objective.MIN_MEMORY:
        raise InvalidArgument("greedy (STI) has no memory model to minimise; use --solver "
                              "highs for objective min_memory")
    started = time.perf_counter()
    deadline = None if time_limit_s is None else started + time_limit_s
    layouts = [Layout(scenario.prefetch_window)]
    if scenario.memory_budget_mb is not None and scenario.model.embedding_rows:
        layouts.append(Layout(scenario.prefetch_window, stream_embeddings=True))
    for layout in layouts:
        selection = _plan(scenario, layout, deadline)
        if selection is not None:
            break
    if selection is None:
        raise NoPlanFoundError(
            f"greedy (STI) found no plan for target {scenario.target_latency_ms:g} ms and "
            f"buffer {scenario.preload_budget_mb:g} MB; this proves nothing: an exact solver "
            f"(--solver highs) finds a plan or explains why none exists")
    plan = Plan.from_selection(scenario, selection, solver=NAME, status=SolveStatus.FEASIBLE,
                               gap=None, solve_seconds=time.perf_counter() - started,
                               layout=layout)
    if scenario.objective == Objective.MIN_BUFFER and plan.importance < scenario.importance_floor:
        # STI plans for importance within a buffer; it has no way to size the buffer itself.
        raise NoPlanFoundError(
            f"greedy (STI) reaches importance {plan.importance:.6g} within the "
            f"{scenario.preload_budget_mb:g} MB budget, below the floor "
            f"{scenario.importance_floor:.6g}; it does not size buffers (use --solver highs)")
    return plan


def _out_of_time(deadline: float | None) -> bool:
    return deadline is not None and time.perf_counter() > deadline


def _plan(sc: Scenario, layout: Layout, deadline: float | None) -> Selection | None:
    d, m = sc.device, sc.model
    L, top = len(m.layers), len(m.bitwidths) - 1
    ranked = [sorted(range(len(layer.shards)), key=lambda s: (-layer.shards[s].importance[top], s))
              for layer in m.layers]
    depths = range(1, L + 1) if sc.min_shards_per_layer == 0 else [L]
    candidates = []
    # a decoder's table (its last pseudo-layer, one part) runs whatever the width
    body = m.layers[:-1] if m.decode_pass is not None else m.layers
    for n in depths:
        widest = min(len(layer.shards) for layer in body[:n])
        for width in range(max(1, sc.min_shards_per_layer), widest + 1):
            compute = sum(d.layer_overhead_ms + sum(
                m.layers[li].shards[s].flops for s in ranked[li][:width]) / (d.gflops * 1e6)
                for li in range(n))
            if compute <= sc.target_latency_ms:
                candidates.append((n * width, n, width))
    for _, n, width in sorted(candidates, reverse=True):
        if _out_of_time(deadline):
            raise SolverTimeoutError("greedy (STI) found no plan within the time limit (not a "
                                     "proof that none exists); raise --time-limit")
        chosen = _io_plan(sc, ranked, n, width, layout, deadline)
        if chosen is not None:
            return chosen
    return None


def _io_plan(sc: Scenario, ranked, n: int, width: int, layout: Layout,
             deadline: float | None) -> Selection | None:
    m = sc.model
    top = len(m.bitwidths) - 1
    for base in range(top, -1, -1):
        picks, buffer, full = [], 0, False
        for li in range(len(m.layers)):
            layer_picks = []
            for s in (ranked[li][:width] if li < n else []):
                nbytes = m.layers[li].shards[s].bytes[base]
                preload = not full and buffer + nbytes <= sc.preload_budget_bytes
                full = full or not preload
                buffer += nbytes if preload else 0
                layer_picks.append(Pick(s, base, preload))
            picks.append(layer_picks)
        pipe = _Pipeline(sc, picks, layout)
        if not pipe.ok():
            continue
        # Upgrades, most important shard first, each to the highest bitwidth that fits.
        order = sorted(((li, k) for li, ps in enumerate(picks) for k in range(len(ps))),
                       key=lambda lk: -m.layers[lk[0]].shards[picks[lk[0]][lk[1]].shard]
                       .importance[top])
        for li, k in order:
            if _out_of_time(deadline):
                break  # every upgrade so far kept the plan feasible
            cur = pipe.picks[li][k]
            for b in range(top, cur.bit, -1):
                if pipe.try_replace(li, k, Pick(cur.shard, b, cur.preloaded)):
                    break
        return tuple(tuple(sorted(ps, key=lambda p: p.shard)) for ps in pipe.picks)
    return None
