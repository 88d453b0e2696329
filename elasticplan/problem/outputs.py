"""The one output helper: every file elasticplan writes goes through here.

A write goes to a temporary file in the target's own directory (`.NAME.XXXX.tmp`), is
flushed and fsync'ed, and is renamed over the target, and the directory is fsync'ed: a
reader sees the old file or the new one, never a part. On any failure the temporary file
is removed, the old file is left as it was, and an OutputError names the path and the
reason. A write onto one of the command's own inputs (the same file, through any path or
link, or a file inside an input directory) is refused before anything is written. A link
at the target is written through (the file it names is replaced, the link stays), unless
the caller owns the name (`follow_links=False`: a fleet's own files), when the link itself
is replaced.
"""

from __future__ import annotations

import csv
import io
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from elasticplan.errors import InvalidArgument, OutputError

TEMP_SUFFIX = ".tmp"


class Inputs:
    """A command's inputs, each resolved and identified once: a command that writes many
    files (a fleet writes two per solve) checks each write against them with one
    `resolve` and one `stat` of the target, not one of each per input. What a source is
    (its real path, whether a directory, its device and inode) is read when this is made."""

    __slots__ = ("sources",)

    def __init__(self, inputs: Iterable[str | os.PathLike | None]):
        sources = []
        for src in inputs:
            if src is None:
                continue
            source = Path(src)
            try:
                real = source.resolve()
            except (OSError, RuntimeError):  # a link loop: compared as given
                real = None
            try:
                st = os.stat(source)
                ident = (st.st_dev, st.st_ino)
            except (OSError, ValueError):
                ident = None
            try:
                is_dir = source.is_dir()
            except (OSError, ValueError):
                is_dir = False
            sources.append((src, source.absolute(), real, is_dir, ident))
        self.sources = tuple(sources)

    @staticmethod
    def of(inputs: "Inputs | Iterable[str | os.PathLike | None]") -> "Inputs":
        return inputs if isinstance(inputs, Inputs) else Inputs(inputs)

    def holding(self, path: str | os.PathLike, follow_links: bool = True):
        """The input that writing `path` would overwrite (the same file, through any path
        or link, or a file inside an input directory), or None. The inputs are taken as
        they were when this was made (relative ones from the directory then current)."""
        if not self.sources:
            return None
        path = Path(path)
        try:
            # not following: the name itself, in its real directory (a link there is replaced)
            real = path.resolve() if follow_links else path.parent.resolve() / path.name
        except (OSError, RuntimeError):  # a link loop: compare as given
            real = None
        ident = None
        if follow_links or not path.is_symlink():
            try:
                st = os.stat(path)
                ident = (st.st_dev, st.st_ino)
            except (OSError, ValueError):
                pass
        absolute = path.absolute()
        for src, src_absolute, src_real, src_is_dir, src_ident in self.sources:
            mine, theirs = (absolute, src_absolute) if real is None or src_real is None else \
                (real, src_real)
            if mine == theirs or (src_is_dir and theirs in mine.parents):
                return src
            if ident is not None and ident == src_ident and _still(src, src_ident):
                return src
        return None


def _still(src, ident: tuple[int, int]) -> bool:
    """Whether input `src` is still the file `ident` names (a deleted input's inode can be
    handed to the next file created: that file is not the input)."""
    try:
        st = os.stat(src)
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == ident


def refuse_inputs(path: str | os.PathLike, inputs: "Inputs | Iterable[str | os.PathLike | None]",
                  *, follow_links: bool = True) -> None:
    """InvalidArgument if writing `path` would overwrite one of `inputs` (paths, or an
    `Inputs` made once for many writes)."""
    src = Inputs.of(inputs).holding(Path(path), follow_links)
    if src is not None:
        raise InvalidArgument(f"{path}: refusing to write an output onto this command's "
                              f"input {src}; choose another output path")


