"""The real model: golden embeddings, elastic layers against an independent oracle,
quantisation bounds and packing."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from runtime.families.encoder import LayerWeights, parse_shard_name
from runtime.schemes import uniform

GOLDEN = Path(__file__).parent / "data" / "golden_minilm.json"


def test_full_encoder_matches_golden_embeddings(reference):
    g = json.loads(GOLDEN.read_text())
    assert g["max_seq_length"] == 256
    emb = reference.embed(g["sentences"], batch_size=3)
    ref = torch.tensor(g["embeddings"])
    assert emb.shape == ref.shape == (len(g["sentences"]), 384)
    assert (emb - ref).abs().max().item() < 1e-5
    assert [len(reference.tokenizer([s]).ids[0]) for s in g["sentences"]] == g["tokens"]


def _zeroed_layer(reference, l, drop):
    """Oracle for dropping shards: the full layer with the dropped shards' output weights
    (Wo columns of a head, W2 columns of an FFN slice) zeroed; nothing else changes."""
    c = reference.config
    w = reference.layer_weights(l, c.shard_names())
    for name in drop:
        w.slot(name).out.zero_()  # Wo columns (head) or W2 columns (ffn) of this shard
    return w


@pytest.mark.parametrize("drop", [["head0"], ["head3", "head7", "ffn0"], ["ffn11"],
                                  [f"head{h}" for h in range(12)],
                                  [f"ffn{f}" for f in range(12)]])
def test_dropping_shards_equals_zeroing_their_output_weights(reference, drop):
    c = reference.config
    b = reference.tokenizer(["Sharding a transformer layer by heads.", "Short one"])
    enc = reference.encoder
    with torch.inference_mode():
        for l in (0, 5):
            keep = [n for n in c.shard_names() if n not in drop]
            layers = list(reference.full_layers)
            layers[l] = reference.layer_weights(l, keep)
            got = enc.forward(b.ids, b.mask, layers)
            layers[l] = _zeroed_layer(reference, l, drop)
            want = enc.forward(b.ids, b.mask, layers)
            assert (got - want).abs().max().item() < 1e-5
            full = enc.forward(b.ids, b.mask, reference.full_layers)
            assert (got - full).abs().max().item() > 1e-4  # the drop did change the output


def test_layer_with_no_shards_is_skipped(reference):
    c = reference.config
    b = reference.tokenizer(["x y z"])
    x = reference.encoder.embed(b.ids)
    out = reference.encoder.layer(2, x, b.mask, LayerWeights(c, []))
    assert torch.equal(out, x)


def test_shard_order_in_a_layer_does_not_change_the_result(reference):
    c = reference.config
    b = reference.tokenizer(["The order of shards in the fused buffer is irrelevant."])
    names = c.shard_names()
    shuffled = [names[i] for i in np.random.default_rng(1).permutation(len(names))]
    with torch.inference_mode():
        a = reference.encoder.layer(1, reference.encoder.embed(b.ids), b.mask,
                                    reference.layer_weights(1, names))
        z = reference.encoder.layer(1, reference.encoder.embed(b.ids), b.mask,
                                    reference.layer_weights(1, shuffled))
    assert (a - z).abs().max().item() < 1e-5


def test_shard_names_parse():
    assert parse_shard_name("head11") == ("head", 11)
    assert parse_shard_name("ffn0") == ("ffn", 0)
    for bad in ("head", "ffnx", "attn1", ""):
        with pytest.raises(ValueError):
            parse_shard_name(bad)


@given(bits=st.sampled_from(uniform.QUANT_BITS), rows=st.integers(1, 5),
       cols=st.integers(1, 70), seed=st.integers(0, 2**31))
def test_pack_unpack_round_trip(bits, rows, cols, seed):
    codes = np.random.default_rng(seed).integers(0, 2 ** bits, size=(rows, cols), dtype=np.uint8)
    packed = uniform.pack(codes, bits)
    assert packed.shape == (rows, uniform.row_bytes(cols, bits))
    back = uniform.unpack(torch.from_numpy(packed.copy()), bits, cols)
    assert np.array_equal(back.numpy(), codes)


@given(bits=st.sampled_from(uniform.QUANT_BITS), seed=st.integers(0, 2**31),
       scale=st.floats(1e-4, 10.0), heavy=st.booleans())
def test_quantisation_error_within_documented_bound(bits, seed, scale, heavy):
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(3, size=(6, 48)) if heavy else rng.normal(size=(6, 48))) * scale
    w = w.astype(np.float32)
    w[0] = 0.0  # an all-zero row must come back as (near) zero too
    codes, scales = uniform.quantize(w, bits)
    assert codes.max() < 2 ** bits
    deq = uniform.dequantize_np(codes, scales, bits)
    rms = np.sqrt(((deq - w) ** 2).mean(axis=1))
    assert np.all(rms <= uniform.error_bound(w, bits) * (1 + 1e-5) + 1e-12)
    # the chosen clip is at least as good as not clipping (ratio 1.0 is in the grid)
    lo = -(2 ** (bits - 1))
    s1 = np.abs(w).max(axis=1) / -lo
    s1[s1 == 0] = 1.0 / -lo
    q1 = np.clip(np.floor(w / s1[:, None]), lo, -lo - 1)
    mse1 = (((q1 + 0.5) * s1[:, None] - w) ** 2).mean(axis=1)
    assert np.all((rms ** 2) <= mse1 * (1 + 1e-4) + 1e-12)


def test_dequantize_into_a_strided_view_matches_numpy():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 40)).astype(np.float32)
    for bits in uniform.QUANT_BITS:
        codes, scales = uniform.quantize(w, bits)
        dest = torch.zeros(2, 10, 40)
        view = dest[:, 3:7, :]  # [2, 4, 40]: 8 rows scattered in two blocks
        uniform.dequantize_into(view, torch.from_numpy(uniform.pack(codes, bits)),
                              torch.from_numpy(scales), bits)
        assert np.array_equal(view.reshape(8, 40).numpy(), uniform.dequantize_np(codes, scales, bits))
        assert dest[:, :3].abs().sum() == 0 and dest[:, 7:].abs().sum() == 0


@pytest.mark.parametrize("shape", [(1536, 576), (7, 13), (33, 40), (5, 2)])
def test_every_dequantisation_path_gives_the_same_bits(shape):
    """8 and 4 bits decode by byte, 2/3/6 bits and 4 bits into views that cannot be split
    by byte through the lookup table: each equals the numpy reference exactly, with and
    without a workspace, into a 2-D block, a strided view and a 3-D view."""
    from elasticplan.problem import archgen
    from runtime.schemes.base import DecodeWork

    rows, cols = shape
    w = np.random.default_rng(rows * cols).normal(size=shape).astype(np.float32)
    for bits in uniform.QUANT_BITS:
        codes, scales = uniform.quantize(w, bits)
        expect = uniform.dequantize_np(codes, scales, bits)
        packed, s = torch.from_numpy(uniform.pack(codes, bits)), torch.from_numpy(scales)
        work = DecodeWork(*archgen.decode_work(rows, cols, bits))
        wide = torch.full((rows, cols + 3), 7.0)
        for out in (torch.empty(rows, cols), wide[:, 1:cols + 1],
                    torch.empty(1, rows, cols)):
            for wk in (None, work):
                uniform.dequantize_into(out, packed, s, bits, wk)
                assert np.array_equal(out.reshape(rows, cols).numpy(), expect), (bits, out.shape)
        assert (wide[:, 0] == 7).all() and (wide[:, cols + 1:] == 7).all()


def test_unsupported_bitwidth_is_a_clear_error():
    with pytest.raises(ValueError, match="not stored"):
        uniform.check_bits(5)


@given(bits=st.integers(1, 8), shapes=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 70)),
                                               min_size=1, max_size=3),
       seed=st.integers(0, 2**31), share=st.sampled_from([0.0, 0.01, 0.1]),
       split=st.booleans())
def test_dictionary_decode_into_strided_views_with_its_workspace(bits, shapes, seed, share,
                                                                 split):
    """At any bitwidth, for a group of blocks of any shapes: the packed codes are a
    little-endian bit stream of the row's codes; the group's bytes parse back (numpy) to
    each block's parts, and are the blocks' block_bytes summed; decode_into, with a
    DecodeWork sized by decode_work (too small would raise), writes exactly numpy's
    reconstruction of each block into a transposed view (as an output block's slot) or a
    3-D view (as a head's input block)."""
    from runtime.schemes import dictionary

    rng = np.random.default_rng(seed)
    rows, cols = shapes[0]
    codes = rng.integers(0, 2 ** bits, size=(rows, cols), dtype=np.uint8)
    packed = dictionary.pack_codes(codes, bits)
    assert packed.shape == (rows, -(-cols * bits // 8))
    stream = np.unpackbits(packed, axis=1, bitorder="little")[:, :cols * bits]
    back = (stream.reshape(rows, cols, bits) << np.arange(bits)).sum(axis=2)
    assert np.array_equal(back, codes)
    ws = [rng.normal(size=shape).astype(np.float32) * rng.uniform(0.01, 5) for shape in shapes]
    parts = [dictionary.quantize(w, bits, share) for w in ws]
    raw = dictionary.encode_blocks(ws, bits, share)
    assert len(raw) == sum(dictionary.block_bytes(r, c, bits, share) for r, c in shapes)
    for got, want in zip(dictionary.parse_blocks(raw, shapes, bits, share), parts):
        assert all(np.array_equal(g, w) for g, w in zip(got, want))
    work = uniform.DecodeWork(*dictionary.decode_work(tuple(shapes), bits, share))
    outs = []
    for r, c in shapes:
        if split and r % 3 == 0:
            outs.append(torch.full((3, r // 3, c + 2), -1.0)[..., 1:-1])  # strided 3-D view
        else:
            outs.append(torch.full((c, r), -1.0).t())  # transposed
    dictionary.decode_into(outs, torch.frombuffer(bytearray(raw), dtype=torch.uint8), shapes,
                          bits, share, work)
    for out, part, (r, c) in zip(outs, parts, shapes):
        assert np.array_equal(out.reshape(r, c).numpy(), dictionary.dequantize_np(*part))
    with pytest.raises(ValueError, match="bytes, got"):
        dictionary.decode_into(outs, torch.frombuffer(bytearray(raw[:-4]), dtype=torch.uint8),
                              shapes, bits, share, work)


@given(bits=st.sampled_from([1, 2, 3, 4, 5, 6]), seed=st.integers(0, 2**31),
       scale=st.floats(1e-4, 10.0), heavy=st.booleans(),
       share=st.sampled_from([0.0, 0.005, 0.05]), cols=st.integers(2, 80),
       rows=st.integers(1, 6))
def test_dictionary_quantisation_error_within_its_bound(bits, seed, scale, heavy, share, cols,
                                                        rows):
    """Outliers come back exactly; the other weights' RMS error over the block is within
    max_r(rms_r) (max z - min z) / 2^(b+1); every weight takes its nearest value s_r D[k];
    the least-squares rounds end no worse than their k-means start; the packed bytes decode
    (torch) to what numpy reconstructs, and their length is the shape's block_bytes."""
    from runtime.schemes import dictionary

    rng = np.random.default_rng(seed)
    w = ((rng.standard_t(3, size=(rows, cols)) if heavy else rng.normal(size=(rows, cols)))
         * scale * rng.uniform(0.1, 3.0, size=(rows, 1)))  # rows of different scales
    w = w.astype(np.float32)
    w[0] = 0.5  # a constant row: every weight one value
    codes, book, scales, out_cols, out_vals = dictionary.quantize(w, bits, share)
    assert book.shape == (2 ** bits,) and scales.shape == (rows,) and np.all(scales > 0)
    assert codes.max() < 2 ** bits and np.all(np.diff(book) >= 0)
    deq = dictionary.dequantize_np(codes, book, scales, out_cols, out_vals)
    r = np.arange(rows)[:, None]
    assert np.array_equal(deq[r, out_cols.astype(int)], w[r, out_cols.astype(int)])
    keep = np.ones(w.shape, bool)
    keep[r, out_cols.astype(int)] = False
    if share == 0:
        assert keep.all()
    table = scales[:, None].astype(np.float64) * book.astype(np.float64)
    dist = np.abs(w[:, :, None] - table[:, None, :])
    chosen = np.take_along_axis(dist, codes[:, :, None].astype(int), axis=2)[..., 0]
    assert np.all(np.where(keep, chosen - dist.min(axis=2), 0) <= 1e-6 * np.abs(w).max())
    sq = float(np.sum(np.where(keep, deq.astype(np.float64) - w, 0.0) ** 2))
    rms = np.sqrt(sq / max(keep.sum(), 1))
    bound = dictionary.error_bound(w, bits, share)
    assert rms <= bound * (1 + 1e-5) + 1e-6 * scale
    start_s, start_book = dictionary.fit(w.astype(np.float64), bits, keep, rounds=0)
    start = start_s[:, None] * start_book[dictionary._nearest(w, start_s, start_book)]
    fp32 = w.size * (1e-6 * float(np.abs(w).max())) ** 2  # what storing in fp32 may add
    assert sq <= float(np.sum(np.where(keep, start - w, 0.0) ** 2)) * (1 + 1e-5) + fp32
    raw = dictionary.encode_blocks([w], bits, share)
    assert len(raw) == dictionary.block_bytes(rows, cols, bits, share)
    assert np.array_equal(dictionary.decode_block(raw, rows, cols, bits, share).numpy(), deq)
    with pytest.raises(ValueError, match="bytes, got"):
        dictionary.decode_block(raw[:-1], rows, cols, bits, share)


@given(seed=st.integers(0, 2**31), rows=st.integers(1, 6), cols=st.integers(1, 12))
def test_error_compensation_without_correlated_inputs_is_nearest_rounding(seed, rows, cols):
    """With uncorrelated inputs (a diagonal H) nothing is pushed onto other columns: the
    rounding is each weight's nearest level, whatever the visiting order."""
    from runtime.schemes.gptq import compensate

    rng = np.random.default_rng(seed)
    W = rng.normal(size=(rows, cols))
    H = np.diag(rng.uniform(0.1, 5.0, size=cols))
    seen = []

    def choose(col, j):
        seen.append(j)
        return np.round(col * 2) / 2
    assert np.array_equal(compensate(W, H, choose), np.round(W * 2) / 2)
    assert sorted(seen) == list(range(cols))  # every column once, in its own index


def test_error_compensation_lowers_the_output_error_on_correlated_inputs():
    """On correlated inputs X, rounding to a coarse grid with compensation gives a smaller
    output error |X (Q - W)^T|^2 than nearest rounding, for every one of 20 seeds."""
    from runtime.schemes.gptq import compensate

    for seed in range(20):
        rng = np.random.default_rng(seed)
        X = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))  # correlated columns
        W = rng.normal(size=(8, 16))
        H = X.T @ X
        near = np.round(W)
        comp = compensate(W, H, lambda col, j: np.round(col))

        def err(Q):
            return float(np.sum((X @ (Q - W).T) ** 2))
        assert err(comp) < err(near)


@pytest.mark.parametrize("bits", [2, 5])
def test_dictionary_decode_of_a_block_wider_than_int16_columns(bits):
    """Outlier columns past 32767 (stored uint16, read through int16) land in their place,
    with and without a workspace."""
    from runtime.schemes import dictionary

    rows, cols, share = 2, 40000, 0.001
    rng = np.random.default_rng(bits)
    w = rng.normal(size=(rows, cols)).astype(np.float32)
    w[:, 39000:] *= 50  # the outliers are past column 32767
    codes, book, scales, out_cols, out_vals = dictionary.quantize(w, bits, share)
    assert out_cols.min() >= 39000
    want = dictionary.dequantize_np(codes, book, scales, out_cols, out_vals)
    raw = torch.frombuffer(bytearray(dictionary.encode_blocks([w], bits, share)),
                           dtype=torch.uint8)
    for work in (None, uniform.DecodeWork(*dictionary.decode_work(((rows, cols),), bits, share))):
        out = torch.full((cols, rows), -1.0).t()
        dictionary.decode_into([out], raw, ((rows, cols),), bits, share, work)
        assert np.array_equal(out.numpy(), want)
