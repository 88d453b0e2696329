"""Fleet planning: the same answers wherever the tasks run, nothing lost, clear errors."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from elasticplan.answers.fleet import load_fleet
from elasticplan.answers.fleet_run import run_fleet
from elasticplan.answers.table import PlanTable
from elasticplan.cli import main
from elasticplan.errors import SpecError

ROOT = Path(__file__).resolve().parent.parent
PROBLEMS = ROOT / "problems"


def _fleet(tmp_path, name="small", **changes) -> Path:
    data = {"schema": "elasticplan.fleet/1", "name": name,
            "devices": [str(PROBLEMS / "devices" / "phone-ufs31.yaml"),
                        str(PROBLEMS / "devices" / "sbc-rpi5-nvme.yaml")],
            "models": [str(PROBLEMS / "models" / "minilm-l6.yaml"),
                       str(PROBLEMS / "models" / "distilbert.yaml")],
            "questions": {"targets_ms": [8, 400], "buffers_mb": [0, 2]},
            # a generous limit: every question solves in well under a second, and runs are
            # compared plan for plan, so a limit hit under CPU contention must not differ
            "solver": {"name": "highs", "time_limit_s": 120, "gap": 1e-2}}
    data.update(changes)
    f = tmp_path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(data))
    return f


def _plans(out: Path) -> dict[str, dict]:
    """Every plan of a run, by task key, without its solve time (the one field that is a
    measurement of the run rather than its answer)."""
    plans = {}
    for p in sorted((out / "plans").glob("*.json")):
        d = json.loads(p.read_text())
        d.pop("solve_seconds")
        plans[p.stem] = d
    return plans


def _rows(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "rows").glob("*.json")}


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    d = tmp_path_factory.mktemp("fleet")
    fleet = load_fleet(_fleet(d))
    summary = run_fleet(fleet, d / "seq", workers=0, progress=False)
    return fleet, d / "seq", summary


def test_sequential_run_writes_every_result(sequential):
    fleet, out, summary = sequential
    assert summary.tasks == 2 * 2 * 4 == len(_rows(out))
    rows = _rows(out)
    # proven answers only, so that every executor must return the same ones
    assert {r["status"] for r in rows.values()} <= {"optimal", "infeasible"}
    for r in rows.values():
        if r["plan"]:  # every plan verifies against the scenario file it names
            assert main(["verify", str(out / r["plan"])]) == 0
        else:
            assert r["explanation"]
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + summary.tasks
    table = pq.read_table(out / "results.parquet")
    assert table.num_rows == summary.tasks and "predicted_memory_bytes" in table.column_names
    assert sorted(p.name for p in (out / "tables").glob("*.json")) == sorted(
        f"{d}--{m}.json" for d in ("phone-ufs31", "sbc-rpi5-nvme")
        for m in ("minilm-l6", "distilbert"))
    t = PlanTable.load(out / "tables" / "phone-ufs31--minilm-l6.json")
    assert t.targets_ms == (8.0, 400.0) and t.buffers_mb == (0.0, 2.0)
    assert "# Fleet small" in (out / "report.md").read_text() and (out / "report.png").is_file()


def test_rerun_solves_nothing_new(sequential):
    fleet, out, _ = sequential
    before = {p: p.read_bytes() for p in (out / "rows").glob("*.json")}
    again = run_fleet(fleet, out, workers=0, progress=False)
    assert again.solved_now == 0 and again.skipped == again.tasks
    assert {p: p.read_bytes() for p in (out / "rows").glob("*.json")} == before


def test_a_row_whose_plan_is_gone_is_solved_again(sequential, tmp_path):
    import shutil

    fleet, seq, _ = sequential
    out = tmp_path / "copy"
    shutil.copytree(seq, out)
    row = next(r for r in _rows(out).values() if r["plan"])
    (out / row["plan"]).unlink()
    again = run_fleet(fleet, out, workers=0, progress=False)
    assert again.solved_now == 1 and (out / row["plan"]).is_file()


def test_process_pool_equals_sequential(sequential, tmp_path):
    fleet, seq, _ = sequential
    run_fleet(fleet, tmp_path / "pool", workers=2, progress=False)
    assert _plans(tmp_path / "pool") == _plans(seq)


def test_local_ray_cluster_equals_sequential(sequential, tmp_path):
    ray = pytest.importorskip("ray")
    fleet, seq, _ = sequential
    try:
        summary = run_fleet(fleet, tmp_path / "ray", workers=2, ray_address="local",
                            progress=False)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert summary.solved_now == summary.tasks
    assert _plans(tmp_path / "ray") == _plans(seq)
    assert {k: r["status"] for k, r in _rows(tmp_path / "ray").items()} == \
        {k: r["status"] for k, r in _rows(seq).items()}


def test_a_killed_worker_loses_nothing(tmp_path):
    """SIGKILL one pool worker mid-run: its chunk is retried, every task gets its row."""
    f = _fleet(tmp_path, name="kill", questions={"targets_ms": [12, 14, 16, 18, 20, 22],
                                                 "buffers_mb": [0, 1, 2]},
               devices=[str(PROBLEMS / "devices" / "phone-ufs31.yaml")],
               models=[str(PROBLEMS / "models" / "minilm-l6.yaml")])
    fleet = load_fleet(f)
    out = tmp_path / "out"
    result = {}
    runner = threading.Thread(target=lambda: result.update(
        s=run_fleet(fleet, out, workers=2, progress=False)))
    runner.start()
    killed = False
    deadline = time.monotonic() + 120
    while runner.is_alive() and time.monotonic() < deadline and not killed:
        children = multiprocessing.active_children()
        written = len(list((out / "rows").glob("*.json"))) if (out / "rows").is_dir() else 0
        if children and 0 < written < 18:
            os.kill(children[0].pid, signal.SIGKILL)
            killed = True
        time.sleep(0.05)
    runner.join(timeout=300)
    assert not runner.is_alive()
    rows = _rows(out)
    assert len(rows) == result["s"].tasks == 18
    assert all(r["status"] != "failed" for r in rows.values())
    assert killed, "the run ended before a worker could be killed"
    assert any(r["attempts"] > 1 for r in rows.values())  # the killed chunk ran again


@pytest.mark.parametrize("change, words", [
    ({"schema": "x/1"}, "schema"),
    ({"devices": ["nothing-*.yaml"]}, "devices[0]: 'nothing-*.yaml' matches no file"),
    ({"questions": {"targets_ms": [], "buffers_mb": [0]}}, "questions.targets_ms"),
    ({"questions": {"targets_ms": [10], "buffers_mb": [-1]}}, "questions.buffers_mb[0]"),
    ({"questions": {"targets_ms": [10], "buffers_mb": [0], "objective": "min_latency"}},
     "questions.objective"),
    ({"solver": {"name": "gurobi"}}, "solver.name"),
    ({"workers": 3}, "workers: unknown key"),
])
def test_bad_fleet_files_get_one_line(tmp_path, capsys, change, words):
    f = _fleet(tmp_path, **change)
    with pytest.raises(SpecError, match=None) as info:
        load_fleet(f)
    assert words in str(info.value)
    assert main(["fleet", str(f), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("elasticplan: error:") and err.count("\n") == 1


def test_a_pair_that_cannot_be_posed_is_refused_before_anything_is_written(tmp_path, capsys):
    """A fleet whose min_shards_per_layer no model can meet: one line naming the fleet file
    and the pair, and no output folder made (it used to write the pair's scenario first and
    name that file)."""
    f = _fleet(tmp_path, questions={"targets_ms": [400], "buffers_mb": [0],
                                    "min_shards_per_layer": 99})
    out = tmp_path / "o"
    assert main(["fleet", str(f), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"elasticplan: error: {f}: min_shards_per_layer: 99 exceeds")
    assert "(for device" in err and err.count("\n") == 1
    assert not out.exists()


def test_a_buffer_the_device_cannot_hold_is_explained_without_scratch_paths(tmp_path):
    f = _fleet(tmp_path, devices=[str(PROBLEMS / "devices" / "phone-ufs31.yaml")],
               models=[str(PROBLEMS / "models" / "minilm-l6.yaml")],
               questions={"targets_ms": [400], "buffers_mb": [5000]})
    out = tmp_path / "o"
    assert main(["fleet", str(f), "-o", str(out), "--workers", "0"]) == 0
    (row,) = _rows(out).values()
    assert row["status"] == "infeasible"
    assert row["explanation"].startswith("preload_budget_mb: 5000 MB does not fit")
    assert "elasticplan-fleet-" not in row["explanation"]


def test_a_fleet_table_with_a_buffer_the_device_cannot_hold_still_looks_up(tmp_path, capsys):
    """A buffer beyond the device's memory is refused as infeasible beside a smaller one
    that has a plan; the table's check (infeasible above a plan only within a buffer's
    column) keeps such a table good for `lookup`."""
    f = _fleet(tmp_path, devices=[str(PROBLEMS / "devices" / "sbc-rpi4-sd.yaml")],
               models=[str(PROBLEMS / "models" / "minilm-l6.yaml")],
               questions={"targets_ms": [2000], "buffers_mb": [0, 600]})
    out = tmp_path / "o"
    assert main(["fleet", str(f), "-o", str(out), "--workers", "0"]) == 0
    (table,) = (out / "tables").glob("*.json")
    capsys.readouterr()
    assert main(["lookup", str(table), "--target-ms", "2000", "--buffer-mb", "0"]) == 0


# --- issue 29: what once ended or skewed a fleet ---------------------------------------------

def test_chunks_schedule_every_task_exactly_once():
    """The last full chunk stops where the one-by-one tail starts (12 tasks on 1 worker
    were scheduled 16 times, tasks 4-7 twice; with 2 workers a row was written twice)."""
    from elasticplan.answers.fleet_run import _chunks

    for n in range(0, 70):
        tasks = list(range(n))
        for workers in (1, 2, 3, 8):
            chunks = _chunks(tasks, workers)
            assert [t for c in chunks for t in c] == tasks, (n, workers)
            assert all(chunks)


def test_a_plan_without_a_finite_bound_says_its_gap_is_unknown(monkeypatch):
    """HiGHS stopped with a plan but no finite dual bound: the plan's gap is null (it was
    Infinity, which the plan reader rightly refuses, and which ended `make fleet`)."""
    import math

    import highspy

    from elasticplan.plans.plan import Plan, SolveStatus, gap_to_bound
    from elasticplan.problem.loader import load_scenario
    from elasticplan.problem.question import Objective
    from elasticplan.solvers import solve
    from elasticplan.solvers.aggregated import highs

    assert gap_to_bound(1.0, math.inf) is None and gap_to_bound(1.0, -math.inf) is None
    assert gap_to_bound(1.0, math.nan) is None and gap_to_bound(2.0, 3.0) == 0.5
    real = highs.solve_mip

    def stopped_unbounded(*args, **kwargs):
        out = real(*args, **kwargs)
        return type(out)(highspy.HighsModelStatus.kTimeLimit, out.has_plan, out.values,
                         math.inf)

    monkeypatch.setattr(highs, "solve_mip", stopped_unbounded)
    sc = load_scenario(PROBLEMS / "scenarios" / "minilm-phone.yaml")
    sc = sc.with_overrides(objective=Objective.MIN_BUFFER, importance_floor=1.0)
    plan = solve(sc, "highs", time_limit_s=60, relative_gap=1e-4)
    assert plan.status == SolveStatus.FEASIBLE and plan.gap is None
    text = plan.to_json()
    assert "Infinity" not in text and "NaN" not in text
    assert Plan.from_dict(json.loads(text)).gap is None


def test_one_failed_task_never_ends_a_fleet(tmp_path, monkeypatch):
    """A task whose solve raises a bug, and one whose plan is not strict JSON (an
    Infinity, as an older worker wrote it), are failed rows; every other task is solved,
    every file written is strict JSON, and a rerun solves the two again."""
    from elasticplan.answers import fleet as fleet_module
    from elasticplan.problem.inputs import load_json

    fleet = load_fleet(_fleet(tmp_path, devices=[str(PROBLEMS / "devices" / "phone-ufs31.yaml")],
                              models=[str(PROBLEMS / "models" / "minilm-l6.yaml")]))
    real = fleet_module.Solver.solve
    calls = []

    def flaky(self, task):
        calls.append(task.key)
        if len(calls) == 1:
            raise RuntimeError("a bug in one task")
        row, plan = real(self, task)
        if len(calls) == 2 and plan is not None:
            plan = plan.replace('"gap": ', '"gap": Infinity, "x": ', 1)
        return row, plan

    monkeypatch.setattr(fleet_module.Solver, "solve", flaky)
    out = tmp_path / "out"
    summary = run_fleet(fleet, out, workers=0, progress=False)
    rows = _rows(out)
    assert summary.tasks == len(rows) == 4
    failed = {k: r for k, r in rows.items() if r["status"] == "failed"}
    assert set(failed) == set(calls[:2])
    assert "a bug in one task" in failed[calls[0]]["explanation"]
    assert "its plan could not be written" in failed[calls[1]]["explanation"]
    assert all(r["status"] == "optimal" for k, r in rows.items() if k not in failed)
    for p in out.rglob("*.json"):  # strict: no NaN or Infinity anywhere
        load_json(p, what="fleet output", error=SpecError)
    monkeypatch.setattr(fleet_module.Solver, "solve", real)
    again = run_fleet(fleet, out, workers=0, progress=False)
    assert again.solved_now == 2 and again.by_status == {"optimal": 4}


def test_pairs_whose_names_collide_are_all_kept():
    """x/a.yaml and y/a.yaml with b.yaml and b-2.yaml: four pairs, four names (the second
    a--b-2 once overwrote the first, and a pair was never solved)."""
    from types import SimpleNamespace

    from elasticplan.answers.fleet_run import _pairs

    fleet = SimpleNamespace(devices=("x/a.yaml", "y/a.yaml"), models=("b.yaml", "b-2.yaml"))
    pairs = _pairs(fleet, Path("o"))
    assert len(pairs) == 4
    assert sorted((d, m) for d, m, _ in pairs.values()) == sorted(
        (d, m) for d in fleet.devices for m in fleet.models)