def writable(path: str | os.PathLike, *, follow_links: bool = True) -> Path:
    """The file a write of `path` replaces (a link's target, unless `follow_links` is
    False); OutputError when it cannot be: an existing directory, device or pipe, or a
    directory that does not exist. Commands call it before their work, write_bytes again."""
    target = Path(path)
    link = target.is_symlink()
    if link and follow_links:  # write the file the link names; the link stays
        try:
            target = target.resolve(strict=False)
        except (OSError, RuntimeError) as e:
            raise OutputError(f"{path}: cannot write: {e}") from None
    if not (link and not follow_links) and target.exists() and not target.is_file():
        # a rename would replace the device (/dev/null), the pipe or the directory itself
        raise OutputError(f"{path}: cannot write: not a regular file (a device, pipe or "
                          f"directory); name a plain file")
    if not target.parent.is_dir():
        raise OutputError(f"{target}: cannot write: directory {target.parent} does not exist")
    return target


def write_bytes(path: str | os.PathLike, data: bytes | Iterable[bytes], *,
                inputs: "Inputs | Iterable[str | os.PathLike | None]" = (), follow_links: bool = True) -> None:
    """Atomically replace `path` with `data` (bytes, or chunks of bytes). A link at `path`
    is written through, or with `follow_links=False` replaced by the file."""
    refuse_inputs(path, inputs, follow_links=follow_links)
    target = writable(path, follow_links=follow_links)
    directory = target.parent
    chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:  # the replaced file's permissions, else a new file's (0666 less the umask)
        mode = stat.S_IMODE(target.stat().st_mode) if target.is_file() else 0o666 & ~_umask()
    except OSError:
        mode = 0o666 & ~_umask()
    try:  # the name shortened so that the temporary one stays within NAME_MAX (255 bytes)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{_short(target.name)}.",
                                   suffix=TEMP_SUFFIX)
    except OSError as e:
        raise OutputError(f"{target}: cannot write: {e.strerror or e}") from None
    try:
        os.fchmod(fd, mode)  # mkstemp makes it 0600
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


def _umask() -> int:
    """The process's umask, read without changing it (Linux: /proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def _short(name: str, most: int = 200) -> str:
    """`name` cut to at most `most` bytes of UTF-8 (whole characters)."""
    return name.encode("utf-8", "surrogateescape")[:most].decode("utf-8", "ignore")


def write_text(path: str | os.PathLike, text: str, *,
               inputs: "Inputs | Iterable[str | os.PathLike | None]" = (), follow_links: bool = True) -> None:
    write_bytes(path, text.encode("utf-8"), inputs=inputs, follow_links=follow_links)


def write_csv(path: str | os.PathLike, rows: Iterable[dict], fields: list[str], *,
              inputs: "Inputs | Iterable[str | os.PathLike | None]" = (), follow_links: bool = True) -> None:
    """Rows as CSV with a header of `fields` (missing values empty, other keys left out)."""
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=fields, restval="", extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_text(path, text.getvalue(), inputs=inputs, follow_links=follow_links)


def figure_format(path: str | os.PathLike) -> str:
    """The format a figure's file name asks for (png without a suffix); InvalidArgument
    naming the formats matplotlib draws when it is none of them."""
    from matplotlib.backend_bases import FigureCanvasBase

    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    known = FigureCanvasBase.get_supported_filetypes()
    if fmt not in known:
        raise InvalidArgument(f"{path}: cannot draw a figure as {fmt!r}; name a file ending in "
                              f"one of {', '.join('.' + k for k in sorted(known))}")
    return fmt


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 120,
                inputs: "Inputs | Iterable[str | os.PathLike | None]" = (), follow_links: bool = True) -> None:
    """A matplotlib figure, in the format its file name says, written atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format=figure_format(path), dpi=dpi)
    write_bytes(path, buf.getvalue(), inputs=inputs, follow_links=follow_links)


def remove_debris(directory: str | os.PathLike,
                  keep: "Inputs | Iterable[str | os.PathLike | None]" = ()) -> list[Path]:
    """Remove temporary files that a killed write left in `directory` (never one of `keep`,
    a command's inputs); return them."""
    d = Path(directory)
    keep = Inputs.of(keep)
    gone = []
    if d.is_dir():
        for p in d.glob(f".*{TEMP_SUFFIX}"):
            if p.is_file() and not p.is_symlink() and keep.holding(p, follow_links=False) is None:
                p.unlink(missing_ok=True)
                gone.append(p)
    return gone
