"""A plan put to use: the session API (runtime/session.py) and `elasticplan encode`
(runtime/encode.py). The embeddings are the plan's submodel's (runtime/profiling/submodel.py,
as `evaluate` builds it) and, for hold-in-memory, transformers' own; the process stays within
10 % of the plan's predicted peak; every bad input is one line with its exit code and leaves
nothing written; docs/session.md's example runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from elasticplan.cli import main
from elasticplan.errors import InvalidArgument
from elasticplan.plans.plan import Plan
from runtime.measurement.memprobe import release, status_bytes
from runtime.profiling.profile import Profiler, profile_seq_len
from runtime.profiling.submodel import plan_changes
from runtime.session import open_session
from runtime.sources.task import TaskHead
from runtime.store import ShardStore

ROOT = Path(__file__).resolve().parent.parent
PROBLEMS = ROOT / "problems"
MINILM = PROBLEMS / "scenarios" / "minilm-phone.yaml"
HEAD = PROBLEMS / "models" / "minilm-l6.taskhead.json"
TEXTS = ["The pipeline streams shards while the previous layer computes.",
         "what a lovely morning",
         "Ünïcödé, emoji 🚗 and punctuation!!! ??? ...",
         " ".join(["the storage is slow and the buffer is small"] * 40),  # > 128 tokens
         "ok"]


def cli(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """A 10 MB plan (window 1, solved to a 1 % gap to keep the test short; README's uses
    --window auto) and hold-in-memory, on the shipped MiniLM scenario."""
    d = tmp_path_factory.mktemp("plans")
    mem10, hold = d / "mem10.plan.json", d / "hold.plan.json"
    assert cli("solve", MINILM, "--memory-mb", 10, "--window", 1, "--gap", 0.01, "-o",
               mem10) == 0
    assert cli("baseline", "hold-in-memory", MINILM, "-o", hold) == 0
    return {"mem10": mem10, "hold": hold}


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    return path


def _summary(text: str) -> dict:
    m = re.search(r"process ([\d.]+) MB above its baseline \(([+-][\d.]+)%\)", text)
    t = re.search(r"(\d+) truncated to (\d+) tokens", text)
    return {"process_mb": float(m.group(1)), "process_pct": float(m.group(2)),
            "truncated": int(t.group(1)), "seq_len": int(t.group(2))}


def test_a_10mb_plan_encodes_each_line_as_its_submodel_does_within_its_memory(
        plans, texts_file, store_dir, tmp_path):
    """`elasticplan encode` of a text file through a 10 MB plan, in a fresh process as a
    user runs it: one embedding per line, cosine >= 0.99999 to the plan's submodel rebuilt
    from the store (as `evaluate` builds it), the long text truncated and counted, and the
    process's peak within 10 % of the plan's prediction."""
    out = tmp_path / "emb.npy"
    run = subprocess.run([sys.executable, "-m", "elasticplan.cli", "encode", str(plans["mem10"]),
                          "--input", str(texts_file), "--output", str(out), "--store",
                          str(store_dir), "--no-head"],
                         capture_output=True, text=True, cwd=ROOT, check=False)
    assert run.returncode == 0, run.stderr
    emb = np.load(out)
    assert emb.shape == (len(TEXTS), 384) and emb.dtype == np.float32
    store = ShardStore(store_dir)
    plan = Plan.load(plans["mem10"])
    prof = Profiler(store, TEXTS, np.zeros(len(TEXTS), np.int64), None, profile_seq_len(store))
    sub = prof.embed_selection(plan_changes(plan, store.config.shard_names()))
    ours = torch.from_numpy(emb[prof.order])  # the profiler sorts texts by length
    cos = torch.nn.functional.cosine_similarity(ours.double(), sub.double(), dim=1)
    assert float(cos.min()) >= 0.99999, cos
    full = torch.nn.functional.cosine_similarity(ours.double(), prof.reference.double(), dim=1)
    assert float(full.mean()) < 0.999  # a 10 MB plan drops and quantises: not the fp32 model
    s = _summary(run.stdout)
    assert (s["truncated"], s["seq_len"]) == (1, 128)
    assert f"wrote {out}: {len(TEXTS)} texts x 384 float32 embeddings" in run.stdout
    assert "texts/s" in run.stdout and "latency per query" in run.stdout
    predicted = plan.memory.peak_bytes / 1e6
    assert re.search(rf"predicted {predicted:.3f} MB, executor {predicted:.3f} MB", run.stdout)
    assert abs(s["process_pct"]) <= 10.0, run.stdout


def test_hold_in_memory_equals_transformers_pooled_embedding(plans, texts_file, store_dir,
                                                              tmp_path, capsys):
    """Through hold-in-memory (every shard fp32) the embeddings are transformers' BertModel
    on the packaged checkpoint, mean-pooled over the real tokens and L2-normalised as its
    modules.json declares, to 1e-4, texts cut at the plan's 128 tokens as ours are."""
    import transformers

    from runtime.families.encoder import model_dir

    out = tmp_path / "hold.npy"
    assert cli("encode", plans["hold"], "--input", texts_file, "--output", out, "--store",
               store_dir, "--no-head") == 0
    assert "1 truncated to 128 tokens" in capsys.readouterr().out
    ours = np.load(out)
    path = str(model_dir())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.BertModel.from_pretrained(path, attn_implementation="eager").eval()
    batch = tok(TEXTS, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.inference_mode():
        h = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    theirs = torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=1).numpy()
    assert np.abs(ours - theirs).max() <= 1e-4


