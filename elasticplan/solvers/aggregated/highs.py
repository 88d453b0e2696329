"""HiGHS backend on the aggregated program (elasticplan.solvers.aggregated.program): counts per cost
class as integers, the assignment of shards as continuous variables.

Data, variables, constraints and objective come from `program.build` as one sparse
matrix, passed to HiGHS in a single call; then solve, map the status by name, read back.
HiGHS works in floating point, so the latency rows are tightened by
`TIME_MARGIN_MS` and importance is scaled as for CBC (elasticplan.solvers.margins).

Threads: every HiGHS run of a solve (LP relaxation, MIP, the exact assignments that read a
solution back) gets `threads` as HiGHS's `threads` option, so `--threads 1` (the fleet's
default) keeps HiGHS on the calling thread, with no worker threads. HiGHS sizes one task
scheduler per thread of a process at its first run and refuses a later run that asks for
another size; highs_model.run remakes it when the size asked for changes (highs_model,
"Threads"). With more threads HiGHS (1.16) searches the MIP's tree with one worker per
thread (its `parallel` option is left at "choose").

Row generation (`solve_highs`): a relaxed program first, grown by the rows its plans
miss (docs/programs.md, "Row generation").

LP first, for max_importance: the LP relaxation is solved, rounded down to a feasible plan
and filled (search.round_down, search.fill); when the gap asked for is loose
(>= LP_FIRST_GAP) that plan is returned if it is within the gap of the relaxation's
bound, which is a proof. On LLM-scale models this is several times faster than the MIP's
root (measured: benchmarks/solver_speed.py). Otherwise it is the MIP's first incumbent.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import highspy
import numpy as np

from elasticplan.costmodel import Layout, Pick, Selection, simulate
from elasticplan.decoding import table_streamed
from elasticplan.errors import InfeasibleError, SolverError, SolverTimeoutError
from elasticplan.plans.plan import Plan, SolveStatus, gap_to_bound, objective_value
from elasticplan.problem.question import Objective
from elasticplan.problem.spec import Scenario, head_layer
from elasticplan.solvers.aggregated import program as aggregated
from elasticplan.solvers.aggregated import search
from elasticplan.solvers.aggregated.highs_model import loaded, new_highs, pass_model, run, solve_mip
from elasticplan.solvers.aggregated.program import (
    PRELOADED,
    STREAMED,
    MatrixProgram,
    Relaxation,
    class_picks,
)
from elasticplan.solvers.margins import float_margins

NAME = "highs"
# An objective this close to 0 is 0: below any solver's tolerance in every objective's
# unit (importance, bytes, ms).
ZERO_OBJECTIVE = 1e-9
ABS_GAP = 1e-6  # HiGHS's mip_abs_gap default: an objective this close to its bound is proven
LP_FIRST_GAP = 1e-4
# A relaxed round may use this share of the time left; the rest is kept for the whole
# program, should a round stop at its limit with a plan that misses rows.
RELAXED_SHARE = 0.75

_STOPPED = {  # stopped early: a plan (if any) is feasible, not proven
    highspy.HighsModelStatus.kTimeLimit, highspy.HighsModelStatus.kIterationLimit,
    highspy.HighsModelStatus.kSolutionLimit, highspy.HighsModelStatus.kInterrupt,
}


def build(scenario: Scenario,
          relaxation: Relaxation | None = None) -> MatrixProgram:
    """The aggregated program with the float backends' margins (elasticplan.solvers.margins)."""
    return aggregated.build(scenario, float_margins(scenario), relaxation)


