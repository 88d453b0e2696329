"""The 4-bit kernel (runtime/schemes/groupmv.c) against the group scheme's own decoding then
torch.mv: the same products to float rounding, on encoded blocks and on raw bytes whose
steps and minima are any finite fp16 (subnormals, zeros, negatives)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.schemes import groupmv
from runtime.schemes.group import GROUP, GROUPED, code_bytes, side_bytes
from runtime.schemes.groupmv import GroupRows, applies, work_floats


def _reference(buf: torch.Tensor, rows: int, cols: int, x: torch.Tensor) -> torch.Tensor:
    w = torch.empty(rows, cols)
    GROUPED.decode_into([w], buf, ((rows, cols),), 4, None)
    return w.double() @ x.double()


@pytest.mark.parametrize("rows, cols", [(256, 576), (576, 128), (320, 576), (576, 192), (3, 32)])
def test_encoded_blocks_equal_decoding_then_mv(rows, cols):
    rng = np.random.default_rng(rows + cols)
    w = (rng.normal(size=(rows, cols)) * 0.05).astype(np.float32)
    w[0, :32] = 0.25  # a constant group: step 0
    buf = torch.frombuffer(bytearray(GROUPED.encode_blocks([w], 4, [None])), dtype=torch.uint8)
    x = torch.from_numpy(rng.normal(size=cols).astype(np.float32))
    y = torch.empty(rows)
    GroupRows.of_block(buf, rows, cols, torch.empty(work_floats(cols))).mv_into(x, y)
    ref = _reference(buf, rows, cols, x)
    assert torch.allclose(y.double(), ref, rtol=0, atol=2e-6 * float(ref.abs().max()))


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), groups=st.integers(1, 4), seed=st.integers(0, 2 ** 32 - 1),
       accumulate=st.booleans())
def test_any_finite_side_data(rows, groups, seed, accumulate):
    """Raw bytes: random codes, and steps and minima drawn from every finite fp16 pattern
    (the kernel's own fp16 conversion against numpy's)."""
    rng = np.random.default_rng(seed)
    cols = 32 * groups
    codes = rng.integers(0, 256, size=(rows, code_bytes(cols, 4)), dtype=np.uint8)
    side = rng.integers(0, 2 ** 16, size=(rows, 2 * groups), dtype=np.uint16)
    exponent = (side >> 10) & 0x1F
    side[exponent == 0x1F] &= 0x7BFF  # an infinity or NaN pattern made finite
    buf = torch.from_numpy(np.concatenate([codes.ravel(), side.astype("<u2").view(np.uint8).ravel()]))
    x = torch.from_numpy(rng.normal(size=cols).astype(np.float32))
    before = torch.from_numpy(rng.normal(size=rows).astype(np.float32))
    y = before.clone()
    GroupRows.of_block(buf, rows, cols, torch.empty(work_floats(cols))).mv_into(x, y, accumulate)
    w = torch.empty(rows, cols)
    GROUPED.decode_into([w], buf, ((rows, cols),), 4, None)
    terms = w.double() * x.double()
    ref = terms.sum(1) + (before.double() if accumulate else 0)
    scale = terms.abs().sum(1) + (before.double().abs() if accumulate else 0)
    assert torch.all((y.double() - ref).abs() <= 1e-5 * scale + 1e-30)


def test_rows_at_a_stride_of_their_own():
    """A run of table rows: codes then side data at row strides given (any rows of it)."""
    rng = np.random.default_rng(1)
    rows, cols = 40, 64
    w = (rng.normal(size=(rows, cols))).astype(np.float32)
    buf = torch.frombuffer(bytearray(GROUPED.encode_blocks([w], 4, [None])), dtype=torch.uint8)
    cb, sb = code_bytes(cols, 4), side_bytes(cols)
    x = torch.from_numpy(rng.normal(size=cols).astype(np.float32))
    part = GroupRows(buf.data_ptr() + 10 * cb, buf.data_ptr() + rows * cb + 10 * sb, 7, cols,
                     torch.empty(work_floats(cols)), keep=buf, code_stride=cb, side_stride=sb)
    y = torch.empty(7)
    part.mv_into(x, y)
    ref = _reference(buf, rows, cols, x)[10:17]
    assert torch.allclose(y.double(), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


def test_refusals():
    assert applies(4, 576) and not applies(4, 100) and not applies(8, 576)
    buf = torch.zeros(1000, dtype=torch.uint8)
    with pytest.raises(ValueError, match="whole groups"):
        GroupRows.of_block(buf, 2, 48, torch.empty(100))
    with pytest.raises(ValueError, match="workspace"):
        GroupRows.of_block(buf, 2, 64, torch.empty(3))
    with pytest.raises(ValueError, match="need 64 contiguous bytes of codes, got 50"):
        GroupRows.of_block(buf[:50], 2, 64, torch.empty(100))
    rows = GroupRows.of_block(buf, 2, 64, torch.empty(100))
    with pytest.raises(ValueError, match="times 63 values"):
        rows.mv_into(torch.zeros(63), torch.zeros(2))


def test_the_scheme_offers_the_kernel_with_its_workspace():
    assert GROUPED.vector_kernel(4, 576) and not GROUPED.vector_kernel(8, 576)
    assert groupmv.GROUP == GROUP  # the kernel's layout is the scheme's, at 4 bits
    for cols in (32, 64, 576, 1536):
        assert (groupmv.code_bytes(cols), groupmv.side_bytes(cols)) == GROUPED.row_layout(cols, 4)
    assert not GROUPED.vector_kernel(4, 40)
    # decode_work's fp32 values cover the kernel's temporaries for every block it takes
    for rows, cols in [(1, 32), (2, 1536), (576, 128)]:
        assert GROUPED.decode_work(((rows, cols),), 4)[2] >= work_floats(cols)
