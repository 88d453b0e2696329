"""`elasticplan encode PLAN --input FILE --output FILE`: a user's texts through a plan, within
its memory (runtime/session.py), embeddings out.

Input, read as a stream (never held whole): text (one text per line), CSV (a header row;
`--text-column`, default `text`) or JSON Lines (one object per line; `--field`, default
`text`), chosen by `--text-column`/`--field` or else by the suffix (.csv; .jsonl or
.ndjson; anything else is text). It is read twice: first to check every line and count the
texts (so a bad line is refused before any compute, and the output's size is known), then
to encode them. Output: `.npy` (float32, [texts, hidden]) or `.parquet` (a row per text:
`embedding`, and with a task head `label` and `probabilities`, the classes named in the
file's metadata), written in chunks of CHUNK texts to a temporary file beside the target
and renamed over it at the end (elasticplan/problem/outputs.py), so that a failed or
interrupted run leaves nothing half-written. docs/session.md has the details.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from elasticplan.cli import MAX_THREADS, out_file, whole
from elasticplan.errors import InvalidArgument, SpecError
from elasticplan.problem.inputs import fail, not_unicode, regular_file, typename
from elasticplan.problem.outputs import refuse_inputs, writable, write_bytes
from runtime.defaults import DEFAULT_HEAD, DEFAULT_STORE

CHUNK = 64  # texts per output chunk (64 x 384 float32: 98 KB, ~1 % of a 10 MB plan)
MAX_LINE_BYTES = 1 << 20  # one line (one text, one CSV row, one JSON object)
MAX_INPUT_BYTES = 1 << 40  # the input is streamed: a bound for the file check only
SNIFF_BYTES = 8192  # a NUL byte in these: a binary file
OUTPUTS = (".npy", ".parquet")
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}  # else text


def register(sub) -> None:
    """Add `encode` to the `elasticplan` sub-command parsers (from runtime/commands.py)."""
    e = sub.add_parser("encode", help="a plan encoding your texts within its memory: "
                                      "embeddings (and a task head's labels) to .npy or Parquet")
    e.set_defaults(handler=cmd_encode)
    e.add_argument("plan")
    e.add_argument("--input", required=True, metavar="FILE",
                   help="texts: one per line, or CSV (.csv, --text-column), or JSON Lines "
                        "(.jsonl/.ndjson, --field)")
    e.add_argument("--output", required=True, metavar="FILE", type=out_file,
                   help="embeddings: .npy (float32, one row per text) or .parquet (with the "
                        "task head's labels and probabilities)")
    e.add_argument("--text-column", metavar="C",
                   help="the input is CSV; its texts are in column C (default for .csv: text)")
    e.add_argument("--field", metavar="F",
                   help="the input is JSON Lines; its texts are in field F (default for "
                        ".jsonl: text)")
    e.add_argument("--limit", type=whole(1, 10**12), metavar="N",
                   help="encode the first N texts only")
    e.add_argument("--scenario", help="scenario file (default: the path the plan records)")
    e.add_argument("--store", help=f"default: the store the model profile names, else "
                                    f"{DEFAULT_STORE}")
    e.add_argument("--head", help=f"task head (default: the profile's, else {DEFAULT_HEAD} "
                                   f"for MiniLM)")
    e.add_argument("--no-head", action="store_true", help="embeddings only, no task head")
    e.add_argument("--no-emulate", action="store_true",
                   help="read at this machine's real disk speed instead of the device's")
    e.add_argument("--threads", type=whole(1, MAX_THREADS), default=1,
                   help="torch threads (default 1, as calibrated)")


# --- input ------------------------------------------------------------------------------

def input_kind(path: str, text_column: str | None, field: str | None) -> tuple[str, str | None]:
    """("text", None), ("csv", column) or ("jsonl", field): from the flags, else the suffix."""
    if text_column is not None and field is not None:
        raise InvalidArgument("--text-column (CSV) and --field (JSON Lines): give one")
    if text_column is not None:
        return "csv", text_column
    if field is not None:
        return "jsonl", field
    kind = FORMATS.get(Path(path).suffix.lower(), "text")
    return kind, None if kind == "text" else "text"


def _lines(fh, file: str) -> Iterator[tuple[int, str]]:
    """(line number, decoded line with its end) of a binary file; SpecError naming the
    line for a NUL byte (a binary file), invalid UTF-8 or a line too long."""
    n = 0
    while True:
        raw = fh.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        n += 1
        if len(raw) > MAX_LINE_BYTES:
            raise fail(SpecError, file, f"line {n}", f"longer than {MAX_LINE_BYTES:,} bytes, "
                                                     f"the most one line may hold")
        if b"\0" in raw:
            raise fail(SpecError, file, f"line {n}", "holds a NUL byte: a binary file, not text")
        try:
            yield n, raw.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise fail(SpecError, file, f"line {n}",
                       f"not UTF-8 (byte {e.start + 1} of the line is 0x{raw[e.start]:02x})") \
                from None


def _text_lines(lines, file: str, _key) -> Iterator[str]:
    for n, line in lines:
        text = line.rstrip("\r\n")
        if not text.strip():
            raise fail(SpecError, file, f"line {n}", "empty text (every line is one text)")
        yield text


def _csv_rows(lines, file: str, column: str) -> Iterator[str]:
    # strict: a quoted field never closed is an error, not the rest of the file as one text
    reader = csv.reader((line for _, line in lines), strict=True)
    start = 1  # the line the row being read starts on
    try:
        header = next(reader, None)
        if header is None:
            return
        if column not in header:
            raise fail(SpecError, file, "line 1", f"no column {column!r} (columns: "
                                                  f"{', '.join(map(repr, header)) or 'none'})")
        if header.count(column) > 1:
            raise fail(SpecError, file, "line 1", f"column {column!r} is named twice")
        ci = header.index(column)
        start = reader.line_num + 1
        for row in reader:
            if row:  # else a blank line
                text = row[ci] if ci < len(row) else ""
                if not text.strip():
                    raise fail(SpecError, file, f"line {reader.line_num}",
                               f"empty text (column {column!r})")
                yield text
            start = reader.line_num + 1
    except csv.Error as e:
        if "unexpected end of data" in str(e):
            raise fail(SpecError, file, f"line {start}", "a quoted field that starts in this "
                                                         "row is never closed (a stray \")") \
                from None
        raise fail(SpecError, file, f"line {reader.line_num}", f"not readable CSV ({e})") \
            from None


def _json_lines(lines, file: str, field: str) -> Iterator[str]:
    for n, line in lines:
        if not line.strip():  # a blank line
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise fail(SpecError, file, f"line {n}", f"not JSON ({getattr(e, 'msg', e)})") \
                from None
        if not isinstance(obj, dict):
            raise fail(SpecError, file, f"line {n}", f"a JSON {typename(obj)}, expected an "
                                                     f"object with a field {field!r}")
        if field not in obj:
            raise fail(SpecError, file, f"line {n}", f"no field {field!r} (fields: "
                                                     f"{', '.join(map(repr, obj)) or 'none'})")
        text = obj[field]
        if not isinstance(text, str):
            raise fail(SpecError, file, f"line {n}", f"field {field!r} is a {typename(text)}, "
                                                     f"expected a string")
        if not text.strip():
            raise fail(SpecError, file, f"line {n}", f"empty text (field {field!r})")
        why = not_unicode(text)
        if why:
            raise fail(SpecError, file, f"line {n}", f"field {field!r} {why}")
        yield text


READERS = {"text": _text_lines, "csv": _csv_rows, "jsonl": _json_lines}


def read_texts(path: str | os.PathLike, kind: str, key: str | None,
               limit: int | None = None) -> Iterator[str]:
    """The input's texts, streamed (at most `limit`); SpecError (exit 2) naming the file and
    line for an empty or binary file, invalid UTF-8, a missing column or field, an empty
    text, or no texts at all."""
    file = str(path)
    count = 0
    with regular_file(path, what=f"{kind} input", limit=MAX_INPUT_BYTES, error=SpecError) as fd, \
            open(fd, "rb", closefd=False) as fh:
        start = fh.read(SNIFF_BYTES)
        if not start:
            raise fail(SpecError, file, "", "an empty file: no texts to encode")
        if b"\0" in start:
            raise fail(SpecError, file, "", "a binary file (a NUL byte in its first "
                                            f"{SNIFF_BYTES:,} bytes), not text")
        fh.seek(0)
        for text in READERS[kind](_lines(fh, file), file, key):
            if limit is not None and count >= limit:
                return
            count += 1
            yield text
    if count == 0:
        raise fail(SpecError, file, "", "no texts to encode"
                   + (" (a header only)" if kind == "csv" else " (blank lines only)"))


# --- output -----------------------------------------------------------------------------

def _chunks(texts: Iterator[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    for t in texts:
        chunk.append(t)
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def npy_bytes(encode: Callable[[list[str]], np.ndarray], chunks: Iterator[list[str]],
              count: int, hidden: int, done: Callable[[int], None]) -> Iterator[bytes]:
    """A .npy file of `count` float32 rows of `hidden` values, in pieces: its header, then
    each chunk's rows (`encode(chunk)`, written from where they lie)."""
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        head, {"descr": "<f4", "fortran_order": False, "shape": (count, hidden)})
    yield head.getvalue()
    for chunk in chunks:
        rows = np.ascontiguousarray(encode(chunk), "<f4")
        yield memoryview(rows).cast("B")
        done(len(chunk))


