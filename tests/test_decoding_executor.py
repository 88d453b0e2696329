"""The decode executor (runtime/decoding.py) on the tiny random llama: it generates exactly
what the store's Decoder with the same picks generates (fp32: the full model; dropped and
quantised shards, a quantised table: that submodel), whatever is resident or streamed and
whatever the window; every streamed shard is read once per pass (counted at the system
call); its memory account is the sum of its terms, each the planner's prediction for the
same choices exactly, and its ring never holds more than it was sized for; its KV cache
holds the kept groups only. No timing thresholds."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

from elasticplan.cli import main
from elasticplan.costmodel import Layout, Pick, simulate, window_peak
from elasticplan.errors import StoreError
from elasticplan.problem.archgen import work_bytes
from elasticplan.problem.loader import parse_model
from elasticplan.problem.question import Question
from elasticplan.problem.spec import HEAD_CHUNK_ROWS, Device, Scenario, activation_bytes
from runtime.decode_layers import ALIGN, Arena, decode_buffers, workspace_bytes
from runtime.decoding import DecodeExecutor, ShardPick, TablePick, emulated_storage
from runtime.schemes import uniform
from runtime.schemes.base import FP32
from runtime.sources.tiny_llama import write_tiny_llama
from runtime.store import TABLE, ShardStore

PROMPT = "the cat sat on the mat and the hat"
NEW = 12


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("decode-executor")
    ckpt = write_tiny_llama(root / "ckpt")
    assert main(["shard", "--checkpoint", str(ckpt), "--out", str(root / "store")]) == 0
    return root / "store"


@pytest.fixture(scope="module")
def store(store_path):
    return ShardStore(store_path)


@pytest.fixture(scope="module")
def group_store(tmp_path_factory):
    """The same model kept in the group scheme (runtime/schemes/group.py: its table too)."""
    root = tmp_path_factory.mktemp("decode-executor-group")
    ckpt = write_tiny_llama(root / "ckpt")
    assert main(["shard", "--checkpoint", str(ckpt), "--out", str(root / "store"),
                 "--scheme", "group"]) == 0
    return ShardStore(root / "store")


@pytest.fixture(params=["uniform", "group"])
def any_store(request, store, group_store):
    s = {"uniform": store, "group": group_store}[request.param]
    assert s.table_variant(8).scheme.name == request.param
    return s


@pytest.fixture(scope="module")
def prompt(store):
    return store.text_tokenizer().encode(PROMPT).ids


def every(store, bits=FP32, resident=False):
    c = store.config
    return [[ShardPick(n, bits, resident) for n in c.shard_names()] for _ in range(c.layers)]


def mixed(store, bits=FP32):
    """Every shard, resident and streamed alternating."""
    c = store.config
    return [[ShardPick(n, bits, (i + l) % 2 == 0) for i, n in enumerate(c.shard_names())]
            for l in range(c.layers)]


def reference(store, picks, table_bits, prompt, n, context):
    """The store's Decoder with the same shards and table: its greedy tokens and, along
    them, the logits of the prompt pass and of every decode step."""
    bits = [{p.name: p.bits for p in row} for row in picks]
    with torch.inference_mode():
        dec = store.decoder(bits, context=context, table_bits=table_bits)
        tokens = dec.greedy(torch.tensor([prompt]), max_new_tokens=n, eos_id=None)[0]
        dec = store.decoder(bits, context=context, table_bits=table_bits)
        logits = [dec.prefill(torch.tensor([prompt]), last_only=True)[0]]
        for t in tokens[:-1]:
            logits.append(dec.decode_step(torch.tensor([t]))[0])
    return tokens, logits


def run(store, picks, table, prompt, *, window=None, n=NEW, chunk=None, on_token=None):
    context = len(prompt) + n
    with DecodeExecutor(store, picks, table, context=context, window=window,
                        chunk=chunk) as ex:
        result = ex.generate(prompt, n, on_token, eos_id=None, keep_logits=True)
    return ex, result


def assert_same(result, tokens, logits):
    """Token for token, and every pass's logits within 1e-5 of the logits' scale."""
    assert result.tokens == tokens
    assert len(result.logits) == len(logits) == len(tokens)
    for got, want in zip(result.logits, logits):
        assert float((got - want).abs().max()) <= 1e-5 * max(1.0, float(want.abs().max()))


@pytest.mark.parametrize("layout,window,table_resident", [
    ("resident", None, True), ("streamed", None, False), ("streamed", 1, False),
    ("streamed", 0, True), ("mixed", 1, True), ("mixed", None, False)])
def test_fp32_generates_what_the_fp32_decoder_generates(store, prompt, layout, window,
                                                        table_resident):
    picks = {"resident": every(store, resident=True), "streamed": every(store),
             "mixed": mixed(store)}[layout]
    context = len(prompt) + NEW
    with torch.inference_mode():  # the plain fp32 Decoder (Decoder.greedy), not via picks
        full = store.decoder(context=context).greedy(torch.tensor([prompt]), max_new_tokens=NEW,
                                                     eos_id=None)[0]
    tokens, logits = reference(store, picks, None, prompt, NEW, context)
    assert tokens == full
    _, result = run(store, picks, TablePick(FP32, table_resident), prompt, window=window)
    assert_same(result, tokens, logits)
    assert result.stop == "max_new_tokens" and len(result.passes) == NEW
    assert len(set(result.tokens)) > 1  # not one token repeated: the test can tell


CASES = [
    # (per layer: {shard: (bits, resident)}, table bits, table resident, window, chunk)
    ([{"group0": (4, False), "group1": (8, True), "ffn0": (2, False), "ffn2": (32, True)},
      {"group1": (32, False), "ffn1": (6, False), "ffn3": (3, True)}], 8, False, 1, None),
    ([{"group1": (3, True), "ffn0": (32, False), "ffn1": (4, False), "ffn3": (8, False)},
      {"ffn0": (8, False), "ffn2": (2, True)}], 4, True, 0, 4),  # layer 1: no attention
    ([{"group0": (6, False), "group1": (6, False)},  # layer 0: no FFN
      {"group0": (8, True), "ffn0": (32, True), "ffn3": (4, False)}], 2, False, None, 1),
]


def _picks(layers):
    return [[ShardPick(n, b, r) for n, (b, r) in row.items()] for row in layers]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_dropped_and_quantised_picks_generate_that_submodel(any_store, prompt, case):
    store = any_store
    layers, table_bits, table_resident, window, chunk = CASES[case]
    picks = _picks(layers)
    tokens, logits = reference(store, picks, table_bits, prompt, NEW, len(prompt) + NEW)
    ex, result = run(store, picks, TablePick(table_bits, table_resident), prompt,
                     window=window, chunk=chunk)
    assert_same(result, tokens, logits)
    if store.variant(0, "group0", 4).scheme.name == "group":  # 4-bit KV groups: the kernel's
        assert len(ex.vectors) == sum(p.bits == 4 and p.name.startswith("group")
                                      for row in picks for p in row)
    # the picks matter: the full model's logits are not these
    _, full_logits = reference(store, every(store), None, prompt, NEW, len(prompt) + NEW)
    assert float((full_logits[0] - result.logits[0]).abs().max()) > 1e-2


WRAPS = {  # window 0: (layer 0, layer 1, table bits) -> what lies split at the ring's end
    "fp32 table": (["all@32"], ["group0@32", "ffn0@32"], FP32),
    "fp32 mid-row table": (["group0@32"], ["ffn0@6"], FP32),  # (a row split at the end)
    "8-bit table": (["all@32"], ["group0@32", "group1@32", "ffn0@32", "ffn1@32", "ffn2@32"], 8),
    "fp32 shard": (["group0@32"], ["all@32"], 8),
    "8-bit shard": (["group1@8"], ["ffn0@32", "ffn1@32", "ffn2@32", "group0@32", "group1@8",
                                  "ffn3@8"], 8),
    # the group store's 4-bit rows, which decode steps multiply where they lie (the kernel,
    # runtime/schemes/groupmv.py): a KV group joined in the bounce buffer, the table's
    # chunks joined in it too
    "4-bit shard": (["group0@2"], ["ffn0@32", "group1@4"], 4),
    "4-bit table": (["group0@2"], ["group1@4"], 4),
}


def _layer(store, spec):
    out = []
    for item in spec:
        name, bits = item.split("@")
        names = store.config.shard_names() if name == "all" else [name]
        out += [ShardPick(n, int(bits), False) for n in names]
    return out


@pytest.mark.parametrize("scheme,split", [("uniform", k) for k in WRAPS if "4-bit" not in k]
                         + [("group", k) for k in WRAPS if k[:5] in ("8-bit", "4-bit")])
def test_shards_and_the_table_wrapped_around_the_ring(store, group_store, prompt, scheme,
                                                      split):
    """Window 0: the ring holds the largest layer, so what follows a smaller one wraps
    around its end: an fp32 shard (joined in the scratch), a quantised one (in the bounce
    buffer), the fp32 table (split between rows, or within one: that row joined in the
    scratch) or the 8-bit table (a chunk of its codes joined in the bounce buffer), the
    next token's row read across the end. Still the submodel's tokens and logits. In both
    schemes whose rows decode alone (uniform: a scale per row; group: steps and minima;
    the layer sizes that make the fp32 splits are the uniform store's)."""
    store = group_store if scheme == "group" else store
    first, second, table_bits = WRAPS[split]
    picks = [_layer(store, first), _layer(store, second)]
    ex, result = run(store, picks, TablePick(table_bits, False), prompt, window=0)
    wrapped = [s.variant for row in ex.rows for s in row if s.raw is None]
    kind = "table" if split.endswith("table") else "shard"
    bits = FP32 if split.startswith("fp32") else int(split.split("-")[0])
    assert [((v.name == TABLE) == (kind == "table"), v.bits) for v in wrapped] == [(True, bits)]
    if split == "4-bit shard":  # computed by the kernel in decode steps
        assert [id(s) for row in ex.rows for s in row if s.raw is None][0] in ex.vectors
    if split == "4-bit table":
        assert ex.table.vector
    if split == "fp32 mid-row table":
        assert ex.table_shard.iov[0].nbytes % (4 * store.config.hidden)
    assert_same(result, *reference(store, picks, table_bits, prompt, NEW, len(prompt) + NEW))


def _count_preadv(monkeypatch):
    calls = []
    real = os.preadv

    def counting(fd, buffers, offset, *args):
        calls.append((os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), offset))
        return real(fd, buffers, offset, *args)

    monkeypatch.setattr(os, "preadv", counting)
    return calls


