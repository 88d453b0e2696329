"""The one input layer: every file elasticplan reads goes through here.

- `read_bytes`: only a regular file (not a device such as /dev/zero, a pipe or a
  directory), and at most a documented number of bytes, checked before reading.
- `load_yaml`: bounded size; duplicate keys rejected; at most MAX_DEPTH levels and
  MAX_NODES nodes *after* aliases are expanded, so that a small alias bomb is refused
  before anything walks it; safe loading only.
- `load_json`: bounded size and depth; NaN, Infinity, overflowing floats, integers of
  more than MAX_INT_DIGITS digits and an object with a key twice are refused.
- `Fields`: typed, range-checked access to one mapping, with the key path in every error;
  `done()` rejects keys nobody asked for.

Every error is raised as the caller's error class (SpecError for problem files,
PlanFormatError for plans and tables, StoreError for a shard store), one line naming the
file, the key path and the rule. The limits are documented in docs/formats.md.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import re
import stat
from typing import Any, Iterator

import yaml

from elasticplan.errors import ElasticplanError, SpecError

MB = 10**6
MAX_YAML_BYTES = 16 * MB  # 12x the largest shipped profile (Llama-2-70B, 1.3 MB); ~1 s per MB to parse
MAX_JSON_BYTES = 256 * MB  # plan tables hold one full plan per distinct plan
MAX_DEPTH = 64  # nesting of mappings and lists; the formats need 6
MAX_NODES = 5_000_000  # YAML nodes after alias expansion (Llama-2-70B: ~0.4 M)
MAX_INT_DIGITS = 30  # any count or byte size fits in far fewer digits

try:  # the C parser is ~10x faster on the large profiles; same semantics
    _BaseLoader = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - depends on how PyYAML was built
    _BaseLoader = yaml.SafeLoader


def fail(error: type[ElasticplanError], file: str | None, key_path: str,
         message: str) -> ElasticplanError:
    """An error of class `error` naming the file and key path."""
    if issubclass(error, SpecError):
        return error(file, key_path, message)
    where = (file or "<inline>") + (f": {key_path}" if key_path else "")
    return error(f"{where}: {message}")


@contextlib.contextmanager
def regular_file(path: str | os.PathLike, *, what: str, limit: int,
                 error: type[ElasticplanError] = SpecError) -> Iterator[int]:
    """An open descriptor of a regular file of at most `limit` bytes (a device, pipe,
    socket or directory is refused before a byte is read); closed on exit. Read errors
    inside the block become `error` naming the file."""
    file = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the open
    except FileNotFoundError:
        raise fail(error, file, "", "file not found") from None
    except IsADirectoryError:
        raise fail(error, file, "", f"is a directory, expected a {what}") from None
    except (OSError, ValueError) as e:
        raise fail(error, file, "", f"cannot open: {getattr(e, 'strerror', None) or e}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise fail(error, file, "", f"is a directory, expected a {what}")
        if not stat.S_ISREG(st.st_mode):
            raise fail(error, file, "", f"is not a regular file (a device, pipe or socket); "
                                        f"expected a {what}")
        if st.st_size > limit:
            raise fail(error, file, "", f"is {st.st_size / MB:.1f} MB; a {what} may be at most "
                                        f"{limit / MB:g} MB")
        yield fd
    except OSError as e:
        raise fail(error, file, "", f"cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)


def read_bytes(path: str | os.PathLike, *, what: str, limit: int,
               error: type[ElasticplanError] = SpecError) -> bytes:
    """The bytes of a regular file of at most `limit` bytes."""
    with regular_file(path, what=what, limit=limit, error=error) as fd:
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:  # it grew while being read
            raise fail(error, str(path), "", f"is more than {limit / MB:g} MB, the most a "
                                             f"{what} may be")
        return b"".join(chunks)


def _text(data: bytes, file: str, what: str, error) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise fail(error, file, "", f"not a UTF-8 {what} (byte {e.start})") from None


# --- YAML ---------------------------------------------------------------------------------

class _Loader(_BaseLoader):
    """Safe loading; a mapping with a key twice is an error, not "the last one wins"."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    key = key_node.value
                    if key in seen:
                        raise _Duplicate(key, key_node.start_mark)
                    seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """Safe dumping that quotes what _Loader would read back as another type."""


# YAML 1.2's floats that YAML 1.1 (PyYAML) reads as strings: an exponent without a point
# or without a sign (1e9, 1.0e7): numbers, as a user writing them means; the dumper knows
# them too, so that a string such as '1e3' is written quoted and read back a string
for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."))


