"""The benchmark scripts' own arithmetic and plumbing (their numbers are in the README).

No timing asserts: what is checked is that the statistics are right, that every entry
point parses its arguments, and that one small solver-speed run writes a table whose
invariants hold (no plan above the best proven bound, every exact row with its gap).
"""

from __future__ import annotations

import csv
import datetime
import importlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks import common, prediction, solver_speed
from runtime.measurement.report import LayerReport, StageTimes

MODULES = ("plan_quality", "frontier", "runtime_baselines", "prediction", "solver_speed",
           "compute_layout", "quant_schemes", "dictquant", "decoder_speed",
           "fleet", "decode_baselines", "decode_frontier", "dequant_speed",
           "int4_kernel")


def test_relative_error():
    assert common.relative(110.0, 100.0) == pytest.approx(0.10)
    assert common.relative(90.0, 100.0) == pytest.approx(-0.10)
    assert common.relative(0.0, 0.0) == 0.0
    assert common.relative(1.0, 0.0) == float("inf")


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=50), st.floats(0, 100))
def test_percentile_is_numpys_and_within_the_data(values, q):
    p = common.percentile(values, q)
    assert p == pytest.approx(float(np.percentile(values, q)))
    assert min(values) - 1e-9 <= p <= max(values) + 1e-9


def test_header_names_command_machine_and_date():
    h = common.header("benchmarks.x", ["--a", "1"], torch_threads=1)
    assert h.startswith("# python -m benchmarks.x --a 1; ")
    assert "cores" in h and str(datetime.date.today()) in h and h.endswith("torch threads 1")


def _layer(p_io, m_io, p_c, m_c):
    def side(io, c):
        return StageTimes(io_start_ms=io[0], io_end_ms=io[1], compute_start_ms=c[0],
                          compute_end_ms=c[1])
    return LayerReport(index=0, shards=1, preloaded=0, reads=1, read_bytes=1,
                       predicted=side(p_io, p_c), measured=side(m_io, m_c), decode_ms=0.0)


def test_stage_sums_are_busy_time_per_layer():
    layers = [_layer((0, 2), (0, 3), (2, 5), (3, 7)), _layer((2, 6), (3, 6), (6, 8), (7, 9))]
    assert prediction.stage_ms(layers, "predicted", "io") == 6
    assert prediction.stage_ms(layers, "measured", "io") == 6
    assert prediction.stage_ms(layers, "predicted", "compute") == 5
    assert prediction.stage_ms(layers, "measured", "compute") == 6


def test_summary_median_and_p95_per_bandwidth_and_overall():
    rows = []
    for bw, errs in ((200.0, [0.01, -0.02, 0.03, -0.04]), (1000.0, [0.10, -0.20])):
        rows += [{"bandwidth_mb_s": bw, "error": e, "io_error": 2 * e, "compute_error": -e,
                  "embed_pool_error": e, "memory_error": 0.0, "process_error": e / 10,
                  "latency_quantile": 0.5} for e in errs]
    # plans at another quantile are not in the error statistics
    quantile = dict(rows[0], latency_quantile=0.95, error=9.0)
    stats = {(s["bandwidth"], s["metric"]): s for s in prediction.summary(rows + [quantile])}
    assert set(stats) == {(g, m) for g in (200.0, 1000.0, "all")
                          for m in prediction.METRICS + prediction.MEMORY_METRICS}
    assert stats[1000.0, "process"]["max_abs_error"] == pytest.approx(0.02)
    assert stats[200.0, "total"]["median_abs_error"] == pytest.approx(0.025)
    assert stats[200.0, "io"]["median_abs_error"] == pytest.approx(0.05)
    assert stats[1000.0, "compute"]["max_abs_error"] == pytest.approx(0.20)
    assert stats["all", "total"]["plans"] == 6
    assert stats["all", "total"]["p95_abs_error"] == pytest.approx(
        np.percentile([0.01, 0.02, 0.03, 0.04, 0.10, 0.20], 95))
    assert stats[200.0, "compute"]["mean_signed_error"] == pytest.approx(0.005)


def test_targets_met_counts_runs_per_quantile_and_the_importance_given_up():
    def row(q, target, within, importance):
        return {"bandwidth_mb_s": 200.0, "target_ms": target, "buffer_mb": 0.0,
                "memory_budget_mb": None, "latency_quantile": q,
                "runs_within_target": within, "importance": importance}

    rows = [row(0.5, 10, 3, 1.0), row(0.95, 10, 5, 0.9), row(0.5, 20, 2, 2.0),
            row(0.95, 20, 4, 2.0)]
    lines = prediction.targets_met(rows, repeats=5)
    assert "5 of 10 measured runs (50.0%)" in lines[0]
    assert "9 of 10 measured runs (90.0%)" in lines[1]
    assert "mean 5.00%, max 10.00% (2 questions)" in lines[1]


@pytest.mark.parametrize("name", MODULES)
def test_every_benchmark_parses_its_arguments(name, capsys):
    module = importlib.import_module(f"benchmarks.{name}")
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    assert f"python -m benchmarks.{name}" in capsys.readouterr().out