@pytest.mark.parametrize("table_bits", [FP32, 8])
def test_every_streamed_shard_is_read_once_per_pass(any_store, prompt, monkeypatch, table_bits):
    """Counted at the system call, pass by pass: the prompt pass reads each prompt token's
    row of the streamed table (fp32: one read; 8 bits: its codes and its scale), every
    streamed shard once and the table once; each decode step every streamed shard and the
    table once, no row; a resident shard is never read after opening."""
    store = any_store
    c = store.config
    picks = mixed(store, 4)
    calls = _count_preadv(monkeypatch)
    per_pass = []
    context = len(prompt) + 6
    with DecodeExecutor(store, picks, TablePick(table_bits, False), context=context,
                        window=1) as ex:
        calls.clear()
        result = ex.generate(prompt, 6, lambda t: (per_pass.append(sorted(calls)),
                                                   calls.clear()), eos_id=None)
    tv = store.table_variant(table_bits)
    streamed = sorted([(store.variant(l, p.name, p.bits).file,
                        store.variant(l, p.name, p.bits).offset)
                       for l, row in enumerate(picks) for p in row if not p.resident]
                      + [(tv.file, tv.offset)])
    resident = {(store.variant(l, p.name, p.bits).file, store.variant(l, p.name, p.bits).offset)
                for l, row in enumerate(picks) for p in row if p.resident}
    assert resident and len(streamed) > c.layers
    row, side = (4 * c.hidden, 0) if table_bits == FP32 else \
        tv.scheme.row_layout(c.hidden, table_bits)
    rows = [(tv.file, t * row) for t in prompt]
    if table_bits != FP32:
        rows += [(tv.file, c.vocab * row + side * t) for t in prompt]
    assert len(per_pass) == len(result.passes) == 6
    assert per_pass[0] == sorted(streamed + rows)
    assert all(p == streamed for p in per_pass[1:])
    assert not resident & {k for p in per_pass for k in p}
    assert [p.reads for p in result.passes] == [len(p) for p in per_pass]
    assert result.passes[0].row_reads == len(rows)


