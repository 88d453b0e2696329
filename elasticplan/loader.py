"""Load and validate problem files (device, model profile, scenario) in one place.

Every error is a SpecError naming the file, the key path (``layers[2].shards[0].bytes``)
and what is wrong. Unknown keys are errors, except the documented free-form ones:
``description`` in every file, ``architecture`` and ``importance_metric`` in a model
profile.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import yaml

from elasticplan.errors import SpecError
from elasticplan.spec import Device, Layer, ModelProfile, Objective, Scenario, Shard

try:  # the C loader is ~10x faster on the large profiles; same semantics
    _YamlLoader = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - depends on how PyYAML was built
    _YamlLoader = yaml.SafeLoader


class _Fields:
    """Typed, checked access to one mapping; `done()` rejects keys nobody asked for."""

    def __init__(self, data: Any, file: str | None, path: str, what: str):
        if not isinstance(data, dict):
            raise SpecError(file, path, f"expected a mapping ({what}), got {_typename(data)}")
        self.data, self.file, self.path = data, file, path
        self.seen: set[str] = set()

    def key(self, k: str) -> str:
        return f"{self.path}.{k}" if self.path else k

    def err(self, k: str, message: str) -> SpecError:
        return SpecError(self.file, self.key(k), message)

    def raw(self, k: str, required: bool = True) -> Any:
        self.seen.add(k)
        if k not in self.data or self.data[k] is None:
            if required:
                raise self.err(k, "required key is missing")
            return None
        return self.data[k]

    def string(self, k: str, required: bool = True) -> str | None:
        v = self.raw(k, required)
        if v is None:
            return None
        if not isinstance(v, str) or not v.strip():
            raise self.err(k, f"expected a non-empty string, got {_show(v)}")
        return v

    def number(self, k: str, *, minimum: float | None = None, positive: bool = False,
               required: bool = True) -> float | None:
        v = self.raw(k, required)
        if v is None:
            return None
        return _number(v, self.file, self.key(k), minimum=minimum, positive=positive)

    def integer(self, k: str, *, minimum: int | None = None, required: bool = True) -> int | None:
        v = self.raw(k, required)
        if v is None:
            return None
        return _integer(v, self.file, self.key(k), minimum=minimum)

    def boolean(self, k: str, default: bool) -> bool:
        v = self.raw(k, required=False)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self.err(k, f"expected true or false, got {_show(v)}")
        return v

    def sequence(self, k: str) -> list:
        v = self.raw(k)
        if not isinstance(v, list) or not v:
            raise self.err(k, f"expected a non-empty list, got {_show(v)}")
        return v

    def mapping(self, k: str, what: str) -> "_Fields":
        return _Fields(self.raw(k), self.file, self.key(k), what)

    def free_form(self, k: str, kind: type) -> None:
        """A documented key whose content elasticplan does not interpret."""
        v = self.raw(k, required=False)
        if v is not None and not isinstance(v, kind):
            raise self.err(k, f"expected a {kind.__name__}, got {_show(v)}")

    def done(self) -> None:
        unknown = [k for k in self.data if k not in self.seen]
        if unknown:
            k = unknown[0]
            if not isinstance(k, str):
                raise SpecError(self.file, self.path, f"keys must be strings, got {_show(k)}")
            allowed = ", ".join(sorted(self.seen))
            raise self.err(k, f"unknown key (allowed here: {allowed})")


def _typename(v: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            type(None): "nothing"}.get(type(v), type(v).__name__)


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(v: Any, file, key, *, minimum=None, positive=False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SpecError(file, key, f"expected a number, got {_show(v)}")
    v = float(v)
    if not math.isfinite(v):
        raise SpecError(file, key, f"expected a finite number, got {v}")
    if positive and v <= 0:
        raise SpecError(file, key, f"must be > 0, got {v:g}")
    if minimum is not None and v < minimum:
        raise SpecError(file, key, f"must be >= {minimum:g}, got {v:g}")
    return v


def _integer(v: Any, file, key, *, minimum=None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise SpecError(file, key, f"expected an integer, got {_show(v)}")
    if minimum is not None and v < minimum:
        raise SpecError(file, key, f"must be >= {minimum}, got {v}")
    return v


def read_yaml(path: str | os.PathLike) -> Any:
    """Parse one YAML file; every failure is a one-line SpecError naming the file."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(file, "", "file not found") from None
    except IsADirectoryError:
        raise SpecError(file, "", "is a directory, expected a YAML file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(file, "", f"cannot read: {e}") from None
    try:
        return yaml.load(text, Loader=_YamlLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(file, "", f"invalid YAML: {where}{problem}") from None
    except RecursionError:
        raise SpecError(file, "", "invalid YAML: nested too deeply") from None


def write_checked_yaml(path: str | os.PathLike, data: dict, header: str, parse) -> None:
    """Write a mapping as YAML, after checking that `parse(data, file)` accepts it, with
    `header` as leading comment lines. Used by everything that generates problem files."""
    parse(data, str(path))
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    Path(path).write_text(comment + yaml.safe_dump(data, sort_keys=False,
                                                   default_flow_style=None, width=120))


def write_model_profile(path: str | os.PathLike, data: dict, header: str) -> None:
    """A model profile (the profile generators: archgen, `elasticplan profile`)."""
    write_checked_yaml(path, data, header, parse_model)


# --- device -----------------------------------------------------------------------------

def parse_device(data: Any, file: str | None = None, path: str = "") -> Device:
    f = _Fields(data, file, path, "a device")
    name = f.string("name")
    storage = f.mapping("storage", "storage: {bandwidth_mb_s, latency_us}")
    bandwidth = storage.number("bandwidth_mb_s", positive=True)
    latency = storage.number("latency_us", minimum=0)
    storage.done()
    compute = f.mapping("compute", "compute: {gflops, layer_overhead_ms, dequant_gb_s}")
    gflops = compute.number("gflops", positive=True)
    overhead = compute.number("layer_overhead_ms", minimum=0)
    dequant = compute.number("dequant_gb_s", positive=True)
    compute.done()
    memory = f.number("memory_mb", positive=True)
    f.free_form("description", str)
    f.done()
    return Device(name=name, bandwidth_mb_s=bandwidth, latency_us=latency, gflops=gflops,
                  layer_overhead_ms=overhead, dequant_gb_s=dequant, memory_mb=memory)


# --- model profile ----------------------------------------------------------------------

def parse_model(data: Any, file: str | None = None, path: str = "") -> ModelProfile:
    f = _Fields(data, file, path, "a model profile")
    name = f.string("name")
    seq_len = f.integer("seq_len", minimum=1)
    raw_bits = f.sequence("bitwidths")
    bitwidths = tuple(_integer(b, file, f"{f.key('bitwidths')}[{i}]", minimum=1)
                      for i, b in enumerate(raw_bits))
    for i, b in enumerate(bitwidths):
        if b > 32:
            raise SpecError(file, f"{f.key('bitwidths')}[{i}]", f"must be <= 32, got {b}")
        if i and b <= bitwidths[i - 1]:
            raise SpecError(file, f"{f.key('bitwidths')}[{i}]",
                            f"bitwidths must be strictly increasing, got {b} after {bitwidths[i - 1]}")
    layers = []
    for li, raw_layer in enumerate(f.sequence("layers")):
        lf = _Fields(raw_layer, file, f"{f.key('layers')}[{li}]", "a layer: {shards: [...]}")
        shards, names = [], set()
        for si, raw_shard in enumerate(lf.sequence("shards")):
            shard = _parse_shard(raw_shard, file, f"{lf.key('shards')}[{si}]", bitwidths)
            if shard.name in names:
                raise SpecError(file, f"{lf.key('shards')}[{si}].name",
                                f"duplicate shard name {shard.name!r} in this layer")
            names.add(shard.name)
            shards.append(shard)
        lf.done()
        layers.append(Layer(shards=tuple(shards)))
    resident = f.integer("resident_bytes", minimum=0, required=False) or 0
    synthetic = f.boolean("synthetic", default=False)
    f.free_form("description", str)
    f.free_form("architecture", dict)
    f.free_form("importance_metric", str)
    f.done()
    return ModelProfile(name=name, seq_len=seq_len, bitwidths=bitwidths, layers=tuple(layers),
                        resident_bytes=resident, synthetic=synthetic)


def _parse_shard(data: Any, file, path: str, bitwidths: tuple[int, ...]) -> Shard:
    f = _Fields(data, file, path, "a shard: {name, kind, flops, bytes, importance}")
    name = f.string("name")
    kind = f.string("kind")
    flops = f.number("flops", minimum=0)
    arrays = {}
    for k, parse in (("bytes", lambda v, key: _integer(v, file, key, minimum=0)),
                     ("importance", lambda v, key: _number(v, file, key, minimum=0))):
        values = f.sequence(k)
        if len(values) != len(bitwidths):
            raise f.err(k, f"has {len(values)} entries but bitwidths has {len(bitwidths)}; "
                           f"they must be aligned")
        arrays[k] = tuple(parse(v, f"{f.key(k)}[{i}]") for i, v in enumerate(values))
    f.done()
    return Shard(name=name, kind=kind, flops=flops, bytes=arrays["bytes"],
                 importance=arrays["importance"])


# --- scenario ---------------------------------------------------------------------------

def load_scenario(path: str | os.PathLike) -> Scenario:
    """Load a scenario file; `device` and `model` are paths relative to it, or inline mappings."""
    file = str(path)
    data = read_yaml(path)
    f = _Fields(data, file, "", "a scenario")
    base = Path(path).parent
    device, device_raw = _load_part(f, "device", base, parse_device)
    model, model_raw = _load_part(f, "model", base, parse_model)
    name = f.string("name", required=False) or Path(path).stem
    target = f.number("target_latency_ms", positive=True)
    budget = f.number("preload_budget_mb", minimum=0)
    min_shards = f.integer("min_shards_per_layer", minimum=0, required=False)
    objective_raw = f.string("objective", required=False) or Objective.MAX_IMPORTANCE.value
    public = (Objective.MAX_IMPORTANCE.value, Objective.MIN_BUFFER.value)
    if objective_raw not in public:
        raise f.err("objective", f"must be one of {', '.join(public)}, got {objective_raw!r}")
    floor = f.number("importance_floor", minimum=0, required=False)
    f.free_form("description", str)
    f.done()
    scenario_raw = {k: v for k, v in data.items() if k not in ("device", "model")}
    digest = hashlib.sha256(json.dumps(
        {"device": device_raw, "model": model_raw, "scenario": scenario_raw},
        sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return Scenario(
        name=name, device=device, model=model, target_latency_ms=target,
        preload_budget_mb=budget, min_shards_per_layer=1 if min_shards is None else min_shards,
        objective=Objective(objective_raw), importance_floor=floor, source=file,
        content_hash=digest)


def _load_part(f: _Fields, key: str, base: Path, parse):
    """A scenario's device or model: a path relative to the scenario, or an inline mapping."""
    value = f.raw(key)
    if isinstance(value, str):
        part_path = (base / value)
        if not part_path.is_file():
            raise f.err(key, f"file not found: {part_path}")
        raw = read_yaml(part_path)
        return parse(raw, str(part_path), ""), raw
    if isinstance(value, dict):
        return parse(value, f.file, key), value
    raise f.err(key, f"expected a path (string) or an inline mapping, got {_show(value)}")
