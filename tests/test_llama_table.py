"""A llama store's token-embedding table (tied to the LM head) as a planned part: stored at
every bitwidth as the variant (layer = layers, shard "table", bits) in the uniform per-row
scheme, read and decoded through ShardStore.table_variant / load_table, run by the decoder
(embedding lookups and LM head both read it), and measured by the decoder profile (the
`head:` and `decoder:` blocks). On the tiny random llama."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from elasticplan.cli import main
from elasticplan.errors import StoreError
from elasticplan.problem.spec import HEAD_PIECE_ROWS
from runtime.families.llama import Decoder
from runtime.schemes import uniform
from runtime.schemes.base import FP32
from runtime.schemes.uniform import UNIFORM
from runtime.sources.llama_source import open_hf_llama
from runtime.sources.tiny_llama import write_tiny_llama
from runtime.store import TABLE, ShardStore, variant_bytes

PROMPTS = ["the cat sat on the mat", "where is the hat"]


def cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama-table")
    ckpt = write_tiny_llama(root / "ckpt")
    assert cli("shard", "--checkpoint", ckpt, "--out", root / "store") == 0
    return ckpt, root / "store"


def _batch(store: ShardStore):
    tok = store.text_tokenizer()
    enc = [tok.encode(t).ids for t in PROMPTS]
    n = max(map(len, enc))
    ids = torch.full((len(enc), n), 2, dtype=torch.int64)
    mask = torch.zeros(len(enc), n, dtype=torch.bool)
    for i, e in enumerate(enc):
        ids[i, :len(e)], mask[i, :len(e)] = torch.tensor(e), True
    return ids, mask


def test_the_table_is_stored_at_every_bitwidth(built):
    """One variant per stored bitwidth, the pseudo-layer after the last, [vocab, hidden] as
    its input block alone (no output block, no bias), its own file, listed with checksums;
    at 32 bits it is resident.bin's table exactly."""
    _, store_dir = built
    store = ShardStore(store_dir)
    c = store.config
    resident = store.resident()["embed"]
    for b in store.bitwidths:
        v = store.table_variant(b)
        assert (v.layer, v.name, v.bits, v.file) == (c.layers, TABLE, b, f"table.b{b}.bin")
        assert (v.rows, v.in_rows, v.cols, v.bias, v.offset) == (c.vocab, c.vocab, c.hidden, 0, 0)
        assert v.blocks() == [(c.vocab, c.hidden)]
        per_row = 4 * c.hidden if b == FP32 else math.ceil(c.hidden * b / 8) + 4
        assert v.nbytes == c.vocab * per_row == variant_bytes(UNIFORM, c.vocab, c.hidden,
                                                              c.vocab, 0, b)
        assert (store_dir / v.file).stat().st_size == v.nbytes
        assert store.index.files[v.file].sha256 == v.sha256
    assert torch.equal(store.load_table(FP32), resident)
    assert store.verify() == []
    with pytest.raises(StoreError, match=r"no embedding table at 5 bits in this store "
                                         r"\(stored: \[2, 3, 4, 6, 8, 32\]\)"):
        store.table_variant(5)


def test_a_store_built_before_the_table_gets_it_from_a_rerun(built, tmp_path, capsys):
    """A llama store without table variants (as built before they were stored): asking for
    the table says to rerun `shard`; the rerun writes the six table files and keeps every
    other file (the build key is unchanged)."""
    ckpt, store_dir = built
    old = tmp_path / "store"
    shutil.copytree(store_dir, old)
    index = json.loads((old / "index.json").read_text())
    for b in index["bitwidths"]:
        del index["files"][f"table.b{b}.bin"]
        (old / f"table.b{b}.bin").unlink()
    (old / "index.json").write_text(json.dumps(index))
    with pytest.raises(StoreError, match="rerun `elasticplan shard` to add it"):
        ShardStore(old).load_table(8)
    capsys.readouterr()
    assert cli("shard", "--checkpoint", ckpt, "--out", old) == 0
    assert "6 file(s) written, 14 kept" in capsys.readouterr().out
    assert torch.equal(ShardStore(old).load_table(8), ShardStore(store_dir).load_table(8))