@pytest.mark.parametrize("window", [None, 0, 1])
def test_memory_is_the_sum_of_its_terms_and_the_ring_its_window(store, prompt, window):
    c = store.config
    picks = mixed(store, 6)
    picks[1] = [p for p in picks[1] if p.name != "group0"]
    context = len(prompt) + NEW
    ex, result = run(store, picks, TablePick(8, False), prompt, window=window)
    m = result.memory
    assert m.peak_bytes == (m.resident_bytes + m.preload_bytes + m.ring_high_water_bytes
                            + m.kv_cache_bytes + m.scratch_bytes + m.workspace_bytes)
    assert m.allocated_bytes == m.peak_bytes - m.ring_high_water_bytes + m.ring_bytes
    # the ring as the planner sizes it: W+1 consecutive layers, the table a last one
    streamed = [sum(store.variant(l, p.name, p.bits).nbytes for p in row if not p.resident)
                for l, row in enumerate(picks)] + [store.table_variant(8).nbytes]
    span = len(streamed) if window is None else window + 1
    assert m.ring_bytes == window_peak(streamed, window) == max(
        sum(streamed[i:i + span]) for i in range(len(streamed) - span + 1))
    assert 0 < m.ring_high_water_bytes <= m.ring_bytes
    assert all(p.ring_high_water_bytes <= m.ring_bytes for p in result.passes)
    assert m.preload_bytes == sum(store.variant(l, p.name, p.bits).nbytes
                                  for l, row in enumerate(picks) for p in row if p.resident)
    assert m.resident_bytes == 4 * c.hidden * (2 * c.layers + 1)  # the norms; table streamed
    kept = sum(p.name.startswith("group") for row in picks for p in row)
    assert m.kv_cache_bytes == kept * 2 * context * c.head_dim * 4
    # activations at the longest prompt (context - 1 tokens; a quantised table's stored rows
    # of it are read into the accumulator), and the store's scheme buffers
    work, bounce = decode_buffers(store)
    assert m.workspace_bytes == ex.ws.nbytes + ex.work.nbytes + ex.bounce.nbytes
    assert (ex.work.nbytes, ex.bounce.nbytes) == (work_bytes(work), bounce)
    assert work_bytes(work) + bounce == workspace_bytes(store)
    assert bounce >= min(HEAD_CHUNK_ROWS, c.vocab) * (uniform.row_bytes(c.hidden, 8) + 4)
    assert result.process_peak_bytes >= m.peak_bytes
    # a resident table is a preload term, in its stored form
    held, resident = run(store, picks, TablePick(8, True), prompt, window=window, n=2)
    assert resident.memory.resident_bytes == m.resident_bytes
    assert resident.memory.preload_bytes == m.preload_bytes + store.table_variant(8).nbytes
    assert resident.memory.ring_bytes == window_peak(streamed[:-1], window)
    # the scheme buffers are the store's, whatever the table (the activations: the context)
    assert resident.memory.workspace_bytes - held.ws.nbytes == m.workspace_bytes - ex.ws.nbytes


