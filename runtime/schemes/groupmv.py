"""The group scheme's 4-bit rows times a vector where their bytes lie, by the C kernel
runtime/schemes/groupmv.c (built with the package: pyproject.toml's ext-modules), which
never writes the weights out in fp32: the decode executor's matrix-vector products on
4-bit shards and table rows (runtime/decode_layers.py). A decode step computes each
weight once, and decoding a 4-bit block to fp32 before torch.mv cost 3-5x the kernel per
weight on SmolLM2's blocks (`python -m benchmarks.int4_kernel`, docs/decoders.md).

Why our own kernel rather than torch's int4 one (`_weight_int4pack_mm_for_cpu`): that is
fast only with bf16 activations, scales and output (3-4e-3 off the fp32 product), and its
packed layout depends on the CPU's instruction set (blocks of 64 columns with AVX-512, 32
with AVX2), so a store could not keep it. This one reads the store's own bytes and
computes in fp32: it agrees with decoding then torch.mv to float rounding
(tests/test_groupmv.py).
"""

from __future__ import annotations

import ctypes
import importlib.util

import torch

BITS = 4  # the bitwidth the kernel computes
GROUP = 32  # weights per step and minimum along a row (runtime/schemes/group.py's GROUP)


def code_bytes(cols: int) -> int:
    """Code bytes of a row of whole groups at 4 bits (group.code_bytes: two codes a byte)."""
    return cols // 2


def side_bytes(cols: int) -> int:
    """Its fp16 steps, then its fp16 minima (group.side_bytes)."""
    return 4 * (cols // GROUP)

MODULE = "runtime._groupmv"

_lib = None


def _library():
    """The kernel's shared library, loaded once (RuntimeError if the package was installed
    without building it)."""
    global _lib
    if _lib is None:
        spec = importlib.util.find_spec(MODULE)
        if spec is None or spec.origin is None:
            raise RuntimeError(f"the 4-bit kernel ({MODULE}, runtime/schemes/groupmv.c) is not "
                               f"built: reinstall the package (pip install -e .) with a C "
                               f"compiler on the machine")
        lib = ctypes.CDLL(spec.origin)
        p, n = ctypes.c_void_p, ctypes.c_int64
        lib.group4_mv.argtypes = [p, n, p, n, p, p, n, n, ctypes.c_int, p]
        lib.group4_mv.restype = None
        _lib = lib
    return _lib


def applies(bits: int, cols: int) -> bool:
    """Whether the kernel computes rows of `cols` weights at `bits` (whole groups only)."""
    return bits == BITS and cols > 0 and cols % GROUP == 0


def work_floats(cols: int) -> int:
    """The fp32 workspace one call needs: x split into even and odd columns, and its group
    sums."""
    return cols + cols // GROUP


class GroupRows:
    """A block of `rows` 4-bit group rows of `cols` weights lying at fixed addresses: codes
    row r at codes + r * code_stride, its steps and minima at side + r * side_stride.
    `keep` holds what owns those bytes; `work` is an fp32 tensor of work_floats(cols) at
    least. y = W x by `mv_into`."""

    __slots__ = ("codes", "side", "code_stride", "side_stride", "rows", "cols", "work", "keep",
                 "_fn")

    def __init__(self, codes: int, side: int, rows: int, cols: int, work: torch.Tensor,
                 keep=None, code_stride: int | None = None, side_stride: int | None = None):
        if not applies(BITS, cols):
            raise ValueError(f"the 4-bit kernel computes whole groups of {GROUP} columns, not "
                             f"{cols}")
        if work.dtype != torch.float32 or work.numel() < work_floats(cols):
            raise ValueError(f"the 4-bit kernel's workspace has {work.numel()} floats, "
                             f"{work_floats(cols)} needed")
        self.codes, self.side, self.rows, self.cols = codes, side, rows, cols
        self.code_stride = code_bytes(cols) if code_stride is None else code_stride
        self.side_stride = side_bytes(cols) if side_stride is None else side_stride
        self.work, self.keep = work, keep
        self._fn = _library().group4_mv

    @classmethod
    def of(cls, codes: torch.Tensor, side: torch.Tensor, rows: int, cols: int,
           work: torch.Tensor) -> "GroupRows":
        """Rows stored as runtime/schemes/group.py lays them out: their codes from the start of
        `codes`, their steps and minima from the start of `side` (uint8, contiguous)."""
        for name, t, per in (("codes", codes, code_bytes(cols)), ("side data", side,
                                                                  side_bytes(cols))):
            if t.dtype != torch.uint8 or not t.is_contiguous() or t.numel() < rows * per:
                raise ValueError(f"{rows} 4-bit rows of {cols} weights need {rows * per} "
                                 f"contiguous bytes of {name}, got {t.numel()}")
        return cls(codes.data_ptr(), side.data_ptr(), rows, cols, work, keep=(codes, side))

    @classmethod
    def of_block(cls, buf: torch.Tensor, rows: int, cols: int, work: torch.Tensor
                 ) -> "GroupRows":
        """The block stored at the start of `buf` (its rows' codes, then their side data)."""
        n = rows * code_bytes(cols)
        return cls.of(buf[:n], buf[n:], rows, cols, work)

    def mv_into(self, x: torch.Tensor, y: torch.Tensor, accumulate: bool = False) -> torch.Tensor:
        """y (=|+=) W x: x fp32 [cols] (or [1, cols]), y fp32 [rows] (or [1, rows]), both
        contiguous."""
        if x.numel() != self.cols or y.numel() != self.rows:
            raise ValueError(f"a [{self.rows}, {self.cols}] block times {x.numel()} values "
                             f"into {y.numel()}")
        if not (x.is_contiguous() and y.is_contiguous() and x.dtype == y.dtype == torch.float32):
            raise ValueError("the 4-bit kernel takes contiguous fp32 vectors")
        self._fn(self.codes, self.code_stride, self.side, self.side_stride, x.data_ptr(),
                 y.data_ptr(), self.rows, self.cols, int(accumulate), self.work.data_ptr())
        return y
