"""The HiGHS backend honours `threads` (issue 30, item 5).

HiGHS sizes one task scheduler per OS thread at its first run (the calling thread plus
threads-1 workers, which stay) and refuses a later run that asks for another size;
elasticplan.solvers.aggregated.highs_model.run remakes it when the size changes. Counted,
not timed: the workers are threads of the process (/proc/self/task)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import highspy
import numpy as np
import pytest

from elasticplan.problem.loader import load_scenario
from elasticplan.solvers import solve
from elasticplan.solvers.aggregated import highs, highs_model

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "problems" / "scenarios" / "minilm-phone.yaml"

# Runs in a fresh interpreter: the scheduler of a process's first run is the point.
_CHILD = r"""
import json, os, sys
import highspy
from elasticplan.problem.loader import load_scenario
from elasticplan.solvers import solve

def tasks():
    return len(os.listdir("/proc/self/task"))

sc = load_scenario(sys.argv[1])
base = tasks()
out = []
for threads in (1, 2, 1, 3):
    plan = solve(sc, "highs", threads=threads, time_limit_s=60)
    out.append([threads, tasks() - base, plan.status.value])
# A run of HiGHS that does not go through elasticplan remakes the scheduler at another size.
h = highspy.Highs()
h.setOptionValue("output_flag", False)
h.setOptionValue("threads", 2)
h.addVar(0, 1)
highspy.Highs.resetGlobalScheduler(True)
assert h.run() == highspy.HighsStatus.kOk
plan = solve(sc, "highs", threads=1, time_limit_s=60)
out.append([1, tasks() - base, plan.status.value])
print(json.dumps(out))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_threads_is_the_number_of_highs_threads_in_a_fresh_process():
    """threads=1 leaves no HiGHS worker thread in the process; threads=n leaves n-1; a
    change of size in the same process (ours, or a foreign run's) is honoured, not refused."""
    done = subprocess.run([sys.executable, "-c", _CHILD, str(SCENARIO)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert rows == [[1, 0, "optimal"], [2, 1, "optimal"], [1, 0, "optimal"],
                    [3, 2, "optimal"], [1, 0, "optimal"]]


@pytest.fixture
def runs(monkeypatch):
    """The `threads` option of every HiGHS run made while the test runs."""
    seen = []
    real = highspy.Highs.run

    def run(self):
        seen.append(self.getOptionValue("threads")[1])
        return real(self)

    monkeypatch.setattr(highspy.Highs, "run", run)
    return seen


@pytest.mark.parametrize("name, gap", [("minilm-phone", 0.0),  # LP relaxation, then the MIP
                                       ("bert-base-phone-min-buffer", 1e-4)])  # rows grown
def test_every_highs_run_of_a_solve_gets_threads(runs, name, gap):
    """Each HiGHS instance a solve runs carries the threads asked for, not HiGHS's default
    (0: a size of its own choosing)."""
    sc = load_scenario(ROOT / "problems" / "scenarios" / f"{name}.yaml")
    plan = solve(sc, "highs", threads=3, relative_gap=gap, time_limit_s=60)
    assert plan.status.value == "optimal"
    assert len(runs) >= 2 and set(runs) == {3}, runs


def test_the_exact_assignment_gets_threads(runs):
    chosen = highs.best_assignment(np.array([[1.0, 2.0], [3.0, 1.0], [0.5, 0.5]]),
                                   np.array([1, 1]), 3)
    assert list(chosen) == [1, 0, -1]
    assert runs == [3]


def test_new_highs_sets_threads_and_refuses_nonsense():
    assert highs_model.new_highs(3).getOptionValue("threads")[1] == 3
    assert highs_model.new_highs().getOptionValue("threads")[1] == 1
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError):
            highs_model.new_highs(bad)
