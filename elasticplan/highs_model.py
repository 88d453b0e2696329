"""HiGHS, loaded the one way the project loads it: a silent instance, and a sparse model
passed in one call. A leaf module: the HiGHS backend (elasticplan.solvers.highs) and the
aggregated program's exact assignment (elasticplan.aggregate) both use it.
"""

from __future__ import annotations

import os
import sys

import highspy
import numpy as np

from elasticplan.errors import SolverError

_banner_shown = False


def new_highs() -> highspy.Highs:
    """A silent HiGHS instance. The library prints its banner on stdout when the first
    instance of a process is made, before any option can be set; that one is sent to
    /dev/null so that the CLI's output stays the plan."""
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
    return h


def pass_model(h: highspy.Highs, csc, *, maximize: bool, cost, col_lower, col_upper,
               row_lower, row_upper, integer=None) -> None:
    """Load `row_lower <= A x <= row_upper` (A column-wise: start, index, value) into `h`;
    `integer` marks integer columns (None: an LP)."""
    start, index, value = csc
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = len(cost), len(row_lower)
    lp.sense_ = highspy.ObjSense.kMaximize if maximize else highspy.ObjSense.kMinimize
    lp.col_cost_ = np.asarray(cost, dtype=float)
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