def dump_yaml(data: Any, **options) -> str:
    """`data` as YAML text that load_yaml reads back the same (yaml.dump's options)."""
    return yaml.dump(data, Dumper=_Dumper, **options)


class _Duplicate(Exception):
    def __init__(self, key, mark):
        super().__init__(key)
        self.key, self.mark = key, mark


def _check_nodes(root: yaml.Node, file: str, error) -> None:
    """Depth and node count with aliases expanded, computed without expanding them: each
    node's expanded size is summed once (an alias shares its anchor's node object)."""
    size: dict[int, int | None] = {}  # None: on the current path
    stack = [(root, 1)]
    while stack:
        node, depth = stack[-1]
        if depth > MAX_DEPTH:
            raise fail(error, file, "", f"nested more than {MAX_DEPTH} levels deep "
                                        f"(line {node.start_mark.line + 1})")
        kids = [] if isinstance(node, yaml.ScalarNode) else \
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) \
            else list(node.value)
        if id(node) not in size:
            size[id(node)] = None
            todo = [k for k in kids if id(k) not in size]
            if any(id(k) in size and size[id(k)] is None for k in kids):
                raise fail(error, file, "", f"a recursive alias (line {node.start_mark.line + 1}); "
                                            f"refused")
            stack.extend((k, depth + 1) for k in todo)
            continue
        stack.pop()
        if size[id(node)] is not None:
            continue  # reached twice while pending (listed by two parents)
        total = 1 + sum(size[id(k)] or 0 for k in kids)
        if total > MAX_NODES:
            raise fail(error, file, "", f"expands to more than {MAX_NODES:,} nodes (aliases "
                                        f"counted as copies); refused")
        size[id(node)] = total


def load_yaml(path: str | os.PathLike, *, what: str = "YAML problem file",
              limit: int = MAX_YAML_BYTES, error: type[ElasticplanError] = SpecError) -> Any:
    """Parse one YAML document within the limits above."""
    return parse_yaml(read_bytes(path, what=what, limit=limit, error=error), str(path),
                      what=what, error=error)


def parse_yaml(data: bytes, file: str, *, what: str = "YAML problem file",
               error: type[ElasticplanError] = SpecError) -> Any:
    """One YAML document from a file's bytes (read within the limits: read_bytes); errors
    name `file`."""
    loader = _Loader(_text(data, file, what, error))
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, file, error)
        return loader.construct_document(node)
    except _Duplicate as d:
        raise fail(error, file, "", f"duplicate key {d.key!r} (line {d.mark.line + 1}); each "
                                    f"key may appear once in a mapping") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise fail(error, file, "", f"invalid YAML: {where}{problem}") from None
    except RecursionError:
        raise fail(error, file, "", "invalid YAML: nested too deeply") from None
    except (ValueError, OverflowError) as e:  # a scalar its constructor refuses (a huge integer)
        raise fail(error, file, "", f"invalid YAML: {str(e).split(';')[0]}") from None
    finally:
        loader.dispose()


# --- JSON ---------------------------------------------------------------------------------

def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"number {text[:20]} is out of range")
    return v


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"integer of {len(text)} digits is out of range")
    return int(text)