def solve_highs(scenario: Scenario, *, time_limit_s: float, threads: int,
                relative_gap: float, row_generation: bool = True,
                start: tuple[Selection, Layout] | None = None) -> Plan:
    """Row generation: solve a relaxed program (program.first_relaxation: two latency
    paths; layers that its rows treat alike merge into blocks, which removes the near-ties
    between layers that keep a branch and bound from closing), then add every row its plan
    misses (search.grow) and solve again. Each round first grows from its LP's rounded
    plan (search.grow_by_rounding: the rows it misses, the layers it leaves short), so a
    MIP runs only on a relaxation whose LP plan misses nothing (SmolLM2: one MIP, not
    three). A plan that misses none is a plan of the scenario, and a relaxation's bound is
    a bound of the scenario, so its gap is proven.
    Scenarios that cannot be relaxed (program.relaxable) get the whole program at once;
    a round stopped by its share of the time (RELAXED_SHARE) hands the rest to it.
    A decoder's table is held or streamed: the two are solved apart (`_split`), each as
    above. `row_generation=False` solves the whole program from the start, unsplit (the
    solver benchmark's side-by-side baseline). Every HiGHS run gets `threads` (module
    docstring). `start`: a known plan of the scenario (its selection and layout), every
    MIP's first incumbent where the relaxation gives none (min_latency's tie-break,
    elasticplan.solvers.fastest_at, starts from the max_importance plan it improves on)."""
    started = time.perf_counter()
    deadline = started + time_limit_s
    found = _split(scenario, started=started, deadline=deadline, relative_gap=relative_gap,
                   threads=threads, start=start) if row_generation else \
        _solve_side(scenario, None, started=started, deadline=deadline,
                    relative_gap=relative_gap, threads=threads, row_generation=False,
                    start=start)
    return found.plan(scenario)


# The share of the time left that the first of a split's two sides may take (the rest is
# the second's, should it need one).
SPLIT_SHARE = 0.5
# The least share of the table the LP takes in each placement for `_split` to split.
SPLIT_AT = 1e-6


def _split(scenario: Scenario, *, started: float, deadline: float, relative_gap: float,
           threads: int, start: tuple[Selection, Layout] | None) -> "_Found":
    """A decoder's table held and streamed, solved apart. The table is one large part: the
    LP relaxation takes it partly held and partly streamed (SmolLM2 on the phone: 6 bits,
    0.76 streamed and 0.24 held, a bound 2 % above the optimum), and HiGHS's branching
    closes that gap slowly (one MIP 2.2 s); with the placement pinned the two MIPs took 0.54
    and 0.15 s. Each side's first relaxation is solved as an LP; the side with the better
    bound is solved first (row generation, `_solve_side`, in SPLIT_SHARE of the time left),
    and the other only if its bound could beat that plan by more than the gap asked for.
    The answer is the better plan; its bound is the better of the two sides' bounds (a
    skipped or stopped side's: its LP's), so its gap is proven. Scenarios without a table
    part, or whose LP keeps it in one place (`_table_split`), are solved whole."""
    program = build(scenario, aggregated.first_relaxation(scenario)) \
        if _has_table(scenario) else None
    if program is None or not _table_split(program, deadline=deadline, threads=threads):
        return _solve_side(scenario, None, started=started, deadline=deadline,
                           relative_gap=relative_gap, threads=threads, start=start)
    pins = (STREAMED, PRELOADED)
    maximize = program.maximize
    unknown = math.inf if maximize else -math.inf  # an LP infeasible or out of time
    bounds = {}
    failures: list[Exception] = []
    for pin in list(pins):
        try:
            lp = _lp(program, _model(program, pin), deadline=deadline, threads=threads,
                     strict=True)
        except InfeasibleError as e:  # the side's relaxation is: so is the side
            failures.append(e)
            pins = tuple(p for p in pins if p != pin)
            continue
        bounds[pin] = unknown if lp is None else lp[0]
    # Known bounds first, the better first; an unknown one (often an infeasible side,
    # which its MIP then proves) last.
    order = sorted(pins, key=lambda pin: (bounds[pin] == unknown,
                                          -bounds[pin] if maximize else bounds[pin]))
    found: list[_Found] = []
    proven = True
    for i, pin in enumerate(order):
        best = _best(program, found)
        if best is not None:
            gap = gap_to_bound(best.objective, bounds[pin])
            if (bounds[pin] <= best.objective) == maximize or \
                    (gap is not None and gap <= relative_gap):
                continue  # its LP bound is no better than the plan in hand, within the gap
        now = time.perf_counter()
        until = deadline if i == len(order) - 1 else now + SPLIT_SHARE * (deadline - now)
        seed = start if start is not None and \
            table_streamed(scenario, start[0]) == (pin == STREAMED) else None
        try:
            side = _solve_side(scenario, pin, started=started, deadline=until,
                               relative_gap=relative_gap, threads=threads, start=seed)
        except InfeasibleError as e:
            bounds[pin] = -math.inf if maximize else math.inf
            failures.append(e)
            continue
        except SolverTimeoutError as e:
            proven = False
            failures.append(e)
            continue
        bounds[pin] = side.bound
        proven &= side.status == SolveStatus.OPTIMAL
        found.append(side)
    best = _best(program, found)
    if best is None:
        timeouts = [e for e in failures if isinstance(e, SolverTimeoutError)]
        raise (timeouts or failures)[0]
    bound = max(bounds.values()) if maximize else min(bounds.values())
    done = replace(best, seconds=time.perf_counter() - started)
    return done.against(bound, proven=proven, relative_gap=relative_gap)


