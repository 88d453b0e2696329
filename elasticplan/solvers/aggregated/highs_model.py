"""HiGHS, loaded the one way the project loads it: a silent instance, and a sparse model
passed in one call. A leaf module: the HiGHS backend (elasticplan.solvers.aggregated.highs) and the
aggregated program's exact assignment (elasticplan.solvers.aggregated.program) both use it.

Deadlines. HiGHS checks its time limit, and calls its interrupt callback, only between
steps; on a large MIP a step (presolve, the root's heuristics) can take tens of seconds
(measured: a 200,000-variant model overran a 30 s limit by 30 s). `solve_mip` therefore
runs a large model's MIP in a child process that is killed at the deadline, so a time
limit holds whatever HiGHS does; small models, where a step is milliseconds, run in
process.

Threads. Every instance made here gets HiGHS's `threads` option. HiGHS (measured with
1.16) runs its parallel work on a task scheduler that is made by the first `run` of an OS
thread, sized by that run's `threads` (that many workers: the calling thread and threads-1
more, which live as long as the scheduler), and kept for every later run of that thread; a
later run asking for another size fails at once (status error, model status not set:
"Option 'threads' is set to 1 but global scheduler has already been initialized to use 2
threads"). `run` therefore records the size it gave the calling thread's scheduler and, when
a run asks for another, shuts the old one down first (`Highs.resetGlobalScheduler`, which
acts on the calling thread's scheduler); a first run in a fresh process, such as a fleet's
spawned worker or `solve_mip`'s child, makes it with the size asked for. The reset is not
safe while another thread of the process is inside HiGHS: elasticplan runs HiGHS on one
thread per process. `threads=1` leaves HiGHS on the calling thread alone. Since 1.16 the
MIP's branch and bound is parallel by default: under the `parallel` option's default
("choose", left as it is) it searches with one worker per thread ("using up to 2 workers
across 2 threads" in its log; "off" would keep one), and its symmetry detection runs on the
scheduler's workers too.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import highspy
import numpy as np

from elasticplan.errors import SolverError

_banner_shown = False
_scheduler = threading.local()  # .threads: the size `run` gave this thread's scheduler


def new_highs(threads: int = 1) -> highspy.Highs:
    """A silent HiGHS instance that runs on `threads` threads (run it with `run`). The
    library prints its banner on stdout when the first instance of a process is made,
    before any option can be set; that one is sent to /dev/null so that the CLI's output
    stays the plan."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    global _banner_shown
    if _banner_shown:
        h = highspy.Highs()
    else:
        sys.stdout.flush()
        saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 1)
            h = highspy.Highs()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            os.close(devnull)
        _banner_shown = True
    h.setOptionValue("output_flag", False)
    if h.setOptionValue("threads", threads) == highspy.HighsStatus.kError:
        raise SolverError(f"HiGHS refused threads={threads}")
    return h


def run(h: highspy.Highs) -> highspy.HighsStatus:
    """`h.run()` on the calling thread's scheduler, first remade if it was made for another
    number of threads than `h`'s `threads` option (module docstring, "Threads")."""
    _, threads = h.getOptionValue("threads")  # (status, value)
    if getattr(_scheduler, "threads", None) != threads:
        _reset_scheduler(threads)
    with _signals_held():
        status = h.run()
        if status == highspy.HighsStatus.kError and \
                h.getModelStatus() == highspy.HighsModelStatus.kNotset:
            # Refused before solving: the scheduler may have been remade, for another size,
            # by a run of HiGHS that did not come through here. Once more on a fresh one.
            _reset_scheduler(threads)
            status = h.run()
    return status


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_signalled: list[tuple[int, object]] = []  # (signal, frame) that came during a run