def test_the_8_bit_table_is_within_the_schemes_bound(built):
    """The uniform scheme's bound (runtime/schemes/uniform.py: the clip grid holds the
    no-clip ratio, whose error is at most max|w_row| / 2^b per element): every row's RMS
    error at 8 bits is at most max|row| / 256. The 2-bit table breaks the 8-bit bound (the
    bound can fail). One token's row is a contiguous slice of codes plus its scale: decoded
    alone by the scheme's own dequantisation, it is that row of the table."""
    _, store_dir = built
    store = ShardStore(store_dir)
    fp32 = store.resident()["embed"].numpy()
    eight = store.load_table(8).numpy()
    rms = np.sqrt(((eight - fp32) ** 2).mean(axis=1))
    bound = uniform.error_bound(fp32, 8)
    assert (rms <= bound).all() and rms.max() > 0
    two = store.load_table(2).numpy()
    assert (np.sqrt(((two - fp32) ** 2).mean(axis=1)) > bound).mean() > 0.9
    v, raw = store.table_variant(8), store.read(store.table_variant(8))
    codes_per_row = uniform.row_bytes(v.cols, 8)
    for row in (0, 17, v.rows - 1):
        codes = torch.frombuffer(bytearray(raw[row * codes_per_row:(row + 1) * codes_per_row]),
                                 dtype=torch.uint8).view(1, -1)
        at = v.rows * codes_per_row + 4 * row
        scale = torch.frombuffer(bytearray(raw[at:at + 4]), dtype=torch.float32)
        out = uniform.dequantize_into(torch.empty(1, v.cols), codes, scale, 8)
        assert torch.equal(out[0], torch.from_numpy(eight[row]))


def test_a_decoder_with_the_table_at_8_bits(built):
    """`store.decoder(table_bits=8)` is exactly the model whose embeddings and (tied) LM head
    are the dequantised 8-bit table; its logits are within 5 % of the logits' range of
    fp32's (2 bits: not); for the same final hidden states h, the LM head alone moves a
    logit by at most |h| sqrt(hidden) max|row| / 2^8 (the scheme's row bound); at 32 bits it
    is the fp32 decoder exactly. The resident tensors it was given are left as they were."""
    ckpt, store_dir = built
    store = ShardStore(store_dir)
    c = store.config
    src = open_hf_llama(ckpt)
    ids, mask = _batch(store)
    table = store.load_table(8)
    tensors = dict(src.tensors)
    tensors["model.embed_tokens.weight"] = table.numpy()
    with torch.inference_mode():
        full = store.decoder(context=32)
        ref = full.prefill(ids, mask)
        dec = store.decoder(context=32, table_bits=8)
        got = dec.prefill(ids, mask)
        want = Decoder.from_tensors(c, tensors, context=32).prefill(ids, mask)
        two = store.decoder(context=32, table_bits=2).prefill(ids, mask)
        same = store.decoder(context=32, table_bits=FP32).prefill(ids, mask)
        h = full.teacher_forced(ids, mask)
        head_only = torch.matmul(h, table.t()) - full.logits(h)
    assert dec.head is dec.r["embed"] and torch.equal(dec.head, table)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(same, ref)
    real = mask[..., None].expand_as(ref)
    spread = float(ref[real].max() - ref[real].min())
    assert 0 < float((got - ref)[real].abs().max()) <= 0.05 * spread
    assert float((two - ref)[real].abs().max()) > 0.05 * spread
    fp32 = store.resident()["embed"]
    bound = h.norm(dim=-1, keepdim=True) * math.sqrt(c.hidden) * \
        (fp32.abs().amax(dim=1) / 2 ** 8)[None, None, :]
    assert (head_only.abs() <= bound).all()
    assert torch.equal(full.r["embed"], fp32)  # set_table replaced, never wrote into it
    with pytest.raises(ValueError, match="must be fp32"):
        dec.set_table(table[:-1])