class _Sink:
    """Where pyarrow's Parquet writer writes: its pieces, kept until taken (`take`)."""

    closed = False

    def __init__(self):
        self.parts: list[bytes] = []
        self.pos = 0

    def write(self, data) -> int:
        b = bytes(data)
        self.parts.append(b)
        self.pos += len(b)
        return len(b)

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def take(self) -> list[bytes]:
        out, self.parts = self.parts, []
        return out


Rows = tuple[np.ndarray, list[str] | None, np.ndarray | None]  # embeddings, labels, probabilities


def parquet_bytes(rows: Callable[[list[str]], Rows], chunks: Iterator[list[str]], hidden: int,
                  classes: tuple[str, ...] | None, meta: dict, done: Callable[[int], None]
                  ) -> Iterator[bytes]:
    """A Parquet file in pieces, one row group per chunk (`rows(chunk)`): `embedding`
    (float32, `hidden` values), and with a task head's `classes` `label` and
    `probabilities` (float32, in the order of `classes`, which the metadata names)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = [pa.field("embedding", pa.list_(pa.float32(), hidden))]
    if classes is not None:
        fields += [pa.field("label", pa.string()),
                   pa.field("probabilities", pa.list_(pa.float32(), len(classes)))]
        meta = {**meta, "classes": list(classes)}
    schema = pa.schema(fields, metadata={"elasticplan": json.dumps(meta)})
    sink = _Sink()
    # no dictionary, statistics or compression for the floats: with them the writer held
    # 2.6 MB more while writing 4 row groups of 64 texts (0.4 MB without; measured)
    writer = pq.ParquetWriter(sink, schema, use_dictionary=["label"], compression="none",
                              write_statistics=["label"])
    try:
        for chunk in chunks:
            emb, labels, probs = rows(chunk)
            cols = [_fixed(pa, emb)]
            if classes is not None:
                cols += [pa.array(labels, pa.string()), _fixed(pa, probs)]
            writer.write_table(pa.Table.from_arrays(cols, schema=schema))
            done(len(chunk))
            yield from sink.take()
    finally:
        writer.close()
    yield from sink.take()


def _fixed(pa, rows: np.ndarray):
    """A [n, k] float32 array as a fixed-size-list column."""
    return pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1), pa.float32()),
                                             rows.shape[1])


def writer_for(suffix: str, session, count: int, chunks: Iterator[list[str]], meta: dict,
               done: Callable[[int], None]) -> Iterator[bytes]:
    """The output's pieces: .npy of the session's embeddings, or Parquet with its task
    head's labels and probabilities when it has one."""
    hidden, head = session.store.config.hidden, session.head
    if suffix == ".npy":
        return npy_bytes(session.encode, chunks, count, hidden, done)
    if head is None:
        return parquet_bytes(lambda c: (session.encode(c), None, None), chunks, hidden, None,
                             meta, done)

    def classified(chunk: list[str]) -> Rows:
        c = session.classify(chunk)
        return c.embeddings, c.labels, c.probabilities
    return parquet_bytes(classified, chunks, hidden, head.labels, meta, done)