def _has_table(scenario: Scenario) -> bool:
    """Whether the scenario has a table part: a decoder's head layer, one shard (a class
    of its own in every program)."""
    model = scenario.model
    return scenario.question.decoding and len(model.layers[head_layer(model)].shards) == 1


def _table_split(program: MatrixProgram, *, deadline: float, threads: int) -> bool:
    """Whether `_split` solves the table's two placements apart (for a scenario with a
    table, `_has_table`): the program's LP relaxation takes it partly held, partly
    streamed. Where the LP keeps it whole in one place, splitting only adds a solve (measured: the group-store phone
    question's MIP 0.53 s whole, 0.85 s pinned)."""
    lp = _lp(program, _model(program), deadline=deadline, threads=threads)
    if lp is None:
        return False
    counts = lp[1][_table_counts(program)]  # [B, 2]
    return bool(min(counts[:, STREAMED].sum(), counts[:, PRELOADED].sum()) > SPLIT_AT)


def _best(program: MatrixProgram, found: list["_Found"]) -> "_Found | None":
    best = None
    for f in found:
        if best is None or _better(program, f, best):
            best = f
    return best


def _solve_side(scenario: Scenario, pin: int | None, *, started: float, deadline: float,
                relative_gap: float, threads: int, row_generation: bool = True,
                start: tuple[Selection, Layout] | None = None) -> "_Found":
    """Row generation (solve_highs) with the table's placement pinned to `pin` (STREAMED
    or PRELOADED; None: free)."""
    margins = float_margins(scenario)
    relaxation = aggregated.first_relaxation(scenario) if row_generation else None
    lp_first = relative_gap >= LP_FIRST_GAP and scenario.objective == Objective.MAX_IMPORTANCE
    while True:
        program = build(scenario, relaxation)
        model = _model(program, pin)
        now = time.perf_counter()
        until = deadline if relaxation is None else now + RELAXED_SHARE * (deadline - now)
        lp = _lp(program, model, deadline=until, threads=threads) \
            if relaxation is not None or lp_first else None
        if lp is not None and relaxation is not None:
            # The LP's rounded plan may already miss a row: grow before any branching.
            grown = search.grow_by_rounding(program, lp[1], margins)
            if grown is not None:
                relaxation = grown
                continue
        try:
            found, values = _solve_program(program, model, lp, started=started,
                                           deadline=until, relative_gap=relative_gap,
                                           threads=threads, known=start)
        except SolverTimeoutError:
            if relaxation is None:
                raise
            relaxation = None  # the rest of the time goes to the whole program
            continue
        if values is None or relaxation is None:
            return found  # the whole program's, or checked already
        grown = search.grow(program, found.selection, found.layout, margins)
        if grown is None:
            return found
        # A proven round grows; a stopped round's plan misses rows, and the time left is
        # the whole program's, which gives a plan if there is one in reach.
        relaxation = grown if found.status == SolveStatus.OPTIMAL else None