def test_parquet_with_labels_from_csv_and_jsonl_and_limit(plans, store_dir, tmp_path, capsys):
    """CSV (--text-column) and JSON Lines (--field) inputs, --limit, and Parquet output with
    the task head's labels and probabilities: the same embeddings as .npy of the same texts,
    labels the head's argmax on them, probabilities summing to one."""
    import pyarrow.parquet as pq

    csv_in = tmp_path / "in.csv"
    csv_in.write_text("id,body\n1,\"what a lovely morning\"\n2,\"the bus is late, again\"\n"
                      "3,\"a quoted\nline break\"\n4,never encoded\n", encoding="utf-8")
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": t, "n": i}) for i, t in
                               enumerate(["what a lovely morning", "the bus is late, again",
                                          "a quoted\nline break"])) + "\n\n", encoding="utf-8")
    pq_out, npy_out = tmp_path / "out.parquet", tmp_path / "out.npy"
    common = ("--store", store_dir, "--head", HEAD)
    assert cli("encode", plans["mem10"], "--input", csv_in, "--text-column", "body", "--limit",
               3, "--output", pq_out, *common) == 0
    assert "3 texts x 384 float32 embeddings, labels and probabilities (negative, positive)" \
        in capsys.readouterr().out
    assert cli("encode", plans["mem10"], "--input", jsonl, "--field", "body", "--output",
               npy_out, *common) == 0
    table = pq.read_table(pq_out)
    assert table.column_names == ["embedding", "label", "probabilities"]
    meta = json.loads(table.schema.metadata[b"elasticplan"])
    assert meta["classes"] == ["negative", "positive"] and meta["seq_len"] == 128
    emb = np.array(table.column("embedding").to_pylist(), np.float32)
    assert np.array_equal(emb, np.load(npy_out))
    head = TaskHead.load(HEAD)
    want = [head.labels[k] for k in head.predict(torch.from_numpy(emb))]
    assert table.column("label").to_pylist() == want
    probs = np.array(table.column("probabilities").to_pylist())
    assert np.allclose(probs.sum(1), 1, atol=1e-6)
    assert [head.labels[k] for k in probs.argmax(1)] == want


BAD = [  # (file name, bytes, extra flags, exit code, the message's telling part)
    ("empty.txt", b"", (), 2, "empty.txt: an empty file: no texts to encode"),
    ("blank.jsonl", b"\n \n", (), 2, "blank.jsonl: no texts to encode (blank lines only)"),
    ("bin.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", (), 2, "bin.txt: a binary file"),
    ("bad.txt", b"fine\nalso fine\ncaf\xe9 latte\n", (), 2,
     "bad.txt: line 3: not UTF-8 (byte 4 of the line is 0xe9)"),
    ("gap.txt", b"one\n\nthree\n", (), 2, "gap.txt: line 2: empty text"),
    ("t.csv", b"id,text\n1,hello\n", ("--text-column", "body"), 2,
     "t.csv: line 1: no column 'body' (columns: 'id', 'text')"),
    ("e.csv", b"text\nhello\n\"  \"\n", (), 2, "e.csv: line 3: empty text (column 'text')"),
    ("h.csv", b"text\n", (), 2, "h.csv: no texts to encode (a header only)"),
    ("f.jsonl", b'{"text": "a"}\n{"body": "b"}\n', (), 2,
     "f.jsonl: line 2: no field 'text' (fields: 'body')"),
    ("n.jsonl", b'{"text": 5}\n', (), 2, "n.jsonl: line 1: field 'text' is a"),
    ("j.jsonl", b'{"text": "a"\n', (), 2, "j.jsonl: line 1: not JSON"),
    ("s.jsonl", b'{"text": "ok"}\n{"text": "\\ud800 alone"}\n', (), 2,
     "s.jsonl: line 2: field 'text' holds a lone surrogate (U+D800) at character 1"),
    ("q.csv", b'text\nfine\n"a quote never closed\nsecond\nthird\n', (), 2,
     "q.csv: line 3: a quoted field that starts in this row is never closed"),
]