@contextlib.contextmanager
def _signals_held():
    """Ctrl-C and SIGTERM during a run, on the main thread: noted (the interrupt callback
    then stops HiGHS at its next check) and handed, once HiGHS has returned, to the
    handlers they would have met, SIGTERM first. Raised inside the callback, their
    exception would reach HiGHS, which ends the run as a solve error (exit 7, not 130/143).
    A signal the process ignores stays ignored; the handlers are swapped with both signals
    blocked, so that none arrives between two swaps."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = [s for s in _STOP_SIGNALS
            if callable(signal.getsignal(s)) or signal.getsignal(s) == signal.SIG_DFL]
    previous: dict[int, object] = {}
    _signalled.clear()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        for s in held:
            previous[s] = signal.signal(s, _note)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    try:
        yield
    finally:
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, held)
        try:
            for s, handler in previous.items():
                signal.signal(s, handler)
        finally:  # a signal that came meanwhile now meets the handler restored
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        noted = dict(_signalled)  # signal -> its frame
        _signalled.clear()
        for s in sorted(noted, key=lambda s: s != signal.SIGTERM):
            handler = previous[s]
            if callable(handler):
                handler(s, noted[s])  # KeyboardInterrupt, the CLI's Terminated, ...
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), s)


def _note(signum: int, frame) -> None:
    _signalled.append((signum, frame))


def _reset_scheduler(threads: int) -> None:
    """Shut the calling thread's HiGHS scheduler down (nothing if it has none; blocking,
    so its workers have ended), for the next run to make one of `threads`."""
    highspy.Highs.resetGlobalScheduler(True)
    _scheduler.threads = threads


def pass_model(h: highspy.Highs, csc, *, maximize: bool, cost, col_lower, col_upper,
               row_lower, row_upper, integer=None, offset: float = 0.0) -> None:
    """Load `row_lower <= A x <= row_upper` (A column-wise: start, index, value) into `h`;
    `integer` marks integer columns (None: an LP); `offset` is the objective's constant
    (HiGHS's relative gap is then the whole objective's)."""
    start, index, value = csc
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = len(cost), len(row_lower)
    lp.sense_ = highspy.ObjSense.kMaximize if maximize else highspy.ObjSense.kMinimize
    lp.col_cost_ = np.asarray(cost, dtype=float)
    lp.offset_ = float(offset)
    lp.col_lower_ = np.asarray(col_lower, dtype=float)
    lp.col_upper_ = np.asarray(col_upper, dtype=float)
    lp.row_lower_ = np.asarray(row_lower, dtype=float)
    lp.row_upper_ = np.asarray(row_upper, dtype=float)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = np.asarray(start, dtype=np.int32)
    lp.a_matrix_.index_ = np.asarray(index, dtype=np.int32)
    lp.a_matrix_.value_ = np.asarray(value, dtype=float)
    if integer is not None:
        lp.integrality_ = [highspy.HighsVarType.kInteger if i
                           else highspy.HighsVarType.kContinuous for i in integer]
    # kWarning: coefficients below HiGHS's small_matrix_value (1e-9) were dropped; a
    # latency term that small is inside the rows' TIME_MARGIN_MS.
    if h.passModel(lp) == highspy.HighsStatus.kError:
        raise SolverError("HiGHS rejected the model")



_INTERRUPTS = (highspy.cb.HighsCallbackType.kCallbackMipInterrupt,
               highspy.cb.HighsCallbackType.kCallbackSimplexInterrupt,
               highspy.cb.HighsCallbackType.kCallbackIpmInterrupt)


def interrupt_at(h: highspy.Highs, deadline: float) -> None:
    """Interrupt `h` at its next interrupt check after `deadline` (time.perf_counter())."""
    def check(kind, message, data_out, data_in, user_data) -> None:
        if _signalled or time.perf_counter() >= deadline:
            data_in.user_interrupt = True

    h.setCallback(check, None)
    for kind in _INTERRUPTS:
        h.startCallback(kind)


ISOLATE_COLS = 50_000  # MIPs with more columns than this run in a child process
KILL_GRACE_S = 0.5  # the child's own limits come first; this is for the steps they miss


@dataclass(frozen=True)
class MipOutcome:
    status: highspy.HighsModelStatus
    has_plan: bool
    values: np.ndarray | None  # column values of the best plan, if any
    dual_bound: float


def solve_mip(model: dict, *, deadline: float, relative_gap: float,
              start: np.ndarray | None = None, threads: int = 1) -> MipOutcome:
    """Solve `model` (pass_model's keyword arguments plus `csc`) as a MIP on `threads`
    threads by `deadline` (time.perf_counter()), in a child process if it is large; `start`
    is a feasible solution's columns, handed to HiGHS as its first incumbent."""
    if len(model["cost"]) <= ISOLATE_COLS:
        return _mip(model, deadline - time.perf_counter(), relative_gap, start, threads)
    ctx = multiprocessing.get_context("spawn")  # no HiGHS threads inherited by a fork
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_mip_child, daemon=True,
                        args=(send, model, deadline - time.perf_counter(), relative_gap, start,
                              threads))
    child.start()
    send.close()
    try:
        if receive.poll(max(0.0, deadline - time.perf_counter()) + KILL_GRACE_S):
            status, has_plan, values, bound = receive.recv()
            return MipOutcome(highspy.HighsModelStatus(status), has_plan, values, bound)
        child.kill()
        return MipOutcome(highspy.HighsModelStatus.kTimeLimit, False, None, float("nan"))
    except EOFError:  # the child died without an answer (out of memory, a crash)
        raise SolverError(f"HiGHS's process ended without an answer (exit code "
                          f"{child.exitcode})") from None
    except BaseException:  # Ctrl-C, SIGTERM: the child goes with the command
        child.kill()
        raise
    finally:
        child.join(timeout=5)
        receive.close()


def loaded(model: dict, *, deadline: float, relative_gap: float,
           threads: int = 1) -> highspy.Highs:
    """A silent HiGHS on `threads` threads holding `model`, to stop at `deadline`
    (time.perf_counter()): by its own time limit, and by an interrupt callback, which its
    simplex and MIP ask more often than they check the clock."""
    h = new_highs(threads)
    h.setOptionValue("time_limit", max(1e-3, deadline - time.perf_counter()))
    interrupt_at(h, deadline)
    h.setOptionValue("mip_rel_gap", float(relative_gap))
    h.setOptionValue("mip_abs_gap", 0.0)
    pass_model(h, **model)
    return h


def _mip(model: dict, seconds: float, relative_gap: float,
         start: np.ndarray | None = None, threads: int = 1) -> MipOutcome:
    h = loaded(model, deadline=time.perf_counter() + seconds, relative_gap=relative_gap,
               threads=threads)
    if start is not None:
        solution = highspy.HighsSolution()
        solution.col_value = list(map(float, start))
        solution.value_valid = True
        h.setSolution(solution)
    run(h)
    has_plan = h.getInfo().primal_solution_status == \
        highspy.SolutionStatus.kSolutionStatusFeasible
    values = np.asarray(h.getSolution().col_value) if has_plan else None
    return MipOutcome(h.getModelStatus(), has_plan, values, h.getInfo().mip_dual_bound)


def _mip_child(send, model: dict, seconds: float, relative_gap: float,
               start: np.ndarray | None, threads: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C: the parent decides
    out = _mip(model, seconds, relative_gap, start, threads)
    send.send((int(out.status), out.has_plan, out.values, out.dual_bound))
    send.close()
