"""Importance for a decoder (a llama store): how far the next-token distribution moves when
one shard changes, teacher-forced on held-out text.

For every layer l, shard s and variant v (dropped, or stored at b bits) the model reads the
profile's token sequences with only shard s of layer l changed and every other shard in
fp32; at each real position whose next token is real, it is compared with the full fp32
model: the KL divergence KL(p_full || p_changed) of the next-token distributions (nats)
and whether the two agree on the most likely token (top-1). Both are averaged over those
positions. Importance, as for encoders (runtime/profiling/profile.py), is the damage of
dropping the shard that the variant avoids:

    importance[l, s, b] = max(0, KL(dropped) - KL(b)),   importance[l, s, fp32] = KL(dropped)

The token-embedding table (tied to the LM head) is a planned part too, stored at every
bitwidth (runtime/store.py, the pseudo-layer after the last): with every layer in fp32 and
only the table at b bits (the embedding lookups and the LM head both read it), KL(b) is
measured on the same texts and positions. The table cannot be dropped, so only the
differences between its bitwidths matter:

    importance[table, b] = max(0, KL(lowest stored bitwidth) - KL(b))

(0 at the lowest). It is the profile's `head:` block, beside a `decoder:` block with what a
decoding plan needs of the shape (context, head_dim, q_per_kv, kv_kind...) and of the
runtime (workspace_bytes: its schemes' buffers, the same for every plan).

Text: the first `texts` tweets of the calibration split (runtime/sources/task.py), each cut
to `max_tokens` tokens, in batches; evaluation reads the test split, so the two never
overlap. Speed: the full model's input to every layer is computed once per batch and kept;
a change in layer l runs from its kept input through layers l.. and the LM head. Resumable
like the encoder's profile: measurements are appended to a JSON-lines cache keyed by the
store's build and the token sequences, and a rerun measures only what is missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from runtime.families import family
from runtime.profiling.profile import DROP, MeasurementCache
from runtime.schemes.base import FP32
from runtime.store import TABLE, ShardStore

PROFILE_VERSION = 1
TEXTS = 16  # calibration tweets profiled by default
MAX_TOKENS = 32  # each cut to this many tokens
BATCH = 8


@dataclass(frozen=True)
class KLMeasurement:
    layer: int
    shard: str
    variant: int  # DROP, or bits
    kl: float  # mean KL(full || changed) over the scored positions, nats
    top1: float  # share of scored positions whose most likely next token is the full model's

    def key(self) -> tuple[int, str, int]:
        return self.layer, self.shard, self.variant


def token_batches(store: ShardStore, texts: list[str], max_tokens: int, batch: int
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids [B, n], mask [B, n]) right-padded, each text cut to `max_tokens` tokens; texts
    of fewer than two tokens (nothing to predict) are left out."""
    tok = store.text_tokenizer()
    pad = next(i for i in (store.config.pad_id, store.config.eos_id, 0) if i is not None)
    seqs = [ids[:max_tokens] for ids in (tok.encode(t).ids for t in texts) if len(ids) >= 2]
    out = []
    for i in range(0, len(seqs), batch):
        part = seqs[i:i + batch]
        n = max(map(len, part))
        ids = torch.full((len(part), n), pad, dtype=torch.int64)
        mask = torch.zeros(len(part), n, dtype=torch.bool)
        for j, s in enumerate(part):
            ids[j, :len(s)], mask[j, :len(s)] = torch.tensor(s), True
        out.append((ids, mask))
    return out


def scored(mask: torch.Tensor) -> torch.Tensor:
    """The positions whose next token is real (teacher forcing predicts it): [B, n] bool."""
    out = torch.zeros_like(mask)
    out[:, :-1] = mask[:, :-1] & mask[:, 1:]
    return out


