"""Load and validate problem files (device, model profile, scenario) in one place.

Every error is a SpecError naming the file, the key path (``layers[2].shards[0].bytes``)
and what is wrong. Unknown keys are errors, except the documented free-form ones:
``description`` in every file, ``architecture`` and ``importance_metric`` in a model
profile.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from elasticplan.errors import SpecError
from elasticplan.problem.inputs import (
    MAX_YAML_BYTES,
    Fields,
    dump_yaml,
    integer,
    load_yaml,
    number,
    parse_yaml,
    read_bytes,
    show,
)
from elasticplan.problem.limits import (
    MAX_BANDWIDTH_MB_S,
    MAX_CONTENTION_SHARE,
    MAX_DEQUANT_GB_S,
    MAX_FLOPS,
    MAX_GFLOPS,
    MAX_IMPORTANCE,
    MAX_LATENCY_US,
    MAX_LAYERS,
    MAX_MEMORY_MB,
    MAX_NS_PER_WEIGHT,
    MAX_OVERHEAD_MS,
    MAX_SEQ_LEN,
    MAX_SHARD_BYTES,
    MAX_SHARDS_PER_LAYER,
    MAX_SPREAD,
    MAX_VARIANTS,
    MIN_BANDWIDTH_MB_S,
    MIN_DEQUANT_GB_S,
    MIN_GFLOPS,
    bytes_of_mb,
)
from elasticplan.problem.outputs import write_text
from elasticplan.problem.question import Question
from elasticplan.problem.spec import (
    FULL_PRECISION_BITS,
    HEAD_PIECE_ROWS,
    SCHEME_NAME,
    DecoderShape,
    Device,
    Disk,
    Layer,
    ModelProfile,
    Scenario,
    Shard,
    Spread,
)


def read_yaml(path: str | os.PathLike) -> Any:
    """Parse one YAML problem file; every failure is a one-line SpecError naming the file."""
    return load_yaml(path)


def write_checked_yaml(path: str | os.PathLike, data: dict, header: str, parse) -> None:
    """Write a mapping as YAML, after checking that `parse(data, file)` accepts it, with
    `header` as leading comment lines. Used by everything that generates problem files."""
    parse(data, str(path))
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    write_text(path, comment + dump_yaml(data, sort_keys=False, default_flow_style=None,
                                         width=120))


def write_model_profile(path: str | os.PathLike, data: dict, header: str) -> None:
    """A model profile (the profile generators: archgen, `elasticplan profile`)."""
    write_checked_yaml(path, data, header, parse_model)


# --- device -----------------------------------------------------------------------------

def parse_device(data: Any, file: str | None = None, path: str = "") -> Device:
    f = Fields(data, file, path, "a device")
    name = f.string("name")
    storage = f.mapping("storage", "storage: {bandwidth_mb_s, latency_us}")
    bandwidth = storage.number("bandwidth_mb_s", minimum=MIN_BANDWIDTH_MB_S,
                               maximum=MAX_BANDWIDTH_MB_S)
    latency = storage.number("latency_us", minimum=0, maximum=MAX_LATENCY_US)
    disk = storage.mapping("disk", "disk: {bandwidth_mb_s, latency_us}", required=False)
    if disk is not None:  # beneath a kernel throttle (calibrate --throttle)
        disk_bandwidth = disk.number("bandwidth_mb_s", minimum=MIN_BANDWIDTH_MB_S,
                                     maximum=MAX_BANDWIDTH_MB_S)
        disk_latency = disk.number("latency_us", minimum=0, maximum=MAX_LATENCY_US)
        disk.done()
        disk = Disk(bandwidth_mb_s=disk_bandwidth, latency_us=disk_latency)
    storage.done()
    compute = f.mapping("compute", "compute: {gflops, layer_overhead_ms, dequant_gb_s or "
                                   "dequant_ns_per_weight, ...}")
    gflops = compute.number("gflops", minimum=MIN_GFLOPS, maximum=MAX_GFLOPS)
    overhead = compute.number("layer_overhead_ms", minimum=0, maximum=MAX_OVERHEAD_MS)
    dequant = compute.number("dequant_gb_s", minimum=MIN_DEQUANT_GB_S, maximum=MAX_DEQUANT_GB_S,
                             required=False)
    per_weight = _per_weight(compute, "dequant_ns_per_weight")
    vector = _per_weight(compute, "vector_ns_per_weight")
    if vector and not per_weight:
        raise compute.err("vector_ns_per_weight", "needs dequant_ns_per_weight beside it (the "
                                                  "cost of the same bitwidths multiplied by a "
                                                  "matrix)")
    if dequant is None and not per_weight:
        raise compute.err("dequant_gb_s", "a device needs a dequantisation cost: dequant_gb_s "
                                          "(per stored byte) or dequant_ns_per_weight (per "
                                          "weight, by bitwidth), or both")
    optional = {k: compute.number(k, minimum=0, maximum=MAX_OVERHEAD_MS, required=False) or 0.0
                for k in ("shard_overhead_ms", "embed_ms", "pool_ms", "wake_ms",
                          "stream_ms_per_mb", "contention_ms_per_mb",
                          "contention_ms_per_read")}
    optional["contention_share"] = compute.number("contention_share", minimum=0,
                                                  maximum=MAX_CONTENTION_SHARE,
                                                  required=False) or 0.0
    compute.done()
    spread = f.mapping("spread", "spread: {io, compute, runs}", required=False)
    if spread is not None:
        spread_io = spread.number("io", minimum=0, maximum=MAX_SPREAD)
        spread_compute = spread.number("compute", minimum=0, maximum=MAX_SPREAD)
        runs = spread.integer("runs", minimum=2)
        spread.done()
        spread = Spread(io=spread_io, compute=spread_compute, runs=runs)
    memory = f.number("memory_mb", positive=True, maximum=MAX_MEMORY_MB)
    f.free_form("description", str)
    f.done()
    return Device(name=name, bandwidth_mb_s=bandwidth, latency_us=latency, gflops=gflops,
                  layer_overhead_ms=overhead, dequant_gb_s=dequant, memory_mb=memory,
                  dequant_ns_per_weight=per_weight, vector_ns_per_weight=vector,
                  spread=spread, disk=disk, **optional)


def _per_weight(compute: Fields, name: str) -> tuple[tuple[int, float], ...]:
    """`dequant_ns_per_weight` or `vector_ns_per_weight`: {bits: ns, ...} (bitwidths 1..32:
    32 is a decoder device's per-weight cost of fp32 weights, runtime/decode_calibrate.py)."""
    raw = compute.raw(name, required=False)
    if raw is None:
        return ()
    table = Fields(raw, compute.file, compute.key(name), f"{name}: {{bits: ns per weight}}")
    out = []
    for k in list(raw):
        key = table.key(str(k))
        bits = integer(k, compute.file, key, minimum=1, maximum=FULL_PRECISION_BITS)
        out.append((bits, number(raw[k], compute.file, key, minimum=0, maximum=MAX_NS_PER_WEIGHT)))
    if not out:
        raise compute.err(name, "is empty: give ns per weight for every quantised bitwidth, "
                                "or leave it out")
    return tuple(sorted(out))


# --- model profile ----------------------------------------------------------------------

def parse_model(data: Any, file: str | None = None, path: str = "") -> ModelProfile:
    f = Fields(data, file, path, "a model profile")
    name = f.string("name")
    seq_len = f.integer("seq_len", minimum=1, maximum=MAX_SEQ_LEN)
    raw_bits = f.sequence("bitwidths")
    bitwidths = tuple(integer(b, file, f"{f.key('bitwidths')}[{i}]", minimum=1, maximum=32)
                      for i, b in enumerate(raw_bits))
    for i, b in enumerate(bitwidths):
        if i and b <= bitwidths[i - 1]:
            raise SpecError(file, f"{f.key('bitwidths')}[{i}]",
                            f"bitwidths must be strictly increasing, got {b} after {bitwidths[i - 1]}")
    raw_layers = f.sequence("layers")
    if len(raw_layers) > MAX_LAYERS:
        raise f.err("layers", f"{len(raw_layers)} layers; at most {MAX_LAYERS}")
    layers, variants = [], 0
    for li, raw_layer in enumerate(raw_layers):
        lf = Fields(raw_layer, file, f"{f.key('layers')}[{li}]", "a layer: {shards: [...]}")
        shards, names = [], set()
        raw_shards = lf.sequence("shards")
        variants += len(raw_shards) * len(bitwidths)
        if len(raw_shards) > MAX_SHARDS_PER_LAYER or variants > MAX_VARIANTS:
            raise lf.err("shards", f"the model has more than {MAX_VARIANTS:,} shard variants "
                                   f"(layers x shards x bitwidths) or a layer more than "
                                   f"{MAX_SHARDS_PER_LAYER:,} shards: beyond what the "
                                   f"planner is sized for (docs/formats.md)")
        for si, raw_shard in enumerate(raw_shards):
            shard = _parse_shard(raw_shard, file, f"{lf.key('shards')}[{si}]", bitwidths)
            if shard.name in names:
                raise SpecError(file, f"{lf.key('shards')}[{si}].name",
                                f"duplicate shard name {shard.name!r} in this layer")
            names.add(shard.name)
            shards.append(shard)
        lf.done()
        layers.append(Layer(shards=tuple(shards)))
    resident = f.integer("resident_bytes", minimum=0, maximum=bytes_of_mb(MAX_MEMORY_MB),
                         required=False) or 0
    synthetic = f.boolean("synthetic", default=False)
    memory = _memory_terms(f.mapping("memory", "the model's fixed memory terms", required=False))
    links = _runtime_links(f.mapping("runtime", "where the runtime finds the shard store "
                                                "and task head", required=False))
    schemes = []
    qf = f.mapping("quantisation", "bitwidth -> the scheme it was measured in",
                   required=False)
    for key in list(qf.data) if qf else []:
        if key not in bitwidths or key == FULL_PRECISION_BITS:
            raise qf.err(str(key), f"not a quantised bitwidth of this model "
                                   f"({list(bitwidths)})")
        scheme = qf.string(key)
        if not re.fullmatch(SCHEME_NAME, scheme):
            raise qf.err(str(key), f"must be a quantisation scheme's name (lower-case letters, "
                                   f"digits, '_' or '-'), got {scheme!r}")
        schemes.append((key, scheme))
    decoder = _decoder_shape(f.mapping("decoder", "a decoder's shape", required=False))
    head = None
    if f.raw("head", required=False) is not None:
        head = _parse_shard(f.raw("head"), file, f.key("head"), bitwidths)
    if (decoder is None) != (head is None):
        raise f.err("decoder" if decoder is None else "head",
                    "a decoder's profile gives `decoder` (its shape) and `head` (its "
                    "embedding / LM-head table) together")
    f.free_form("description", str)
    f.free_form("architecture", dict)
    f.free_form("importance_metric", str)
    f.done()
    return ModelProfile(name=name, seq_len=seq_len, bitwidths=bitwidths, layers=tuple(layers),
                        resident_bytes=resident, synthetic=synthetic, **memory, **links,
                        schemes=tuple(sorted(schemes)), decoder=decoder, head=head)


def _decoder_shape(d: Fields | None) -> DecoderShape | None:
    """`decoder: {context, hidden, ffn, ffn_slices, heads, head_dim, q_per_kv, vocab,
    workspace_bytes, kv_kind, table_piece_rows}` (docs/formats.md)."""
    if d is None:
        return None
    dims = {k: d.integer(k, minimum=1, maximum=MAX_SEQ_LEN)
            for k in ("context", "hidden", "ffn", "ffn_slices", "heads", "head_dim",
                      "q_per_kv", "vocab")}
    if dims["heads"] % dims["q_per_kv"]:
        raise d.err("q_per_kv", f"{dims['q_per_kv']} does not divide heads {dims['heads']}")
    if dims["ffn"] % dims["ffn_slices"]:
        raise d.err("ffn_slices", f"{dims['ffn_slices']} does not divide ffn {dims['ffn']}")
    workspace = d.integer("workspace_bytes", minimum=0, maximum=bytes_of_mb(MAX_MEMORY_MB))
    kind = d.string("kv_kind", required=False) or "group"
    rows = d.integer("table_piece_rows", minimum=1, maximum=MAX_SEQ_LEN,
                     required=False) or HEAD_PIECE_ROWS
    d.done()
    return DecoderShape(**dims, workspace_bytes=workspace, kv_kind=kind, table_piece_rows=rows)


def _runtime_links(r: Fields | None) -> dict:
    """`runtime: {store, task_head}`: paths relative to the profile's file."""
    if r is None:
        return {}
    base = Path(r.file).parent if r.file else Path(".")
    out = {"store_path": str(base / r.string("store"))}
    head = r.string("task_head", required=False)
    if head is not None:
        out["task_head_path"] = str(base / head)
    r.done()
    return out


def _memory_terms(m: Fields | None) -> dict:
    """`memory: {embedding_rows, embedding_row_bytes, activation_bytes, scratch_bytes}`
    (docs/formats.md); absent: no streamable table, no activation or scratch term."""
    if m is None:
        return {}
    limit = bytes_of_mb(MAX_MEMORY_MB)
    terms = {"embedding_rows": m.integer("embedding_rows", minimum=0, maximum=1 << 32,
                                         required=False) or 0,
             "embedding_row_bytes": m.integer("embedding_row_bytes", minimum=0,
                                              maximum=MAX_SHARD_BYTES, required=False) or 0,
             "activation_bytes": m.integer("activation_bytes", minimum=0, maximum=limit),
             "scratch_bytes": m.integer("scratch_bytes", minimum=0, maximum=limit)}
    if bool(terms["embedding_rows"]) != bool(terms["embedding_row_bytes"]):
        raise m.err("embedding_rows", "embedding_rows and embedding_row_bytes go together "
                                      "(both > 0, or both absent)")
    if terms["embedding_rows"] * terms["embedding_row_bytes"] > limit:
        raise m.err("embedding_rows", "the embedding table exceeds the memory limit")
    m.done()
    return terms


def _parse_shard(data: Any, file, path: str, bitwidths: tuple[int, ...]) -> Shard:
    f = Fields(data, file, path, "a shard: {name, kind, flops, bytes, importance, weights}")
    name = f.string("name")
    kind = f.string("kind")
    flops = f.number("flops", minimum=0, maximum=MAX_FLOPS)
    weights = f.integer("weights", minimum=0, maximum=MAX_SHARD_BYTES, required=False)
    arrays = {}
    for k, parse in (("bytes", lambda v, key: integer(v, file, key, minimum=0,
                                                       maximum=MAX_SHARD_BYTES)),
                     ("importance", lambda v, key: number(v, file, key, minimum=0,
                                                         maximum=MAX_IMPORTANCE))):
        values = f.sequence(k)
        if len(values) != len(bitwidths):
            raise f.err(k, f"has {len(values)} entries but bitwidths has {len(bitwidths)}; "
                           f"they must be aligned")
        arrays[k] = tuple(parse(v, f"{f.key(k)}[{i}]") for i, v in enumerate(values))
    f.done()
    return Shard(name=name, kind=kind, flops=flops, bytes=arrays["bytes"],
                 importance=arrays["importance"], weights=weights)


# --- scenario ---------------------------------------------------------------------------

def load_scenario(path: str | os.PathLike) -> Scenario:
    """Load a scenario file; `device` and `model` are paths relative to it, or inline mappings."""
    file = str(path)
    data = read_yaml(path)
    f = Fields(data, file, "", "a scenario")
    base = Path(path).parent
    device, device_raw, device_file = _load_part(f, "device", base, parse_device)
    model, model_raw, model_file = _load_part(f, "model", base, parse_model)
    name = f.string("name", required=False) or Path(path).stem
    question = Question.read(f)
    f.free_form("description", str)
    f.done()
    scenario_raw = {k: v for k, v in data.items() if k not in ("device", "model")}
    # json.dumps of {"device": ..., "model": ..., "scenario": ...} with sorted keys, from
    # the parts' own canonical texts (a part file's is kept with its parse: _load_part)
    digest = hashlib.sha256(
        f'{{"device":{device_raw},"model":{model_raw},"scenario":{_canonical(scenario_raw)}}}'
        .encode()).hexdigest()
    return Scenario(name=name, device=device, model=model, question=question, source=file,
                    content_hash=digest,
                    files=tuple(p for p in (file, device_file, model_file) if p))


def _load_part(f: Fields, key: str, base: Path, parse):
    """A scenario's device or model: a path relative to the scenario, or an inline mapping.
    Returns it, its canonical JSON text (for the scenario's content hash) and its file."""
    value = f.raw(key)
    if isinstance(value, str):
        part_path = base / value
        if not part_path.exists():
            raise f.err(key, f"file not found: {part_path}")
        part, text = _part_file(part_path, parse)
        return part, text, str(part_path)
    if isinstance(value, dict):
        return parse(value, f.file, key), _canonical(value), None
    raise f.err(key, f"expected a path (string) or an inline mapping, got {show(value)}")


def _canonical(data) -> str:
    """A document's canonical JSON text: the scenario's content hash is taken over these."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


# Parsed part files by their bytes: a fleet loads each model profile (up to 1.4 MB of YAML,
# ~1 s a MB to parse) once per scenario that names it, in the parent and in every worker
# (48 scenarios over 4 models and 12 devices in the fleet benchmark). Parsing depends on the
# bytes alone (the file only names an error, and a file that fails is never kept), and the
# parts are frozen, so one parse serves every file with those bytes.
_PARTS: dict[tuple, tuple] = {}
PARTS_KEPT = 32


def _part_file(path: Path, parse):
    data = read_bytes(path, what="YAML problem file", limit=MAX_YAML_BYTES, error=SpecError)
    key = (parse, hashlib.sha256(data).digest())
    if key not in _PARTS:
        raw = parse_yaml(data, str(path))
        part = parse(raw, str(path), "")
        if len(_PARTS) >= PARTS_KEPT:
            _PARTS.pop(next(iter(_PARTS)))  # the oldest
        _PARTS[key] = (part, _canonical(raw))
    return _PARTS[key]