@pytest.mark.parametrize("name,data,flags,code,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_writes_nothing(plans, store_dir, tmp_path, capsys, name,
                                                  data, flags, code, message):
    src = tmp_path / name
    src.write_bytes(data)
    out = tmp_path / "out.npy"
    assert cli("encode", plans["mem10"], "--input", src, "--output", out, "--store",
               store_dir, "--no-head", *flags) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no output, no temp file


def test_bad_plans_and_outputs(plans, texts_file, store_dir, tmp_path, capsys):
    """A decoder's plan (use generate), a store of another model, an output onto an input
    or of an unknown kind: one line each, documented exit codes, nothing written."""
    dec = tmp_path / "dec.plan.json"
    assert cli("solve", PROBLEMS / "scenarios" / "smollm2-phone.yaml", "--solver", "greedy",
               "-o", dec) == 0
    bert = tmp_path / "bert.plan.json"
    assert cli("solve", PROBLEMS / "scenarios" / "distilbert-sbc.yaml", "--solver", "greedy",
               "-o", bert) == 0
    capsys.readouterr()
    out = tmp_path / "o.npy"
    cases = [
        ((dec, "--output", out), 2, "answers a decoder's question (it generates token by "
                                    "token): use `elasticplan generate`"),
        ((bert, "--output", out), 8, "the plan is for model 'distilbert', this shard store "
                                     "holds 'minilm-l6'"),
        ((plans["mem10"], "--output", texts_file), 2, "refusing to write an output onto this "
                                                      "command's input"),
        ((plans["mem10"], "--output", store_dir / "x.npy"), 2, "refusing to write an output "
                                                              "onto this command's input"),
        ((plans["mem10"], "--output", tmp_path / "o.csv"), 2, "write .npy or .parquet, not "
                                                              "'.csv'"),
        ((plans["mem10"], "--output", out, "--text-column", "a", "--field", "b"), 2,
         "give one"),
        ((plans["mem10"], "--output", out, "--store", tmp_path / "nowhere"), 8,
         "no shard store here"),
        ((plans["mem10"], "--output", tmp_path / "dir.npy"), 11, "not a regular file"),
        ((plans["mem10"], "--output", tmp_path / "nowhere" / "o.npy"), 11,
         "does not exist"),
    ]
    (tmp_path / "dir.npy").mkdir()
    for argv, code, message in cases:
        rc = cli("encode", argv[0], "--input", texts_file, "--store", store_dir, "--no-head",
                 *argv[1:])
        err = capsys.readouterr().err
        assert rc == code and err.count("\n") == 1 and message in err, (argv, rc, err)
    assert not out.exists()
    assert texts_file.read_text(encoding="utf-8") == "\n".join(TEXTS) + "\n"


def test_an_interrupted_encode_leaves_the_old_output_and_no_temp_file(
        plans, store_dir, tmp_path, capsys, monkeypatch):
    """Outputs are written in chunks to a temporary file renamed at the end: a run stopped
    in its second chunk (Ctrl-C) leaves the previous output as it was and no debris."""
    import runtime.encode as encode
    from runtime.session import Session

    src = tmp_path / "many.txt"
    src.write_text("\n".join(f"text number {i}" for i in range(3 * encode.CHUNK)) + "\n")
    out = tmp_path / "out.npy"
    out.write_bytes(b"the old output")
    calls = []
    real = Session.encode

    def stopping(self, texts):
        calls.append(len(texts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, texts)

    monkeypatch.setattr(Session, "encode", stopping)
    assert cli("encode", plans["mem10"], "--input", src, "--output", out, "--store", store_dir,
               "--no-head", "--no-emulate") == 130
    assert calls == [encode.CHUNK, encode.CHUNK]
    assert out.read_bytes() == b"the old output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.txt", "out.npy"]


