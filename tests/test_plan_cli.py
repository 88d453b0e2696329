"""The plan file contract, the verifier's rejections, and the CLI end to end."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from elasticplan.cli import main
from elasticplan.errors import PlanFormatError, VerificationError
from elasticplan.plans.plan import SCHEMA, Plan, ShardChoice
from elasticplan.plans.verify import check, scenario_for, verify_plan
from elasticplan.problem.loader import load_scenario
from elasticplan.solvers import solve

PROBLEMS = Path(__file__).resolve().parent.parent / "problems"
MINILM = PROBLEMS / "scenarios" / "minilm-phone.yaml"


@pytest.fixture(scope="module")
def solved():
    sc = load_scenario(MINILM)
    return sc, solve(sc, "cpsat", time_limit_s=60)


def test_plan_json_round_trip_and_fields(solved, tmp_path):
    sc, plan = solved
    path = tmp_path / "plan.json"
    plan.save(path)
    data = json.loads(path.read_text())
    assert data["schema"] == SCHEMA
    for key in ("scenario", "solver", "status", "gap", "solve_seconds", "objective",
                "predicted_latency_ms", "preload_bytes", "layers"):
        assert key in data
    layer = data["layers"][0]
    assert set(layer) >= {"index", "shards", "io_start_ms", "io_end_ms", "compute_start_ms",
                          "compute_end_ms"}
    assert set(layer["shards"][0]) == {"name", "bits", "preloaded"}
    back = Plan.load(path)
    assert dataclasses.replace(back, scenario=plan.scenario) == plan
    verify_plan(scenario_for(back), back)


def test_plan_json_carries_the_question_flat_and_old_plans_load(solved, tmp_path):
    """The plan's `scenario` is the scenario's keys then the question's, flat, in the
    question's field order; a plan recorded before memory, windows and quantiles were
    planned (none of their keys) loads with their defaults and verifies."""
    sc, plan = solved
    path = tmp_path / "plan.json"
    plan.save(path)
    data = json.loads(path.read_text())
    assert list(data["scenario"]) == [
        "path", "sha256", "name", "model", "device", "target_latency_ms", "preload_budget_mb",
        "min_shards_per_layer", "objective", "importance_floor", "memory_budget_mb",
        "prefetch_window", "latency_quantile", "query_tokens"]
    assert data["scenario"]["objective"] == "max_importance"
    assert data["scenario"]["target_latency_ms"] == sc.question.target_latency_ms == 25.0
    for key in ("memory_budget_mb", "prefetch_window", "latency_quantile", "query_tokens"):
        del data["scenario"][key]
    for key in ("execution", "window", "embeddings", "memory", "quantile_latency_ms"):
        del data[key]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    back = Plan.load(old)
    assert back.scenario.question == sc.question
    verify_plan(scenario_for(back), back)


def test_one_range_table_for_files_plans_and_flags(solved, tmp_path, capsys):
    """A question field out of range gets the same message from a scenario file, a plan's
    recorded question and the command-line flag (elasticplan.problem.question.BOUNDS)."""
    sc, plan = solved
    words = "latency_quantile: must be a number in [0.5, 0.999] (0.5: the median run meets " \
            "the target), got 0.49"
    scenario = tmp_path / "s.yaml"
    scenario.write_text(MINILM.read_text().replace("../devices", str(PROBLEMS / "devices"))
                        .replace("../models", str(PROBLEMS / "models"))
                        + "latency_quantile: 0.49\n")
    assert main(["solve", str(scenario)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"s.yaml: {words}")
    data = json.loads(plan.to_json())
    data["scenario"]["latency_quantile"] = 0.49
    with pytest.raises(PlanFormatError) as e:
        Plan.from_dict(data, "p.json")
    assert str(e.value) == f"p.json: scenario.{words}"
    for value in ("0", "0.49"):
        with pytest.raises(SystemExit):
            main(["solve", str(MINILM), "--latency-quantile", value])
        assert capsys.readouterr().err.strip().endswith(
            f"argument --latency-quantile: {words.split(': ', 1)[1][:-4]}{value}")


def test_plan_moves_with_its_scenario(solved, tmp_path):
    """The scenario path is stored relative to the plan, so the pair can be copied together."""
    sc, plan = solved
    copy = tmp_path / "problems"
    shutil.copytree(PROBLEMS, copy)
    moved = load_scenario(copy / "scenarios" / "minilm-phone.yaml")
    plan2 = solve(moved, "greedy")
    (tmp_path / "plans").mkdir()
    plan2.save(tmp_path / "plans" / "p.json")
    assert main(["verify", str(tmp_path / "plans" / "p.json")]) == 0


def test_stale_plan_is_rejected(solved, tmp_path):
    sc, plan = solved
    copy = tmp_path / "problems"
    shutil.copytree(PROBLEMS, copy)
    scenario_path = copy / "scenarios" / "minilm-phone.yaml"
    plan2 = solve(load_scenario(scenario_path), "greedy")
    plan2.save(tmp_path / "p.json")
    device = copy / "devices" / "phone-ufs31.yaml"
    device.write_text(device.read_text().replace("bandwidth_mb_s: 1200", "bandwidth_mb_s: 1100"))
    with pytest.raises(VerificationError, match="stale plan"):
        verify_plan(scenario_for(Plan.load(tmp_path / "p.json")), Plan.load(tmp_path / "p.json"))


def _tamper(plan: Plan, li: int, **changes) -> Plan:
    layers = list(plan.layers)
    layers[li] = dataclasses.replace(layers[li], **changes)
    return dataclasses.replace(plan, layers=tuple(layers))


@pytest.mark.parametrize("tamper,words", [
    (lambda p: _tamper(p, 0, io_end_ms=p.layers[0].io_end_ms + 1), "predicted io_end_ms"),
    (lambda p: _tamper(p, 1, shards=p.layers[1].shards + (ShardChoice("head99", 8, False),)),
     "no shard named 'head99'"),
    (lambda p: _tamper(p, 1, shards=p.layers[1].shards[:1] * 2), "more than once"),
    (lambda p: _tamper(p, 2, shards=tuple(dataclasses.replace(c, bits=5)
                                          for c in p.layers[2].shards)), "at 5 bits"),
    (lambda p: _tamper(p, 3, shards=()), "fewer than min_shards_per_layer"),
    (lambda p: dataclasses.replace(p, predicted_latency_ms=1.0), "predicted_latency_ms"),
    (lambda p: dataclasses.replace(p, objective=p.objective + 1), "objective"),
])
def test_verifier_rejects_tampered_plans(solved, tamper, words):
    sc, plan = solved
    bad, _ = check(sc, tamper(plan))
    assert any(words in b for b in bad), bad


def test_verifier_rejects_constraint_violations(solved):
    sc, plan = solved
    tighter = sc.with_overrides(target_latency_ms=plan.predicted_latency_ms * 0.99)
    assert any("exceeds the target" in b for b in check(tighter, plan)[0])
    smaller = sc.with_overrides(preload_budget_mb=plan.preload_bytes / 2e6)
    assert any("exceeds the budget" in b for b in check(smaller, plan)[0])


def test_unreadable_plan_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PlanFormatError, match="not a readable JSON plan"):
        Plan.load(bad)
    bad.write_text(json.dumps({"schema": "other/9"}))
    with pytest.raises(PlanFormatError, match="schema"):
        Plan.load(bad)
    assert main(["verify", str(tmp_path / "missing.json")]) == 2


@pytest.mark.parametrize("scenario", sorted((PROBLEMS / "scenarios").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_shipped_scenario_solves_optimal_and_verifies(scenario, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["solve", str(scenario), "--time-limit", "120", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "solver highs: optimal" in printed
    assert main(["verify", str(out)]) == 0
    assert ": OK (highs, optimal)" in capsys.readouterr().out


def test_cli_infeasible_explains_and_exits_3(capsys):
    assert main(["solve", str(MINILM), "--target-ms", "1", "--solver", "cbc"]) == 3
    err = capsys.readouterr().err
    assert "below the fastest possible schedule" in err and err.count("\n") == 1


def test_cli_sweep_writes_monotone_frontier(tmp_path, capsys):
    out = tmp_path / "frontier.csv"
    assert main(["sweep", str(MINILM), "--buffer-mb", "0:2:1", "--time-limit", "120",
                 "--csv", str(out)]) == 0
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["buffer_mb"]) for r in rows] == [0.0, 1.0, 2.0]
    assert {r["status"] for r in rows} == {"optimal"}
    values = [float(r["importance"]) for r in rows]
    for smaller, larger in zip(values, values[1:]):  # monotone up to the 1e-4 gap tolerance
        assert larger >= smaller * (1 - 2e-4)


# --- memory ------------------------------------------------------------------------------

def test_memory_plan_round_trips_verifies_and_records_its_terms(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["solve", str(MINILM), "--memory-mb", "9", "--window", "1", "--time-limit",
                 "5", "-o", str(out)]) == 0
    assert "(budget 9) = resident" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["window"] == 1 and data["embeddings"] == "streamed"
    assert data["scenario"]["memory_budget_mb"] == 9 and data["scenario"]["prefetch_window"] == 1
    m = data["memory"]
    assert m["peak_bytes"] == sum(m[k] for k in ("resident_bytes", "preload_bytes",
                                                 "working_peak_bytes", "activation_bytes"))
    assert m["peak_bytes"] <= 9e6
    assert main(["verify", str(out)]) == 0
    # a memory term that does not match the shards: named by the verifier
    m["working_peak_bytes"] -= 1000
    m["resident_bytes"] += 1000
    out.write_text(json.dumps(data))
    assert main(["verify", str(out)]) == 6
    assert "memory.resident_bytes 848872 != 847872" in capsys.readouterr().err
    # a peak that is not the sum of its terms: refused when read, naming the key
    m["peak_bytes"] += 1
    out.write_text(json.dumps(data))
    with pytest.raises(PlanFormatError, match=r"memory\.peak_bytes: .* not the sum"):
        Plan.load(out)


def test_plan_recorded_before_memory_still_loads_and_verifies(solved, tmp_path):
    sc, plan = solved
    path = tmp_path / "old.json"
    plan.save(path)
    data = json.loads(path.read_text())
    for key in ("window", "embeddings", "memory"):
        del data[key]
    for key in ("memory_budget_mb", "prefetch_window"):
        del data["scenario"][key]
    path.write_text(json.dumps(data))
    old = Plan.load(path)
    assert old.window is None and old.embeddings == "resident" and old.memory is None
    assert verify_plan(scenario_for(old), old).memory.peak_bytes > 0


@pytest.mark.parametrize("args,words", [
    (["--memory-mb", "1"], "--memory-mb 1: 1 MB is below what every plan"),
    (["--memory-mb", "5000"], "--memory-mb 5000: 5000 MB exceeds the device's memory_mb"),
    (["--buffer-mb", "1e9"], "--buffer-mb 1e+09: 1e+09 MB does not fit in the device's "
                             "memory_mb"),
])
def test_bad_memory_budgets_name_the_field(args, words, capsys):
    assert main(["solve", str(MINILM), *args]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


def test_window_of_zero_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["solve", str(MINILM), "--window", "0"])
    assert e.value.code == 2
    scenario = tmp_path / "s.yaml"
    scenario.write_text(MINILM.read_text().replace("../devices", str(PROBLEMS / "devices"))
                        .replace("../models", str(PROBLEMS / "models"))
                        + "prefetch_window: 0\n")
    assert main(["solve", str(scenario)]) == 2
    # the flag and the file say the same, from the question's one table of ranges
    flag, file = capsys.readouterr().err.splitlines()[-2:]
    words = "must be an integer in [1, 10000] layers (layers IO may run ahead of compute), got 0"
    assert flag.endswith(f"argument --window: {words}; or 'auto' or 'unbounded'")
    assert file.endswith(f"s.yaml: prefetch_window: {words}")


def test_min_memory_is_explained_and_bounded(capsys):
    assert main(["solve", str(MINILM), "--objective", "min_memory", "--floor", "1.2",
                 "--time-limit", "10"]) == 0
    out = capsys.readouterr().out
    assert "objective min_memory (floor 1.2)" in out
    assert main(["solve", str(MINILM), "--memory-mb", "3", "--target-ms", "14"]) == 3
    err = capsys.readouterr().err
    assert "memory_budget_mb 3 is short" in err and "raise the memory budget to >=" in err


def test_a_sweep_with_no_plan_says_what_is_short_at_its_loosest_point(capsys):
    assert main(["sweep", str(MINILM), "--target-ms", "0.1:0.3:0.1"]) == 0
    out = capsys.readouterr().out
    assert "no point has a plan; at the loosest (target_ms 0.3): target 0.3 ms is below " \
           "the fastest possible schedule" in out
    assert main(["sweep", str(MINILM), "--target-ms", "20:30:10"]) == 0
    assert "no point has a plan" not in capsys.readouterr().out
