"""Importance profiling: the measured effect of each shard, alone, at each bitwidth.

For every layer l, shard s and variant v (dropped, or stored at b bits), the model runs on
the calibration tweets with only shard s of layer l changed and everything else at fp32
(weights read from the shard store). Three numbers are recorded per variant:
- fidelity: mean cosine between its sentence embeddings and the fp32 model's;
- accuracy and log-loss of the task head (runtime/sources/task.py) on those tweets' labels.
Layers before l are unchanged, so their outputs are computed once and reused.

Importance (what the planner adds up). With loss(v) = 1 - fidelity(v):

    importance[l, s, b] = max(0, loss(dropped) - loss(b))

i.e. how much of the damage of dropping the shard is avoided by keeping it at b bits; the
fp32 importance is the drop loss itself. The planner's objective Σ importance is then the
drop loss of all shards minus the *additive prediction* of the plan's loss,
Σ_s loss(choice of s). What is additive: single-shard losses, each measured with all other
shards at fp32. What is not: interactions (two shards dropped together can hurt more or
less than the sum), which runtime/profiling/additive.py measures on solved plans. Clamping at 0
means a bitwidth that hurts more than dropping the shard is worth nothing, never negative.

Resumable: measurements are appended to a JSON-lines cache keyed by a digest of the
inputs (store build, calibration set, task head, this module's version); a rerun skips
every variant already measured for the same inputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from elasticplan.errors import StoreError
from elasticplan.problem import archgen
from elasticplan.problem.archgen import architecture_dict, ffn_flops, ffn_weights, head_flops, head_weights
from elasticplan.problem.outputs import write_text
from runtime.families.encoder import (
    MODEL_NAME,
    LayerWeights,
    cosine,
    embed_batched,
    length_batches,
    parse_shard_name,
)
from runtime.schemes import DEFAULT_NAME
from runtime.sources.task import CSV_TRAIN, MAX_ITER, Split, Task, TaskHead, tweet_task
from runtime.store import ShardStore

PROFILE_VERSION = 1
DROP = 0  # variant key for "shard dropped"
PROFILE_SEQ_LEN = 128  # flops in the profile are for this sequence length
BATCH = 32


@dataclass(frozen=True)
class Measurement:
    layer: int
    shard: str
    variant: int  # DROP, or bits
    fidelity: float
    accuracy: float | None  # None: profiled without a task (fidelity only)
    logloss: float | None

    def key(self) -> tuple[int, str, int]:
        return self.layer, self.shard, self.variant


class Profiler:
    """Runs single-shard variants of the model from a shard store on calibration text."""

    def __init__(self, store: ShardStore, texts: list[str], labels: np.ndarray,
                 head: TaskHead | None, max_length: int = PROFILE_SEQ_LEN):
        self.store, self.head = store, head
        self.config = c = store.config
        self.encoder = store.encoder()
        tokenizer = store.tokenizer(max_length)
        self.batches = length_batches(tokenizer, texts, BATCH)
        self.order = [i for idx, _ in self.batches for i in idx]
        self.full = [self._layer(l, {}) for l in range(c.layers)]
        # inputs[l][k]: batch k's hidden state entering layer l, all layers at fp32
        self.inputs: list[list[torch.Tensor]] = []
        with torch.inference_mode():
            xs = [self.encoder.embed(b.ids) for _, b in self.batches]
            for l in range(c.layers):
                self.inputs.append(xs)
                xs = [self.encoder.layer(l, x, b.mask, self.full[l])
                      for x, (_, b) in zip(xs, self.batches)]
            self.reference = torch.cat([self.encoder.pool(x, b.mask)
                                        for x, (_, b) in zip(xs, self.batches)])
        self.sorted_labels = labels[self.order]

    def _layer(self, l: int, changes: dict[str, int]) -> LayerWeights:
        """Layer l at fp32 except `changes` (shard -> DROP or bits)."""
        return self.store.layer_weights(l, {n: changes.get(n, 32) for n in self.config.shard_names()
                                            if changes.get(n) != DROP})

    @torch.inference_mode()
    def run_from(self, l: int, layers: list[LayerWeights]) -> torch.Tensor:
        """Embeddings (in length-sorted order) when layers l.. use `layers[l:]`."""
        out = []
        for k, (_, b) in enumerate(self.batches):
            x = self.inputs[l][k]
            for j in range(l, self.config.layers):
                x = self.encoder.layer(j, x, b.mask, layers[j])
            out.append(self.encoder.pool(x, b.mask))
        return torch.cat(out)

    def check_finite(self, emb: torch.Tensor) -> torch.Tensor:
        """`emb`, unless it holds a NaN or an infinity: then a StoreError (a NaN fidelity
        is never a measurement; the store's values are checked on load, so this is what
        would follow if they were not)."""
        if not bool(torch.isfinite(emb).all()):
            raise StoreError(f"{self.store.path}: the model's sentence embeddings are not "
                             f"finite (NaN or infinite): its weights overflow fp32; rebuild "
                             f"the store from a sound checkpoint")
        return emb

    def score(self, emb: torch.Tensor) -> tuple[float, float | None, float | None]:
        self.check_finite(emb)
        fidelity = float(cosine(emb, self.reference).mean())
        if self.head is None:
            return fidelity, None, None
        return (fidelity, self.head.accuracy(emb, self.sorted_labels),
                self.head.logloss(emb, self.sorted_labels))

    def measure(self, l: int, shard: str, variant: int) -> Measurement:
        layers = list(self.full)
        layers[l] = self._layer(l, {shard: variant})
        return Measurement(l, shard, variant, *self.score(self.run_from(l, layers)))

    def embed_selection(self, changes: list[dict[str, int]]) -> torch.Tensor:
        """A whole submodel's embeddings (length-sorted order): per layer, shard -> DROP or
        bits (missing = fp32)."""
        layers = [self._layer(l, ch) if ch else self.full[l] for l, ch in enumerate(changes)]
        return self.run_from(0, layers)

    def measure_selection(self, changes: list[dict[str, int]]) -> tuple[float, float, float]:
        return self.score(self.embed_selection(changes))


def inputs_digest(store: ShardStore, calibration_digest: str, head: TaskHead | None) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(store.index.build, sort_keys=True).encode())
    if store.model != MODEL_NAME:  # (MiniLM's cache keeps its key)
        h.update(json.dumps(store.index.data["config"], sort_keys=True).encode())
    h.update(calibration_digest.encode())
    if head is not None:
        h.update(json.dumps(head.to_json(), sort_keys=True).encode())
    h.update(f"profile/{PROFILE_VERSION}".encode())
    return h.hexdigest()


class MeasurementCache:
    """JSON lines: a header {"inputs": digest} then one measurement per line (a frozen
    dataclass with a `key()`: `kind`, Measurement by default). A cache for other inputs is
    discarded; a torn last line (interrupted run) is ignored."""

    def __init__(self, path: Path, digest: str, kind: type = Measurement):
        self.path, self.digest = path, digest
        self.items: dict[tuple[int, str, int], Measurement] = {}
        if path.is_file():
            lines = path.read_text().splitlines()
            try:
                ok = json.loads(lines[0]).get("inputs") == digest
            except (ValueError, IndexError, AttributeError):
                ok = False
            if ok:
                for line in lines[1:]:
                    try:
                        m = kind(**json.loads(line))
                    except (ValueError, TypeError):
                        continue
                    self.items[m.key()] = m
        if not self.items:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"inputs": digest}) + "\n")

    def add(self, m: Measurement) -> None:
        self.items[m.key()] = m
        with open(self.path, "a") as fh:
            fh.write(json.dumps(dataclasses.asdict(m), allow_nan=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


@dataclass
class ProfileResult:
    measurements: dict[tuple[int, str, int], Measurement]
    baseline: tuple[float, float | None, float | None]  # fp32 model on the calibration set
    measured_now: int
    calibration: Split  # the calibration tweets measured on


def profile_seq_len(store: ShardStore) -> int:
    """The sequence length profiled (and the profile's flops are for): PROFILE_SEQ_LEN, or
    less when the model's position table is shorter."""
    return min(PROFILE_SEQ_LEN, store.config.usable_positions)


def train_head(store: ShardStore, out: Path, log: Callable[[str], None],
               task: Task | None = None) -> TaskHead:
    """Train the task head on the fp32 model's embeddings of the task's train split (the
    tweets by default); saved to `out` with its accuracy. Reused when `out` records the
    same store build and task."""
    task = task or tweet_task()
    splits = task.splits
    extra = json.dumps(task.source, sort_keys=True) if task.source else ""
    key = hashlib.sha256((json.dumps(store.index.build, sort_keys=True) +
                          splits.train.digest() + extra).encode()).hexdigest()
    source = dict(task.source)
    if source:  # a copy of the CSV beside the head: the head reads nothing outside its folder
        source["csv"] = copy_task_csv(Path(task.source["csv"]), out, store)
    if out.is_file():
        try:
            meta = json.loads(out.read_text())
        except ValueError:
            meta = {}
        if isinstance(meta, dict) and meta.get("inputs") == key:
            return TaskHead.load(out)
    what = "tweets" if not task.source else f"texts of {task.source['csv']}"
    sample = f" ({task.sample}: at most {CSV_TRAIN:,})" if task.sample else ""
    log(f"training the task head on {len(splits.train)} {what}{sample} (fp32 embeddings)...")
    encoder, tokenizer = store.encoder(), store.tokenizer(profile_seq_len(store))
    c = store.config
    full = [store.layer_weights(l, dict.fromkeys(c.shard_names(), 32)) for l in range(c.layers)]

    def embed(texts, desc):
        texts = list(texts)
        with torch.inference_mode(), tqdm(total=len(texts), desc=desc, unit="text",
                                          file=sys.stderr, mininterval=1.0) as bar:
            def run(b):
                bar.update(b.ids.shape[0])
                return encoder.forward(b.ids, b.mask, full)
            return embed_batched(tokenizer, texts, 64, run, c.hidden)

    train = embed(splits.train.texts, "embedding the training texts")
    log(f"fitting the head (L-BFGS, at most {MAX_ITER} iterations)...")
    head = TaskHead.train(train, splits.train.labels, names=task.labels, task=source)
    acc = head.accuracy(embed(splits.test.texts, "embedding the test texts"), splits.test.labels)
    head.save(out, inputs=key, trained_on=f"train split, {len(splits.train)} {what}{sample}",
              test_accuracy=acc, test_size=len(splits.test))
    log(f"task head: test accuracy {acc:.4f} on {len(splits.test)} held-out "
        f"{'tweets' if not task.source else 'test texts'}")
    return head


def copy_task_csv(csv: Path, head: Path, store: ShardStore) -> str:
    """The task CSV copied beside the head (HEAD.csv, HEAD the head file's name without
    .json; rewritten only when it differs); returns the copy's name, as the head records
    it."""
    from elasticplan.problem.outputs import write_bytes

    copy = head.with_name(head.name.removesuffix(".json") + ".csv")
    data = csv.read_bytes()
    if not (copy.exists() and os.path.samefile(copy, csv)) and \
            not (copy.is_file() and copy.read_bytes() == data):
        head.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(copy, data, inputs=store.files())
    return copy.name


def run_profile(store: ShardStore, head: TaskHead | None, cache_path: Path, *,
                task: Task | None = None, layers: list[int] | None = None,
                bitwidths: list[int] | None = None, calibration_size: int | None = None,
                progress: bool = True) -> ProfileResult:
    """Measure every (layer, shard, variant) not already in the cache, on the task's
    calibration texts (default: the tweets'); no head: fidelity only."""
    cal = (task or tweet_task()).splits.calibration
    texts, labels = list(cal.texts), cal.labels
    if calibration_size is not None:  # a smaller, still balanced, set (tests)
        pick = np.r_[np.flatnonzero(labels == 0)[:calibration_size // 2],
                     np.flatnonzero(labels == 1)[:calibration_size - calibration_size // 2]]
        texts, labels = [texts[i] for i in pick], labels[pick]
        cal = Split(tuple(texts), labels)
    digest = inputs_digest(store, hashlib.sha256("\n".join(texts).encode()).hexdigest(), head)
    cache = MeasurementCache(cache_path, digest)
    c = store.config
    layers = list(range(c.layers)) if layers is None else layers
    bits = [b for b in (bitwidths or store.bitwidths) if b != 32]
    todo = [(l, n, v) for l in layers for n in c.shard_names() for v in [DROP] + bits
            if (l, n, v) not in cache.items]
    profiler = Profiler(store, texts, labels, head, profile_seq_len(store))
    with tqdm(total=len(todo), desc="profile", unit="variant", file=sys.stderr,
              disable=not (progress and todo), mininterval=1.0) as bar:
        for l, n, v in todo:
            cache.add(profiler.measure(l, n, v))
            bar.set_postfix_str(f"layer {l} {n}", refresh=False)
            bar.update(1)
    baseline = profiler.score(profiler.reference)
    return ProfileResult(cache.items, baseline, len(todo), cal)


def importance(ms: dict, baseline: tuple[float, float, float], l: int, shard: str,
               bits: tuple[int, ...], metric: str = "fidelity") -> list[float]:
    """importance[b] = max(0, loss(drop) - loss(b)); loss is measured against the fp32
    model (1 - fidelity, or the log-loss increase), so the fp32 loss is 0."""
    def loss(v: int) -> float:
        if v == 32:
            return 0.0
        m = ms[l, shard, v]
        if metric == "fidelity":
            return max(0.0, 1.0 - m.fidelity)  # a cosine above 1 is rounding noise
        return m.logloss - baseline[2]
    drop = loss(DROP)
    return [max(0.0, drop - loss(b)) for b in bits]


def profile_dict(store: ShardStore, result: ProfileResult, test_accuracy: float | None,
                 metric: str = "fidelity", runtime: dict | None = None) -> dict:
    """The measured model profile (the planner's input), as written to YAML. `runtime`:
    where the store and the task head are, relative to the profile (what `run`,
    `evaluate` and `calibrate` then default to)."""
    ms, baseline = result.measurements, result.baseline
    c = store.config
    seq_len = profile_seq_len(store)
    arch = dataclasses.replace(c, seq_len=seq_len)
    schemes = {b: store.scheme_of(b) for b in store.bitwidths if b != 32}
    bits = tuple(store.bitwidths)
    layers = []
    for l in range(c.layers):
        shards = []
        for n in c.shard_names():
            kind, _ = parse_shard_name(n)
            flops = head_flops(arch) if kind == "head" else ffn_flops(arch)
            weights = head_weights(arch) if kind == "head" else ffn_weights(arch)
            imp = importance(ms, baseline, l, n, bits, metric)
            shards.append({"name": n, "kind": kind, "flops": flops, "weights": weights,
                           "bytes": [store.variant(l, n, b).nbytes for b in bits],
                           "importance": [float(f"{v:.6g}") for v in imp]})
        layers.append({"shards": shards})
    task = (f"fp32 model: task accuracy {test_accuracy:.4f} on the held-out test split"
            if test_accuracy is not None else "no task: fidelity only")
    title = ("all-MiniLM-L6-v2 (sentence-transformers)" if store.model == MODEL_NAME else
             f"{store.model} ({c.family}, {c.pooling} pooling"
             f"{', normalised' if c.normalize else ''})")
    texts = "tweets" if store.model == MODEL_NAME else "texts"
    return {
        "name": store.model,
        "description": f"{title}, measured: bytes as stored "
                       f"by `elasticplan shard`, importance from `elasticplan profile` on "
                       f"{len(result.calibration)} calibration {texts} ({task})",
        "architecture": architecture_dict(c),
        "synthetic": False,
        "importance_metric": (
            "importance[b] = max(0, loss(dropped) - loss(b bits)), one shard changed at a "
            "time, all others fp32; loss = 1 - mean cosine to the fp32 model's embedding"
            if metric == "fidelity" else
            "importance[b] = max(0, logloss(dropped) - logloss(b bits)) of the task head"),
        "seq_len": seq_len,
        "bitwidths": list(bits),
        # The word-embedding table is streamable by rows (memory.embedding_*), the rest resident.
        **archgen.memory_fields(arch, store.decode_buffers()),
        **({"quantisation": schemes} if set(schemes.values()) != {DEFAULT_NAME} else {}),
        **({"runtime": runtime} if runtime else {}),
        "layers": layers,
    }


def profile_model(store_path: str | Path, out: str | Path, *, cache_dir: str | Path,
                  head_path: str | Path | None, task: Task | None = None,
                  metric: str = "fidelity", link: bool = False,
                  log: Callable[[str], None] = print) -> ProfileResult:
    """`elasticplan profile`: train (or reuse) the task head (none when `head_path` is
    None: fidelity only, on the tweets' calibration texts), measure what the cache lacks,
    and write the model profile YAML plus every measurement as JSON beside it. `link`:
    the profile records where its store and head are (runtime.profiling.profile.profile_dict)."""
    from elasticplan.errors import InvalidArgument
    from elasticplan.problem.loader import write_model_profile

    store = ShardStore(store_path)
    out = Path(out)
    if head_path is None and metric != "fidelity":
        raise InvalidArgument(f"--metric {metric} needs a task head (give --task CSV)")
    head = test_accuracy = None
    if head_path is not None:
        head_path = Path(head_path)
        head = train_head(store, head_path, log, task)
        test_accuracy = json.loads(head_path.read_text())["test_accuracy"]
    result = run_profile(store, head, Path(cache_dir) / "measurements.jsonl", task=task)
    runtime = None
    if link:
        here = out.resolve().parent
        runtime = {"store": os.path.relpath(store.path.resolve(), here)}
        if head_path is not None:
            runtime["task_head"] = os.path.relpath(head_path.resolve(), here)
    data = profile_dict(store, result, test_accuracy, metric, runtime)
    write_model_profile(out, data, "Generated by `elasticplan profile` from the shard store "
                                   "and measured importance: do not edit by hand.")
    cal = result.calibration
    raw = {"calibration": {"tweets" if task is None or not task.source else "texts": len(cal),
                           "split_seed": 0, "digest": cal.digest()},
           "baseline": dict(zip(("fidelity", "accuracy", "logloss"), result.baseline)),
           "fp32_test_accuracy": test_accuracy,
           "measurements": [m.__dict__ for m in sorted(result.measurements.values(),
                                                       key=lambda m: m.key())]}
    write_text(measurements_path(out), json.dumps(raw, indent=0, allow_nan=False) + "\n")
    log(f"measured {result.measured_now} variants now, "
        f"{len(result.measurements) - result.measured_now} from the cache; wrote {out} and "
        f"{measurements_path(out)}")
    return result


def measurements_path(profile_path: Path) -> Path:
    return profile_path.with_name(profile_path.name.removesuffix(".yaml") + ".measurements.json")