@dataclass(frozen=True)
class _Found:
    """A plan before it is lowered: its choices, objective (the cost model's, as the plan's),
    gap, status and solve time. Only the answer is lowered (`plan`): Plan.from_selection
    prices a decoder's every pass (SmolLM2's 64 + 64 tokens: 0.1-0.3 s a plan), and a round
    that grows, or a start that the MIP beats, never becomes the answer."""

    selection: Selection
    layout: Layout
    objective: float
    gap: float | None
    status: SolveStatus
    seconds: float
    bound: float = math.nan  # the proven bound its gap is to (the objective's unit)

    @staticmethod
    def of(scenario: Scenario, selection: Selection, layout: Layout, *, status: SolveStatus,
           bound: float, seconds: float) -> "_Found":
        value = objective_value(scenario.objective, simulate(scenario, selection, layout=layout))
        return _Found(selection, layout, value, _gap(value, bound), status, seconds, bound)

    def against(self, bound: float, *, proven: bool, relative_gap: float) -> "_Found":
        """This plan with its gap to `bound`: optimal if every part of that bound was
        proven (`proven`) and the gap is the one asked for, else feasible."""
        found = replace(self, gap=_gap(self.objective, bound), bound=bound,
                        status=SolveStatus.OPTIMAL)
        if proven and _within(found, relative_gap):
            return found
        return replace(found, status=SolveStatus.FEASIBLE)

    def plan(self, scenario: Scenario) -> Plan:
        return Plan.from_selection(scenario, self.selection, solver=NAME, status=self.status,
                                   gap=self.gap, solve_seconds=self.seconds, layout=self.layout)


def _solve_program(program: MatrixProgram, model: dict,
                   lp: tuple[float, np.ndarray] | None, *, started: float, deadline: float,
                   relative_gap: float, threads: int,
                   known: tuple[Selection, Layout] | None = None
                   ) -> tuple[_Found, np.ndarray | None]:
    """A plan of `program` (`model`: it as pass_model's arguments) with its gap to the
    program's bound, and the solution's columns
    (None for the relaxation's rounded plan, which is checked against the cost model).
    Given the LP relaxation (`lp`: bound, columns), its rounded and filled plan comes
    first, and is the answer if it is within the gap; else a `known` plan is the MIP's
    first incumbent."""
    scenario = program.scenario
    rounded = None  # the LP relaxation's rounded plan: a fallback if the MIP finds none
    # Rounding down keeps every <= row; min_buffer's importance floor is a >= row.
    if lp is not None and scenario.objective == Objective.MAX_IMPORTANCE:
        rounded = _lp_rounded(program, lp, started=started)
        if rounded is not None and rounded.gap is not None and rounded.gap <= relative_gap:
            return rounded, None
    seed = (rounded.selection, rounded.layout) if rounded is not None else known
    start = None if seed is None else program.solution_of(*seed)
    mip = solve_mip(model, deadline=deadline, relative_gap=relative_gap, start=start,
                    threads=threads)
    plan, values = _mip_plan(program, mip, rounded, started=started, deadline=deadline,
                             threads=threads)
    if plan.status == SolveStatus.OPTIMAL and start is not None and \
            not _within(plan, relative_gap):
        # HiGHS (seen with 1.16) can take the start, find it better "in the reduced space"
        # than in the program, stop there as optimal, and hand back the start's columns
        # unchanged: its optimum is not the plan it returns. Once more without the start.
        try:
            mip = solve_mip(model, deadline=deadline, relative_gap=relative_gap,
                            threads=threads)
            again = _mip_plan(program, mip, rounded, started=started, deadline=deadline,
                              threads=threads)
        except SolverTimeoutError:
            again = None
        if again is not None and _better(program, again[0], plan):
            plan, values = again
    if plan.status == SolveStatus.OPTIMAL and not _within(plan, relative_gap):
        # Not proven within the gap asked for: a plan, with its true gap, not the optimum.
        plan = replace(plan, status=SolveStatus.FEASIBLE)
    return plan, values


