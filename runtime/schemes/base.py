"""What every quantisation scheme offers the store and the executor, and what they share.

A scheme says how a shard variant's two blocks (runtime/store.py: the input block
[in_rows, cols] and the output block [cols, rows - in_rows]) are kept below 32 bits: their
size from their shapes alone, how they are encoded, how they are decoded straight into
the executor's views, and the decode workspace that needs. 32 bits is fp32 kept raw in
every scheme (the store handles it); a scheme may leave some bitwidths to the default
uniform scheme (`coder`). The store index records the scheme of every file by `name`, and
a scheme's parameters (if it has any) under `quantisation.<index_key>`.

The store, the executor and the commands ask this interface, never a scheme's name;
`runtime.schemes` lists the registered schemes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

if TYPE_CHECKING:
    from elasticplan.problem.inputs import Fields

FP32 = 32



class DecodeWork:
    """Preallocated buffers for the schemes' decoders, sized for the largest block they will
    see (each scheme's `decode_work`), so decoding allocates nothing: int32 words and codes,
    fp32 values, a byte buffer (given in 4-byte units) and int64 outlier indices."""

    def __init__(self, packed_ints: int, indices: int, values: int, byte_words: int = 0,
                 longs: int = 0):
        self.packed = torch.zeros(packed_ints, dtype=torch.int32)
        self.indices = torch.zeros(indices, dtype=torch.int32)  # (viewed as int64 for 8-byte words)
        self.values = torch.zeros(values)
        self.bytes = torch.zeros(4 * byte_words, dtype=torch.uint8)
        self.longs = torch.zeros(longs, dtype=torch.int64)
        self._views: dict = {}

    def views(self, key, make):
        """The views `make(self)` cuts from these buffers for one kind of block, made once
        per key (cutting them costs a microsecond each, per block, on a hot path)."""
        if key not in self._views:
            self._views[key] = make(self)
        return self._views[key]

    @property
    def nbytes(self) -> int:
        return 4 * (self.packed.numel() + self.indices.numel() + self.values.numel()) + \
            self.bytes.numel() + 8 * self.longs.numel()


def take(work: torch.Tensor | None, n: int, dtype) -> torch.Tensor:
    """The first n elements of a workspace buffer (a fresh tensor without one)."""
    if work is None:
        return torch.empty(n, dtype=dtype)
    if work.numel() < n:
        raise ValueError(f"decode workspace of {work.numel()} elements, {n} needed")
    return work[:n]


Blocks = tuple[tuple[int, int], ...]  # (rows, cols) of each block of a variant


class Scheme:
    """A quantisation scheme (a frozen dataclass subclass, its fields its parameters).

    Subclasses set `name`, `bitwidths` (what a store of this scheme keeps by default, 32
    included), `index_key` (None: no parameters in the index), and implement the methods
    that raise NotImplementedError here."""

    name: ClassVar[str]
    bitwidths: ClassVar[tuple[int, ...]]
    index_key: ClassVar[str | None] = None

    # --- which bitwidths ----------------------------------------------------------------

    def coder(self, bits: int) -> "Scheme":
        """The scheme that codes variants at `bits` (this one, or the default uniform scheme,
        whose fp32 is raw): what a store file of those variants records."""
        raise NotImplementedError

    def check_bits(self, bits: int) -> None:
        if bits not in self.bitwidths:
            raise ValueError(f"bitwidth {bits} is not stored by the {self.name} scheme; use "
                             f"one of {self.bitwidths}")

    # --- sizes --------------------------------------------------------------------------

    def block_bytes(self, rows: int, cols: int, bits: int) -> int:
        """Bytes of one block [rows, cols] coded at `bits` (< 32) by this scheme."""
        raise NotImplementedError

    def decode_work(self, blocks: Blocks, bits: int) -> tuple[int, ...]:
        """The DecodeWork sizes one variant of these blocks needs (five numbers)."""
        raise NotImplementedError

    # --- bytes --------------------------------------------------------------------------

    def encode_blocks(self, blocks: list[np.ndarray], bits: int,
                      hessians: list[np.ndarray | None]) -> bytes:
        """The blocks' bytes at `bits` (exactly sum(block_bytes)); `hessians`, one per block
        or None, are the blocks' input covariances for schemes that round with them."""
        raise NotImplementedError

    def decode_into(self, outs: list[torch.Tensor], buf: torch.Tensor, blocks: Blocks,
                    bits: int, work: DecodeWork | None) -> None:
        """Decode the blocks' bytes (uint8 tensor `buf`) into `outs`, one view per block of
        rows x cols elements whose last dimension is cols; with `work`, allocation-free.
        A rowwise scheme's blocks are each its rows' codes then their side data, decoded by
        `decode_rows`; another scheme overrides this."""
        if not self.rowwise:
            raise NotImplementedError
        pos = 0
        for (r, c), dest in zip(blocks, outs):
            code, side = self.row_layout(c, bits)
            n, k = r * code, r * side
            if r and c:
                self.decode_rows(dest, buf[pos:pos + n].view(r, code),
                                 buf[pos + n:pos + n + k].view(r, side), bits, work)
            pos += n + k

    def check(self, buf: np.ndarray, blocks: Blocks, bits: int) -> None:
        """ValueError saying what is wrong if the blocks' bytes (uint8 array, exactly their
        block_bytes summed) would decode to anything but weights inside ±MAX_WEIGHT, or
        would index outside their block (a store tampered with, its checksums rewritten).
        Called once per variant when it is loaded (runtime/store.py), not per query."""
        raise NotImplementedError

    # --- rows that decode alone (a decoder's embedding table) ----------------------------

    # Whether every row of a block decodes alone: its codes at a fixed stride from the
    # block's start and its side data (scales) at a fixed stride after all the codes.
    rowwise: ClassVar[bool] = False

    def row_layout(self, cols: int, bits: int) -> tuple[int, int]:
        """(code bytes, side bytes) of one row of cols weights at `bits` (rowwise schemes:
        a block [rows, cols] is rows x code bytes, then rows x side bytes)."""
        raise NotImplementedError

    def decode_rows(self, out: torch.Tensor, codes: torch.Tensor, side: torch.Tensor,
                    bits: int, work: DecodeWork | None) -> torch.Tensor:
        """Rows of a block (uint8 `codes` [rows, code bytes], `side` [rows, side bytes], any
        rows of it) decoded into `out` (a view of rows x cols elements, its last dimension
        cols); with `work`, allocation-free. `side` is viewed as the scheme's side dtype
        (uniform: fp32, group: fp16), so its storage offset must be a multiple of that
        size (a tensor made by torch.frombuffer, or an aligned slice of one)."""
        raise NotImplementedError

    # --- rows times a vector where they lie (a decode step's matrix-vector products) -------

    def vector_kernel(self, bits: int, cols: int) -> bool:
        """Whether `vector_rows` computes blocks of rows of `cols` weights at `bits` from
        their stored bytes, without decoding them first."""
        return False

    def vector_rows(self, codes: torch.Tensor, side: torch.Tensor, rows: int, cols: int,
                    bits: int, work: DecodeWork):
        """Rows of a block (or of a table) as stored, their codes starting `codes` and their
        side data starting `side` (uint8, contiguous, each at the row layout's strides), as
        an object whose `mv_into(x, y, accumulate)` computes y (=|+=) W x in fp32, its
        temporaries in `work` (decode_work covers them). Only where vector_kernel says so."""
        raise NotImplementedError

    # --- building and the index -----------------------------------------------------------

    @property
    def needs_hessians(self) -> bool:
        """Whether encoding rounds with the blocks' input covariances (runtime/schemes/gptq.py,
        on `calibration_texts`)."""
        return False

    def calibration_texts(self) -> list[str]:
        return []

    def build_key(self) -> dict[str, Any] | None:
        """What the store's build key records of this scheme (None: nothing)."""
        return None

    def index_entry(self, calibration: list[str]) -> dict[str, Any] | None:
        """The scheme's parameters as the index records them (under `index_key`)."""
        return None

    @classmethod
    def from_index(cls, f: "Fields") -> "Scheme":
        """The scheme from its index entry (checked; refusals name the key)."""
        return cls()

    @classmethod
    def create(cls, **options) -> "Scheme":
        """From command-line options (None: not given); ValueError names what is wrong."""
        given = [k for k, v in options.items() if v is not None]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} does not apply to the {cls.name} "
                             f"scheme")
        return cls()
