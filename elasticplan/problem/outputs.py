"""The one output helper: every file elasticplan writes goes through here.

A write goes to a temporary file in the target's own directory (`.NAME.XXXX.tmp`), is
flushed and fsync'ed, and is renamed over the target, and the directory is fsync'ed: a
reader sees the old file or the new one, never a part. On any failure the temporary file
is removed, the old file is left as it was, and an OutputError names the path and the
reason. A write onto one of the command's own inputs (the same file, through any path or
link, or a file inside an input directory) is refused before anything is written.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from elasticplan.errors import InvalidArgument, OutputError

TEMP_SUFFIX = ".tmp"


def _same_or_inside(path: Path, source: Path) -> bool:
    try:
        real, src = path.resolve(), source.resolve()
    except (OSError, RuntimeError):  # a link loop: compare as given
        real, src = path.absolute(), source.absolute()
    if real == src:
        return True
    if src.is_dir() and src in real.parents:
        return True
    try:
        return path.exists() and source.exists() and os.path.samefile(path, source)
    except OSError:
        return False


def refuse_inputs(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> None:
    """InvalidArgument if writing `path` would overwrite one of `inputs`."""
    for src in inputs:
        if src is not None and _same_or_inside(Path(path), Path(src)):
            raise InvalidArgument(f"{path}: refusing to write an output onto this command's "
                                  f"input {src}; choose another output path")


def write_bytes(path: str | os.PathLike, data: bytes | Iterable[bytes], *,
                inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """Atomically replace `path` with `data` (bytes, or chunks of bytes)."""
    target = Path(path)
    refuse_inputs(target, inputs)
    if target.is_symlink():  # write the file the link names; the link stays
        try:
            target = target.resolve(strict=False)
        except (OSError, RuntimeError) as e:
            raise OutputError(f"{path}: cannot write: {e}") from None
    directory = target.parent
    if target.exists() and not target.is_file():
        # a rename would replace the device (/dev/null), the pipe or the directory itself
        raise OutputError(f"{path}: cannot write: not a regular file (a device, pipe or "
                          f"directory); name a plain file")
    if not directory.is_dir():
        raise OutputError(f"{target}: cannot write: directory {directory} does not exist")
    chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=TEMP_SUFFIX)
    except OSError as e:
        raise OutputError(f"{target}: cannot write: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            for c in chunks:
                fh.write(c)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OutputError(f"{target}: cannot write: {e.strerror or e}; the previous file, "
                              f"if any, is unchanged") from None
        raise
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # some file systems cannot fsync a directory; the rename stands
        pass


def write_text(path: str | os.PathLike, text: str, *,
               inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    write_bytes(path, text.encode("utf-8"), inputs=inputs)


def write_csv(path: str | os.PathLike, rows: Iterable[dict], fields: list[str], *,
              inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """Rows as CSV with a header of `fields` (missing values empty, other keys left out)."""
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=fields, restval="", extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_text(path, text.getvalue(), inputs=inputs)


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 120,
                inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """A matplotlib figure, in the format its file name says, written atomically."""
    buf = io.BytesIO()
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    try:
        fig.savefig(buf, format=fmt, dpi=dpi)
    except ValueError as e:  # an unknown format
        raise InvalidArgument(f"{path}: cannot draw a figure as {fmt!r}: {e}") from None
    write_bytes(path, buf.getvalue(), inputs=inputs)


def remove_debris(directory: str | os.PathLike) -> list[Path]:
    """Remove temporary files that a killed write left in `directory`; return them."""
    d = Path(directory)
    gone = []
    if d.is_dir():
        for p in d.glob(f".*{TEMP_SUFFIX}"):
            if p.is_file():
                p.unlink(missing_ok=True)
                gone.append(p)
    return gone