def _gap(value: float, bound: float) -> float | None:
    """A plan's objective's gap to a bound (gap_to_bound), 0 where they are one: both ~0
    (min_latency's 1e-12 ms, a skipped layer's wake-up, against a bound of 0 was "1e-3
    away": gap_to_bound's floor), or within HiGHS's own absolute gap (min_latency's 1.2e-7
    ms, a wake-up alone, against a bound of 0 was "1.0 away": a gap of 100 %)."""
    zero = max(abs(value), abs(bound)) <= ZERO_OBJECTIVE or abs(value - bound) <= ABS_GAP
    return 0.0 if zero else gap_to_bound(value, bound)


def _within(plan: _Found, relative_gap: float) -> bool:
    """Whether the plan's own gap (its objective against the bound) is the one asked for,
    to float noise."""
    return plan.gap is not None and plan.gap <= relative_gap + 1e-9


def _better(program: MatrixProgram, a: _Found, b: _Found) -> bool:
    """Whether plan a is better than plan b (a smaller gap breaks a tie)."""
    if a.objective != b.objective:
        return (a.objective > b.objective) == program.maximize
    return a.gap is not None and (b.gap is None or a.gap < b.gap)


def _mip_plan(program: MatrixProgram, mip, rounded: _Found | None, *, started: float,
              deadline: float, threads: int = 1) -> tuple[_Found, np.ndarray | None]:
    """The plan of a MIP's outcome with its gap to the MIP's dual bound, and its columns
    (None for the rounded relaxation's plan, the fallback when the MIP stopped without
    one); raises on infeasible, on no plan in time, on any other status."""
    scenario = program.scenario
    time_limit_s = deadline - started
    elapsed = time.perf_counter() - started
    status, has_plan = mip.status, mip.has_plan
    if status in (highspy.HighsModelStatus.kInfeasible,
                  highspy.HighsModelStatus.kUnboundedOrInfeasible):
        # The program is bounded by construction (every column is bounded or pinned by an
        # equality), so "unbounded or infeasible" can only mean infeasible; a relaxation
        # infeasible means the scenario is.
        raise InfeasibleError("HiGHS proved the problem infeasible")
    if status == highspy.HighsModelStatus.kOptimal:
        solve_status = SolveStatus.OPTIMAL
    elif status in _STOPPED and has_plan:
        solve_status = SolveStatus.FEASIBLE
    elif status in _STOPPED and rounded is not None:
        # Out of time with no MIP plan: the rounded relaxation is a plan, and its distance
        # from the relaxation's bound is a proven gap.
        return replace(rounded, status=SolveStatus.FEASIBLE, seconds=elapsed), None
    elif status in _STOPPED:
        raise SolverTimeoutError(
            f"HiGHS found no plan within the {time_limit_s:g} s time limit "
            f"(not a proof that none exists); raise --time-limit")
    else:
        raise SolverError(f"HiGHS returned status {status.name}")

    bound = mip.dual_bound / program.objective_scale  # the model carries the offset
    return _Found.of(scenario, selection_of(program, mip.values, threads),
                     program.layout(mip.values), status=solve_status, bound=bound,
                     seconds=elapsed), mip.values


def _lp(program: MatrixProgram, model: dict, *, deadline: float, threads: int = 1,
        strict: bool = False) -> tuple[float, np.ndarray] | None:
    """The LP relaxation's bound (in the objective's unit) and columns; None if it is
    infeasible or out of time (the MIP then reports it properly), or with `strict`,
    InfeasibleError if it is infeasible."""
    h = loaded(model, deadline=deadline, relative_gap=LP_FIRST_GAP, threads=threads)
    h.setOptionValue("solve_relaxation", True)
    h.setOptionValue("presolve", "off")  # measured faster on these LPs
    run(h)
    status = h.getModelStatus()
    if strict and status == highspy.HighsModelStatus.kInfeasible:
        raise InfeasibleError("HiGHS proved the relaxation infeasible")
    if status != highspy.HighsModelStatus.kOptimal:
        return None
    return (h.getInfo().objective_function_value / program.objective_scale,
            np.asarray(h.getSolution().col_value))


