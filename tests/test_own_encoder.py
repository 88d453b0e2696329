"""A user's own encoder, end to end, on tiny random checkpoints of each family (made by
runtime.sources.tinyckpt: config.json, model.safetensors, a `tokenizers` tokenizer.json, and the
sentence-transformers pooling): shard -> profile -> scenario -> calibrate -> solve ->
verify -> run -> evaluate through the CLI, and the runtime's output checked against
`transformers` (fp32) and against our own reference path (dropped and quantised shards).
Then the bad input a checkpoint directory or a task CSV can bring."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from elasticplan.cli import main
from elasticplan.costmodel import PIPELINED, Pick
from elasticplan.errors import StoreError
from elasticplan.plans.plan import Plan, SolveStatus
from elasticplan.problem.loader import load_scenario
from runtime.executor import Executor
from runtime.families.encoder import shard_from_hf
from runtime.measurement.measure import Reference
from runtime.schemes import dictionary, gptq
from runtime.schemes.dictionary import Dictionary
from runtime.sources.checkpoint import ReferenceModel, open_checkpoint
from runtime.sources.task import TaskHead, csv_task, load_splits
from runtime.sources.tinyckpt import write_checkpoint, write_task_csv
from runtime.store import ShardStore, variant_bytes
from tests.submodel_oracle import oracle_layers, stored_dictionary

DEVICE = Path(__file__).resolve().parent.parent / "problems" / "devices" / "phone-ufs31.yaml"
# Each family with another sentence embedding: mean + Normalize (modules.json), CLS
# (modules.json), and no modules.json at all (mean, not normalised).
POOLING = {"bert": "mean", "distilbert": "cls", "roberta": None}
ORACLES = {"bert": "BertModel", "distilbert": "DistilBertModel", "roberta": "RobertaModel"}
TEXTS = ["the good car and the sun", "bad slow rain", "ok", "very very fast city road, not bad"]


def cli(*argv) -> int:
    return main([str(a) for a in argv])


def _strict_json(text: str, file: Path) -> None:
    def refuse(name):
        raise AssertionError(f"{file} holds {name}")
    json.loads(text, parse_constant=refuse)


def _finite(data, file: Path) -> None:
    stack = [data]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, float):
            assert math.isfinite(v), f"{file} holds {v}"


@pytest.fixture(autouse=True)
def outputs_hold_no_nan_or_infinity(tmp_path_factory):
    """Every JSON, JSON-lines and YAML file written while a test ran (the commands'
    outputs: store indexes, profiles, measurements and their cache, task heads, scenarios,
    device files, plans, run and evaluation reports) holds no NaN or Infinity; the
    checkpoints the tests write as input are not outputs."""
    started = time.time() - 1
    yield
    import yaml

    for file in tmp_path_factory.getbasetemp().rglob("*"):
        if file.suffix not in (".json", ".jsonl", ".yaml") or not file.is_file() or \
                file.stat().st_mtime < started or \
                any((d / "model.safetensors").exists() for d in file.parents):
            continue
        text = file.read_text()
        if file.suffix == ".jsonl":
            for line in text.splitlines():
                _strict_json(line, file)
        elif file.suffix == ".json":
            _strict_json(text, file)
        else:
            _finite(yaml.safe_load(text), file)


@pytest.fixture(scope="module", params=sorted(POOLING))
def built(request, tmp_path_factory):
    """A tiny checkpoint of the family, its store and its profile (with a task for
    DistilBERT, fidelity only for the others), through the commands."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    ckpt = write_checkpoint(root / "ckpt", family, seed=3, pooling=POOLING[family])
    store = root / "store"
    assert cli("shard", "--checkpoint", ckpt, "--out", store) == 0
    task = []
    if family == "distilbert":
        write_task_csv(root / "task.csv", rows=90, seed=1)
        task = ["--task", root / "task.csv"]
    assert cli("profile", "--store", store, "--cache", root / "cache", *task) == 0
    return family, root, ckpt, store


