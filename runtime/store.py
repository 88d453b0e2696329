"""The shard store: real files on disk, one per (layer, bitwidth), with a JSON index.

Directory layout (written once by `elasticplan shard`, every file fsync'ed):

    index.json           schema elasticplan.store/1: source, config, files, shards
    resident.bin         resident fp32 tensors (embeddings, LayerNorms, Wo/W2 biases)
    tokenizer.json       the model's tokenizer, copied
    layer{L}.b{B}.bin    every shard of layer L at B bits, back to back, in the order
                         head0..head{H-1}, ffn0..ffn{H-1}
    table.b{B}.bin       a decoder's (llama's) token-embedding table, tied to its LM head,
                         at B bits: one variant, shard "table" of the pseudo-layer
                         L = layers (after the last), a planned part like the shards

One shard variant (its `offset` and `bytes` in the index) is two blocks and a bias:
    input block   the shard matrix's first `in_rows` rows (Wq/Wk/Wv rows; W1 rows):
                  [in_rows, cols]
    output block  the remaining rows transposed back to the original orientation
                  (Wo's / W2's columns): [cols, rows - in_rows]
    bias          [bias] fp32
The table variant is its input block alone: in_rows = rows = vocab, cols = hidden, no
output block, no bias; one token's embedding is a contiguous row of codes plus its scale,
the whole table one contiguous read (resident.bin keeps the fp32 table too).
Each block is fp32 (B = 32), or in the store's scheme for quantised bitwidths:
- uniform (default): packed codes [r, ceil(c*B/8)] then fp32 scales [r] (uniform.py), so
  every block is quantised per output channel; B in {2, 3, 4, 6, 8};
- dict (`elasticplan shard --scheme dict`): per block a codebook of 2^B fp32 values and a
  scale per row, plus exact outliers (dictionary.py; its layout there); B in {2, 3, 4, 5}
  (6 and 8 bits of a dict store are uniform).
The index records the scheme per file (absent: uniform) and the dictionary parameters
(outlier share, layout) under `quantisation.dictionary`. (Quantising Wo's columns
per input channel instead cost 6-bit fidelity 0.962 vs 0.999 here.) For the uniform scheme the
size is exactly elasticplan.problem.archgen's head_bytes / ffn_bytes; for either, the model
profile's `bytes` are these sizes, and the index's sizes must be what the shapes imply. Each variant and each file carries a sha256.

Building is idempotent and resumable: the index records what the store was built from
(the model file's sha256, bitwidths, quantisation scheme); a rerun keeps every file whose
recorded checksum still matches and rewrites the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from elasticplan.errors import StoreError
from elasticplan.problem.inputs import Fields, integer, load_json, regular_file, show
from elasticplan.problem.outputs import TEMP_SUFFIX, remove_debris, write_bytes
from runtime.families import DEFAULT_FAMILY, REGISTRY, family
from runtime.families.encoder import (
    Config,
    Encoder,
    Slot,
    Tokenizer,
)
from runtime.families.weights import MAX_WEIGHT, first_bad, out_of_range
from runtime.schemes import all_schemes, gptq, uniform
from runtime.schemes.base import FP32, DecodeWork, Scheme
from runtime.schemes.uniform import UNIFORM as DEFAULT
from runtime.sources.checkpoint import packaged

SCHEMA = "elasticplan.store/1"
LAYOUT_VERSION = 2
INDEX = "index.json"
VARIANT_LAYOUT = ("input block [in_rows, cols], then output block [cols, rows - in_rows] "
                  "(the matrix's last rows, transposed), each fp32 (32 bits) or packed codes "
                  "[r, ceil(c*bits/8)] + fp32 scales [r]; then bias: fp32 [bias]")
TABLE = "table"  # a decoder's token-embedding table (tied LM head): layer = config.layers
RESIDENT_PIECE = 1 << 20  # bytes of resident.bin read at once


def _blocks(rows: int, cols: int, in_rows: int) -> list[tuple[int, int]]:
    """(rows, cols) of a variant's stored blocks: the input block, and the output block
    unless the input block is the whole matrix (the embedding table's variant)."""
    return [(in_rows, cols)] + ([(cols, rows - in_rows)] if rows > in_rows else [])


@dataclass(frozen=True)
class Variant:
    """Where one shard at one bitwidth lives, and how to decode it."""

    layer: int
    name: str
    bits: int
    file: str
    offset: int
    nbytes: int
    rows: int
    cols: int
    in_rows: int
    bias: int
    sha256: str
    scheme: Scheme = DEFAULT  # the scheme that coded it (fp32: raw, the default)

    def blocks(self) -> list[tuple[int, int]]:
        """(rows, cols) of the stored input and output blocks (the table: input only)."""
        return _blocks(self.rows, self.cols, self.in_rows)

    def describe(self) -> str:
        """'shard group1 of layer 3 at 4 bits', 'the embedding table at 8 bits'."""
        what = "the embedding table" if self.name == TABLE else \
            f"shard {self.name} of layer {self.layer}"
        return f"{what} at {self.bits} bits"




@dataclass(frozen=True)
class FileEntry:
    """A file of the store that the index lists with its checksum."""

    file: str
    sha256: str


@dataclass(frozen=True)
class TensorEntry:
    offset: int  # in resident.bin
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return 4 * int(np.prod(self.shape))  # fp32


@dataclass(frozen=True)
class ResidentEntry(FileEntry):
    """resident.bin: the resident fp32 tensors back to back."""

    nbytes: int
    tensors: dict[str, TensorEntry]


@dataclass(frozen=True)
class StoreIndex:
    """index.json, read strictly and typed. `build` (what the store was built from: a
    rebuild keeps the files whose build matches) and `source` (provenance) are kept as the
    JSON they are, compared and hashed whole; `data` is the whole JSON as read."""

    model: str
    complete: bool
    config: Config
    bitwidths: tuple[int, ...]
    variants: dict[tuple[int, str, int], Variant]  # by (layer, shard, bits)
    files: dict[str, FileEntry]  # the shard files
    tokenizer: FileEntry
    resident: ResidentEntry
    build: dict
    data: dict
    chat_template: str | None = None  # a decoder's, from its source (a Jinja template)

    def entries(self) -> list[FileEntry]:
        """Every file the index lists: shard files, the resident tensors, the tokenizer."""
        return [*self.files.values(), self.resident, self.tokenizer]


def decode_into(v: Variant, raw: memoryview | bytes, slot: Slot,
                work: DecodeWork | None = None) -> None:
    """Decode one variant's bytes straight into its slot's views (the one decoder): the
    input block into `slot.inp` (any view of in_rows x cols elements, last dim cols), the
    output block into `slot.out` (stored orientation [cols, rows - in_rows]), the bias."""
    buf = torch.frombuffer(bytearray(raw) if isinstance(raw, bytes) else raw, dtype=torch.uint8)
    pos = v.nbytes - 4 * v.bias
    if v.bits == FP32:
        at = 0
        for dest in (slot.inp, slot.out):
            dest.copy_(buf[at:at + 4 * dest.numel()].view(torch.float32).view(dest.shape))
            at += 4 * dest.numel()
    else:
        v.scheme.decode_into([slot.inp, slot.out], buf[:pos], tuple(v.blocks()), v.bits, work)
    slot.bias.copy_(buf[pos:pos + 4 * v.bias].view(torch.float32).view(slot.bias.shape))


def check_values(v: Variant, raw: memoryview | bytes | bytearray) -> str | None:
    """Why a variant's bytes may not be decoded (a NaN, an infinity or a weight beyond
    ±MAX_WEIGHT anywhere, an outlier column outside its block: the scheme's `check`), or
    None. Cheap next to its checksum: run once per variant when it is read, not per query."""
    buf = np.frombuffer(raw, np.uint8, v.nbytes)
    body = v.nbytes - 4 * v.bias
    why = out_of_range(np.frombuffer(buf, "<f4", v.bias, body), "the bias")
    if why:
        return why
    if v.bits == FP32:
        return out_of_range(np.frombuffer(buf, "<f4", body // 4), "the weights")
    try:
        v.scheme.check(buf[:body], tuple(v.blocks()), v.bits)
    except ValueError as e:
        return str(e)
    return None


def variant_bytes(scheme: Scheme, rows: int, cols: int, in_rows: int, bias: int,
                  bits: int) -> int:
    """A variant's size from its shape: its two blocks (fp32 raw, else in the scheme that
    codes `bits`) and its fp32 bias."""
    blocks = _blocks(rows, cols, in_rows)
    if bits == FP32:
        return 4 * (sum(r * c for r, c in blocks) + bias)
    coder = scheme.coder(bits)
    return sum(coder.block_bytes(r, c, bits) for r, c in blocks) + 4 * bias


def encode_variant(scheme: Scheme, matrix: np.ndarray, in_rows: int, bias: np.ndarray,
                   bits: int, hessians: tuple[np.ndarray, np.ndarray] | None = None) -> bytes:
    """A variant's bytes: its two blocks (fp32 raw, else coded by the scheme that codes
    `bits`; `hessians`, its blocks' input covariances, for a scheme that rounds with
    them), then the bias."""
    parts = (matrix[:in_rows], matrix[in_rows:].T) if in_rows < len(matrix) else (matrix,)
    blocks = [np.ascontiguousarray(b, dtype=np.float32) for b in parts]
    if bits == FP32:
        body = b"".join(b.astype("<f4").tobytes() for b in blocks)
    else:
        body = scheme.coder(bits).encode_blocks(blocks, bits,
                                                list(hessians or [None] * len(blocks)))
    return body + np.asarray(bias, dtype="<f4").tobytes()


def sha256_file(path: Path) -> str:
    """The sha256 of a regular file (a device or pipe in its place is a StoreError: it
    could be read forever)."""
    with open(path, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise StoreError(f"{path}: not a regular file (a device, pipe or socket)")
        h = hashlib.sha256()
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_checked(path: Path, sha256: str) -> bytes:
    """A small store file's bytes, checked against the checksum the index records."""
    try:
        with regular_file(path, what="shard store file", limit=MAX_INDEX_BYTES,
                          error=StoreError) as fd:
            data = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
    except OSError as e:
        raise StoreError(f"{path}: cannot read ({e.strerror})") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise StoreError(f"{path}: checksum mismatch (file corrupt or changed since the "
                         f"store was built); rebuild with `elasticplan shard`")
    return data


def _write_durable(path: Path, chunks: list[bytes]) -> None:
    """Written atomically and fsync'ed (so that fadvise can evict its pages later)."""
    write_bytes(path, chunks)


MAX_INDEX_BYTES = 16 * 10**6


def _store_file(f: Fields, key: str, name) -> str:
    """A file name the index lists: a plain name inside the store, nothing else."""
    if not isinstance(name, str) or not name or len(name) > 255 or "/" in name \
            or "\\" in name or "\0" in name or name in (".", ".."):
        raise f.err(key, f"{show(name)} is not a file name inside the store")
    return name


def _read_index(path: Path) -> StoreIndex:
    """The index, checked strictly and typed. Every listed file is confined to the store
    directory."""
    file = str(path)
    f = Fields(load_json(path, what="shard store index", limit=MAX_INDEX_BYTES,
                         error=StoreError), file, "", "a shard store index", StoreError)
    if f.raw("schema") != SCHEMA:
        raise f.err("schema", f"expected {SCHEMA!r}, got {show(f.raw('schema'))}")
    model = f.string("model", max_length=64)
    complete = f.boolean("complete")
    cf = f.mapping("config", "the model's shape")
    name = cf.string("family", required=False) or DEFAULT_FAMILY
    if name not in REGISTRY:
        raise cf.err("family", f"must be one of {', '.join(REGISTRY)}, got {show(name)}")
    config = family(name).config_from_index(cf, model)
    cf.done()
    bitwidths = tuple(integer(b, file, f"bitwidths[{i}]", minimum=1, maximum=32,
                              error=StoreError) for i, b in enumerate(f.sequence("bitwidths")))
    schemes = {DEFAULT.name: DEFAULT}
    qf = f.mapping("quantisation", "the quantisation schemes")
    for cls in all_schemes().values():
        sub = cls.index_key and qf.mapping(cls.index_key, f"the {cls.name} scheme's parameters",
                                           required=False)
        if sub is not None and cls.index_key:
            schemes[cls.name] = cls.from_index(sub)
    variants: dict[tuple[int, str, int], Variant] = {}
    shard_files: dict[str, FileEntry] = {}
    # a decoder's embedding table is the pseudo-layer config.layers (one shard, "table")
    tables = family(config.family).decoder
    files = f.mapping("files", "file name -> its layer, bitwidth and shards")
    for fname in list(files.data):
        _store_file(files, str(fname), fname)
        ef = files.mapping(fname, "a shard file")
        layer = ef.integer("layer", minimum=0, maximum=config.layers - (not tables))
        bits = ef.integer("bits", minimum=1, maximum=32)
        name = ef.string("scheme", required=False) or DEFAULT.name
        if name not in schemes:
            registered = all_schemes()
            hint = f"; {name} needs quantisation.{registered[name].index_key}" \
                if name in registered else ""
            raise ef.err("scheme", f"{name!r} is not a scheme of this store (known: "
                                   f"{', '.join(schemes)}{hint})")
        scheme = schemes[name]
        if bits not in scheme.bitwidths or scheme.coder(bits) != scheme:
            raise ef.err("bits", f"{bits} is not a bitwidth of the {name} scheme")
        shard_files[fname] = FileEntry(fname, ef.string("sha256"))
        shards = ef.mapping("shards", "shard name -> its place in the file")
        for name in list(shards.data):
            sf = shards.mapping(name, "a shard variant")
            v = Variant(layer=layer, name=str(name), bits=bits, file=fname,
                        offset=sf.integer("offset", minimum=0, maximum=1 << 40),
                        nbytes=sf.integer("bytes", minimum=0, maximum=1 << 40),
                        rows=sf.integer("rows", minimum=0, maximum=1 << 20),
                        cols=sf.integer("cols", minimum=0, maximum=1 << 20),
                        in_rows=sf.integer("in_rows", minimum=0, maximum=1 << 20),
                        bias=sf.integer("bias", minimum=0, maximum=1 << 20),
                        sha256=sf.string("sha256"), scheme=scheme)
            sf.done()
            if layer == config.layers:  # the embedding table: [vocab, hidden], input block only
                if v.name != TABLE:
                    raise shards.err(v.name, f"layer {layer} (after the last) holds only the "
                                             f"embedding table, shard {TABLE!r}")
                for key, value in (("rows", config.vocab), ("in_rows", config.vocab),
                                   ("cols", config.hidden), ("bias", 0)):
                    if getattr(v, key) != value:
                        raise sf.err(key, f"{getattr(v, key)}, but the embedding table "
                                          f"[vocab, hidden] has {key} {value}")
            elif not 0 < v.in_rows < v.rows:
                raise sf.err("in_rows", f"{v.in_rows} is not inside the shard's {v.rows} rows")
            want = variant_bytes(scheme, v.rows, v.cols, v.in_rows, v.bias, bits)
            if v.nbytes != want:  # e.g. an outlier count that does not match the size
                raise sf.err("bytes", f"{v.nbytes}, but a {v.rows}x{v.cols} shard at {bits} "
                                      f"bits in the {scheme.name} scheme is {want} bytes "
                                      f"(a store of another scheme or layout version?)")
            variants[v.layer, v.name, v.bits] = v
    tokenizer = f.mapping("tokenizer", "{file, sha256}")
    tok = FileEntry(_store_file(tokenizer, "file", tokenizer.raw("file")),
                    tokenizer.string("sha256"))
    resident = f.mapping("resident", "{file, sha256, bytes, tensors}")
    res_file = _store_file(resident, "file", resident.raw("file"))
    res_sha, res_bytes = resident.string("sha256"), resident.integer("bytes", minimum=0,
                                                                     maximum=1 << 40)
    tensors = resident.mapping("tensors", "tensor name -> {offset, shape}")
    entries = {}
    for name in list(tensors.data):
        tf = tensors.mapping(name, "{offset, shape}")
        offset = tf.integer("offset", minimum=0, maximum=1 << 40)
        shape = tuple(integer(d, file, f"{tf.key('shape')}[{i}]", minimum=1, maximum=1 << 30,
                              error=StoreError) for i, d in enumerate(tf.sequence("shape")))
        tf.done()
        entries[str(name)] = TensorEntry(offset, shape)
        if offset + entries[str(name)].nbytes > res_bytes:
            raise tf.err("offset", f"{offset} + {entries[str(name)].nbytes} bytes runs past "
                                   f"the file's {res_bytes} bytes")
    word = entries.get("word")
    want = (getattr(config, "vocab", None), getattr(config, "hidden", None))
    if word is not None and None not in want and word.shape != want:
        # rows are read by token id (runtime/executor.py): the table must be [vocab, hidden]
        raise tensors.err("word", f"shape {list(word.shape)}, but the config's vocabulary "
                                  f"and hidden size make {list(want)}")
    return StoreIndex(model=model, complete=complete, config=config, bitwidths=bitwidths,
                      variants=variants, files=shard_files, tokenizer=tok,
                      resident=ResidentEntry(res_file, res_sha, res_bytes, entries),
                      build=f.data.get("build", {}), data=f.data,
                      chat_template=f.string("chat_template", required=False,
                                             max_length=1 << 20))


class ShardStore:
    """A built store, opened read-only. Errors name the store file and what is wrong."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index_path = self.path / INDEX
        if not index_path.is_file():
            raise StoreError(f"{index_path}: no shard store here; build one with "
                             f"`elasticplan shard --out {self.path}`")
        self.index = _read_index(index_path)
        self.config, self.bitwidths = self.index.config, self.index.bitwidths
        self._variants = self.index.variants
        if not self.index.complete:
            raise StoreError(f"{index_path}: the store build did not finish; rerun "
                             f"`elasticplan shard --out {self.path}` to resume it")

    @property
    def model(self) -> str:
        return self.index.model

    def variant(self, layer: int, name: str, bits: int) -> Variant:
        try:
            return self._variants[layer, name, bits]
        except KeyError:
            raise StoreError(f"{self.path / INDEX}: no shard {name!r} of layer {layer} at "
                             f"{bits} bits in this store (bitwidths {list(self.bitwidths)})") \
                from None

    def table_variant(self, bits: int) -> Variant:
        """A decoder store's token-embedding table (its tied LM head) at `bits`: the variant
        (layer = config.layers, shard "table"), [vocab, hidden], one contiguous read."""
        v = self._variants.get((self.config.layers, TABLE, bits))
        if v is None:
            have = sorted(b for (l, n, b) in self._variants if n == TABLE)
            raise StoreError(
                f"{self.path / INDEX}: no embedding table at {bits} bits in this store ("
                + (f"stored: {have})" if have else
                   "it keeps none: an encoder's store, or a decoder's built before the table "
                   "was stored; rerun `elasticplan shard` to add it)"))
        return v

    def load_table(self, bits: int) -> torch.Tensor:
        """The token-embedding table at `bits`, read (checksum- and value-checked) and decoded
        to fp32 [vocab, hidden] by its scheme (32: the fp32 table, equal to resident.bin's)."""
        v = self.table_variant(bits)
        table = torch.empty(v.rows, v.cols)
        decode_into(v, self.read(v), Slot(table, torch.empty(v.cols, 0), torch.empty(0)))
        return table

    def file(self, name: str) -> Path:
        return self.path / name

    def open_file(self, name: str) -> int:
        """One of the store's files, opened read-only (a descriptor); StoreError naming it
        when it cannot be opened or is not a regular file (a FIFO must not block the open,
        a directory or device is not a shard file)."""
        path = self.file(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as e:
            raise StoreError(f"{path}: cannot open shard file ({e.strerror})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise StoreError(f"{path}: not a regular file (a directory, pipe or device): not "
                             f"a store `elasticplan shard` wrote, rebuild it")
        return fd

    def scheme_of(self, bits: int) -> str:
        """The name of the scheme the store's variants at `bits` are kept in (fp32: the
        default's, raw)."""
        v = next((v for k, v in self._variants.items() if k[2] == bits), None)
        return (v.scheme if v is not None else DEFAULT).name

    def decode_buffers(self) -> tuple[tuple[int, ...], int]:
        """The decode workspace (DecodeWork's sizes: the largest need of any stored quantised
        block) and the bounce buffer (bytes of the largest quantised variant), as
        elasticplan.problem.archgen.decode_buffers for the uniform scheme."""
        work, bounce = [0] * 5, 0
        for v in self._variants.values():
            if v.bits == FP32 or v.name == TABLE:  # (the table is decoded whole, not here)
                continue
            work = [max(a, b) for a, b in zip(work, v.scheme.decode_work(v.blocks(), v.bits))]
            bounce = max(bounce, v.nbytes)
        return tuple(work), bounce

    @property
    def resident_bytes(self) -> int:
        return self.index.resident.nbytes

    @property
    def word_table(self) -> TensorEntry:
        """The word-embedding table: fp32 rows in resident.bin (streamable by rows)."""
        return self.index.resident.tensors["word"]

    def resident(self, *, without_word: bool = False) -> dict[str, torch.Tensor]:
        """The resident tensors (checksum-checked); `without_word` leaves the word-embedding
        table in the file (the executor then reads one query's rows of it)."""
        entry = self.index.resident
        path = self.path / entry.file
        out, dests = {}, []  # dests: (offset, bytes) of the tensors loaded, by offset
        for name, t in entry.tensors.items():
            if not (without_word and name == "word"):
                out[name] = torch.empty(t.shape)
                dests.append((t.offset, memoryview(out[name].numpy()).cast("B")))
        dests.sort(key=lambda d: d[0])
        with regular_file(path, what="shard store file", limit=entry.nbytes,
                          error=StoreError) as fd:
            # One pass over the file in pieces of at most RESIDENT_PIECE bytes, each read
            # straight into the tensor it belongs to (bytes no loaded tensor holds, such as
            # a streamed word table, into a scratch piece), hashed and value-checked there
            # (the file is fp32 tensors back to back). So loading holds no second copy, and
            # no read holds more than a piece of page cache in flight: a memory cgroup
            # charges the cache, and MiniLM's 46.9 MB word table read at once held 30.4 MB
            # of it, not yet reclaimable, when a capped layer-wise run was killed. (The
            # pieces stay cached, reclaimable: dropping them made the next reads of the
            # file cold, which a throttled run's disk counters then counted.)
            digest, size, bad, k = hashlib.sha256(), 0, None, 0
            scratch = memoryview(bytearray(RESIDENT_PIECE))
            while True:
                while k < len(dests) and dests[k][0] + dests[k][1].nbytes <= size:
                    k += 1
                if k < len(dests) and dests[k][0] <= size:
                    at, mv = dests[k]
                    view = mv[size - at:size - at + RESIDENT_PIECE]
                else:
                    gap = dests[k][0] - size if k < len(dests) else RESIDENT_PIECE
                    view = scratch[:min(RESIDENT_PIECE, gap)]
                n = os.preadv(fd, [view], size)
                if n <= 0:
                    break
                digest.update(view[:n])
                if bad is None and (b := first_bad(np.frombuffer(view, "<f4", n // 4))):
                    bad = size + 4 * b[0], b[1]
                size += n
        if size != entry.nbytes or digest.hexdigest() != entry.sha256:
            raise StoreError(f"{path}: checksum mismatch (file corrupt or changed since the "
                             f"store was built); rebuild with `elasticplan shard`")
        if bad is not None:
            at, value = bad
            name = next((k for k, t in entry.tensors.items()
                         if t.offset <= at < t.offset + t.nbytes), "no tensor")
            raise StoreError(f"{path}: tensor {name!r} holds {value:g} (byte {at}): a NaN, an "
                             f"infinity or a weight beyond ±{MAX_WEIGHT:g}; not a store "
                             f"`elasticplan shard` wrote, rebuild it")
        return out

    def text_tokenizer(self):
        """The store's tokenizer as `tokenizers` loads it (checksum-checked): a decoder's,
        which neither truncates nor pads."""
        from tokenizers import Tokenizer as HFTokenizer

        entry = self.index.tokenizer
        path = self.path / entry.file
        data = _read_checked(path, entry.sha256)
        return HFTokenizer.from_str(data.decode())

    def decoder(self, bits: list[dict[str, int]] | None = None, context: int | None = None,
                table_bits: int | None = None):
        """A llama store's decoder with, per layer, these shards at these bitwidths (None:
        every shard in fp32), its KV cache `context` columns long (default: the model's),
        and the embedding table (the tied LM head) at `table_bits` (None: resident.bin's
        fp32 table; else the stored table variant, decoded)."""
        from runtime.families.llama import Decoder

        c = self.config
        bits = bits or [{n: FP32 for n in c.shard_names()} for _ in range(c.layers)]
        layers = [self.layer_weights(l, b) for l, b in enumerate(bits)]
        dec = Decoder(c, self.resident(), layers, context)
        if table_bits is not None:
            dec.set_table(self.load_table(table_bits))
        return dec

    def encoder(self, *, without_word: bool = False) -> Encoder:
        return Encoder(self.config, self.resident(without_word=without_word))

    def tokenizer(self, max_length: int) -> Tokenizer:
        """The store's tokenizer, after checking it against the checksum the index records."""
        entry = self.index.tokenizer
        path = self.path / entry.file
        _read_checked(path, entry.sha256)
        c = self.config
        tok = Tokenizer(path, min(max_length, c.usable_positions), c.pad_id)
        tok.check_ids(c.vocab, path, "the index's config.vocab")
        return tok

    def read(self, v: Variant) -> bytearray:
        """One variant's bytes (one pread), checksum-checked."""
        buf = bytearray(v.nbytes)
        self.check_into(v, memoryview(buf))
        return buf

    def check_into(self, v: Variant, view: memoryview, fd: int | None = None) -> None:
        """Read one variant into `view` (its size) and check its sha256: no allocation.
        `fd`: the variant's file, already open (else it is opened here)."""
        path = self.path / v.file
        if fd is None:
            own = self.open_file(v.file)
            try:
                return self.check_into(v, view, own)
            finally:
                os.close(own)
        n = os.preadv(fd, [view], v.offset)
        if n != v.nbytes or hashlib.sha256(view).hexdigest() != v.sha256:
            raise StoreError(f"{path}: {v.describe()} fails its checksum (offset {v.offset}, "
                             f"{v.nbytes} bytes)")
        why = check_values(v, view)
        if why:  # its checksum matches: the index was rewritten to match a tampered file
            raise StoreError(f"{path}: {v.describe()} "
                             f"({v.scheme.coder(v.bits).name if v.bits != FP32 else 'fp32'}"
                             f"): {why}; not a store `elasticplan shard` wrote, rebuild it")

    def load(self, layer: int, name: str, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One shard, decoded to fp32 (matrix [rows, cols], bias)."""
        v = self.variant(layer, name, bits)
        matrix, bias = torch.empty(v.rows, v.cols), torch.empty(v.bias)
        decode_into(v, self.read(v), Slot(matrix[:v.in_rows], matrix[v.in_rows:].t(), bias))
        return matrix, bias

    def layer_weights(self, layer: int, bits_by_name: dict[str, int]):
        """Layer `layer` with exactly these shards at these bitwidths, each decoded straight
        into its slot of the family's fused buffers."""
        w = family(self.config.family).layer_weights(self.config, list(bits_by_name))
        for name, bits in bits_by_name.items():
            v = self.variant(layer, name, bits)
            decode_into(v, self.read(v), w.slot(name))
        return w

    def files(self) -> list[Path]:
        """The store's own files, the index included (what an output must not overwrite)."""
        return [self.path / INDEX] + [self.path / e.file for e in self.index.entries()]

    def verify(self) -> list[str]:
        """Every file against its checksum; returns the problems found (empty if none)."""
        problems = []
        for entry in self.index.entries():
            path = self.path / entry.file
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif sha256_file(path) != entry.sha256:
                problems.append(f"{path}: checksum mismatch")
        return problems


# --- building ---------------------------------------------------------------------------

@dataclass
class BuildReport:
    path: Path
    written: list[str]
    kept: list[str]
    total_bytes: int


def check_out(out: Path) -> None:
    """InvalidArgument unless `out` may hold a store: absent, empty (but for a killed
    write's temporary files), or a store (its index.json is a shard store index: a build
    writes one before any other file). A directory of other files, or someone else's
    index.json, is never written into."""
    from elasticplan.errors import InvalidArgument

    if not out.is_dir():
        if out.exists() or out.is_symlink():
            raise InvalidArgument(f"{out}: not a directory (a file, or a link to none); "
                                  f"--out names the store's directory: choose a new or empty "
                                  f"one")
        return
    index = out / INDEX
    if index.exists() or index.is_symlink():
        try:
            ours = load_json(index, what="shard store index", limit=MAX_INDEX_BYTES,
                             error=StoreError).get("schema") == SCHEMA
        except (StoreError, AttributeError):
            ours = False
        if not ours:
            raise InvalidArgument(f"{index}: not a shard store index ({SCHEMA}); refusing to "
                                  f"build a store over it: choose a new or empty --out "
                                  f"directory")
        return
    other = sorted(p.name for p in out.iterdir() if not p.name.endswith(TEMP_SUFFIX))
    if other:
        raise InvalidArgument(f"{out}: not empty ({other[0]!r}{' and more' if other[1:] else ''})"
                              f" and not a shard store (no {INDEX}); refusing to write a store "
                              f"among other files: choose a new or empty --out directory")


def build_store(out: str | os.PathLike, checkpoint=None, *,
                bitwidths: tuple[int, ...] | None = None, scheme: Scheme = DEFAULT,
                force: bool = False, log: Callable[[str], None] = lambda s: None
                ) -> BuildReport:
    """Write (or resume, or confirm) the shard store of a checkpoint, checked in full before
    this runs (default: the packaged MiniLM): an encoder's Hugging Face directory
    (runtime.sources.checkpoint.Checkpoint) or a llama's GGUF file or directory
    (runtime.sources.llama_source.LlamaSource). Either gives its config, tensors, weights
    file, provenance, tokenizer bytes and, for a scheme that rounds with input
    covariances, its fp32 reference model; its family cuts the shards. Quantised shards
    are kept in `scheme` (default bitwidths: the scheme's)."""
    bitwidths = tuple(bitwidths or scheme.bitwidths)
    for b in bitwidths:
        scheme.check_bits(b)
    ckpt = checkpoint or packaged()
    if scheme.needs_hessians and not hasattr(ckpt, "reference"):  # before a byte is written
        raise StoreError(f"{ckpt.path}: the {scheme.name} scheme rounds with an fp32 "
                         f"reference model's activations, which only encoders offer here; "
                         f"build this store with the uniform scheme (the default) or the "
                         f"group scheme")
    out = Path(out)
    check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    for p in remove_debris(out):  # temporary files of a build that was killed mid-write
        log(f"removed {p.name}, left by an interrupted build")
    build = {"source_sha256": sha256_file(ckpt.weights_file),
             "bitwidths": list(bitwidths), "layout_version": LAYOUT_VERSION,
             "quantisation": uniform.SCHEME, "clip_grid": len(uniform.CLIP_GRID)}
    # (the default scheme's store keeps its build key and index as they were)
    calibration = scheme.calibration_texts()
    if scheme.index_key:
        build[scheme.index_key] = scheme.build_key(calibration)
    old = {}
    index_path = out / INDEX
    if index_path.is_file() and not force:
        try:
            prev = _read_index(index_path).data
            if prev.get("build") == build:
                old = prev
        except StoreError:
            pass  # an unreadable or malformed index is rebuilt from scratch
    config = ckpt.config
    index = {"schema": SCHEMA, "model": config.name, "complete": False, "build": build,
             "source": ckpt.source, "config": config.to_dict(), "bitwidths": list(bitwidths),
             "quantisation": {"scheme": uniform.SCHEME, "variant_layout": VARIANT_LAYOUT},
             "files": {}}
    if getattr(ckpt, "chat_template", None):  # (a decoder's; an encoder's index is as it was)
        index["chat_template"] = ckpt.chat_template
    if scheme.index_key:
        index["quantisation"][scheme.index_key] = scheme.index_entry(calibration)
    if not index_path.is_file():  # before any other file: the directory is a store's now
        _write_durable(index_path, [json.dumps(index, indent=1, allow_nan=False).encode()])
    written, kept = [], []

    def keep_ok(fname: str, entry: dict | None) -> bool:
        return bool(entry) and (out / fname).is_file() and \
            sha256_file(out / fname) == entry["sha256"]

    def keep(fname: str, entry: dict | None) -> bool:
        if keep_ok(fname, entry):
            kept.append(fname)
            return True
        return False

    def save_index() -> None:
        _write_durable(index_path, [json.dumps(index, indent=1, allow_nan=False).encode()])

    tensors = ckpt.tensors
    # tokenizer
    tok_bytes = ckpt.tokenizer_bytes()
    index["tokenizer"] = {"file": "tokenizer.json", "sha256": hashlib.sha256(tok_bytes).hexdigest()}
    if not keep("tokenizer.json", index["tokenizer"]):
        _write_durable(out / "tokenizer.json", [tok_bytes])
        written.append("tokenizer.json")
    # resident tensors
    res_entry, chunks, offset = {"file": "resident.bin", "tensors": {}}, [], 0
    kind = family(config.family)
    for name, hf in kind.resident_names(config).items():
        raw = np.ascontiguousarray(tensors[hf], dtype="<f4").tobytes()
        res_entry["tensors"][name] = {"shape": list(tensors[hf].shape), "offset": offset}
        chunks.append(raw)
        offset += len(raw)
    res_entry["bytes"] = offset
    res_entry["sha256"] = hashlib.sha256(b"".join(chunks)).hexdigest()
    index["resident"] = res_entry
    if not keep("resident.bin", res_entry):  # the file must be what the index now says
        _write_durable(out / "resident.bin", chunks)
        written.append("resident.bin")
    save_index()
    # shard files (and a decoder's embedding table, the pseudo-layer config.layers)
    tables = kind.decoder
    total = len(bitwidths) * (config.layers + tables)
    hessians = None
    if scheme.needs_hessians and any(
            not keep_ok(f"layer{l}.b{b}.bin", old.get("files", {}).get(f"layer{l}.b{b}.bin"))
            for l in range(config.layers) for b in bitwidths if scheme.coder(b) == scheme):
        log(f"the fp32 model on {len(calibration)} calibration texts (for the rounding)...")
        hessians = gptq.hessians(ckpt.reference(), calibration)
    for l in range(config.layers + tables):
        if l < config.layers:
            shards = {n: kind.cut_shard(tensors, config, l, n) for n in config.shard_names()}
        else:  # the table as one variant, the whole matrix its input block
            embed = kind.resident_names(config)["embed"]
            shards = {TABLE: (tensors[embed], np.zeros(0, np.float32))}
        for bits in bitwidths:
            fname = f"layer{l}.b{bits}.bin" if l < config.layers else f"{TABLE}.b{bits}.bin"
            prev = old.get("files", {}).get(fname)
            if keep(fname, prev):
                index["files"][fname] = prev
            else:
                entry = {"layer": l, "bits": bits, "shards": {}}
                coder = scheme.coder(bits)
                if coder != DEFAULT:
                    entry["scheme"] = coder.name
                chunks, offset = [], 0
                for name, (matrix, bias) in shards.items():
                    in_rows = len(matrix) if name == TABLE else config.shard_in_rows(name)
                    raw = encode_variant(
                        coder, matrix, in_rows, bias, bits,
                        gptq.shard_hessians(hessians, l, name) if hessians and
                        coder.needs_hessians and bits != FP32 else None)
                    assert len(raw) == variant_bytes(coder, *matrix.shape, in_rows, len(bias),
                                                      bits)
                    entry["shards"][name] = {"offset": offset, "bytes": len(raw),
                                             "rows": matrix.shape[0], "cols": matrix.shape[1],
                                             "in_rows": in_rows, "bias": len(bias),
                                             "sha256": hashlib.sha256(raw).hexdigest()}
                    chunks.append(raw)
                    offset += len(raw)
                entry["bytes"] = offset
                entry["sha256"] = hashlib.sha256(b"".join(chunks)).hexdigest()
                _write_durable(out / fname, chunks)
                index["files"][fname] = entry
                written.append(fname)
                save_index()
            log(f"[{len(index['files'])}/{total}] {fname}")
    index["complete"] = True
    save_index()
    size = sum(e["bytes"] for e in index["files"].values()) + res_entry["bytes"]
    return BuildReport(out, written, kept, size)