def _lp_rounded(program: MatrixProgram, lp: tuple[float, np.ndarray], *,
                started: float) -> _Found | None:
    """The relaxation's rounded-down (and filled) plan with its proven gap to the
    relaxation's bound (status optimal; the caller decides whether the gap is good
    enough)."""
    bound, values = lp
    rounded = search.round_down(program, values, float_margins(program.scenario))
    if rounded is None:
        return None
    selection, layout = rounded
    return _Found.of(program.scenario, selection, layout, status=SolveStatus.OPTIMAL,
                     bound=bound, seconds=time.perf_counter() - started)


def _model(program: MatrixProgram, pin: int | None = None) -> dict:
    """The program as pass_model's arguments; with the table's placement pinned to `pin`
    (STREAMED or PRELOADED: the other placement's counts bounded to 0; _split)."""
    upper = program.col_upper
    if pin is not None:
        upper = upper.copy()
        upper[_table_counts(program)[:, 1 - pin]] = 0
    return dict(csc=program.csc(), maximize=program.maximize, cost=program.cost,
                col_lower=program.col_lower, col_upper=upper,
                row_lower=program.row_lower, row_upper=program.row_upper,
                integer=program.col_integer,
                offset=program.objective_offset * program.objective_scale)


def _table_counts(program: MatrixProgram) -> np.ndarray:
    """The table's count columns ([B, 2]: streamed, preloaded): its class, which has no
    other member (every other shard costs differently)."""
    head = head_layer(program.scenario.model)
    for gi, classes in enumerate(program.classes):
        for ci, c in enumerate(classes):
            if (head, 0) in zip(c.layers, c.members):
                if len(c.members) != 1:
                    raise AssertionError("the table shares a cost class")
                return program.n_col[gi][ci]
    raise AssertionError("no table class in a decoder's program")


# --- reading a solution back ---------------------------------------------------------------

def selection_of(program: MatrixProgram, values: np.ndarray, threads: int = 1) -> Selection:
    """Shard choices of a solution's columns. Counts are rounded; per class an integral x
    says which member takes which bitwidth. A fractional x (HiGHS may return a non-vertex
    optimum) is not rounded: the class's assignment is re-solved exactly for the counts
    (on `threads` threads), which can only match or beat the fractional x's importance."""
    layers: list[list[Pick]] = [[] for _ in program.scenario.model.layers]
    for gi, classes in enumerate(program.classes):
        for ci, c in enumerate(classes):
            counts = np.rint(values[program.n_col[gi][ci]]).astype(np.int64)  # [B, 2]
            x = values[program.x_col[gi][ci]]  # [members, B]
            chosen = np.where(x.max(axis=1) > 0.5, x.argmax(axis=1), -1)
            if np.abs(x - np.rint(x)).max() > 1e-6 or not _matches(chosen, counts.sum(axis=1)):
                chosen = best_assignment(c.importance, counts.sum(axis=1), threads)
            for li, pick in class_picks(c, chosen, counts):
                layers[li].append(pick)
    return tuple(tuple(sorted(picks, key=lambda p: p.shard)) for picks in layers)


def _matches(chosen: np.ndarray, per_bit: np.ndarray) -> bool:
    return bool(np.array_equal(np.bincount(chosen[chosen >= 0], minlength=len(per_bit)),
                               per_bit))


def best_assignment(importance: np.ndarray, per_bit: np.ndarray,
                    threads: int = 1) -> np.ndarray:
    """Which member takes which bitwidth, given how many run at each: the max-importance
    transportation problem, solved exactly (its LP optimum at a vertex is integral).
    Returns per member the bitwidth index, -1 for dropped."""
    m, B = importance.shape
    if int(per_bit.sum()) > m:
        raise ValueError(f"{int(per_bit.sum())} shards asked of a class of {m}")
    h = new_highs(threads)  # the solve's size: its scheduler is not remade (highs_model.run)
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
    run(h)
    if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        raise RuntimeError(f"assignment LP: {h.modelStatusToString(h.getModelStatus())}")
    x = np.asarray(h.getSolution().col_value).reshape(m, B)
    if np.abs(x - np.rint(x)).max() > 1e-6:
        raise RuntimeError("assignment LP returned a fractional vertex")
    return np.where(x.max(axis=1) > 0.5, x.argmax(axis=1), -1)