def test_solver_speed_table_respects_the_bounds(tmp_path, capsys):
    assert solver_speed.main(["--only", "minilm-phone@", "--repeats", "1", "--time-limit", "1",
                              "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# python -m benchmarks.solver_speed --only minilm-phone@")
    with open(tmp_path / "solver_speed.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["solver"] for r in rows] == [s for s, _ in solver_speed.RUNS]
    assert {r["instance"] for r in rows} == {"minilm-phone@17ms"}
    solved = [r for r in rows if r["objective"]]
    assert {"greedy", "highs"} <= {r["solver"] for r in solved}
    for r in solved:
        assert float(r["vs_bound"]) <= 1 + 1e-9  # no plan above the best proven bound
    for r in rows:
        if r["solver"] != "greedy" and r["objective"]:
            assert float(r["gap"]) >= 0 and r["status"] in ("optimal", "feasible")


def test_solver_speed_frontier_points_agree_across_paths(monkeypatch, capsys):
    """One MiniLM frontier point per objective: every path answers, the default path's
    1e-6 plan and the whole program's 1e-4 plan agree within 1e-4, and the summary counts
    every point."""
    import argparse

    monkeypatch.setattr(solver_speed, "FRONTIERS", {"minilm": ("minilm-phone", (25.0,))})
    rows: list = []
    solver_speed.frontiers(argparse.Namespace(only=None, frontier_floors=1, time_limit=20,
                                              threads=1), rows)
    assert len(rows) == len(solver_speed.FRONTIER_OBJECTIVES) * len(solver_speed.FRONTIER_RUNS)
    for objective in solver_speed.FRONTIER_OBJECTIVES:
        got = {(r["solver"], r["gap_asked"]): r for r in rows
               if f":{objective.value}@" in r["instance"]}
        fine, whole = got[("highs", 1e-6)], got[(solver_speed.WHOLE, 1e-4)]
        assert fine["status"] == "optimal" and whole["status"] == "optimal"
        assert fine["objective"] <= whole["objective"] * (1 + 1e-4) + 1
        assert whole["objective"] <= fine["objective"] * (1 + 1e-4) + 1
    out = capsys.readouterr().out
    assert out.count("1/1   proven") == len(rows)


def test_error_bar_is_the_latency_at_the_0975_quantile_of_the_spread():
    """No measured spread: no bar. Hold-in-memory reads nothing, so its bar is the compute
    stretch exp(z_0.975 sigma_compute) - 1 exactly."""
    import dataclasses
    import math
    import statistics

    from benchmarks.runtime_baselines import error_bar
    from elasticplan.plans.baselines import baseline_plan
    from elasticplan.problem.loader import load_scenario
    from elasticplan.problem.spec import Spread

    sc = load_scenario(common.MINILM_PHONE)
    plan = baseline_plan(sc, "hold-in-memory")
    assert error_bar(plan, sc) == 0.0
    spread = dataclasses.replace(sc.device, spread=Spread(io=0.01, compute=0.04, runs=10))
    question = sc.with_overrides(device=spread)
    z = statistics.NormalDist().inv_cdf(0.975)
    assert error_bar(plan, question) == pytest.approx(math.exp(z * 0.04) - 1, rel=1e-9)


def test_busy_core_pins_a_loop_for_the_block_and_stops_it(capsys):
    """--busy-core N: a separate process pinned to core N runs for the block, and is gone
    after it; a core this machine does not have is refused; None starts nothing."""
    import os
    import time

    core = min(os.sched_getaffinity(0))
    with common.busy_core(core):
        pid = int(capsys.readouterr().out.split("(pid ")[1].split(")")[0])
        for _ in range(100):  # the child pins itself first thing
            if os.sched_getaffinity(pid) == {core}:
                break
            time.sleep(0.01)
        assert os.sched_getaffinity(pid) == {core}
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with common.busy_core(None):
        assert capsys.readouterr().out == ""
    with pytest.raises(SystemExit, match="--busy-core 4096"):
        with common.busy_core(4096):
            pass
    # a benchmark killed by SIGTERM (which skips the block's cleanup) takes its loop along
    import signal
    import subprocess
    import sys

    parent = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom benchmarks import common\n"
         f"with common.busy_core({core}):\n    time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    loop = int(parent.stdout.readline().split("(pid ")[1].split(")")[0])
    parent.send_signal(signal.SIGTERM)
    parent.wait(timeout=30)
    parent.stdout.close()

    def running(pid):  # a killed child whose parent is gone may linger as a zombie (Z)
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    for _ in range(200):
        if not running(loop):
            break
        time.sleep(0.05)
    else:
        os.kill(loop, signal.SIGKILL)
        raise AssertionError("the busy loop outlived its benchmark")


def test_a_row_carries_the_question_the_plan_answers():
    """row_of reads the plan's own question (target, buffer, quantile, memory budget) and
    the report's figures into one row (it read fields the plan's scenario record no
    longer has, and the benchmark stopped at its first plan)."""
    from types import SimpleNamespace

    from elasticplan.problem.loader import load_scenario
    from elasticplan.solvers import solve

    sc = load_scenario(Path(__file__).resolve().parent.parent / "problems" / "scenarios"
                       / "minilm-phone.yaml")
    sc = sc.with_overrides(target_latency_ms=31.5, preload_budget_mb=3.0)
    plan = solve(sc, "greedy")
    memory = SimpleNamespace(predicted_peak_bytes=2e6, measured_peak_bytes=2e6,
                             relative_error=0.0, measured_process_peak_bytes=2.1e6,
                             process_relative_error=0.05)
    report = SimpleNamespace(layers=[_layer((0, 2), (0, 3), (2, 5), (3, 7))],
                             embed_ms=(0.0, 0.5), pool_ms=(7.0, 7.2), reads_per_run=1,
                             streamed_bytes=1e6, predicted_latency_ms=7.0,
                             measured_latency_ms=7.2, relative_error=0.2 / 7,
                             measured_runs_ms=(7.1, 7.2, sc.target_latency_ms + 1),
                             memory=memory, fidelity=0.99)
    row = prediction.row_of(200.0, plan, report, sc)
    assert row["target_ms"] == 31.5 and row["buffer_mb"] == 3.0
    assert row["latency_quantile"] == 0.5 and row["memory_budget_mb"] is None
    assert row["runs_within_target"] == 2 and row["process_peak_mb"] == 2.1


def test_decode_prediction_grid_and_summary():
    """The decoding prediction benchmark's questions are solved and verified decoder plans
    (one per feasible point of the grid, the infeasible said and skipped), and its summary
    is the median and p95 of the absolute errors."""
    from benchmarks import decode_prediction
    from elasticplan.problem.loader import load_scenario

    sc = load_scenario(common.SMOLLM2_PHONE)
    said = []
    cases = decode_prediction.questions(sc, [2.0], [None, 48.0, 0.5], log=said.append)
    assert [(f, b) for f, b, _, _ in cases] == [(2.0, None), (2.0, 48.0)]
    assert len(said) == 1 and "memory 0.5" in said[0]
    for _, budget, plan, q in cases:
        assert plan.scenario.question.decoding and plan.decoding is not None
        assert budget is None or plan.memory.peak_bytes <= budget * 1e6
    rows = [{"ttft_err": e, "token_err": -e, "io_err_pct": 1.0, "compute_err_pct": -2.0,
             "head_err_pct": 0.5, "executor_err": 0.0, "process_err": 0.02}
            for e in (0.01, 0.02, 0.03, 0.10)]
    text = decode_prediction.summary(rows, "all")
    assert "4 plans" in text and "time to first token 2.5 / 8.9 %" in text
    assert "per-token 2.5 / 8.9 %" in text and "process median +2.0 %" in text


def test_decode_frontier_goal_two_counts_wins_losses_and_lossless_ties():
    from types import SimpleNamespace

    from benchmarks import decode_frontier

    def row(method, mb, kl):
        return {"method": method, "bandwidth_mb_s": 1000.0, "memory_budget_mb": mb, "kl": kl,
                "top1": 1.0, "top1_se": 0.0, "measured_token_ms": 10.0,
                "predicted_token_ms": 10.0, "executor_peak_mb": mb, "process_peak_mb": mb}
    a = SimpleNamespace(goal_bandwidth=1000.0, goal_memory_mb=48.0, goal_factor=2.0,
                        goal_top1=0.95)
    hold = row("hold-in-memory", None, 0.0)
    rows = [row("exact", 48.0, 0.5), row("greedy", 48.0, 2.0),
            row("exact", 128.0, 0.0), row("greedy", 128.0, 0.0)]
    lines = decode_frontier.goals(rows, hold, a)
    assert "than 1 of 1 comparisons" in lines[1] and "(1 more tied at KL 0): MET" in lines[1]
    rows.append(row("uniform-4", 48.0, 0.5))  # equal, not lossless: a loss
    assert decode_frontier.goals(rows, hold, a)[1].endswith("NOT MET")


def test_decode_frontier_rows_take_the_interleaved_times_of_their_plan():
    """A frontier row reports the times of its plan's interleaved rounds (looked up by its
    measure key, which it then drops), the fresh process's beside them unchanged."""
    from types import SimpleNamespace

    from benchmarks import decode_frontier

    m = SimpleNamespace(times={("a",): (210.0, 95.5), ("b",): (180.0, 60.25)})
    row = {"method": "exact", "measure_key": ("b",), "measured_token_ms": None,
           "measured_ttft_ms": None, "fresh_token_ms": 70.0, "fresh_ttft_ms": 190.0}
    out = decode_frontier.timed(row, m)
    assert (out["measured_ttft_ms"], out["measured_token_ms"]) == (180.0, 60.25)
    assert (out["fresh_ttft_ms"], out["fresh_token_ms"]) == (190.0, 70.0)
    assert "measure_key" not in out and row["measure_key"] == ("b",)
