"""Every shipped problem loads; every malformed one is a one-line SpecError naming file and key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from elasticplan.cli import main
from elasticplan.errors import SpecError
from elasticplan.problem.loader import load_scenario, parse_device, parse_model, read_yaml

PROBLEMS = Path(__file__).resolve().parent.parent / "problems"
SCENARIOS = sorted((PROBLEMS / "scenarios").glob("*.yaml"))
MINILM = PROBLEMS / "models" / "minilm-l6.yaml"
PHONE = PROBLEMS / "devices" / "phone-ufs31.yaml"


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.name)
def test_every_scenario_loads(path):
    sc = load_scenario(path)
    assert sc.model.layers and sc.content_hash


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.name)
def test_a_scenarios_content_hash_is_json_of_its_three_parts(path):
    """The hash is composed from the parts' canonical texts (a part file's kept with its
    parse): it must stay the hash of the whole document, which fleets key their tasks by."""
    import hashlib
    import json

    data = read_yaml(path)
    parts = {k: read_yaml(path.parent / data[k]) if isinstance(data[k], str) else data[k]
             for k in ("device", "model")}
    whole = {**parts, "scenario": {k: v for k, v in data.items() if k not in parts}}
    expected = hashlib.sha256(json.dumps(whole, sort_keys=True, separators=(",", ":"),
                                         default=str).encode()).hexdigest()
    assert load_scenario(path).content_hash == expected


def test_a_part_file_is_parsed_once_per_content_and_errors_name_their_file(tmp_path):
    """Two scenarios naming copies of one model profile share one parse; a changed file is
    parsed again; a broken copy is an error naming that copy."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        (tmp_path / d / "model.yaml").write_bytes(MINILM.read_bytes())
        (tmp_path / d / "device.yaml").write_bytes(PHONE.read_bytes())
        (tmp_path / d / "s.yaml").write_text(
            "device: device.yaml\nmodel: model.yaml\ntarget_latency_ms: 50\n"
            "preload_budget_mb: 4\n")
    a, b = load_scenario(tmp_path / "a" / "s.yaml"), load_scenario(tmp_path / "b" / "s.yaml")
    assert a.model is b.model and a.content_hash == b.content_hash
    raw = yaml.safe_load(MINILM.read_text())
    raw["name"] = "renamed"
    (tmp_path / "b" / "model.yaml").write_text(yaml.safe_dump(raw))
    changed = load_scenario(tmp_path / "b" / "s.yaml")
    assert changed.model.name == "renamed" and changed.content_hash != a.content_hash
    raw["bitwidths"] = "eight"
    (tmp_path / "b" / "model.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError) as e:
        load_scenario(tmp_path / "b" / "s.yaml")
    assert str(tmp_path / "b" / "model.yaml") in str(e.value) and "bitwidths" in str(e.value)


@pytest.mark.parametrize("path", sorted((PROBLEMS / "devices").glob("*.yaml")), ids=lambda p: p.name)
def test_every_device_loads(path):
    assert parse_device(read_yaml(path), str(path)).bandwidth_mb_s > 0


@pytest.mark.parametrize("path", sorted((PROBLEMS / "models").glob("*.yaml")), ids=lambda p: p.name)
def test_every_model_loads_and_matches_its_generator(path):
    from elasticplan.problem.archgen import ARCHITECTURES, profile_dict

    raw = read_yaml(path)
    model = parse_model(raw, str(path))
    if model.name not in ARCHITECTURES:  # a measured decoder's profile has no generator:
        # tests/test_llama_store.py checks it against its architecture's shapes
        assert raw["architecture"]["family"] == "llama" and not model.synthetic
        return
    generated = yaml.safe_load(yaml.safe_dump(profile_dict(ARCHITECTURES[model.name])))
    if model.synthetic:
        assert raw == generated
    else:  # measured (elasticplan profile): same shards, bytes and flops, measured importance
        assert model.name == "minilm-l6"
        # a dictionary store's profile: its bitwidths (5 added), its bytes and decode
        # workspace are the dictionary scheme's; names, kinds, flops, weights as generated
        dictionary = "quantisation" in raw
        other = ("importance", "bytes") if dictionary else ("importance",)
        strip = [[{k: v for k, v in s.items() if k not in other} for s in layer["shards"]]
                 for layer in raw["layers"]]
        assert strip == [[{k: v for k, v in s.items() if k not in other}
                          for s in layer["shards"]] for layer in generated["layers"]]
        assert raw["resident_bytes"] == generated["resident_bytes"]
        if dictionary:
            assert dict(model.schemes) == {2: "dict", 3: "dict", 4: "dict", 5: "dict",
                                           6: "uniform", 8: "uniform"}
            assert model.store_path is not None and model.task_head_path is not None
            raw["memory"].pop("activation_bytes"), generated["memory"].pop("activation_bytes")
        assert raw["memory"] == generated["memory"]


def test_minilm_bytes_match_measured_sizes():
    """docs/runtime.md: a head is 197 KB fp32, 50 KB 8-bit, 25 KB 4-bit, 13 KB 2-bit with one
    scale per row of [128, 384]; the store quantises Wo per output channel (384 scales
    instead of 32), which adds 1.4 KB per head: 51, 27, 15 KB."""
    model = parse_model(read_yaml(MINILM), str(MINILM))
    head = model.layers[0].shards[0]
    kb = dict(zip(model.bitwidths, (round(b / 1000) for b in head.bytes)))
    assert (kb[32], kb[8], kb[4], kb[2]) == (197, 51, 27, 15)
    ffn = model.layers[0].shards[12]
    assert round(ffn.bytes[-1] / 1000) == 394


def _model():
    return read_yaml(MINILM)


CASES = [
    # (mutation, key path, words in the message)
    (lambda m: m.update(extra=1), "extra", "unknown key"),
    (lambda m: m.update(seq_len="long"), "seq_len", "expected an integer"),
    (lambda m: m["layers"][1]["shards"][2]["bytes"].pop(), "layers[1].shards[2].bytes",
     "must be aligned"),
    (lambda m: m["layers"][0]["shards"][0]["bytes"].__setitem__(3, -5),
     "layers[0].shards[0].bytes[3]", "must be >= 0"),
    (lambda m: m.update(bitwidths=[2, 8, 4, 6, 3, 32]), "bitwidths[2]", "strictly increasing"),
    (lambda m: m["layers"][0]["shards"][1].update(name="head0"), "layers[0].shards[1].name",
     "duplicate"),
    (lambda m: m["layers"][0]["shards"][0].update(flops=float("nan")),
     "layers[0].shards[0].flops", "finite"),
    (lambda m: m["layers"][0]["shards"][0].pop("kind"), "layers[0].shards[0].kind", "missing"),
    (lambda m: m.update(quantisation={7: "dict"}), "quantisation.7", "not a quantised bitwidth"),
    (lambda m: m.update(quantisation={3: "Not A Name!"}), "quantisation.3",
     "must be a quantisation scheme's name"),
    (lambda m: m.update(runtime={"store": 5}), "runtime.store", "expected a non-empty string"),
    (lambda m: m.update(runtime={"store": "s", "head": "h"}), "runtime.head", "unknown key"),
]


@pytest.mark.parametrize("mutate,key,words", CASES)
def test_model_errors_name_file_key_and_problem(tmp_path, mutate, key, words):
    data = _model()
    mutate(data)
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as info:
        parse_model(read_yaml(path), str(path))
    msg = str(info.value)
    assert msg.startswith(f"{path}: {key}: ") and words in msg and "\n" not in msg


@pytest.mark.parametrize("mutate,key,words", [
    (lambda d: d.pop("workspace_bytes"), "decoder.workspace_bytes", "missing"),
    (lambda d: d.pop("ffn_slices"), "decoder.ffn_slices", "missing"),
    (lambda d: d.update(ffn_slices=7), "decoder.ffn_slices", "does not divide ffn 1536"),
    (lambda d: d.update(workspace_bytes=-1), "decoder.workspace_bytes", "must be >= 0"),
])
def test_decoder_block_errors(tmp_path, mutate, key, words):
    """A decoder's `decoder:` block gives its FFN slices and its runtime's scheme buffers
    (what the planner prices of its activations: docs/formats.md), or is refused."""
    data = read_yaml(PROBLEMS / "models" / "smollm2-135m.yaml")
    data.pop("runtime", None)
    mutate(data["decoder"])
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as info:
        parse_model(read_yaml(path), str(path))
    msg = str(info.value)
    assert msg.startswith(f"{path}: {key}: ") and words in msg and "\n" not in msg


def _scenario(tmp_path, **fields):
    data = {"name": "t", "device": str(PHONE), "model": str(MINILM), "target_latency_ms": 25,
            "preload_budget_mb": 2}
    data.update(fields)
    data = {k: v for k, v in data.items() if v is not None}
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("fields,key,words", [
    ({"device": "missing.yaml"}, "device", "file not found"),
    ({"target_latency_ms": -1}, "target_latency_ms", "must be a number in (0, 1e+07] ms, got -1"),
    ({"objective": "fastest"}, "objective", "must be one of"),
    ({"objective": "min_buffer"}, "importance_floor", "needs an importance_floor"),
    ({"min_shards_per_layer": 99}, "min_shards_per_layer", "exceeds the 24 shards"),
    ({"preload_budget_mb": 2000}, "preload_budget_mb", "does not fit"),
    ({"target_latency_ms": None}, "target_latency_ms", "missing"),
    ({"device": 5}, "device", "path (string) or an inline mapping"),
])
def test_scenario_errors(tmp_path, fields, key, words):
    path = _scenario(tmp_path, **fields)
    with pytest.raises(SpecError) as info:
        load_scenario(path)
    assert str(info.value).startswith(f"{path}: {key}: ") and words in str(info.value)


def test_inline_device_errors_name_the_inline_key_path(tmp_path):
    device = read_yaml(PHONE)
    device["storage"]["bandwidth_mb_s"] = 0
    path = _scenario(tmp_path, device=device)
    with pytest.raises(SpecError, match=r"scenario.yaml: device.storage.bandwidth_mb_s: must be >= 0.001"):
        load_scenario(path)


def _calibrated_device() -> dict:
    """A device file as `elasticplan calibrate` writes it: per-weight dequantisation for
    every quantised bitwidth, per-shard overhead, embedding and pooling, the spread."""
    return {"name": "cal", "storage": {"bandwidth_mb_s": 200, "latency_us": 100},
            "compute": {"gflops": 70, "layer_overhead_ms": 0.4, "shard_overhead_ms": 0.03,
                        "dequant_ns_per_weight": {2: 1.2, 3: 2.0, 4: 1.6, 6: 2.6, 8: 2.4},
                        "embed_ms": 0.4, "pool_ms": 0.15},
            "spread": {"io": 0.01, "compute": 0.04, "runs": 48}, "memory_mb": 1000}


def test_a_calibrated_device_loads_with_every_term():
    d = parse_device(_calibrated_device(), "cal.yaml")
    assert d.dequant_gb_s is None and d.dequant_ns(3) == 2.0 and d.dequant_ns(32) is None
    assert d.vector_ns_per_weight == () and d.weight_ns(4, True) == d.weight_ns(4, False) == 1.6
    data = _calibrated_device()
    data["compute"]["vector_ns_per_weight"] = {4: 0.15}  # a decoder's: the kernel's bitwidth
    v = parse_device(data, "cal.yaml")
    assert (v.weight_ns(4, True), v.weight_ns(4, False), v.weight_ns(8, True)) == (0.15, 1.6, 2.4)
    assert (d.shard_overhead_ms, d.embed_ms, d.pool_ms) == (0.03, 0.4, 0.15)
    assert (d.spread.io, d.spread.compute, d.spread.runs) == (0.01, 0.04, 48)
    assert d.contention_share == 0.0  # not given: none
    data["compute"].update(contention_share=0.3)
    assert parse_device(data, "cal.yaml").contention_share == 0.3
    old = parse_device(read_yaml(PHONE), str(PHONE))  # an older file: its terms, the rest 0
    assert old.dequant_gb_s == 3.0 and old.dequant_ns_per_weight == () and old.spread is None
    assert (old.shard_overhead_ms, old.embed_ms, old.pool_ms) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("mutate,key,words", [
    (lambda d: d["compute"].pop("dequant_ns_per_weight"), "compute.dequant_gb_s",
     "needs a dequantisation cost"),
    (lambda d: d["compute"].update(dequant_ns_per_weight={}), "compute.dequant_ns_per_weight",
     "is empty"),
    (lambda d: d["compute"]["dequant_ns_per_weight"].update({33: 1.0}),
     "compute.dequant_ns_per_weight.33", "must be <= 32"),
    (lambda d: d["compute"]["dequant_ns_per_weight"].update({4: -1}),
     "compute.dequant_ns_per_weight.4", "must be >= 0"),
    (lambda d: d["compute"]["dequant_ns_per_weight"].update({"four": 1}),
     "compute.dequant_ns_per_weight.four", "expected an integer"),
    (lambda d: d["compute"].update(vector_ns_per_weight={}), "compute.vector_ns_per_weight",
     "is empty"),
    (lambda d: d["compute"].update(vector_ns_per_weight={4: "fast"}),
     "compute.vector_ns_per_weight.4", "expected a number"),
    (lambda d: d["compute"].update(dequant_gb_s=3.0, vector_ns_per_weight={4: 0.1})
     or d["compute"].pop("dequant_ns_per_weight"), "compute.vector_ns_per_weight",
     "needs dequant_ns_per_weight beside it"),
    (lambda d: d["compute"].update(pool_ms="slow"), "compute.pool_ms", "expected a number"),
    (lambda d: d["spread"].update(io=2), "spread.io", "must be <= 1"),
    (lambda d: d["compute"].update(contention_share=1.5), "compute.contention_share",
     "must be <= 0.9"),
    (lambda d: d["spread"].pop("runs"), "spread.runs", "missing"),
])
def test_calibrated_device_errors(mutate, key, words):
    data = _calibrated_device()
    mutate(data)
    with pytest.raises(SpecError) as info:
        parse_device(data, "cal.yaml")
    msg = str(info.value)
    assert msg.startswith(f"cal.yaml: {key}: ") and words in msg, msg


def test_a_device_and_model_that_cannot_price_dequantisation_are_refused(tmp_path):
    """A per-weight device needs every quantised bitwidth the model stores and the shards'
    weights; a latency quantile needs the device's spread."""
    device = _calibrated_device()
    del device["compute"]["dequant_ns_per_weight"][6]
    with pytest.raises(SpecError, match=r"dequant_ns_per_weight: device 'cal' has no "
                                        r"dequantisation cost for 6 bits"):
        load_scenario(_scenario(tmp_path, device=device))
    model = _model()
    del model["layers"][2]["shards"][5]["weights"]
    with pytest.raises(SpecError, match=r"model.layers\[2\].shards\[5\].weights: .* does not "
                                        r"give its shards' weights"):
        load_scenario(_scenario(tmp_path, device=_calibrated_device(), model=model))
    with pytest.raises(SpecError, match="latency_quantile: 0.9 needs the run-to-run spread"):
        load_scenario(_scenario(tmp_path, latency_quantile=0.9))
    with pytest.raises(SpecError, match=r"latency_quantile: must be a number in \[0.5, 0.999\]"):
        load_scenario(_scenario(tmp_path, latency_quantile=0.2, device=_calibrated_device()))
    sc = load_scenario(_scenario(tmp_path, latency_quantile=0.95, device=_calibrated_device()))
    assert sc.latency_quantile == 0.95


def _mutations():
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-10, 10), st.floats(allow_nan=True),
                     st.text(max_size=5), st.lists(st.integers(), max_size=3),
                     st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
    return st.lists(st.tuples(st.sampled_from(["set", "delete", "add"]), st.integers(0, 10_000),
                              leaf), min_size=1, max_size=4)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node[:3]):
            yield from _paths(v, prefix + (i,))


