"""The decoder baselines (elasticplan/plans/baselines.py): hold-in-memory-B and
hold-in-memory-fit, load-on-demand (prefetch window 0: nothing overlaps) and the refusal
of load-then-execute for a decoder; the plans verify and round-trip, the cost model prices
load-on-demand as reads + computes layer after layer, the decode executor honours window 0
(traces), and the decoding benchmarks' --quick paths run on the tiny llama. No timing
thresholds."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from elasticplan.cli import main
from elasticplan.costmodel import PIPELINED, read_ms, shard_compute_ms
from elasticplan.decoding import pass_scenario
from elasticplan.errors import InfeasibleError, InvalidArgument
from elasticplan.plans.baselines import (
    HOLD_FIT,
    HOLD_IN_MEMORY,
    LAYERWISE,
    LOAD_ON_DEMAND,
    LOAD_THEN_EXECUTE,
    baseline_plan,
)
from elasticplan.plans.plan import Plan
from elasticplan.plans.verify import check, with_plan_question
from elasticplan.problem.loader import load_scenario
from elasticplan.problem.spec import step_pass
from tests.test_decoding_plan import DEVICE, _scenario
from tests.test_generate import tiny  # noqa: F401 (the tiny llama's store, profile, question)

ROOT = Path(__file__).resolve().parent.parent
PHONE = ROOT / "problems/scenarios/smollm2-phone.yaml"
MINILM = ROOT / "problems/scenarios/minilm-phone.yaml"
TINY_NAMES = [HOLD_IN_MEMORY, "hold-in-memory-4", LOAD_ON_DEMAND, LAYERWISE, "uniform-4"]


def _round_trip(sc, plan) -> list[str]:
    """What the verifier finds in the plan as read back from its JSON."""
    return check(with_plan_question(sc, plan), Plan.from_dict(json.loads(plan.to_json())))[0]


@pytest.mark.parametrize("name", TINY_NAMES)
def test_decoder_baselines_verify_and_round_trip(name):
    sc = _scenario(memory_budget_mb=0.9)
    plan = baseline_plan(sc, name)
    assert _round_trip(sc, plan) == []
    assert plan.decoding is not None and plan.execution == PIPELINED
    picks = [c for lp in plan.layers for c in lp.shards]
    assert len(picks) == sc.model.n_shards  # every shard, the table (the last layer) too
    bits = 4 if name.endswith("-4") else 32
    assert {c.bits for c in picks} == {bits}
    assert {c.preloaded for c in picks} == {name.startswith(HOLD_IN_MEMORY)}
    assert plan.window == {LOAD_ON_DEMAND: 0, LAYERWISE: 1}.get(name)


def test_uniform_takes_another_window_and_the_others_keep_theirs():
    sc = _scenario()
    plan = baseline_plan(sc, "uniform-4", window=1)
    assert plan.window == 1 and _round_trip(sc, plan) == []
    with pytest.raises(InvalidArgument, match="has its own window"):
        baseline_plan(sc, LOAD_ON_DEMAND, window=1)


def test_load_on_demand_step_is_every_read_then_every_compute():
    """Window 0: layer l's reads start when layer l-1 has computed, so the last decode step
    is the sum over layers (the table last) of its reads, the wake-up and its compute,
    then pooling; the cost model's figure, from its own terms added up here."""
    device = dataclasses.replace(DEVICE, wake_ms=0.01, pool_ms=0.02)
    sc = _scenario(device=device)
    plan = baseline_plan(sc, LOAD_ON_DEMAND)
    step = pass_scenario(sc, step_pass(sc.question, sc.question.answer_tokens - 1))
    m, bit = step.model, step.model.bit_index(32)
    total = device.pool_ms
    for layer in m.layers:
        total += sum(read_ms(device, s.bytes[bit]) for s in layer.shards) + device.wake_ms
        total += device.layer_overhead_ms + sum(shard_compute_ms(device, m, s, bit, True)
                                                for s in layer.shards)
    assert plan.decoding.last_token_ms == pytest.approx(total, rel=1e-12)
    for before, lp in zip(plan.layers, plan.layers[1:]):  # the step model's schedule
        assert lp.io_start_ms == pytest.approx(before.compute_end_ms, abs=1e-12)
    # layer-wise pipelining reads one layer ahead: the same work, overlapped
    assert baseline_plan(sc, LAYERWISE).decoding.last_token_ms < total