class DecoderProfiler:
    """The full fp32 decoder of a llama store, its kept per-layer inputs and reference
    log-probabilities on the profile's batches, and `measure` of one changed layer."""

    def __init__(self, store: ShardStore, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.store, self.batches = store, batches
        c = store.config
        n = max(ids.shape[1] for ids, _ in batches)
        self.dec = store.decoder(context=n)
        self.full = list(self.dec.layers)
        self.inputs: list[list[torch.Tensor]] = []
        self.ref: list[torch.Tensor] = []  # log-probs at the scored positions
        self.positions = 0
        with torch.inference_mode():
            for ids, mask in batches:
                rec: list[torch.Tensor] = []
                h = self.dec.teacher_forced(ids, mask, record=rec)
                self.inputs.append(rec)
                self.ref.append(F.log_softmax(self.dec.logits(h[scored(mask)]), dim=-1))
                self.positions += int(scored(mask).sum())
        self._fp32: dict[str, torch.Tensor] = {}
        self._layer = -1
        self.config = c
        self.table = self.dec.r["embed"]  # resident.bin's fp32 table

    def _fp32_of(self, l: int, name: str) -> torch.Tensor:
        """Layer l's shard in fp32 (the layer's shards are kept while it is profiled)."""
        if self._layer != l:
            self._fp32, self._layer = {}, l
        if name not in self._fp32:
            self._fp32[name] = self.store.load(l, name, FP32)[0]
        return self._fp32[name]

    def layer_with(self, l: int, changes: dict[str, int],
                   loaded: dict[str, torch.Tensor] | None = None):
        """Layer l with these shards changed (DROP, or bits) and the rest in fp32 (`loaded`:
        changed shards' weights already read, by name)."""
        c = self.config
        names = [n for n in c.shard_names() if changes.get(n, FP32) != DROP]
        w = family(c.family).layer_weights(c, names)
        loaded = loaded or {}
        for n in names:
            bits = changes.get(n, FP32)
            if bits == FP32:
                w.put(n, self._fp32_of(l, n))
            else:
                w.put(n, loaded[n] if n in loaded else self.store.load(l, n, bits)[0])
        return w

    @torch.inference_mode()
    def score(self, layers: list, start: int = 0, *, embed: bool = False
              ) -> tuple[float, float]:
        """(mean KL to the full model, top-1 agreement) of the model with these layers,
        every batch run from layer `start`'s kept input (`embed`: from the token ids, through
        the decoder's current embedding table)."""
        self.dec.layers = layers
        kl = agree = 0.0
        try:
            for (ids, mask), rec, ref in zip(self.batches, self.inputs, self.ref):
                h = self.dec.teacher_forced(ids, mask, start=start,
                                            x=None if embed else rec[start])
                logp = F.log_softmax(self.dec.logits(h[scored(mask)]), dim=-1)
                kl += float((ref.exp() * (ref - logp)).sum())
                agree += float((ref.argmax(-1) == logp.argmax(-1)).sum())
        finally:
            self.dec.layers = self.full
        return kl / self.positions, agree / self.positions

    def measure(self, l: int, shard: str, variant: int) -> KLMeasurement:
        loaded = {}
        if variant not in (DROP, FP32):
            loaded[shard] = self.store.load(l, shard, variant)[0]
            if torch.equal(loaded[shard], self._fp32_of(l, shard)):
                # its weights are fp32's bit for bit (a source already quantised on this
                # grid: a GGUF's Q4_1 layers in the group scheme): the full model
                return KLMeasurement(l, shard, variant, 0.0, 1.0)
        layers = list(self.full)
        layers[l] = self.layer_with(l, {shard: variant}, loaded)
        return KLMeasurement(l, shard, variant, *self.score(layers, start=l))

    def measure_table(self, bits: int) -> KLMeasurement:
        """Every layer fp32, only the embedding table (and the tied LM head) at `bits`, the
        store's variant decoded: keyed as the store keys it (layer = config.layers)."""
        self.dec.set_table(self.store.load_table(bits))
        try:
            return KLMeasurement(self.config.layers, TABLE, bits,
                                 *self.score(self.full, embed=True))
        finally:
            self.dec.set_table(self.table)


def inputs_digest(store: ShardStore, batches) -> str:
    h = hashlib.sha256(json.dumps(store.index.build, sort_keys=True).encode())
    h.update(json.dumps(store.index.data["config"], sort_keys=True).encode())
    for ids, mask in batches:
        h.update(ids.numpy().tobytes())
        h.update(mask.numpy().tobytes())
    h.update(f"decoder-profile/{PROFILE_VERSION}".encode())
    return h.hexdigest()


def run_decoder_profile(store: ShardStore, cache_path: Path, *, texts: list[str],
                        max_tokens: int = MAX_TOKENS, batch: int = BATCH,
                        log: Callable[[str], None] = lambda s: None
                        ) -> tuple[dict, DecoderProfiler]:
    """Every (layer, shard, variant) measured (or read from the cache): the measurements by
    key, and the profiler (its positions, batches)."""
    from tqdm import tqdm

    batches = token_batches(store, texts, max_tokens, batch)
    if not batches:
        raise ValueError("no text of two or more tokens to profile on")
    cache = MeasurementCache(cache_path, inputs_digest(store, batches), KLMeasurement)
    c = store.config
    variants = [DROP] + [b for b in store.bitwidths if b != FP32]
    todo = [(l, s, v) for l in range(c.layers) for s in c.shard_names() for v in variants
            if (l, s, v) not in cache.items]
    log(f"{len(cache.items)} measurements cached, {len(todo)} to measure")
    profiler = DecoderProfiler(store, batches)
    for key in tqdm(todo, desc="decoder profile", unit="variant", disable=not todo):
        cache.add(profiler.measure(*key))
    return cache.items, profiler


def head_cache_path(cache_dir: str | Path) -> Path:
    """The table's measurements: their own cache (beside the layers', with the same key), so
    that measuring one never invalidates the other."""
    return Path(cache_dir) / "decoder-head-measurements.jsonl"


def run_head_profile(profiler: DecoderProfiler, cache_path: Path,
                     log: Callable[[str], None] = lambda s: None) -> dict[int, KLMeasurement]:
    """The embedding table at every stored bitwidth (or read from the cache), by bits."""
    store = profiler.store
    cache = MeasurementCache(cache_path, inputs_digest(store, profiler.batches), KLMeasurement)
    todo = [b for b in store.bitwidths if (store.config.layers, TABLE, b) not in cache.items]
    log(f"embedding table: {len(store.bitwidths) - len(todo)} bitwidths cached, "
        f"{len(todo)} to measure")
    for b in todo:
        cache.add(profiler.measure_table(b))
    return {m.variant: m for m in cache.items.values()}


def importance(ms: dict, l: int, shard: str, bits: tuple[int, ...]) -> list[float]:
    """Per stored bitwidth: max(0, KL(dropped) - KL(b)); fp32: KL(dropped)."""
    drop = ms[l, shard, DROP].kl
    return [drop if b == FP32 else max(0.0, drop - ms[l, shard, b].kl) for b in bits]


def additivity(profiler: DecoderProfiler, ms: dict, *, models: int = 12, seed: int = 0
               ) -> dict:
    """Does the sum of single-shard KLs predict a submodel's KL? `models` random submodels
    (each shard of each layer dropped, kept at a random stored bitwidth or in fp32, with
    random rates per model) are run whole; their measured KL against the additive
    prediction Σ KL(single change), by Spearman rank correlation (scipy)."""
    import numpy as np
    import scipy.stats

    store, c = profiler.store, profiler.config
    rng = np.random.default_rng(seed)
    quantised = [b for b in store.bitwidths if b != FP32]
    predicted, measured = [], []
    for _ in range(models):
        drop, quant = rng.uniform(0.0, 0.3), rng.uniform(0.0, 0.8)
        changes = [{} for _ in range(c.layers)]
        for l in range(c.layers):
            for s in c.shard_names():
                u = rng.uniform()
                if u < drop:
                    changes[l][s] = DROP
                elif u < drop + quant:
                    changes[l][s] = int(rng.choice(quantised))
        predicted.append(sum(ms[l, s, v].kl for l in range(c.layers)
                             for s, v in changes[l].items()))
        layers = [profiler.layer_with(l, changes[l]) if changes[l] else profiler.full[l]
                  for l in range(c.layers)]
        measured.append(profiler.score(layers)[0])
    rho = scipy.stats.spearmanr(predicted, measured).statistic
    return {"models": models, "seed": seed, "spearman": float(rho),
            "predicted_kl": [round(p, 6) for p in predicted],
            "measured_kl": [round(m, 6) for m in measured]}


IMPORTANCE_METRIC = (
    "importance[b] = max(0, KL(dropped) - KL(b bits)), one shard changed at a time, all "
    "others fp32; KL = mean over the scored positions of KL(p_full || p_changed) of the next "
    "token, teacher-forced (nats)")
HEAD_METRIC = (
    "; head (the token-embedding table, tied to the LM head; it cannot be dropped): "
    "importance[b] = max(0, KL(lowest stored bitwidth) - KL(b bits)) with every layer fp32 "
    "and only the table at b bits, on the same texts and positions (only the differences "
    "between its bitwidths matter; 0 at the lowest)")


def head_importance(head: dict[int, KLMeasurement], bits: tuple[int, ...]) -> list[float]:
    """Per stored bitwidth: max(0, KL(lowest stored bitwidth) - KL(b))."""
    low = head[bits[0]].kl
    return [max(0.0, low - head[b].kl) for b in bits]


def head_blocks(store: ShardStore, head: dict[int, KLMeasurement]) -> dict:
    """The profile's `head:` (the table as a Shard: flops and weights of the LM head for one
    token, its stored bytes and importance per bitwidth) and `decoder:` blocks (the shape,
    and the bytes of the buffers the decode executor's schemes need whatever a plan picks:
    runtime.decode_layers.workspace_bytes)."""
    from runtime.decode_layers import decoder_shape, workspace_bytes

    c = store.config
    bits = tuple(store.bitwidths)
    return {"decoder": dataclasses.asdict(decoder_shape(c, workspace_bytes(store))),
            "head": {"name": TABLE, "kind": "head", "flops": 2 * c.vocab * c.hidden,
                     "weights": c.vocab * c.hidden,
                     "bytes": [store.table_variant(b).nbytes for b in bits],
                     "importance": [float(f"{v:.6g}") for v in head_importance(head, bits)]}}


def with_head(data: dict, blocks: dict) -> dict:
    """The profile `data` with the `decoder:` and `head:` blocks (replaced if there) before
    its layers, and the head's rule in its importance_metric."""
    out = {k: v for k, v in data.items() if k not in ("decoder", "head", "layers")}
    metric = out.get("importance_metric", IMPORTANCE_METRIC).split(HEAD_METRIC)[0]
    out["importance_metric"] = metric + HEAD_METRIC
    return {**out, **blocks, "layers": data["layers"]}


def profile_dict(store: ShardStore, ms: dict, profiler: DecoderProfiler, texts: int,
                 max_tokens: int, additive: dict | None, runtime: dict | None,
                 head: dict[int, KLMeasurement] | None = None) -> dict:
    """The measured profile of a llama store, as the planner's model profile YAML holds it:
    per layer its KV groups and FFN slices, each with its stored bytes per bitwidth, its
    weights, its flops for one token and its importance (KL, nats); with `head` (the
    table's measurements by bits), the `head:` and `decoder:` blocks."""
    c = store.config
    bits = tuple(store.bitwidths)
    layers = []
    for l in range(c.layers):
        shards = []
        for n in c.shard_names():
            kind, _ = c.parse(n)
            rows = c.shard_rows(n)
            shards.append({"name": n, "kind": kind, "flops": 2 * rows * c.hidden,
                           "weights": rows * c.hidden,
                           "bytes": [store.variant(l, n, b).nbytes for b in bits],
                           "importance": [float(f"{v:.6g}") for v in importance(ms, l, n, bits)]})
        layers.append({"shards": shards})
    text = (f"{texts} calibration tweets (runtime/sources/task.py), each cut to {max_tokens} "
            f"tokens: {profiler.positions} scored positions")
    out = {"name": store.model,
           "description": f"{store.model} (llama, {c.layers} layers), measured: bytes as "
                          f"stored by `elasticplan shard`, importance from `elasticplan "
                          f"profile` on {text}"
                          + (f"; additivity: Spearman {additive['spearman']:.3f} over "
                             f"{additive['models']} random submodels" if additive else ""),
           "architecture": {"family": "llama", **{k: v for k, v in c.to_dict().items()
                                                 if k != "family"}},
           "synthetic": False,
           "importance_metric": IMPORTANCE_METRIC,
           "seq_len": max_tokens, "bitwidths": list(bits),
           "resident_bytes": store.resident_bytes}
    schemes = {b: store.scheme_of(b) for b in bits if b != FP32}
    from runtime.schemes import DEFAULT_NAME

    if set(schemes.values()) != {DEFAULT_NAME}:
        out["quantisation"] = schemes
    if runtime:
        out["runtime"] = runtime
    out["layers"] = layers
    return with_head(out, head_blocks(store, head)) if head is not None else out


HEADER = ("Generated by `elasticplan profile` from the shard store and measured importance: "
          "do not edit by hand.")


def write_profile(out: Path, data: dict) -> None:
    """The profile YAML (a temporary file, renamed), checked first as the planner's loader
    reads it."""
    from elasticplan.problem.loader import write_model_profile

    write_model_profile(out, data, HEADER)


def _records(ms) -> list[dict]:
    return [dataclasses.asdict(m) for m in sorted(ms, key=lambda m: m.key())]


def profile_decoder(store_path: str | Path, out: str | Path, *, cache_dir: str | Path,
                    texts: int = TEXTS, max_tokens: int = MAX_TOKENS, models: int = 12,
                    link: bool = True, log: Callable[[str], None] = print) -> dict:
    """`elasticplan profile` for a llama store: measure what the caches lack (every shard
    variant, and the embedding table at every bitwidth), check additivity on random
    submodels, write the profile YAML and every measurement as JSON beside it. Returns the
    additivity figures."""
    import os

    from elasticplan.problem.outputs import write_text
    from runtime.profiling.profile import measurements_path
    from runtime.sources.task import load_splits

    store = ShardStore(store_path)
    store.table_variant(FP32)  # a store without the table stops here, before any measuring
    out = Path(out)
    cal = load_splits().calibration
    ms, profiler = run_decoder_profile(store, Path(cache_dir) / "decoder-measurements.jsonl",
                                       texts=list(cal.texts[:texts]), max_tokens=max_tokens,
                                       log=log)
    head = run_head_profile(profiler, head_cache_path(cache_dir), log)
    additive = additivity(profiler, ms, models=models) if models else None
    runtime = {"store": os.path.relpath(store.path.resolve(), out.resolve().parent)} \
        if link else None
    data = profile_dict(store, ms, profiler, texts, max_tokens, additive, runtime, head)
    write_profile(out, data)
    raw = {"text": {"split": "calibration", "texts": texts, "max_tokens": max_tokens,
                    "positions": profiler.positions, "digest": cal.digest()},
           "additivity": additive,
           "measurements": _records(ms.values()),
           "head_measurements": _records(head.values())}
    write_text(measurements_path(out), json.dumps(raw, indent=0, allow_nan=False) + "\n")
    log(f"wrote {out} and {measurements_path(out)}"
        + (f"; additivity Spearman {additive['spearman']:.3f}" if additive else ""))
    return additive or {}


def profile_decoder_head(store_path: str | Path, profile: str | Path, *,
                         cache_dir: str | Path, texts: int | None = None,
                         max_tokens: int | None = None,
                         log: Callable[[str], None] = print) -> dict[int, KLMeasurement]:
    """`elasticplan profile --head-only`: measure only the embedding table (every layer
    fp32) on the texts an existing profile of this store was measured on (its
    .measurements.json says which: `texts`/`max_tokens`, when given, must agree), and add
    the `head:` and `decoder:` blocks to it and the table's measurements to its
    .measurements.json; the layers' importance is kept as it is. Returns the table's
    measurements by bits."""
    from elasticplan.errors import InvalidArgument
    from elasticplan.problem.inputs import load_json
    from elasticplan.problem.loader import read_yaml
    from elasticplan.problem.outputs import write_text
    from runtime.profiling.profile import measurements_path
    from runtime.sources.task import load_splits

    store = ShardStore(store_path)
    store.table_variant(FP32)
    out, c = Path(profile), store.config
    data = read_yaml(out)
    arch = {"family": c.family, **{k: v for k, v in c.to_dict().items() if k != "family"}}
    if not isinstance(data, dict) or data.get("name") != store.model or \
            data.get("bitwidths") != list(store.bitwidths) or \
            data.get("architecture") != arch or len(data.get("layers") or ()) != c.layers:
        raise InvalidArgument(f"{out}: not a profile of the store {store.path} (its name, "
                              f"bitwidths, architecture and layers must be the store's)")
    raw_path = measurements_path(out)
    raw = load_json(raw_path, what="profile measurements", limit=64 * 10**6,
                    error=InvalidArgument)
    text = raw.get("text") if isinstance(raw, dict) else None
    cal = load_splits().calibration
    if not isinstance(text, dict) or text.get("split") != "calibration" or \
            text.get("digest") != cal.digest():
        raise InvalidArgument(f"{raw_path}: does not record the calibration texts it was "
                              f"measured on (text: split, digest), or they have changed")
    for flag, given, key in (("--texts", texts, "texts"), ("--max-tokens", max_tokens,
                                                           "max_tokens")):
        if given is not None and given != text.get(key):
            raise InvalidArgument(f"{flag} {given}: the profile was measured with "
                                  f"{key} {text.get(key)}; the head is measured on the same")
    batches = token_batches(store, list(cal.texts[:text["texts"]]), text["max_tokens"], BATCH)
    profiler = DecoderProfiler(store, batches)
    if profiler.positions != text.get("positions"):
        raise InvalidArgument(f"{raw_path}: {text.get('positions')} scored positions, but "
                              f"the same texts give {profiler.positions} now")
    head = run_head_profile(profiler, head_cache_path(cache_dir), log)
    write_profile(out, with_head(data, head_blocks(store, head)))
    raw["head_measurements"] = _records(head.values())
    write_text(raw_path, json.dumps(raw, indent=0, allow_nan=False) + "\n")
    log(f"wrote the head and decoder blocks into {out} and the table's measurements into "
        f"{raw_path}")
    return head


EVAL_TEXTS = 64  # test tweets a decoder plan is evaluated on by default
EVAL_TOKENS = 48


@dataclass(frozen=True)
class DecoderEvaluation:
    """A decoder submodel against the full fp32 model on held-out text, teacher-forced:
    next-token KL (nats), top-1 agreement and perplexity, each with its standard error
    (over texts: a text's positions are not independent), and the full model's perplexity."""

    texts: int
    positions: int
    kl: float
    kl_stderr: float
    top1: float
    top1_stderr: float
    perplexity: float
    perplexity_stderr: float
    fp32_perplexity: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@torch.inference_mode()
def evaluate_bits(store: ShardStore, bits: list[dict[str, int]], texts: list[str], *,
                  max_tokens: int = EVAL_TOKENS, batch: int = BATCH,
                  table_bits: int | None = None) -> DecoderEvaluation:
    """The submodel with, per layer, these shards at these bitwidths (absent: dropped)
    and the embedding table at `table_bits` (None: fp32), against the full model, on
    `texts` (each cut to `max_tokens` tokens)."""
    import numpy as np

    batches = token_batches(store, texts, max_tokens, batch)
    if not batches:
        raise ValueError("no text of two or more tokens to evaluate on")
    n = max(ids.shape[1] for ids, _ in batches)
    full, sub = store.decoder(context=n), store.decoder(bits, context=n, table_bits=table_bits)
    kl, agree, nll, nll_full, count = [], [], [], [], []
    for ids, mask in batches:
        s = scored(mask)
        ref = F.log_softmax(full.logits(full.teacher_forced(ids, mask)), dim=-1)
        got = F.log_softmax(sub.logits(sub.teacher_forced(ids, mask)), dim=-1)
        nxt = torch.zeros_like(ids)
        nxt[:, :-1] = ids[:, 1:]
        per_kl = (ref.exp() * (ref - got)).sum(-1)
        per_agree = (ref.argmax(-1) == got.argmax(-1)).float()
        per_nll = -got.gather(-1, nxt[..., None])[..., 0]
        per_nll_full = -ref.gather(-1, nxt[..., None])[..., 0]
        for i in range(ids.shape[0]):
            m = s[i]
            kl.append(float(per_kl[i][m].mean()))
            agree.append(float(per_agree[i][m].mean()))
            nll.append(float(per_nll[i][m].mean()))
            nll_full.append(float(per_nll_full[i][m].mean()))
            count.append(int(m.sum()))

    def mean_se(values):  # a text's mean, weighted by its positions
        v, w = np.asarray(values), np.asarray(count, dtype=float)
        mean = float(np.average(v, weights=w))
        se = float(np.sqrt(np.average((v - mean) ** 2, weights=w) / max(1, len(v) - 1)))
        return mean, se

    (k, k_se), (t, t_se), (h, h_se) = mean_se(kl), mean_se(agree), mean_se(nll)
    return DecoderEvaluation(texts=len(count), positions=sum(count), kl=k, kl_stderr=k_se,
                             top1=t, top1_stderr=t_se, perplexity=float(np.exp(h)),
                             perplexity_stderr=float(np.exp(h) * h_se),
                             fp32_perplexity=float(np.exp(mean_se(nll_full)[0])))