def test_the_head_measurement(built, tmp_path, capsys):
    """`profile` writes the `head:` block (the table as a Shard, importance[b] = max(0,
    KL(2 bits) - KL(b)): 0 at the lowest, at least that at the highest) and the `decoder:`
    block; the 32-bit table's KL is exactly 0; the 4-bit KL equals the one computed from
    the store's decoder with table_bits=4 through prefill (another code path). `--head-only`
    on a profile without the blocks adds the same blocks and measures no layer; the layers'
    cache is untouched, so a full rerun measures nothing; other texts are refused."""
    from elasticplan.problem.loader import parse_model, read_yaml
    from runtime.decode_layers import workspace_bytes
    from runtime.profiling.decoder_profile import scored, token_batches
    from runtime.sources.task import load_splits

    _, store_dir = built
    store = ShardStore(store_dir)
    c = store.config
    out, cache = tmp_path / "tiny.yaml", tmp_path / "cache"
    args = ("profile", "--store", store_dir, "--out", out, "--cache", cache, "--texts", 2,
            "--max-tokens", 8)
    assert cli(*args) == 0
    data = read_yaml(out)
    profile = parse_model(data, str(out))
    raw = json.loads(out.with_name("tiny.measurements.json").read_text())
    kl = {m["variant"]: m["kl"] for m in raw["head_measurements"]}
    assert {(m["layer"], m["shard"]) for m in raw["head_measurements"]} == {(c.layers, TABLE)}
    assert sorted(kl) == list(store.bitwidths) and kl[FP32] == 0.0
    head = data["head"]
    assert head == {"name": TABLE, "kind": "head", "flops": 2 * c.vocab * c.hidden,
                    "weights": c.vocab * c.hidden,
                    "bytes": [store.table_variant(b).nbytes for b in store.bitwidths],
                    "importance": head["importance"]}
    assert profile.head.importance == tuple(head["importance"])
    assert head["importance"] == pytest.approx([max(0, kl[2] - kl[b]) for b in store.bitwidths],
                                               rel=1e-5)
    assert head["importance"][0] == 0 and head["importance"][-1] >= head["importance"][0]
    assert head["importance"][-1] == pytest.approx(kl[2], rel=1e-5) and kl[2] > 0
    assert data["decoder"] == {"context": c.context, "hidden": c.hidden, "ffn": c.ffn,
                               "ffn_slices": c.ffn_slices, "heads": c.heads,
                               "head_dim": c.head_dim, "q_per_kv": c.q_per_kv,
                               "vocab": c.vocab, "workspace_bytes": workspace_bytes(store),
                               "kv_kind": "group", "table_piece_rows": HEAD_PIECE_ROWS}
    assert profile.decoder.workspace_bytes == workspace_bytes(store) > 0
    assert "KL(lowest stored bitwidth) - KL(b bits)" in data["importance_metric"]
    # one measurement recomputed through the store's decoders and prefill
    total = n = 0.0
    with torch.inference_mode():
        for ids, mask in token_batches(store, list(load_splits().calibration.texts[:2]), 8, 8):
            s = scored(mask)
            ref = F.log_softmax(store.decoder(context=8).prefill(ids, mask)[s], -1)
            got = F.log_softmax(store.decoder(context=8, table_bits=4).prefill(ids, mask)[s], -1)
            total += float((ref.exp() * (ref - got)).sum())
            n += int(s.sum())
    assert kl[4] == pytest.approx(total / n, rel=1e-4, abs=1e-7)
    # --head-only on a profile without the blocks (as one measured before the table)
    old = {k: v for k, v in data.items() if k not in ("head", "decoder")}
    old["importance_metric"] = data["importance_metric"].split("; head")[0]
    out.write_text(yaml.safe_dump(old, sort_keys=False))
    (cache / "decoder-head-measurements.jsonl").unlink()
    layer_cache = (cache / "decoder-measurements.jsonl").read_bytes()
    capsys.readouterr()
    assert cli("profile", "--store", store_dir, "--out", out, "--cache", cache,
               "--head-only") == 0
    log = capsys.readouterr().out
    assert "0 bitwidths cached, 6 to measure" in log and "decoder profile" not in log
    again = read_yaml(out)
    assert again["head"] == head and again["decoder"] == data["decoder"]
    assert again["layers"] == data["layers"]
    assert again["importance_metric"] == data["importance_metric"]
    assert json.loads(out.with_name("tiny.measurements.json").read_text()
                      )["head_measurements"] == raw["head_measurements"]
    assert (cache / "decoder-measurements.jsonl").read_bytes() == layer_cache
    capsys.readouterr()
    assert cli(*args) == 0
    log = capsys.readouterr().out
    assert "0 to measure" in log and "6 bitwidths cached, 0 to measure" in log
    assert cli("profile", "--store", store_dir, "--out", out, "--cache", cache,
               "--head-only", "--texts", 3) == 2
    assert "measured with texts 2" in capsys.readouterr().err


def test_a_corrupted_table_is_refused(built, tmp_path):
    """One byte changed in table.b8.bin: its checksum refuses it (naming the file and the
    table) and `verify` lists it; with the index's checksums rewritten to match a NaN
    scale, the value check refuses it; an index whose table variant is not [vocab, hidden]
    is refused at open, naming the key."""
    import hashlib

    _, store_dir = built
    bad = tmp_path / "store"
    shutil.copytree(store_dir, bad)
    path = bad / "table.b8.bin"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    store = ShardStore(bad)
    with pytest.raises(StoreError, match=r"table\.b8\.bin: the embedding table at 8 bits fails "
                                         r"its checksum"):
        store.load_table(8)
    with pytest.raises(StoreError, match="fails its checksum"):
        store.decoder(context=8, table_bits=8)
    assert store.verify() == [f"{path}: checksum mismatch"]
    torch.testing.assert_close(store.load_table(4), ShardStore(store_dir).load_table(4))
    # a NaN scale, the index rewritten to match
    v = store.table_variant(8)
    data = bytearray(ShardStore(store_dir).read(v))
    at = v.rows * uniform.row_bytes(v.cols, 8) + 4 * 5
    data[at:at + 4] = np.float32("nan").tobytes()
    path.write_bytes(bytes(data))
    index = json.loads((bad / "index.json").read_text())
    digest = hashlib.sha256(bytes(data)).hexdigest()
    index["files"][v.file]["sha256"] = index["files"][v.file]["shards"][TABLE]["sha256"] = digest
    (bad / "index.json").write_text(json.dumps(index))
    with pytest.raises(StoreError, match=r"the embedding table at 8 bits \(uniform\): block 0's "
                                         r"row scales holds nan"):
        ShardStore(bad).load_table(8)
    # an index whose table is not the model's [vocab, hidden]
    index["files"][v.file]["shards"][TABLE]["rows"] -= 1
    (bad / "index.json").write_text(json.dumps(index))
    with pytest.raises(StoreError, match=r"shards\.table\.rows: .*\[vocab, hidden\]"):
        ShardStore(bad)