def test_the_store_records_the_checkpoints_shape_and_pooling(built):
    family, _, ckpt, store = built
    s = ShardStore(store)
    c = s.config
    assert (s.model, c.family, c.layers, c.heads, c.hidden) == ("ckpt", family, 3, 4, 32)
    assert (c.pooling, c.normalize) == {"bert": ("mean", True), "distilbert": ("cls", False),
                                        "roberta": ("mean", False)}[family]
    assert s.verify() == []
    profile = (store / "profile.yaml").read_text()
    assert "name: ckpt" in profile and "runtime: {store: ." in profile
    # a rebuild reuses every file
    assert cli("shard", "--checkpoint", ckpt, "--out", store) == 0
    assert json.loads((store / "index.json").read_text()) == s.index.data


def test_the_stores_fp32_embedding_equals_transformers_pooled(built):
    """Through the store (resident tensors, every shard at 32 bits, the tokenizer, the
    pooling): the sentence embedding equals transformers' last hidden state pooled the
    way the checkpoint declares."""
    family, _, ckpt, store = built
    s = ShardStore(store)
    batch = s.tokenizer(64)(TEXTS)
    ours = Reference(s).embed(batch)
    oracle = getattr(transformers, ORACLES[family]).from_pretrained(
        str(ckpt), attn_implementation="eager")
    oracle.eval()
    with torch.inference_mode():
        h = oracle(input_ids=batch.ids, attention_mask=batch.mask.long()).last_hidden_state
    if s.config.pooling == "cls":
        theirs = h[:, 0]
    else:
        m = batch.mask.unsqueeze(-1).float()
        theirs = (h * m).sum(1) / m.sum(1)
    if s.config.normalize:
        theirs = torch.nn.functional.normalize(theirs, dim=1)
    assert torch.allclose(ours, theirs, atol=3e-5, rtol=1e-5)
    if family == "roberta":  # padding with RoBERTa's own pad id, positions from pad + 1
        assert int(batch.ids[2, -1]) == s.config.pad_id == 1


def _exact_submodel(root: Path, ckpt: Path, store: Path, name: str) -> None:
    """A random plan's run on the store equals the submodel our reference path builds."""
    sc = root / f"{name}.yaml"
    assert cli("scenario", "--store", store, "--device", DEVICE, "--target-ms", 50,
               "-o", sc) == 0
    scenario = load_scenario(sc)
    model = scenario.model
    rng = np.random.default_rng(7)
    selection = tuple(
        tuple(Pick(s, int(rng.integers(len(model.bitwidths))), bool(rng.integers(2)))
              for s in sorted(rng.choice(len(layer.shards), size=5, replace=False)))
        for layer in model.layers)
    plan = Plan.from_selection(scenario, selection, solver="test",
                               status=SolveStatus.FEASIBLE, gap=None, solve_seconds=0.0,
                               execution=PIPELINED)
    s = ShardStore(store)
    batch = s.tokenizer(model.seq_len)(TEXTS)
    with Executor(plan, scenario, s, emulate=False) as ex:
        ex.fill_preload()
        got = ex.run(batch).embedding
    ref = ReferenceModel(ckpt)
    with torch.inference_mode():
        want = ref.encoder.forward(batch.ids, batch.mask,
                                   oracle_layers(ref, model, selection, s))
        full = ref.encoder.forward(batch.ids, batch.mask, ref.full_layers)
    assert (got - want).abs().max().item() < 1e-5
    assert (got - full).abs().max().item() > 1e-3  # the submodel is not the full model


def test_a_dropped_and_quantised_plan_computes_exactly_that_submodel(built):
    family, root, ckpt, store = built
    _exact_submodel(root, ckpt, store, "exact")