def store_profile(store):
    """The store's profile as `elasticplan profile` writes it (runtime/profiling/
    decoder_profile.py: bytes, weights, the `decoder:` and `head:` blocks), its importance
    made up (a memory prediction does not read it), read back by the planner's loader."""
    from runtime.profiling.decoder_profile import KLMeasurement, profile_dict
    from runtime.profiling.profile import DROP

    c = store.config
    variants = [DROP] + [b for b in store.bitwidths if b != FP32]
    ms = {(l, n, v): KLMeasurement(l, n, v, 0.5 if v == DROP else 0.1 / v, 1.0)
          for l in range(c.layers) for n in c.shard_names() for v in variants}
    head = {b: KLMeasurement(c.layers, TABLE, b, 1.0 / b, 1.0) for b in store.bitwidths}
    data = profile_dict(store, ms, SimpleNamespace(positions=1), 1, 8, None, None, head)
    return parse_model(data, "tiny-llama.yaml")


def _dropped(store):
    """Layer 0 keeps one KV group (4 bits, streamed) and two FFN slices; layer 1 no
    attention at all (its FFN slices at 8 bits and fp32, one resident)."""
    return [[ShardPick("group1", 4), ShardPick("ffn0", 8, True), ShardPick("ffn2", 2)],
            [ShardPick("ffn1", 8), ShardPick("ffn3", FP32, True)]]


PLANNED = [
    # (picks, table, window, prompt tokens P, answer tokens A)
    (lambda s: every(s), TablePick(FP32, True), None, 5, 4),
    (lambda s: every(s), TablePick(FP32, False), 1, 1, 2),
    (lambda s: mixed(s, 8), TablePick(8, False), 1, 12, 20),
    (lambda s: mixed(s, 6), TablePick(8, True), 2, 24, 9),
    (_dropped, TablePick(8, False), None, 30, 50),
    (_dropped, TablePick(FP32, False), 1, 16, 8),
    (_dropped, TablePick(4, True), 1, 3, 100),
    (lambda s: mixed(s, 8), TablePick(8, False, 3), 1, 12, 20),  # the table in pieces
    (_dropped, TablePick(FP32, False, 5), 2, 16, 8),
    (lambda s: every(s, 4), TablePick(4, False, 7), None, 5, 4),
]