def test_session_encodes_classifies_reports_and_releases_everything(plans, store_dir):
    """The API: embeddings normalised as the model declares, labels with probabilities,
    latency and memory beside the prediction; closing releases the executor's buffers (the
    process gives back about the plan's peak) and its files, and restores torch's threads."""
    threads = torch.get_num_threads()
    with open_session(plans["hold"], store=store_dir, head=HEAD) as s:
        assert torch.get_num_threads() == 1
        held = status_bytes("VmRSS")
        emb = s.encode(TEXTS[:2])
        assert emb.shape == (2, 384) and emb.dtype == np.float32
        assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-6)
        c = s.classify(["what a lovely morning", "I hate waiting for the bus"])
        assert c.classes == ("negative", "positive") and len(c.labels) == 2
        assert c.probabilities.shape == (2, 2) and np.allclose(c.probabilities.sum(1), 1)
        with pytest.raises(InvalidArgument, match="text 1 is empty"):
            s.encode(["fine", "  "])
        with pytest.raises(InvalidArgument, match="not one string"):
            s.encode("one string")
        st = s.stats()
        assert st.queries == 4 and st.truncated == 0 and st.latency_p95_ms >= st.latency_median_ms
        plan = Plan.load(plans["hold"])
        assert st.predicted_peak_bytes == plan.memory.peak_bytes == st.measured_peak_bytes
        assert st.process_peak_bytes is not None and "process" in st.format()
        assert json.loads(json.dumps(st.to_dict()))["queries"] == 4
        fds = dict(s.executor.fds)
    assert s.closed and torch.get_num_threads() == threads
    for fd in fds.values():
        with pytest.raises(OSError):
            os.fstat(fd)
    with pytest.raises(InvalidArgument, match="closed"):
        s.encode(["again"])
    release()
    assert held - status_bytes("VmRSS") > 0.8 * plan.memory.peak_bytes  # given back
    with open_session(plans["mem10"], store=store_dir, head=False,
                      measure_process=False) as s:
        assert s.head is None and s.stats().process_peak_bytes is None
        with pytest.raises(InvalidArgument, match="no task head"):
            s.classify(["a"])
        # the plan streams its table: each query predicted at the rows it read (one per
        # distinct token), the plan's own figure (at seq_len rows) beside it
        s.encode(["ok", "ok ok ok"])
        st = s.stats()
        plan = Plan.load(plans["mem10"])
        assert plan.embeddings == "streamed" and st.planned_latency_ms == plan.predicted_latency_ms
        assert st.predicted_latency_ms < st.planned_latency_ms
        assert "query_tokens" in st.format()


def test_the_docs_example_runs(plans, store_dir, tmp_path, monkeypatch, capsys):
    """docs/session.md's Python example, as written, from a repository root that has built
    the MiniLM store and solved out/mem10.plan.json (README's commands)."""
    doc = (ROOT / "docs" / "session.md").read_text(encoding="utf-8")
    example = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    assert len([line for line in example.splitlines() if line.strip()]) == 5
    (tmp_path / "build" / "shards").mkdir(parents=True)
    (tmp_path / "build" / "shards" / "minilm-l6").symlink_to(store_dir)
    (tmp_path / "problems").symlink_to(PROBLEMS)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mem10.plan.json").write_bytes(plans["mem10"].read_bytes())
    data = json.loads(plans["mem10"].read_text())
    data["scenario"]["path"] = "../problems/scenarios/minilm-phone.yaml"
    (tmp_path / "out" / "mem10.plan.json").write_text(json.dumps(data))
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "docs/session.md", "exec"), {})
    out = capsys.readouterr().out
    assert "(2, 384)" in out and "latency per query" in out and "peak memory" in out


def test_the_benchmark_parses_its_arguments(capsys):
    from benchmarks import encode_throughput

    with pytest.raises(SystemExit) as e:
        encode_throughput.main(["--help"])
    assert e.value.code == 0 and "python -m benchmarks.encode_throughput" in capsys.readouterr().out


def test_a_session_serves_threads_one_query_at_a_time_and_refuses_what_is_not_text(
        plans, store_dir):
    """Two threads on one session get what one thread gets (their queries take turns on
    the plan's buffers); a lone surrogate and a thread count beyond the CLI's are refused."""
    import threading

    from elasticplan.cli import MAX_THREADS

    texts = [TEXTS[0], TEXTS[1]]
    with open_session(plans["mem10"], store=store_dir, head=False,
                      measure_process=False) as s:
        alone = {t: s.encode([t] * 3) for t in texts}
        got, failed = {}, []

        def worker(t):
            try:
                got[t] = [s.encode([t] * 3) for _ in range(4)]
            except BaseException as e:  # noqa: BLE001 - reported below
                failed.append(e)

        threads = [threading.Thread(target=worker, args=(t,)) for t in texts]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not failed, failed
        for t in texts:
            assert all(np.array_equal(e, alone[t]) for e in got[t])
        assert s.stats().queries == 6 + 2 * 4 * 3
        with pytest.raises(InvalidArgument, match="text 1 holds a lone surrogate"):
            s.encode(["fine", "\ud800"])
    with pytest.raises(InvalidArgument, match=f"from 1 to {MAX_THREADS}"):
        open_session(plans["mem10"], store=store_dir, threads=MAX_THREADS + 1)