def warm_writer(suffix: str, hidden: int, classes: tuple[str, ...] | None) -> None:
    """Write a throwaway output of zeros in memory: the writer's code and libraries are
    loaded before the session takes its memory baseline (pyarrow's code alone is ~5 MB of
    a process's resident pages), so that the process peak it reports is the plan's and the
    streaming's, not a first call's."""
    chunks = iter([["warm"] * CHUNK] * 2)  # full chunks: the sizes the real ones allocate
    zeros = np.zeros((CHUNK, hidden), np.float32)
    if suffix == ".npy":
        pieces = npy_bytes(lambda c: zeros, chunks, 2 * CHUNK, hidden, lambda n: None)
    else:
        k = len(classes) if classes else 0
        pieces = parquet_bytes(lambda c: (zeros, [classes[0]] * CHUNK if classes else None,
                                          np.zeros((CHUNK, k), np.float32)),
                               chunks, hidden, classes, {}, lambda n: None)
    for _ in pieces:
        pass


# --- the command ------------------------------------------------------------------------

def cmd_encode(a) -> int:
    from tqdm import tqdm

    from runtime.session import Session, check_plan

    out = Path(a.output)
    refuse_inputs(out, (a.input, a.plan))  # before anything is read
    suffix = out.suffix.lower()
    if suffix not in OUTPUTS:
        raise InvalidArgument(f"--output {a.output}: write .npy or .parquet, not "
                              f"{suffix or 'a name without a suffix'!r}")
    if a.head and a.no_head:
        raise InvalidArgument("--head and --no-head: give one")
    kind, key = input_kind(a.input, a.text_column, a.field)
    checked = check_plan(a.plan, scenario=a.scenario, store=a.store,
                         head=False if a.no_head else (a.head or True))
    inputs = (a.input, *checked.inputs)
    refuse_inputs(out, inputs)
    writable(out)  # a directory or a missing one: said before any compute
    count = sum(1 for _ in read_texts(a.input, kind, key, a.limit))  # every line checked
    hidden, head = checked.store.config.hidden, checked.head
    warm_writer(suffix, hidden, head.labels if head is not None else None)
    meta = {"plan": a.plan, "model": checked.store.model,
            "seq_len": checked.scenario.model.seq_len}
    with tqdm(total=count, unit=" texts", desc="encode", file=sys.stderr, disable=None,
              dynamic_ncols=True, mininterval=0.5) as bar, \
            Session(checked, emulate=not a.no_emulate, threads=a.threads) as session:
        seen = [0]

        def done(n: int) -> None:
            seen[0] += n
            bar.update(n)

        chunks = _chunks(read_texts(a.input, kind, key, count))
        t0 = time.perf_counter()
        pieces = writer_for(suffix, session, count, chunks, meta, done)
        write_bytes(out, _checked_count(pieces, seen, count, a.input), inputs=inputs)
        seconds = time.perf_counter() - t0
        stats = session.stats()
    what = "embeddings" if suffix == ".npy" or head is None else \
        f"embeddings, labels and probabilities ({', '.join(head.labels)})"
    print(f"wrote {out}: {count} texts x {hidden} float32 {what}; {stats.truncated} "
          f"truncated to {stats.seq_len} tokens")
    print(f"throughput: {count / seconds:.2f} texts/s ({count} texts in {seconds:.1f} s, one "
          f"query at a time, {a.threads} thread{'s' if a.threads > 1 else ''})")
    print(stats.format())
    return 0


def _checked_count(pieces: Iterator[bytes], seen: list[int], count: int, file: str
                   ) -> Iterator[bytes]:
    """The pieces, then a SpecError if the input held fewer texts than its first read."""
    yield from pieces
    if seen[0] != count:
        raise fail(SpecError, file, "", f"changed while it was read: {count} texts at first, "
                                        f"{seen[0]} now; nothing written")