@given(mutations=_mutations())
def test_malformed_models_never_traceback(tmp_path_factory, mutations):
    data = copy.deepcopy(_SMALL)
    for op, pick, value in mutations:
        paths = [p for p in _paths(data) if p]
        path = paths[pick % len(paths)]
        parent = data
        for k in path[:-1]:
            parent = parent[k]
        if op == "set":
            parent[path[-1]] = value
        elif op == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[f"x{pick}"] = value
    file = tmp_path_factory.mktemp("m") / "model.yaml"
    file.write_text(yaml.safe_dump(data))
    try:
        parse_model(read_yaml(file), str(file))
    except SpecError as e:
        assert str(e).startswith(str(file)) and "\n" not in str(e)


@given(text=st.text(max_size=200))
def test_arbitrary_text_never_tracebacks(tmp_path_factory, text):
    file = tmp_path_factory.mktemp("t") / "scenario.yaml"
    file.write_text(text, encoding="utf-8")
    try:
        load_scenario(file)
    except SpecError as e:
        assert str(e).startswith(str(file)) and "\n" not in str(e)


def test_cli_bad_input_is_one_line_and_nonzero(tmp_path, capsys):
    path = _scenario(tmp_path, target_latency_ms="soon")
    assert main(["solve", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "target_latency_ms: must be a number" in err and "'soon'" in err
    assert "Traceback" not in err


_SMALL = {"name": "m", "seq_len": 8, "bitwidths": [4, 32],
          "layers": [{"shards": [{"name": "a", "kind": "head", "flops": 10,
                                  "bytes": [1, 4], "importance": [0.1, 0.2]}]}]}


def test_first_bad_finds_the_first_bad_value_past_its_chunks():
    """The weight check looks at CHECK_CHUNK values at a time (no table-sized
    temporaries) and still names the first bad value's flat index."""
    import numpy as np

    from runtime.families.weights import CHECK_CHUNK, MAX_WEIGHT, first_bad

    v = np.zeros(3 * CHECK_CHUNK + 5, np.float32)
    assert first_bad(v) is None
    v[2 * CHECK_CHUNK + 3] = np.nan
    v[-1] = np.inf
    i, value = first_bad(v)
    assert i == 2 * CHECK_CHUNK + 3 and np.isnan(value)
    v[CHECK_CHUNK - 1] = -2 * MAX_WEIGHT
    assert first_bad(v) == (CHECK_CHUNK - 1, -2 * MAX_WEIGHT)


def test_exponents_without_a_point_or_sign_are_numbers():
    """YAML 1.2's `1e9` and `1.0e7` (PyYAML's YAML 1.1 read them as strings, and a budget
    of 1e9 was refused as "got '1e9'"); quoted, integers and hex stay what they were."""
    from elasticplan.problem.inputs import parse_yaml

    got = parse_yaml(b"a: 1e9\nb: 1.0e7\nc: -2E+3\nd: .5e-3\ne: '1e9'\nf: 12\ng: 1.0e+7\n"
                     b"h: 1e\n", "x.yaml")
    assert got == {"a": 1e9, "b": 1e7, "c": -2000.0, "d": 5e-4, "e": "1e9", "f": 12,
                   "g": 1e7, "h": "1e"}
    assert isinstance(got["f"], int)
    from elasticplan.problem.inputs import dump_yaml  # what we write reads back the same

    data = {"name": "1e3", "budget": 1e9, "n": 12, "label": "2.5e-3x"}
    assert parse_yaml(dump_yaml(data).encode(), "x.yaml") == data


def test_a_misspelt_required_key_is_named_beside_the_missing_one(tmp_path):
    data = yaml.safe_load((PROBLEMS / "scenarios" / "minilm-phone.yaml").read_text())
    data["target_latncy_ms"] = data.pop("target_latency_ms")
    for k in ("device", "model"):
        data[k] = str((PROBLEMS / "scenarios" / data[k]).resolve())
    f = tmp_path / "typo.yaml"
    f.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError, match="target_latency_ms: required key is missing "
                                        r"\(is 'target_latncy_ms' a misspelling of it\?\)"):
        load_scenario(f)
