"""The group scheme (runtime/schemes/group.py): affine per 32 weights of a row, fp16 step and
minimum. Its torch decoding is its numpy reference bit for bit (every bitwidth, ragged last
groups, strided views, with and without a workspace); its error is within the min-max
grid's bound; weights already on a GGUF grid (Q4_1, Q8_0) come back exactly; its bytes are
what block_bytes says; tampered side data is refused; a store keeps it per file and a build
of another scheme does not reuse its files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elasticplan.cli import main
from runtime.schemes import group, uniform
from runtime.schemes.base import DecodeWork
from runtime.schemes.group import GROUPED
from runtime.sources.tiny_llama import write_tiny_llama
from runtime.store import TABLE, ShardStore


def _encode(w: np.ndarray, bits: int) -> torch.Tensor:
    raw = GROUPED.encode_blocks([w], bits, [None])
    assert len(raw) == GROUPED.block_bytes(*w.shape, bits)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(group.QUANT_BITS), rows=st.integers(1, 6),
       cols=st.integers(1, 130), seed=st.integers(0, 2**31), heavy=st.booleans(),
       workspace=st.booleans())
def test_torch_decoding_is_the_numpy_reference_bit_for_bit(bits, rows, cols, seed, heavy,
                                                           workspace):
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(3, size=(rows, cols)) if heavy else rng.normal(size=(rows, cols)))
    w = (w * 0.05).astype(np.float32)
    codes, steps, lows = group.quantize(w, bits)
    assert codes.max() < 2 ** bits and steps.shape == lows.shape == (rows, -(-cols // 32))
    ref = group.dequantize_np(codes, steps, lows)
    out = torch.full((rows, cols), float("nan"))
    work = DecodeWork(*GROUPED.decode_work(((rows, cols),), bits)) if workspace else None
    GROUPED.decode_into([out], _encode(w, bits), ((rows, cols),), bits, work)
    assert np.array_equal(out.numpy(), ref)


def test_decoding_into_a_strided_view_and_by_rows():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(8, 100)).astype(np.float32)  # 3 whole groups and one of 4
    for bits in group.QUANT_BITS:
        ref = group.dequantize_np(*group.quantize(w, bits))
        buf = _encode(w, bits)
        dest = torch.zeros(2, 10, 100)
        view = dest[:, 3:7, :]  # 8 rows scattered in two blocks
        GROUPED.decode_into([view], buf, ((8, 100),), bits, None)
        assert np.array_equal(view.reshape(8, 100).numpy(), ref)
        assert dest[:, :3].abs().sum() == 0 and dest[:, 7:].abs().sum() == 0
        # any rows alone, from their codes and side data (how a decoder reads its table)
        code_bytes, side_bytes = GROUPED.row_layout(100, bits)
        codes = buf[:8 * code_bytes].view(8, code_bytes)
        side = buf[8 * code_bytes:].view(8, side_bytes)
        picked = torch.tensor([6, 1, 1])
        out = torch.empty(3, 100)
        GROUPED.decode_rows(out, codes[picked], side[picked], bits, None)
        assert np.array_equal(out.numpy(), ref[[6, 1, 1]])


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from(group.QUANT_BITS), seed=st.integers(0, 2**31),
       scale=st.floats(1e-3, 10.0))
def test_error_within_the_min_max_grids_bound(bits, seed, scale):
    """Each group's squared error no more than the min-max grid's, so its RMS error within
    half a min-max step (plus fp16's rounding of the step and minimum)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(4, size=(5, 64)) * scale).astype(np.float32)
    w[0] = 0.0  # a constant group: exact
    deq = group.dequantize_np(*group.quantize(w, bits))
    g = w.reshape(5, 2, 32)
    span = g.max(axis=2) - g.min(axis=2)
    step = span / (2 ** bits - 1)
    slack = 2 ** -10 * (np.abs(g).max(axis=2) + span)  # fp16's relative rounding, both terms
    rms = np.sqrt(((deq - w).reshape(5, 2, 32) ** 2).mean(axis=2))
    assert np.all(rms <= step / 2 + slack)
    assert np.array_equal(deq[0], w[0])
    s16, m16 = step.astype(np.float16), g.min(axis=2).astype(np.float16)
    u = np.clip(np.rint((g - m16[..., None].astype(np.float32))
                        / np.where(s16 == 0, 1, s16)[..., None].astype(np.float32)),
                0, 2 ** bits - 1)
    minmax = ((m16[..., None].astype(np.float32) + u * s16[..., None].astype(np.float32)
               - g) ** 2).sum(axis=2)
    mine = ((deq - w).reshape(5, 2, 32) ** 2).sum(axis=2)
    assert np.all(mine <= minmax * (1 + 1e-6) + 1e-30)


def _q4_1(rng, rows, cols):
    d = rng.uniform(1e-3, 2e-2, (rows, cols // 32)).astype(np.float16)
    m = (-8 * d.astype(np.float32) * rng.uniform(0.2, 1.8, d.shape)).astype(np.float16)
    q = rng.integers(0, 16, (rows, cols // 32, 32))
    q[..., 3], q[..., 17] = 0, 15  # llama.cpp's Q4_1: the group's min and max are levels 0, 15
    return (d.astype(np.float32)[..., None] * q + m.astype(np.float32)[..., None]) \
        .reshape(rows, cols).astype(np.float32)


def _q8_0(rng, rows, cols):
    d = rng.uniform(1e-4, 1e-2, (rows, cols // 32)).astype(np.float16)
    q = rng.integers(-127, 128, (rows, cols // 32, 32))
    q[..., 5] = np.where(rng.random((rows, cols // 32)) < 0.5, 127, -127)  # amax / d = 127
    return (d.astype(np.float32)[..., None] * q).reshape(rows, cols).astype(np.float32)


def test_weights_on_a_gguf_grid_come_back_exactly():
    """A Q4_1 source at 4, 6 and 8 bits and a Q8_0 source at 8 bits, bit for bit; below
    their grid's levels they are not (the test can tell)."""
    rng = np.random.default_rng(2)
    q41, q80 = _q4_1(rng, 16, 576), _q8_0(rng, 16, 576)
    for w, exact, lossy in ((q41, (4, 6, 8), (2, 3)), (q80, (8,), (2, 4, 6))):
        for bits in exact + lossy:
            out = torch.empty(w.shape)
            GROUPED.decode_into([out], _encode(w, bits), (w.shape,), bits, None)
            assert np.array_equal(out.numpy(), w) == (bits in exact), bits
    # the per-row uniform scheme keeps neither exactly at 8 bits
    assert not np.array_equal(uniform.dequantize_np(*uniform.quantize(q41, 8), 8), q41)


def test_tampered_side_data_is_refused_with_where():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(4, 64)).astype(np.float32)
    raw = np.frombuffer(GROUPED.encode_blocks([w], 4, [None]), np.uint8).copy()
    GROUPED.check(raw, ((4, 64),), 4)
    side = raw[4 * 32:].view("<f2").reshape(4, 4)  # per row: 2 steps, 2 minima
    for where, value, word in (((2, 1), np.nan, "step nan"), ((1, 0), -1.0, "step -1"),
                               ((3, 3), np.inf, "minimum inf")):
        bad = raw.copy()
        bad[4 * 32:].view("<f2").reshape(4, 4)[where] = value
        with pytest.raises(ValueError, match=f"row {where[0]}, group {where[1] % 2}: .*"
                                             + word.split()[0]):
            GROUPED.check(bad, ((4, 64),), 4)
    assert side.dtype == np.float16


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match="NaN or an infinity"):
        group.quantize(np.array([[1.0, np.nan]], np.float32), 4)
    with pytest.raises(ValueError, match="no grid with an fp16 step and minimum"):
        group.quantize(np.array([[1e6, -1e6]], np.float32), 4)
    with pytest.raises(ValueError, match="not packed by the group scheme"):
        group.quantize(np.zeros((1, 32), np.float32), 5)


def test_a_store_keeps_the_scheme_per_file_and_never_reuses_anothers(tmp_path):
    ckpt = write_tiny_llama(tmp_path / "ckpt")
    out = tmp_path / "store"
    assert main(["shard", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    uniform_sums = {k: v["sha256"] for k, v in
                    json.loads((out / "index.json").read_text())["files"].items()}
    assert main(["shard", "--checkpoint", str(ckpt), "--out", str(out),
                 "--scheme", "group"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["quantisation"]["group"] == {"group": group.GROUP, "layout": group.LAYOUT}
    for name, entry in index["files"].items():
        fp32 = ".b32." in name
        assert entry.get("scheme") == (None if fp32 else "group"), name
        assert (entry["sha256"] == uniform_sums[name]) == fp32, name  # rebuilt, not kept
    store = ShardStore(out)
    assert store.table_variant(8).scheme is not None
    assert store.scheme_of(4) == "group" and store.scheme_of(32) == "uniform"
    t8, t32 = store.load_table(8), store.load_table(32)
    assert 0 < float((t8 - t32).abs().max()) < 0.05 * float(t32.abs().max())
    assert store.variant(0, "ffn0", 8).name == "ffn0" and TABLE == "table"


def test_checking_a_table_allocates_a_piece_at_a_time():
    """`check` runs while the executor's IO buffers are allocated and before its compute
    buffers: a table's side data widened at once (7 MB for SmolLM2's) lifted the process's
    peak 17 % above a 48 MB plan. Widened in pieces of CHECK_ROWS rows, numpy's temporaries
    stay a fraction of a MB whatever the table's rows (numpy reports to tracemalloc)."""
    import tracemalloc

    rows, cols = 8 * group.CHECK_ROWS, 576
    w = np.random.default_rng(5).normal(size=(rows, cols)).astype(np.float32)
    raw = np.frombuffer(GROUPED.encode_blocks([w], 8, [None]), np.uint8)
    tracemalloc.start()
    try:
        GROUPED.check(raw, ((rows, cols),), 8)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    whole = rows * 2 * (cols // 32) * 4  # the side data widened at once
    assert peak < whole / 2 and peak < 1 << 20


def test_every_block_it_writes_its_check_accepts():
    """A coarse grid (k < b) would put its top code far above the group's range; a grid
    whose top lies beyond ±65504 is not used, so what the encoder writes `check` accepts,
    and weights near fp16's limit are kept rather than refused."""
    q = (np.arange(64) % 16).astype(np.float32)
    for w in (q[None] * 512.0, np.linspace(-40000, 40000, 64, dtype=np.float32)[None],
              np.array([[65000.0, -65000.0] * 16], np.float32)):
        for bits in group.QUANT_BITS:
            raw = np.frombuffer(GROUPED.encode_blocks([w], bits, [None]), np.uint8)
            GROUPED.check(raw, (w.shape,), bits)
            deq = group.dequantize_np(*group.quantize(w, bits))
            assert np.abs(deq).max() <= 65504
    assert np.array_equal(group.dequantize_np(*group.quantize(q[None] * 512.0, 4)),
                          q[None] * 512.0)