def test_a_dictionary_store_keeps_the_outlier_share_asked_for(tmp_path, capsys):
    """`shard --scheme dict --outlier-share 0.1`: the index records the share, every
    variant is the size that share implies (larger than at the default 0.005), and it
    decodes to what its bytes parsed with numpy give; a share outside [0, 0.5], or one for
    the uniform scheme, is refused (exit 2) before anything is written."""
    ckpt = write_checkpoint(tmp_path / "ck", "bert", seed=6)
    for bad in (["--scheme", "dict", "--outlier-share", "0.7"],
                ["--scheme", "dict", "--outlier-share", "nan"], ["--outlier-share", "0.02"]):
        assert cli("shard", "--checkpoint", ckpt, "--out", tmp_path / "bad", *bad) == 2
        assert "--outlier-share" in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()
    store = tmp_path / "dict10"
    assert cli("shard", "--checkpoint", ckpt, "--out", store, "--scheme", "dict",
               "--outlier-share", "0.1") == 0
    index = json.loads((store / "index.json").read_text())
    assert index["quantisation"]["dictionary"]["outlier_share"] == 0.1
    s = ShardStore(store)
    for name in ("head1", "ffn0"):
        v = s.variant(0, name, 2)
        k = s.config.shard_in_rows(name)
        assert v.nbytes == variant_bytes(Dictionary(0.1), v.rows, v.cols, k, v.bias, 2) > \
            variant_bytes(Dictionary(), v.rows, v.cols, k, v.bias, 2)
        assert np.array_equal(s.load(0, name, 2)[0].numpy(), stored_dictionary(s, 0, name, 2))


def test_a_dictionary_store_decodes_and_runs_its_submodel_exactly(tmp_path, capsys):
    """`shard --scheme dict`: 2-5 bits as dictionaries with outliers, 6 and 8 uniform,
    recorded per file; the profile records the schemes; a plan on it computes the submodel
    our numpy round trip of each scheme gives; the store and a profile of the other scheme
    are refused before any compute; a size that does not match its shape is refused."""
    ckpt = write_checkpoint(tmp_path / "ck", "bert", seed=5)
    store = tmp_path / "dict"
    assert cli("shard", "--checkpoint", ckpt, "--out", store, "--scheme", "dict") == 0
    s = ShardStore(store)
    assert s.bitwidths == (2, 3, 4, 5, 6, 8, 32)
    assert [s.scheme_of(b) for b in s.bitwidths] == ["dict"] * 4 + ["uniform"] * 3
    v = s.variant(1, "ffn2", 3)
    m, _ = s.load(1, "ffn2", 3)
    assert np.array_equal(m.numpy(), stored_dictionary(s, 1, "ffn2", 3))
    k = s.config.shard_in_rows("ffn2")
    assert v.nbytes == variant_bytes(Dictionary(), v.rows, v.cols, k, v.bias, 3)
    # the rounding is error-compensated: on the calibration activations the block's output
    # is closer to fp32 than nearest-centroid rounding with the same dictionary gets
    ref = ReferenceModel(ckpt)
    texts = list(load_splits().train.texts[:64])
    H = gptq.hessians(ref, texts)[1, "ffn_in"]
    orig, _ = shard_from_hf(ref.tensors, s.config, 1, "ffn2")
    nearest = dictionary.dequantize_np(*dictionary.quantize(orig[:k], 3, v.scheme.share))

    def output_error(q):
        e = (q - orig[:k]).astype(np.float64)
        return float(np.einsum("ri,ij,rj->", e, H, e))
    assert output_error(m[:k].numpy()) < 0.9 * output_error(nearest)
    assert cli("profile", "--store", store, "--cache", tmp_path / "cache") == 0
    assert "quantisation: {2: dict, 3: dict, 4: dict, 5: dict, 6: uniform, 8: uniform}" in \
        (store / "profile.yaml").read_text()
    _exact_submodel(tmp_path, ckpt, store, "exact")
    # a uniform store of the same model, profiled: neither profile serves the other store
    uni = tmp_path / "uniform"
    assert cli("shard", "--checkpoint", ckpt, "--out", uni) == 0
    assert cli("profile", "--store", uni, "--cache", tmp_path / "cache-u") == 0
    capsys.readouterr()
    assert cli("scenario", "--store", store, "--profile", uni / "profile.yaml", "--device",
               DEVICE, "--target-ms", 50, "-o", tmp_path / "mixed.yaml") == 8
    err = _err(capsys)
    assert "index.json: 2-bit shards are stored in the dict scheme, but the profile" in err
    plan = tmp_path / "plan.json"
    assert cli("baseline", "uniform-3", tmp_path / "exact.yaml", "-o", plan) == 0
    capsys.readouterr()
    for command in ("run", "evaluate"):
        assert cli(command, plan, "--store", uni) == 8
        assert "2-bit shards are stored in the uniform scheme" in _err(capsys)
    # an index whose size for a variant does not match its shape and scheme
    index = json.loads((store / "index.json").read_text())
    entry = index["files"]["layer0.b3.bin"]["shards"]["head1"]
    entry["bytes"] -= 4
    (store / "index.json").write_text(json.dumps(index))
    with pytest.raises(StoreError, match=r"index.json: files.layer0.b3.bin.shards.head1.bytes: "
                                         r"\d+, but a 32x32 shard at 3 bits in the dict scheme"):
        ShardStore(store)