def test_an_encoder_store_keeps_no_table(tmp_path):
    """An encoder's store is as it was: no table files, and asking for its table says so."""
    from runtime.sources.tinyckpt import write_checkpoint

    ckpt = write_checkpoint(tmp_path / "bert", "bert")
    assert cli("shard", "--checkpoint", ckpt, "--out", tmp_path / "store") == 0
    store = ShardStore(tmp_path / "store")
    assert not any(f.startswith(TABLE) for f in store.index.files)
    assert all(v.layer < store.config.layers for v in store.index.variants.values())
    with pytest.raises(StoreError, match="keeps none: an encoder's store"):
        store.load_table(8)


def test_the_committed_smollm2_profile_has_its_head():
    """problems/models/smollm2-135m.yaml's `head:` (added by `elasticplan profile --store
    build/shards/smollm2-135m --head-only`): the table's bytes as the uniform scheme stores
    a [49152, 576] table, importance = max(0, KL(2 bits) - KL(b)) of the measurements
    recorded beside it (fp32's KL exactly 0), and the `decoder:` block is its architecture
    and its runtime's scheme buffers (workspace_bytes, recomputed here from the shapes:
    the dequantisation workspace of the largest block of any quantised shard or of
    HEAD_CHUNK_ROWS rows of the table, and a bounce buffer of the largest quantised shard
    or chunk of the table's rows)."""
    from pathlib import Path

    from elasticplan.problem.archgen import decode_work, work_bytes
    from elasticplan.problem.loader import parse_model, read_yaml
    from elasticplan.problem.spec import HEAD_CHUNK_ROWS

    root = Path(__file__).resolve().parent.parent / "problems" / "models"
    data = read_yaml(root / "smollm2-135m.yaml")
    profile = parse_model(data, "smollm2-135m.yaml")
    arch, head, bits = data["architecture"], data["head"], profile.bitwidths
    vocab, hidden = arch["vocab"], arch["hidden"]
    assert (vocab, hidden) == (49152, 576)
    assert (head["name"], head["kind"], head["flops"], head["weights"]) == \
        (TABLE, "head", 2 * vocab * hidden, vocab * hidden)
    assert head["bytes"] == [variant_bytes(UNIFORM, vocab, hidden, vocab, 0, b) for b in bits]
    raw = json.loads((root / "smollm2-135m.measurements.json").read_text())
    kl = {m["variant"]: m["kl"] for m in raw["head_measurements"]
          if (m["layer"], m["shard"]) == (arch["layers"], TABLE)}
    assert sorted(kl) == list(bits) and kl[FP32] == 0.0
    assert head["importance"] == pytest.approx([max(0.0, kl[bits[0]] - kl[b]) for b in bits],
                                               rel=1e-5)
    assert head["importance"][0] == 0 < head["importance"][-1]
    hd, qk = arch["head_dim"], arch["heads"] // arch["kv_heads"]
    f, rows = arch["ffn"] // arch["ffn_slices"], min(HEAD_CHUNK_ROWS, vocab)
    blocks = [((qk + 2) * hd, hidden), (hidden, qk * hd), (2 * f, hidden), (hidden, f),
              (rows, hidden)]
    quantised = [b for b in bits if b != FP32]
    work = [max(decode_work(r, k, b)[i] for r, k in blocks for b in quantised)
            for i in range(5)]
    bounce = max([s["bytes"][i] for layer in data["layers"] for s in layer["shards"]
                  for i, b in enumerate(bits) if b != FP32]
                 + [rows * (uniform.row_bytes(hidden, b) + 4) for b in quantised])
    assert data["decoder"] == {"context": arch["context"], "hidden": hidden,
                               "ffn": arch["ffn"], "ffn_slices": arch["ffn_slices"],
                               "heads": arch["heads"], "head_dim": arch["head_dim"],
                               "q_per_kv": qk, "vocab": vocab,
                               "workspace_bytes": work_bytes(work) + bounce,
                               "kv_kind": "group"}