def test_load_on_demand_is_an_encoders_strategy_too():
    sc = load_scenario(MINILM)
    plan = baseline_plan(sc, LOAD_ON_DEMAND)
    assert plan.window == 0 and plan.preload_bytes == 0 and _round_trip(sc, plan) == []
    for before, lp in zip(plan.layers, plan.layers[1:]):
        assert lp.io_start_ms == pytest.approx(before.compute_end_ms, abs=1e-12)
    assert baseline_plan(sc, LOAD_THEN_EXECUTE).execution == "sequential"  # still an encoder's


def test_load_then_execute_is_refused_for_a_decoder(tmp_path, capsys):
    with pytest.raises(InvalidArgument, match=LOAD_ON_DEMAND):
        baseline_plan(load_scenario(PHONE), LOAD_THEN_EXECUTE)
    out = tmp_path / "plan.json"
    assert main(["baseline", LOAD_THEN_EXECUTE, str(PHONE), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "use load-on-demand" in err and not out.exists()


def test_hold_in_memory_fit_keeps_the_most_importance_within_the_budget():
    """SmolLM2's profile at the phone: of the hold-in-memory-B plans, the one with the most
    importance within the budget; its solver names it, its question keeps the budget."""
    base = load_scenario(PHONE)
    every = {b: baseline_plan(base, f"hold-in-memory-{b}") for b in base.model.bitwidths}
    for budget in (48, 100, 600):
        sc = base.with_overrides(memory_budget_mb=budget)
        plan = baseline_plan(sc, HOLD_FIT)
        fitting = [p for p in every.values() if p.memory.peak_bytes <= budget * 1e6]
        assert plan.importance == max(p.importance for p in fitting)
        assert plan.solver in {p.solver for p in fitting if p.importance == plan.importance}
        assert plan.scenario.question.memory_budget_mb == budget
        assert _round_trip(sc, plan) == []
    assert baseline_plan(base.with_overrides(memory_budget_mb=48), HOLD_FIT).solver == \
        "hold-in-memory-2"
    least = min(p.memory.peak_bytes for p in every.values()) / 1e6
    with pytest.raises(InfeasibleError, match=f"{least:.3f} MB"):
        baseline_plan(base.with_overrides(memory_budget_mb=least - 1), HOLD_FIT)
    with pytest.raises(InvalidArgument, match="no memory_budget_mb"):
        baseline_plan(load_scenario(MINILM), HOLD_FIT)
    with pytest.raises(InvalidArgument, match="hold-in-memory-B with one of them"):
        baseline_plan(base, "hold-in-memory-5")


def test_a_window_0_plan_is_saved_loaded_and_checked(tmp_path):
    """The plan file carries window 0 (a question may not ask for it: its window is None);
    a window 0 plan whose times are another window's is caught."""
    out = tmp_path / "lod.json"
    assert main(["baseline", LOAD_ON_DEMAND, str(PHONE), "-o", str(out)]) == 0
    assert main(["verify", str(out)]) == 0
    plan = Plan.load(out)
    assert plan.window == 0 and plan.scenario.question.prefetch_window is None
    data = json.loads(out.read_text())
    data["window"] = 1
    bad, _ = check(with_plan_question(load_scenario(PHONE), plan), Plan.from_dict(data))
    assert any("predicted io_start_ms" in b for b in bad)


# --- on the tiny llama: the executor, generate, the benchmarks ------------------------------

def test_the_executor_honours_window_0(tiny, tmp_path):  # noqa: F811
    """load-on-demand through the decode executor: in every pass, a layer's reads (the
    table's too) start after the layer before has computed, every layer reads; the answer
    is the full model's."""
    from runtime.decoding import DecodeExecutor
    from runtime.measurement.generate import picks_of
    from runtime.store import ShardStore

    _, _, store_path, sc = tiny
    out = tmp_path / "lod.json"
    assert main(["baseline", LOAD_ON_DEMAND, str(sc), "-o", str(out)]) == 0
    plan = Plan.load(out)
    store = ShardStore(store_path)
    ids = store.text_tokenizer().encode("the cat sat on the mat").ids
    picks, table = picks_of(plan)
    q = plan.scenario.question
    with DecodeExecutor(store, picks, table, context=q.context_tokens, window=plan.window,
                        prompt_tokens=q.prompt_tokens) as ex:
        result = ex.generate(ids, 4, eos_id=None)
    assert ex.window == 0 and len(result.passes) == 4
    for p in result.passes:
        stages = [*p.layers, p.head]
        assert all(t.reads > 0 for t in stages)
        for before, t in zip(stages, stages[1:]):
            assert t.io_start_ms >= before.compute_end_ms
    report = tmp_path / "report.json"
    assert main(["generate", str(out), "--prompt", "the cat sat on the mat",
                 "--max-new-tokens", "4", "--json", str(report)]) == 0
    agreement = json.loads(report.read_text())["agreement"]
    assert agreement["equal"] == agreement["of"] == 4


def _budgeted(tiny, tmp_path: Path, fraction: float) -> tuple[Path, float]:  # noqa: F811
    """The tiny question with a memory budget of `fraction` of hold-in-memory's peak."""
    _, _, _, sc = tiny
    hold = baseline_plan(load_scenario(sc), HOLD_IN_MEMORY).memory.peak_bytes / 1e6
    q = yaml.safe_load(Path(sc).read_text())
    q.update(memory_budget_mb=round(fraction * hold, 3), preload_budget_mb=round(hold, 3))
    path = tmp_path / "budgeted.yaml"
    path.write_text(yaml.safe_dump(q))
    return path, hold


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_decode_baselines_quick(tiny, tmp_path, capsys):  # noqa: F811
    from benchmarks import decode_baselines

    sc, _ = _budgeted(tiny, tmp_path, 0.8)
    assert decode_baselines.main(["--quick", "--scenario", str(sc), "--store", str(tiny[2]),
                                  "--prompt", "where is the hat", "--uniform", "8",
                                  "--out-dir", str(tmp_path)]) == 0
    rows = {r["strategy"]: r for r in _rows(tmp_path / "decode_baselines.csv")}
    assert {"highs", HOLD_IN_MEMORY, LOAD_ON_DEMAND, LAYERWISE, "uniform-8"} <= set(rows)
    assert any(k.startswith(HOLD_FIT) for k in rows)
    for r in rows.values():
        assert float(r["measured_token_ms"]) > 0 and float(r["tokens_per_s"]) > 0
        assert float(r["process_mb"]) > 0
        if r["predicted_peak_mb"]:
            assert float(r["executor_peak_mb"]) == pytest.approx(float(r["predicted_peak_mb"]))
    assert rows[LOAD_ON_DEMAND]["window"] == "0"
    peer = rows["transformers generate (fp32)"]
    assert peer["same_tokens_as_hold_in_memory"] == "True"
    assert "transformers' tokens equal hold-in-memory's" in capsys.readouterr().out


def test_decode_frontier_quick(tiny, tmp_path, capsys):  # noqa: F811
    from benchmarks import decode_frontier

    sc, hold = _budgeted(tiny, tmp_path, 1.0)
    budgets = f"{0.5 * hold:.3f},{0.8 * hold:.3f}"
    assert decode_frontier.main(["--quick", "--scenario", str(sc), "--store", str(tiny[2]),
                                 "--bandwidths", "200,1000", "--memory-mb", budgets,
                                 "--prompt", "where is the hat", "--goal-memory-mb",
                                 f"{0.5 * hold:.3f}", "--out-dir", str(tmp_path)]) == 0
    rows = _rows(tmp_path / "decode_frontier.csv")
    assert (tmp_path / "decode_frontier.png").stat().st_size > 0
    exact = [r for r in rows if r["method"] == "exact"]
    assert {r["bandwidth_mb_s"] for r in exact} == {"200.0", "1000.0"}
    for r in rows:
        assert float(r["executor_peak_mb"]) == pytest.approx(float(r["predicted_peak_mb"]))
        assert 0 <= float(r["top1"]) <= 1 and float(r["kl"]) >= 0
        if r["memory_budget_mb"]:
            assert float(r["predicted_peak_mb"]) <= float(r["memory_budget_mb"]) + 1e-6
    assert float(rows[0]["kl"]) == pytest.approx(0, abs=1e-6)  # hold-in-memory: the full model
    out = capsys.readouterr().out
    assert "goal 1" in out and "goal 2" in out