def test_scenario_calibrate_solve_run_evaluate(built, capsys):
    """The commands as docs/own-encoder.md gives them: every step reads what the one
    before wrote, the store and the head found through the profile."""
    family, root, _, store = built
    sc, cal = root / "question.yaml", root / "calibrated"
    assert cli("scenario", "--store", store, "--device", DEVICE, "--target-ms", 3,
               "--buffer-mb", 0.005, "--memory-mb", 1, "-o", sc) == 0
    # two rounds of a tiny model: the path, not the fit's quality. On a busy machine a
    # device may carry no spread that wide (over 1: calibrate refuses, exit 9, nothing
    # written): tried three times, then the rest of the path runs on the given device.
    for _ in range(3):
        code = cli("calibrate", "--scenario", sc, "--storage-mb-s", 5, "--plans", 8,
                   "--repeats", 2, "--budget-s", 0, "--max-error-pct", 1000, "--out-dir", cal)
        if code == 0:
            break
        assert code == 9 and "Nothing was written" in capsys.readouterr().err
        assert not (cal / "device.yaml").exists()
    if code == 0:
        calibrated = load_scenario(cal / "scenario.yaml")
        assert calibrated.memory_budget_mb == 1  # the question kept what it asked
    solved = cal / "scenario.yaml" if code == 0 else sc
    plan = root / "plan.json"
    # a target any calibrated device meets (this machine's speed varies under load)
    assert cli("solve", solved, "--target-ms", 1000, "-o", plan) == 0
    assert cli("verify", plan) == 0
    p = Plan.load(plan)
    # a 5 kB buffer holds no fp32 shard of this model: the plan streams
    assert any(not c.preloaded for lp in p.layers for c in lp.shards)
    assert cli("run", plan, "--repeat", 2, "--json", root / "run.json") == 0
    run = json.loads((root / "run.json").read_text())
    assert run["memory"]["measured_peak_bytes"] <= run["memory"]["predicted_peak_bytes"]
    assert 0 < run["fidelity"] <= 1 + 1e-6
    assert (run["task_agreement"] is None) == (family != "distilbert")
    assert cli("evaluate", plan, "--json", root / "eval.json") == 0
    ev = json.loads((root / "eval.json").read_text())
    whole = p.n_shards == 24 and all(c.bits == 32 for lp in p.layers for c in lp.shards)
    if whole:  # every shard kept in fp32: the fp32 model, up to summation order
        assert ev["fidelity"] == pytest.approx(1, abs=1e-5)
    else:
        assert 0 < ev["fidelity"] < 1
    if family == "distilbert":  # the task's test split: 20 % of 90 rows
        assert ev["texts"] == 18 and 0 <= ev["accuracy"] <= 1
        assert ev["fp32_accuracy"] is not None
    else:
        assert ev["texts"] == 1000 and ev["accuracy"] is None
    out = capsys.readouterr().out
    assert "fidelity" in out