def _unique(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {key!r}; each key may appear once in an object")
    return out


def load_json(path: str | os.PathLike, *, what: str, limit: int = MAX_JSON_BYTES,
              error: type[ElasticplanError]) -> Any:
    """Parse one JSON document within the limits above."""
    file = str(path)
    text = _text(read_bytes(path, what=what, limit=limit, error=error), file, what, error)
    try:
        data = json.loads(text, parse_constant=_no_constant, parse_float=_float,
                          parse_int=_int, object_pairs_hook=_unique)
    except RecursionError:
        raise fail(error, file, "", f"not a readable JSON {what}: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError included
        raise fail(error, file, "", f"not a readable JSON {what}: {e}") from None
    _check_depth(data, file, error)
    return data


def _check_depth(data: Any, file: str, error) -> None:
    stack = [(data, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise fail(error, file, "", f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(v, dict):
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)


# --- typed fields -------------------------------------------------------------------------

def typename(v: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            type(None): "nothing"}.get(type(v), type(v).__name__)


def show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def not_unicode(text: str) -> str | None:
    """Why `text` is not Unicode text (a lone surrogate: what a JSON escape such as
    "\\ud800" or an argument in an undecodable encoding gives Python), else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"holds a lone surrogate (U+{ord(text[e.start]):04X}) at character "
                f"{e.start + 1}: not Unicode text")
    return None


class Fields:
    """Typed, checked access to one mapping; `done()` rejects keys nobody asked for."""

    def __init__(self, data: Any, file: str | None, path: str, what: str,
                 error: type[ElasticplanError] = SpecError):
        self.file, self.path, self.error = file, path, error
        if not isinstance(data, dict):
            raise fail(error, file, path, f"expected a mapping ({what}), got {typename(data)}")
        self.data = data
        self.seen: set[str] = set()

    def key(self, k: str) -> str:
        return f"{self.path}.{k}" if self.path else k

    def err(self, k: str, message: str) -> ElasticplanError:
        return fail(self.error, self.file, self.key(k), message)

    def raw(self, k: str, required: bool = True) -> Any:
        self.seen.add(k)
        if k not in self.data or self.data[k] is None:
            if required:
                near = difflib.get_close_matches(
                    k, [str(o) for o in self.data if o not in self.seen], n=1, cutoff=0.85)
                raise self.err(k, "required key is missing" + (
                    f" (is {near[0]!r} a misspelling of it?)" if near else ""))
            return None
        return self.data[k]

    def string(self, k: str, required: bool = True, *, max_length: int = 4096) -> str | None:
        v = self.raw(k, required)
        if v is None:
            return None
        if not isinstance(v, str) or not v.strip():
            raise self.err(k, f"expected a non-empty string, got {show(v)}")
        if len(v) > max_length:
            raise self.err(k, f"a string of {len(v)} characters; at most {max_length}")
        return v

    def number(self, k: str, *, minimum: float | None = None, positive: bool = False,
               maximum: float | None = None, required: bool = True) -> float | None:
        v = self.raw(k, required)
        if v is None:
            return None
        return number(v, self.file, self.key(k), minimum=minimum, positive=positive,
                      maximum=maximum, error=self.error)

    def integer(self, k: str, *, minimum: int | None = None, maximum: int | None = None,
                required: bool = True) -> int | None:
        v = self.raw(k, required)
        if v is None:
            return None
        return integer(v, self.file, self.key(k), minimum=minimum, maximum=maximum,
                       error=self.error)

    def boolean(self, k: str, default: bool | None = None) -> bool:
        v = self.raw(k, required=default is None)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self.err(k, f"expected true or false, got {show(v)}")
        return v

    def sequence(self, k: str, *, allow_empty: bool = False) -> list:
        v = self.raw(k)
        if not isinstance(v, list) or not (v or allow_empty):
            raise self.err(k, f"expected a {'' if allow_empty else 'non-empty '}list, "
                              f"got {show(v)}")
        return v

    def mapping(self, k: str, what: str, required: bool = True) -> "Fields | None":
        v = self.raw(k, required)
        return None if v is None else Fields(v, self.file, self.key(k), what, self.error)

    def free_form(self, k: str, kind: type) -> None:
        """A documented key whose content elasticplan does not interpret."""
        v = self.raw(k, required=False)
        if v is not None and not isinstance(v, kind):
            raise self.err(k, f"expected a {kind.__name__}, got {show(v)}")

    def done(self) -> None:
        unknown = [k for k in self.data if k not in self.seen]
        if unknown:
            k = unknown[0]
            if not isinstance(k, str):
                raise fail(self.error, self.file, self.path, f"keys must be strings, got {show(k)}")
            allowed = ", ".join(sorted(self.seen))
            raise self.err(k, f"unknown key (allowed here: {allowed})")


def number(v: Any, file, key, *, minimum=None, positive=False, maximum=None,
           error: type[ElasticplanError] = SpecError) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise fail(error, file, key, f"expected a number, got {show(v)}")
    try:
        v = float(v)
    except OverflowError:
        raise fail(error, file, key, "number out of range") from None
    if not math.isfinite(v):
        raise fail(error, file, key, f"expected a finite number, got {v}")
    if positive and v <= 0:
        raise fail(error, file, key, f"must be > 0, got {v:g}")
    return _in_range(v, file, key, minimum, maximum, error)


def integer(v: Any, file, key, *, minimum=None, maximum=None,
            error: type[ElasticplanError] = SpecError) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise fail(error, file, key, f"expected an integer, got {show(v)}")
    return _in_range(v, file, key, minimum, maximum, error)


def _in_range(v, file, key, minimum, maximum, error):
    if minimum is not None and v < minimum:
        raise fail(error, file, key, f"must be >= {minimum:g}, got {_num(v)}")
    if maximum is not None and v > maximum:
        raise fail(error, file, key, f"must be <= {maximum:g}, got {_num(v)}")
    return v


def _num(v) -> str:
    return f"{v:g}" if isinstance(v, float) else show(v)