@pytest.mark.parametrize("case", range(len(PLANNED)))
def test_memory_is_what_the_planner_predicts_term_by_term(any_store, prompt, case):
    """The planner's prediction for the same choices (the decoder question P + A on the
    store's profile, the picks as its selection: the table the last layer's one part) is
    the executor's account exactly, term by term: resident = resident (the norms), preload
    = preload (resident shards, the resident table), working = ring + scratch, activation
    = workspace (DecodeWorkspace's activations at P and P + A, spec.activation_bytes; the
    store's scheme buffers, the profile's workspace_bytes), kept = the KV cache. So the
    executor's allocated bytes are the predicted peak, and its peak (the ring at its
    high-water mark) no more. In the uniform and the group scheme."""
    store = any_store
    make, table, window, P, A = PLANNED[case]
    picks = make(store)
    profile = store_profile(store)
    if table.pieces > 1:  # the profile's pieces: ceil(vocab / pieces) rows each
        rows = -(-store.config.vocab // table.pieces)
        profile = dataclasses.replace(profile, decoder=dataclasses.replace(
            profile.decoder, table_piece_rows=rows))
    device = Device("d", bandwidth_mb_s=200, latency_us=50, gflops=5, layer_overhead_ms=0.05,
                    dequant_gb_s=2, memory_mb=1000)
    scenario = Scenario("s", device, profile,
                        Question(target_latency_ms=1e3, preload_budget_mb=100,
                                 prompt_tokens=P, answer_tokens=A, prefetch_window=window),
                        content_hash="h")
    model = scenario.model  # the last decode step's: the planned one
    selection = tuple(
        tuple(Pick(layer.shard_index(p.name), model.bit_index(p.bits), p.resident) for p in row)
        for layer, row in zip(model.layers, picks)) + \
        ((Pick(0, model.bit_index(table.bits), table.resident),),)
    predicted = simulate(scenario, selection, layout=Layout(window)).memory
    ids = (prompt * (1 + P // len(prompt)))[:P]
    with DecodeExecutor(store, picks, table, context=P + A, window=window,
                        prompt_tokens=P) as ex:
        result = ex.generate(ids, min(A, 3), eos_id=None)
    m = result.memory
    assert m.resident_bytes == predicted.resident_bytes
    assert m.preload_bytes == predicted.preload_bytes
    assert m.ring_bytes + m.scratch_bytes == predicted.working_peak_bytes
    assert m.scratch_bytes == model.scratch_bytes
    assert m.workspace_bytes == predicted.activation_bytes
    assert ex.ws.nbytes == activation_bytes(profile.decoder, P, P + A)
    assert ex.work.nbytes + ex.bounce.nbytes == profile.decoder.workspace_bytes
    assert m.kv_cache_bytes == predicted.kept_bytes
    assert m.allocated_bytes == predicted.peak_bytes
    assert 0 < m.ring_high_water_bytes <= m.ring_bytes
    assert m.peak_bytes <= predicted.peak_bytes


def test_the_kv_cache_holds_the_kept_groups_only(store, prompt):
    c = store.config
    picks = [[ShardPick("group1", 4, False), ShardPick("ffn0", FP32, True)],
             [ShardPick("ffn1", 8, False)]]
    context = len(prompt) + NEW
    ex, result = run(store, picks, TablePick(FP32, True), prompt)
    assert tuple(ex.cache.k[0].shape) == tuple(ex.cache.v[0].shape) == (1, 1, context,
                                                                         c.head_dim)
    assert ex.cache.k[1] is None and ex.cache.v[1] is None
    assert ex.memory.kv_cache_bytes == 2 * 4 * context * c.head_dim
    # and what it holds is the Decoder's cache of that group
    bits = [{p.name: p.bits for p in row} for row in picks]
    with torch.inference_mode():
        dec = store.decoder(bits, context=context)
        dec.greedy(torch.tensor([prompt]), max_new_tokens=NEW, eos_id=None)
    used = len(prompt) + NEW - 1
    for a, b in ((ex.cache.k[0], dec.cache.k[0]), (ex.cache.v[0], dec.cache.v[0])):
        assert float((a[:, :, :used] - b[:, :, :used]).abs().max()) <= 1e-5
    assert result.tokens == dec.greedy(torch.tensor([prompt]), max_new_tokens=NEW,
                                       eos_id=None)[0]


def test_traces_eos_and_streaming_callback(store, prompt):
    """The passes' traces are consistent (per layer IO before compute, layers in order, the
    LM head last, the prompt pass at position 0 then one position per step), on_token sees
    every token as it comes, and EOS stops the answer (included)."""
    c = store.config
    picks = mixed(store, 8)
    tokens, _ = reference(store, picks, 6, prompt, NEW, len(prompt) + NEW)
    stop_at = next(i for i in range(2, NEW) if tokens[i] not in tokens[:i])
    seen = []
    context = len(prompt) + NEW
    with DecodeExecutor(store, picks, TablePick(6, False), context=context, window=1) as ex:
        result = ex.generate(prompt, NEW, seen.append, eos_id=tokens[stop_at])
    assert result.tokens == seen == tokens[:stop_at + 1] and result.stop == "eos"
    for i, p in enumerate(result.passes):
        assert (p.kind, p.position, p.tokens) == (("prefill", 0, len(prompt)) if i == 0 else
                                                  ("decode", len(prompt) + i - 1, 1))
        assert p.token == result.tokens[i] and len(p.layers) == c.layers
        prev = p.embed_ms[1]
        for lt in p.layers + [p.head]:
            assert lt.io_start_ms <= lt.io_end_ms <= lt.compute_start_ms <= lt.compute_end_ms
            assert lt.compute_start_ms >= prev
            prev = lt.compute_end_ms
        for a, b in zip(p.layers, p.layers[1:] + [p.head]):
            assert b.io_start_ms >= a.io_end_ms  # one channel, in order
        assert p.head.index == c.layers and p.head.reads == 1
        assert p.latency_ms == p.head.compute_end_ms
    assert result.ttft_ms == result.passes[0].latency_ms
    assert len(result.step_ms) == len(result.tokens) - 1


def test_emulated_reads_never_finish_before_the_device_would(store, prompt):
    c = store.config
    picks = every(store, 8)
    slow = emulated_storage(100.0, 500.0)
    with DecodeExecutor(store, picks, TablePick(FP32, False), context=len(prompt) + 3,
                        device=slow) as ex:
        result = ex.generate(prompt, 3, eos_id=None)
    for p in result.passes:
        clock = 0.0 if p.kind == "decode" else len(prompt) * (0.5 + 4 * c.hidden / 100e3)
        if p.rows_io_ms is not None:
            assert p.rows_io_ms[1] >= clock - 1e-6
        for lt, row in zip(p.layers, picks):
            clock += sum(0.5 + store.variant(lt.index, s.name, s.bits).nbytes / 100e3
                         for s in row)
            assert lt.io_end_ms >= clock - 1e-6
        clock += 0.5 + store.table_variant(FP32).nbytes / 100e3
        assert p.head.io_end_ms >= clock - 1e-6


def test_warm_reads_keep_the_pages_and_still_wait_for_the_device(store, prompt):
    """`warm_reads`: the streamed files stay in the page cache from pass to pass (cold: every
    pass starts with them evicted), the emulated device still sets when each read is done,
    and the answer is the same; without emulated storage, refused."""
    picks = every(store, 8)
    slow = emulated_storage(100.0, 500.0)
    results = {}
    for warm in (False, True):
        with DecodeExecutor(store, picks, TablePick(FP32, False), context=len(prompt) + 3,
                            device=slow, warm_reads=warm) as ex:
            results[warm] = ex.generate(prompt, 3, eos_id=None)
    cold, warm = results[False], results[True]
    assert warm.tokens == cold.tokens
    assert all(p.cached_pages_before == 0 for p in cold.passes)
    # kept, not evicted: every page, but for the few the kernel may reclaim on its own (one
    # clean-clone CI run of many found a warm pass short of its pages, 2026-12-04)
    assert all(p.streamed_pages > 0 and p.cached_pages_before >= 0.9 * p.streamed_pages
               for p in warm.passes[1:])
    for p in warm.passes[1:]:  # one token's reads: at least the device's time, in order
        reads = sum(0.5 + store.variant(lt.index, s.name, s.bits).nbytes / 100e3
                    for lt, row in zip(p.layers, picks) for s in row)
        assert p.layers[-1].io_end_ms >= reads - 1e-6
    with pytest.raises(ValueError, match="warm reads need emulated storage"):
        DecodeExecutor(store, picks, TablePick(FP32, False), context=len(prompt) + 3,
                       warm_reads=True)


def test_a_store_without_table_variants_runs_on_resident_bin(store_path, prompt, tmp_path):
    """A store built before tables were stored: the fp32 table comes from resident.bin
    (resident or streamed); another bitwidth is refused, naming it."""
    old = tmp_path / "old"
    shutil.copytree(store_path, old)
    index = json.loads((old / "index.json").read_text())
    for f in [f for f in index["files"] if f.startswith(TABLE)]:
        del index["files"][f]
        (old / f).unlink()
    (old / "index.json").write_text(json.dumps(index))
    store = ShardStore(old)
    picks = mixed(store, 4)
    want = reference(store, picks, None, prompt, NEW, len(prompt) + NEW)
    for resident in (True, False):
        ex, result = run(store, picks, TablePick(FP32, resident), prompt, window=1)
        assert ex.table_shard.variant.file == "resident.bin"
        assert_same(result, *want)
    with pytest.raises(StoreError, match="no embedding table at 8 bits"):
        DecodeExecutor(store, picks, TablePick(8, True), context=32)


def test_bad_input_is_refused_before_any_compute(store_path, store, prompt, tmp_path):
    c = store.config
    picks = every(store)
    with pytest.raises(ValueError, match="picks for 1 layers"):
        DecodeExecutor(store, picks[:1], context=32)
    with pytest.raises(StoreError, match="no shard 'group0' of layer 0 at 5 bits"):
        DecodeExecutor(store, [[ShardPick("group0", 5)], []], context=32)
    with pytest.raises(ValueError, match="not a shard of this model"):
        DecodeExecutor(store, [[ShardPick("head0", 8)], []], context=32)
    with DecodeExecutor(store, picks, context=len(prompt) + 4) as ex:
        need = f"need {len(prompt) + 5} KV cache columns; the context is {len(prompt) + 4}"
        with pytest.raises(ValueError, match=need):
            ex.generate(prompt, 6)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            ex.generate([c.vocab], 2)
    bad = tmp_path / "bad"
    shutil.copytree(store_path, bad)
    path = bad / "layer1.b32.bin"
    data = bytearray(path.read_bytes())
    data[64] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="layer1.b32.bin: .*fails its checksum"):
        DecodeExecutor(ShardStore(bad), picks, context=32)


def test_fill_preload_reads_the_resident_set_through_the_clock(store, prompt, monkeypatch):
    """fill_preload re-reads every resident shard and the resident table, cold, once each,
    no sooner than the emulated device serves them; the answer after it is unchanged."""
    picks = mixed(store, 8)
    calls = _count_preadv(monkeypatch)
    context = len(prompt) + 4
    with DecodeExecutor(store, picks, TablePick(4, True), context=context,
                        device=emulated_storage(100.0, 500.0)) as ex:
        before = ex.generate(prompt, 4, eos_id=None).tokens
        calls.clear()
        fill_ms = ex.fill_preload()
        filled = sorted(calls)
        after = ex.generate(prompt, 4, eos_id=None).tokens
    resident = [store.variant(l, p.name, p.bits) for l, row in enumerate(picks) for p in row
                if p.resident] + [store.table_variant(4)]
    assert filled == sorted((v.file, v.offset) for v in resident)
    assert fill_ms >= sum(0.5 + v.nbytes / 100e3 for v in resident) - 1e-6
    assert before == after == reference(store, picks, 4, prompt, 4, context)[0]


def _heap() -> list[tuple[int, int]]:
    """The C heap's address ranges (Linux /proc/self/maps; none elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            lines = [ln.split() for ln in f if ln.rstrip().endswith("[heap]")]
    except OSError:
        return []
    return [tuple(int(x, 16) for x in ln[0].split("-")) for ln in lines]


def _span(buf) -> tuple[int, int]:
    """[start, end) of a numpy array's or a tensor's bytes."""
    if isinstance(buf, torch.Tensor):
        return buf.data_ptr(), buf.data_ptr() + buf.numel() * buf.element_size()
    return buf.ctypes.data, buf.ctypes.data + buf.nbytes


def test_an_arena_cuts_zeroed_aligned_buffers_from_a_mapping_of_its_own():
    sizes = [100, 3 << 20, 8]
    arena = Arena(sizes)
    assert arena.capacity == sum(-(-n // ALIGN) * ALIGN for n in sizes)
    arena.buffer[:] = 7  # (dirty: taking a buffer zeroes it)
    a = arena.bytes(100)
    t = arena.tensor(3 << 18)  # 3 MB of fp32
    i = arena.tensor(1, dtype=torch.int64)
    assert (a.nbytes, t.numel() * 4, i.numel() * 8) == tuple(sizes)
    assert not a.any() and not t.any() and not i.any()
    spans = [_span(b) for b in (a, t, i)]
    assert all(lo % ALIGN == 0 for lo, _ in spans)
    assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:]))  # one after another
    base = arena.buffer.ctypes.data
    assert spans[0][0] == base and spans[-1][1] <= base + arena.capacity
    assert not any(lo < h1 and h0 < hi for lo, hi in spans for h0, h1 in _heap())
    with pytest.raises(AssertionError, match="does not fit"):
        arena.bytes(1)
    assert Arena([0, 0]).capacity == 0 and Arena([]).tensor(0).numel() == 0


def test_every_buffer_lies_in_its_own_mappings_the_compute_ones_after_the_checks(
        store, prompt, monkeypatch):
    """The executor's buffers (every term of its account but the norms) are cut from two
    mappings of their own (runtime.decode_layers.Arena), none from the C heap: the IO
    buffers (preload, table, ring), read and checked first; then the heap's free pages
    go back (malloc_trim), and only then the compute buffers (scratch, the schemes'
    buffers, the activations, the KV cache) are taken, so that the checksum pass's
    temporaries never sit on top of them. glibc's fastbins are off before any of it."""
    import runtime.decoding as decoding

    order = []
    for name in ("no_fastbins", "check_placed", "_trim", "DecodeWorkspace"):
        real = getattr(decoding, name)
        monkeypatch.setattr(decoding, name,
                            lambda *a, _real=real, _name=name, **k: (order.append(_name),
                                                                     _real(*a, **k))[1])
    picks = mixed(store, 6)
    picks[1] = [p for p in picks[1] if p.name != "group0"]
    with DecodeExecutor(store, picks, TablePick(8, True), context=len(prompt) + 4) as ex:
        tokens = ex.generate(prompt, 4, eos_id=None).tokens
        m = ex.memory
        io = [ex.preload_buffer, ex.table_buffer, ex.ring]
        work = [ex.work.packed, ex.work.indices, ex.work.values, ex.work.bytes, ex.work.longs]
        compute = [ex.scratch, *work, ex.bounce,
                   *(getattr(ex.ws, n) for n in ex.ws.buffers()),
                   *(t for t in ex.cache.k + ex.cache.v if t is not None)]
        spans = [_span(b) for b in io + compute]
        arenas = [_span(ex.preload_buffer.base), _span(ex.bounce.base)]  # the two mappings
    assert order[0] == "no_fastbins"
    assert order.count("_trim") == 1 and order.index("_trim") > max(
        i for i, n in enumerate(order) if n == "check_placed")
    assert order.index("DecodeWorkspace") > order.index("_trim")
    assert tokens == reference(store, picks, 8, prompt, 4, len(prompt) + 4)[0]
    # every accounted byte but the norms' is in one of the two mappings, none shared
    nbytes = sum(hi - lo for lo, hi in spans)
    assert nbytes == m.allocated_bytes - m.resident_bytes
    for k, group in enumerate((io, compute)):
        lo, hi = arenas[k]
        inside = [s for s in spans if lo <= s[0] and s[1] <= hi and s[0] < s[1]]
        assert len(inside) == sum(_span(b)[1] > _span(b)[0] for b in group)
        assert hi - lo == sum(-(-(_span(b)[1] - _span(b)[0]) // ALIGN) * ALIGN for b in group)
    ordered = sorted(s for s in spans if s[0] < s[1])
    assert all(a[1] <= b[0] for a, b in zip(ordered, ordered[1:]))
    assert not any(lo < h1 and h0 < hi for lo, hi in arenas for h0, h1 in _heap())


def test_no_fastbins_is_glibcs_setting():
    """mallopt(M_MXFAST, 0) succeeds where the C library is glibc (and says so)."""
    import platform

    from runtime.decoding import no_fastbins

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert no_fastbins() is True


# --- a table read in pieces ------------------------------------------------------------

PIECED = [
    # (table bits, pieces, window, picks)
    (FP32, 2, None, every), (FP32, 7, 1, mixed), (8, 3, 2, lambda s: mixed(s, 4)),
    (8, 5, 0, lambda s: every(s, 8)), (4, 7, 1, _dropped), (2, 3, None, lambda s: mixed(s, 8)),
]


@pytest.mark.parametrize("case", range(len(PIECED)))
def test_a_table_read_in_pieces_generates_what_the_whole_table_does(any_store, prompt, case):
    """Streamed in pieces (each piece's logits as soon as it is in, the next token's row
    decoded from the piece that held the best logit so far): the submodel's tokens and
    every pass's logits, as the whole table gives them; two pieces of the ring, never more
    in use than it was sized for."""
    store = any_store
    bits, pieces, window, make = PIECED[case]
    picks = make(store)
    want = reference(store, picks, bits, prompt, NEW, len(prompt) + NEW)
    ex, result = run(store, picks, TablePick(bits, False, pieces), prompt, window=window)
    assert_same(result, *want)
    t = ex.table
    rows = -(-store.config.vocab // pieces)
    assert len(ex.spans) == pieces and ex.spans[0] == (0, rows)
    assert ex.layer_bytes[-1] == min(2 * rows * (t.row_bytes + t.side_bytes), t.variant.nbytes)
    assert pieces == 2 or ex.layer_bytes[-1] < t.variant.nbytes
    assert ex.memory.ring_bytes == window_peak(ex.layer_bytes, window)
    assert 0 < ex.memory.ring_high_water_bytes <= ex.memory.ring_bytes
    for p in result.passes:
        head = p.head
        assert head.reads == pieces * (1 if bits == FP32 else 2)
        assert head.read_bytes == t.variant.nbytes
        assert 0 < head.compute_ms <= head.compute_end_ms - head.compute_start_ms + 1e-9
        assert 0 < head.io_ms <= head.io_end_ms - head.io_start_ms + 1e-9


def test_a_tables_pieces_are_read_at_their_rows_once_per_pass(store, prompt, monkeypatch):
    """Counted at the system call: every pass reads each piece's codes and its side data
    (8 bits: two reads at the rows' offsets), no more."""
    c = store.config
    picks = every(store, 8, resident=True)
    calls = _count_preadv(monkeypatch)
    per_pass = []
    with DecodeExecutor(store, picks, TablePick(8, False, 3), context=len(prompt) + 4,
                        window=1) as ex:
        calls.clear()
        result = ex.generate(prompt, 4, lambda t: (per_pass.append(sorted(calls)),
                                                   calls.clear()), eos_id=None)
    tv = store.table_variant(8)
    row, side = tv.scheme.row_layout(c.hidden, 8)
    pieces = sorted([(tv.file, tv.offset + r0 * row) for r0, _ in ex.spans]
                    + [(tv.file, tv.offset + c.vocab * row + r0 * side) for r0, _ in ex.spans])
    rows = sorted([(tv.file, tv.offset + t * row) for t in prompt]
                  + [(tv.file, tv.offset + c.vocab * row + side * t) for t in prompt])
    assert per_pass[0] == sorted(pieces + rows)
    assert all(p == pieces for p in per_pass[1:]) and len(per_pass) == len(result.passes)


def test_a_piece_wrapped_around_the_rings_end(store, prompt):
    """Window 0: the ring holds the largest layer, so the table's two pieces after a
    smaller one wrap around its end: a chunk of a piece is joined in the bounce buffer;
    still the submodel's tokens and logits."""
    picks = [[ShardPick(n, FP32, False) for n in store.config.shard_names()],
             [ShardPick(n, 8 if n == "ffn3" else FP32, False)
              for n in store.config.shard_names()]]
    ex, result = run(store, picks, TablePick(8, False, 3), prompt, window=0)
    assert any(len(ex._piece_views(i)) == 2 for i in range(3))
    assert_same(result, *reference(store, picks, 8, prompt, NEW, len(prompt) + NEW))


def test_a_tampered_table_read_in_pieces_is_refused_at_open(store_path, prompt, tmp_path):
    """Checked piece by piece through the ring (it never holds the whole table): its
    checksum over every byte, its values per piece."""
    bad = tmp_path / "bad"
    shutil.copytree(store_path, bad)
    store = ShardStore(bad)
    tv = store.table_variant(8)
    with open(bad / tv.file, "r+b") as f:
        f.seek(tv.offset + tv.nbytes - 1)
        byte = f.read(1)
        f.seek(tv.offset + tv.nbytes - 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(StoreError, match="fails its checksum"):
        DecodeExecutor(store, every(store, 8, resident=True), TablePick(8, False, 3),
                       context=len(prompt) + 2)
    with pytest.raises(ValueError, match="do not make"):
        DecodeExecutor(store, every(store, 8, resident=True),
                       TablePick(8, False, store.config.vocab - 1), context=len(prompt) + 2)