# --- bad input ------------------------------------------------------------------------

def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def _shard_fails(tmp_path, capsys, ckpt, pattern: str, code: int = 8):
    out = tmp_path / "out-store"
    assert cli("shard", "--checkpoint", ckpt, "--out", out) == code
    err = _err(capsys)
    assert pattern in err, err
    assert not out.exists()  # nothing half-written
    return err


def test_a_directory_without_config_or_weights_is_refused(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "c", "bert")
    (ckpt / "config.json").unlink()
    _shard_fails(tmp_path, capsys, ckpt, "no config.json here")
    ckpt = write_checkpoint(tmp_path / "d", "bert")
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    _shard_fails(tmp_path, capsys, ckpt, "no model.safetensors here (pytorch_model.bin found")
    _shard_fails(tmp_path, capsys, tmp_path / "nowhere", "not a directory")


def test_a_missing_or_misshaped_tensor_is_refused_naming_it(tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    ckpt = write_checkpoint(tmp_path / "c", "roberta")
    t = load_file(str(ckpt / "model.safetensors"))
    del t["encoder.layer.2.output.dense.bias"]
    save_file(t, str(ckpt / "model.safetensors"))
    _shard_fails(tmp_path, capsys, ckpt, "tensor 'encoder.layer.2.output.dense.bias' is missing")
    t["encoder.layer.2.output.dense.bias"] = np.zeros(32, np.float32)
    t["encoder.layer.1.intermediate.dense.weight"] = np.zeros((63, 32), np.float32)
    save_file(t, str(ckpt / "model.safetensors"))
    _shard_fails(tmp_path, capsys, ckpt, "'encoder.layer.1.intermediate.dense.weight' has "
                                         "shape [63, 32], config.json implies [64, 32]")
    (ckpt / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    _shard_fails(tmp_path, capsys, ckpt, "not a readable safetensors file")


def test_a_classifiers_prefixed_tensors_are_read(tmp_path):
    from safetensors.numpy import load_file, save_file

    ckpt = write_checkpoint(tmp_path / "c", "bert")
    t = load_file(str(ckpt / "model.safetensors"))
    save_file({f"bert.{k}": v for k, v in t.items()} | {"classifier.weight": np.zeros((2, 32),
                                                                                     np.float32)},
              str(ckpt / "model.safetensors"))
    got = open_checkpoint(ckpt).tensors
    assert np.array_equal(got["encoder.layer.0.attention.self.query.weight"],
                          t["encoder.layer.0.attention.self.query.weight"])


@pytest.mark.parametrize("change, key", [
    ({"hidden_act": "relu"}, "hidden_act: 'relu' is not supported"),
    ({"num_attention_heads": 5}, "num_attention_heads: 5 heads do not divide the hidden size"),
    ({"hidden_size": "32"}, "hidden_size: expected"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ({"is_decoder": True}, "is_decoder: decoders are not supported"),
])
def test_an_unsupported_config_is_refused_naming_the_key(tmp_path, capsys, change, key):
    ckpt = write_checkpoint(tmp_path / "c", "bert")
    config = json.loads((ckpt / "config.json").read_text()) | change
    (ckpt / "config.json").write_text(json.dumps(config))
    err = _shard_fails(tmp_path, capsys, ckpt, key)
    assert "config.json" in err


def test_a_tokenizer_that_does_not_fit_the_vocabulary_is_refused(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "c", "bert")
    config = json.loads((ckpt / "config.json").read_text()) | {"vocab_size": 40}
    (ckpt / "config.json").write_text(json.dumps(config))
    _shard_fails(tmp_path, capsys, ckpt, "tokenizer.json: the tokenizer has 88 tokens, "
                                         "config.json vocab_size is 40")
    (ckpt / "tokenizer.json").write_text("{}")
    _shard_fails(tmp_path, capsys, ckpt, "not a readable tokenizer.json")


def test_an_unsupported_pooling_is_refused(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "c", "bert", pooling="mean")
    cfg = ckpt / "1_Pooling" / "config.json"
    cfg.write_text(json.dumps(json.loads(cfg.read_text()) | {"pooling_mode_max_tokens": True}))
    _shard_fails(tmp_path, capsys, ckpt, "pooling_mode_max_tokens")
    # the command line overrides what the checkpoint declares
    out = tmp_path / "s"
    assert cli("shard", "--checkpoint", ckpt, "--out", out, "--pooling", "cls") == 0
    assert ShardStore(out).config.pooling == "cls"


@pytest.mark.parametrize("rows, pattern", [
    ("words,label\nthe car,a\n", "no column 'text' (columns: 'words', 'label')"),
    ("text,label\n" + "".join(f"t{i},{i}\n" for i in range(30)),
     "30 distinct values in 30 rows: not class labels"),
    ("text,label\n" + "the car,a\n" * 9, "1 distinct value(s) in 9 rows"),
    ("text,label\n" + "the car,a\n" * 9 + "rain,b\n", "class 'b' of column 'label' has 1 row"),
    ("text,label\nthe car,\n", "line 2: empty label"),
    ("", "no column 'text' (columns: none, the file is empty)"),
])
def test_a_bad_task_csv_is_refused_before_any_work(built, tmp_path, capsys, rows, pattern):
    _, _, _, store = built
    csv = tmp_path / "task.csv"
    csv.write_text(rows)
    out = tmp_path / "p.yaml"
    assert cli("profile", "--store", store, "--task", csv, "--out", out) == 8
    err = _err(capsys)
    assert str(csv) in err and pattern in err, err
    assert not out.exists()


def test_a_csv_task_splits_every_class_three_ways(tmp_path):
    write_task_csv(tmp_path / "t.csv", rows=90, seed=2)
    task = csv_task(tmp_path / "t.csv", "text", "label")
    assert task.labels == ("happy", "meh", "sad")
    sp = task.splits
    assert (len(sp.test), len(sp.calibration), len(sp.train)) == (18, 9, 63)
    for s in (sp.test, sp.calibration, sp.train):
        assert set(s.labels.tolist()) == {0, 1, 2}
    again = csv_task(tmp_path / "t.csv", "text", "label")
    assert again.splits.test.digest() == sp.test.digest()


@pytest.mark.parametrize("built", ["distilbert"], indirect=True)  # profiled with a task
def test_a_head_refuses_a_csv_that_changed_since(built):
    family, root, _, store = built
    head_file = store / "profile.taskhead.json"
    head = TaskHead.load(head_file)
    assert head.labels == ("happy", "meh", "sad") and head.w.shape == (3, 32)
    assert head.load_task(head_file).splits.test.digest()  # as trained
    copy = store / "profile.taskhead.csv"  # the profile copied the CSV beside the head
    assert head.task["csv"] == copy.name and copy.read_bytes() == (root / "task.csv").read_bytes()
    with open(copy, "a") as fh:
        fh.write("one more sun,happy\n")
    try:
        with pytest.raises(StoreError, match="changed since the task head"):
            head.load_task(head_file)
    finally:
        copy.write_bytes((root / "task.csv").read_bytes())


def test_the_scenario_command_refuses_a_profile_of_another_model(built, tmp_path, capsys):
    _, _, _, store = built
    other = tmp_path / "other"
    write_checkpoint(tmp_path / "ck2", "bert")
    assert cli("shard", "--checkpoint", tmp_path / "ck2", "--out", other) == 0
    capsys.readouterr()
    assert cli("scenario", "--store", other, "--device", DEVICE, "--target-ms", 5,
               "--profile", store / "profile.yaml", "-o", tmp_path / "s.yaml") == 2
    assert "a profile of 'ckpt', the store" in _err(capsys)
    assert cli("scenario", "--store", other, "--device", DEVICE, "--target-ms", 5,
               "-o", tmp_path / "s.yaml") == 2
    assert "no profile of this store" in _err(capsys)
