"""The problem as frozen, typed data.

Built only by elasticplan.problem.loader (from YAML) or by tests/generators that go
through the same validating constructors. Units are in the field names:
MB = 10**6 bytes, GB/s = 10**9 bytes per second, GFLOP/s = 10**9 flop/s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from elasticplan.errors import SpecError
from elasticplan.problem.limits import bytes_of_mb
from elasticplan.problem.question import READ_THROUGH, Question

FULL_PRECISION_BITS = 32

# A quantisation scheme's name, as a profile records it per bitwidth: the planner carries it
# as a label; the runtime's scheme registry (runtime/schemes) says which names exist and
# refuses a store kept in another scheme than its profile was measured on.
SCHEME_NAME = r"[a-z][a-z0-9_-]{0,31}"


@dataclass(frozen=True)
class Device:
    """A device's storage and compute (docs/formats.md, "Device"). The compute terms of a
    layer that runs: layer_overhead_ms + per shard (shard_overhead_ms + flops / gflops
    + for a quantised shard its stored bytes / dequant_gb_s and its weights x
    dequant_ns_per_weight[bits]); per query, embed_ms before the first layer computes and
    pool_ms after the last; a layer whose compute waits for its reads starts wake_ms
    after they end (the compute thread's wake-up); and a streamed shard's compute costs
    stream_ms_per_mb more per MB of its stored bytes than the same shard preloaded (weights
    just read into the IO ring, cold in the caches; docs/design.md, "Contention"), and
    contention_ms_per_mb more per MB when its reads run beside compute (a pipelined plan
    with a window of at least one layer: the IO thread's copies share the memory system
    with the compute thread; calibrate fits it per MB read while a layer computes, the
    cost model charges it to the shard's own layer, so that a pass pays it once per byte
    it streams), and contention_ms_per_read more per read request it makes there (the IO
    thread's time on a read has a part per request as well as per byte; measured: what
    slows the compute is the time the IO thread spends reading, about a third of it, so a
    plan of many small reads pays more per MB than one of few large ones). A replay that
    places the reads in time (under a kernel throttle's steps: costmodel.simulate's
    `steps`) prices contention where it happens instead: contention_share of each ms the
    IO thread reads beside a layer's compute, added to that compute (0: that replay keeps
    the per-MB and per-read terms). The terms a device file leaves out are 0 (None: no
    per-byte dequantisation term)."""

    name: str
    bandwidth_mb_s: float  # sequential read bandwidth of the storage
    latency_us: float  # fixed cost of each read request
    gflops: float  # effective throughput for shard math
    layer_overhead_ms: float  # fixed compute per executed layer (norms, residuals, biases)
    dequant_gb_s: float | None  # dequantisation throughput, on stored bytes of quantised shards
    memory_mb: float  # memory the app may use (every term of a plan's predicted peak)
    shard_overhead_ms: float = 0.0  # fixed compute per executed shard
    dequant_ns_per_weight: tuple[tuple[int, float], ...] = ()  # (bits, ns per weight), sorted
    embed_ms: float = 0.0  # per query: the embedding lookup, before layer 0 computes
    pool_ms: float = 0.0  # per query: pooling, after the last layer
    wake_ms: float = 0.0  # a layer that waits for its reads starts computing this long after
    stream_ms_per_mb: float = 0.0  # extra compute of a streamed shard, per MB it stores
    contention_ms_per_mb: float = 0.0  # more when its reads overlap compute (pipelined)
    contention_ms_per_read: float = 0.0  # ... and per read request it makes then
    # ms of compute added per ms the IO thread reads beside it (a timed replay's; < 1)
    contention_share: float = 0.0
    spread: "Spread | None" = None  # measured run-to-run spread per stage (calibrate)
    # (bits, ns per weight) of a shard multiplied by one vector (Shard.vector: a decoder's
    # pass of one position, its LM head) at the bitwidths the runtime computes from their
    # stored bytes without decoding them (runtime/schemes/groupmv.py); every other case
    # takes dequant_ns_per_weight
    vector_ns_per_weight: tuple[tuple[int, float], ...] = ()
    # the disk beneath a kernel throttle set to this storage (`calibrate --throttle`): what
    # `run --throttle` predicts its reads with, held to the throttle's steps
    # (elasticplan.costmodel.under_throttle); the planner prices the storage above
    disk: "Disk | None" = None

    def dequant_ns(self, bits: int) -> float | None:
        """ns per weight to dequantise a shard stored at `bits` (None: no per-weight term)."""
        for b, ns in self.dequant_ns_per_weight:
            if b == bits:
                return ns
        return None

    def weight_ns(self, bits: int, vector: bool) -> float | None:
        """ns per weight of a shard stored at `bits`: multiplied by one vector (`vector`,
        vector_ns_per_weight where the device gives it) or by a matrix (None: no term)."""
        for b, ns in self.vector_ns_per_weight if vector else ():
            if b == bits:
                return ns
        return self.dequant_ns(bits)


@dataclass(frozen=True)
class Disk:
    """The disk beneath a kernel block-IO throttle, as reads through the throttle delivered
    it (`calibrate --throttle`): per read and per MB, for what a slice's allowance admits at
    once (docs/runtime.md, "What the kernel's throttle is")."""

    bandwidth_mb_s: float
    latency_us: float


@dataclass(frozen=True)
class Spread:
    """Relative spread of each stage: the root mean square of log(measured / predicted) over
    the calibration runs, each predicted out of sample (model error and run-to-run noise
    together), and how many runs it was measured on."""

    io: float
    compute: float
    runs: int


@dataclass(frozen=True)
class Shard:
    name: str
    kind: str  # e.g. "head" or "ffn"; informational, used by the greedy baseline's ordering
    flops: float  # flop to run this shard at the profile's seq_len
    bytes: tuple[int, ...]  # stored size per bitwidth, aligned with ModelProfile.bitwidths
    importance: tuple[float, ...]  # importance per bitwidth; a dropped shard contributes 0
    weights: int | None = None  # weight elements (what dequantisation works on); None: unknown
    # Memory held while the shard is kept, wherever its weights live (a decoder's KV group:
    # its part of the KV cache at the question's context; elasticplan.decoding). 0: none.
    kept_bytes: int = 0
    # Streamed in `pieces` pieces of its `rows` rows (ceil(rows / pieces) rows each, the
    # last the rest), each computed as soon as it is in, two in the IO ring at once (a
    # decoder's table in a pass model: spec.pass_model; elasticplan.costmodel). 1: whole.
    pieces: int = 1
    rows: int = 0
    # Multiplied by one vector in its pass (a decoder's pass of one position, and its LM
    # head, which runs for the last position: spec.pass_model): its weights are priced by
    # the device's vector_ns_per_weight (Device.weight_ns). False: by a matrix.
    vector: bool = False

    def piece_bytes(self, bit: int) -> int:
        """Stored bytes of one (full) piece at bitwidth index `bit`: its rows' share."""
        if self.pieces == 1:
            return self.bytes[bit]
        return -(-self.rows // self.pieces) * (self.bytes[bit] // self.rows)

    def ring_bytes(self, bit: int) -> int:
        """What the shard holds of the IO ring while it is streamed: all of it, or two
        pieces (the one computing, the next one read)."""
        return self.bytes[bit] if self.pieces == 1 else min(self.bytes[bit],
                                                            2 * self.piece_bytes(bit))


@dataclass(frozen=True)
class Layer:
    shards: tuple[Shard, ...]

    def shard_index(self, name: str) -> int | None:
        for i, s in enumerate(self.shards):
            if s.name == name:
                return i
        return None


# A streamed table is read in pieces of at most this many rows (DecoderShape's default),
# each piece's logits computed as soon as it is in (Shard.pieces): two pieces in the IO
# ring instead of the whole table. 4096 rows of SmolLM2's 8-bit table are 2.65 MB: 12
# pieces, 24 reads (codes and side data per piece).
HEAD_PIECE_ROWS = 4096


@dataclass(frozen=True)
class DecoderShape:
    """What a decoder's profile says of its shape beyond its shards (the `decoder` block,
    docs/formats.md): enough to price a pass over any number of tokens, its activations
    and its KV cache (elasticplan.decoding). Shards of kind `kv_kind` are KV groups:
    q_per_kv query heads sharing one K/V head, each attending over every earlier position.
    `workspace_bytes` is the runtime's: the buffers its quantisation schemes need whatever
    a plan picks (runtime.decode_layers.decode_buffers: the dequantisation workspace and
    the bounce buffer, sized for the largest variant the store holds)."""

    context: int  # the longest context the model takes (prompt + answer)
    hidden: int
    ffn: int
    ffn_slices: int  # FFN slices per layer (an FFN shard is ffn / ffn_slices units wide)
    heads: int  # query heads
    head_dim: int
    q_per_kv: int  # query heads per KV head (per KV group)
    vocab: int
    workspace_bytes: int  # the runtime's scheme buffers, the same for every plan
    kv_kind: str = "group"
    table_piece_rows: int = HEAD_PIECE_ROWS  # a streamed table's rows per piece, at most

    @property
    def ffn_slice(self) -> int:
        return self.ffn // self.ffn_slices


@dataclass(frozen=True)
class ModelProfile:
    name: str
    seq_len: int
    bitwidths: tuple[int, ...]  # strictly increasing; 32 means full precision (no dequantisation)
    layers: tuple[Layer, ...]
    resident_bytes: int = 0  # always-resident weights (norms, biases, embeddings not in a table)
    synthetic: bool = False  # importance values are synthetic, not measured
    # Memory terms that do not depend on the shards chosen (docs/design.md, "Memory"):
    embedding_rows: int = 0  # token-embedding table in the shard store (0: none, all resident)
    embedding_row_bytes: int = 0  # stored bytes of one row of it
    embedding_row_reads: int = 1  # read requests per row (a decoder's quantised table: 2)
    # Rows one query reads from a streamed table: one per distinct token, at most this many
    # (the question's query_tokens); None: seq_len.
    query_rows: int | None = None
    activation_bytes: int = 0  # the encoder's activations at seq_len, batch 1
    scratch_bytes: int = 0  # compute scratch: one shard at full precision
    # Where the runtime finds the model (a measured profile of a user's checkpoint says;
    # absolute paths, or None: the packaged MiniLM's defaults). Not part of the program.
    store_path: str | None = None
    task_head_path: str | None = None
    # The quantisation scheme each bitwidth was measured in ((bits, "dict"), ...; absent:
    # "uniform"): the runtime refuses a store that keeps a bitwidth another way.
    schemes: tuple[tuple[int, str], ...] = ()
    # A decoder (elasticplan.decoding): its shape, and its tied embedding / LM-head table as
    # one planned part (a Shard: bytes and importance per bitwidth, flops per token). A
    # decoder's shard flops are per token. None for an encoder.
    decoder: DecoderShape | None = None
    head: Shard | None = None
    # Set on a model made for one of a decoder's passes (elasticplan.decoding.pass_model):
    # its name ("prefill", "step7"); None for a profile as loaded.
    decode_pass: str | None = None

    @property
    def embedding_table_bytes(self) -> int:
        return self.embedding_rows * self.embedding_row_bytes

    @property
    def query_row_reads(self) -> int:
        """Rows one query reads from a streamed table (the most it is priced for)."""
        return self.seq_len if self.query_rows is None else min(self.query_rows, self.seq_len)

    @property
    def embedding_query_bytes(self) -> int:
        """Bytes of the rows one query reads when the table is streamed (one per token)."""
        return self.seq_len * self.embedding_row_bytes if self.embedding_rows else 0

    def bit_index(self, bits: int) -> int | None:
        try:
            return self.bitwidths.index(bits)
        except ValueError:
            return None

    @property
    def max_importance(self) -> float:
        """The largest importance of any shard at any bitwidth (0 for an all-zero profile)."""
        return max((max(s.importance) for layer in self.layers for s in layer.shards),
                   default=0.0)

    @property
    def n_shards(self) -> int:
        return sum(len(layer.shards) for layer in self.layers)

    @property
    def fixed_memory_bytes(self) -> int:
        """What every plan holds whatever it chooses: resident weights, activations, compute
        scratch, and the embedding table or, streamed, one query's rows of it (the less)."""
        table = min(self.embedding_table_bytes, self.embedding_query_bytes) \
            if self.embedding_rows else 0
        return self.resident_bytes + self.activation_bytes + self.scratch_bytes + table


@dataclass(frozen=True)
class TimedPass:
    """A pass a question bounds besides its planned model's (Scenario.timed_passes): its
    model (one decoder pass's, elasticplan.problem.spec.pass_model) and its target. When
    the model has embedding rows, they are read before its first layer exactly when the
    last layer (a decoder's table) is streamed."""

    name: str
    model: "ModelProfile"
    target_ms: float


@dataclass(frozen=True)
class Scenario:
    """A device + a model + the question asked of them (elasticplan.problem.question).
    `content_hash` covers the device, model and scenario contents as loaded (not the file
    bytes), so a plan can detect that its inputs changed. The question checks its own
    fields; construction checks how the question relates to the device and the model
    (SpecError naming `source` and the key), so every way of building one -- the loader,
    `with_overrides`, a test -- is checked alike. The question's fields read through:
    `scenario.target_latency_ms` is `scenario.question.target_latency_ms`."""

    name: str
    device: Device
    model: ModelProfile
    question: Question
    source: str | None = None  # path of the scenario file, if loaded from one
    content_hash: str = ""
    files: tuple[str, ...] = ()  # every file it was loaded from (no command may write onto them)
    # A decoder's question: the profile as loaded, while `model` is what the programs plan,
    # its last decode step (step_model, below); None otherwise. Set here.
    source_model: ModelProfile | None = None

    def __getattr__(self, name: str):
        # Only for the question's names (READ_THROUGH); anything else is a plain miss.
        # (Looked up only when normal lookup fails, so the dataclass fields are unaffected.)
        if name in READ_THROUGH:
            return getattr(self.question, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __post_init__(self) -> None:
        file = self.source
        if not isinstance(self.question, Question):
            raise SpecError(file, "", f"the question must be a Question, got {self.question!r}")
        q = self.question
        self._decoder(file, q)
        self._query_rows(file, q)
        if q.latency_quantile > 0.5 and self.device.spread is None:
            raise SpecError(file, "latency_quantile",
                            f"{q.latency_quantile:g} needs the run-to-run spread of device "
                            f"{self.device.name!r}, which its file does not give (`spread`: "
                            f"measure it with `elasticplan calibrate`), or latency_quantile 0.5")
        if q.memory_budget_mb is not None:
            if q.memory_budget_mb > self.device.memory_mb:
                raise SpecError(file, "memory_budget_mb",
                                f"{q.memory_budget_mb:g} MB exceeds the device's memory_mb "
                                f"{self.device.memory_mb:g}")
            fixed = self.model.fixed_memory_bytes
            if q.memory_budget_bytes < fixed:
                raise SpecError(file, "memory_budget_mb",
                                f"{q.memory_budget_mb:g} MB is below what every plan of model "
                                f"{self.model.name!r} holds: {fixed / 1e6:.6g} MB (resident "
                                f"weights, activations, compute scratch and the embedding "
                                f"rows)")
        cap_mb = self.memory_cap_bytes / 1e6
        if q.preload_budget_bytes > self.memory_cap_bytes:
            raise SpecError(file, "preload_budget_mb",
                            f"{q.preload_budget_mb:g} MB does not fit in the device's memory_mb "
                            f"{self.device.memory_mb:g} less the model's resident_bytes "
                            f"{self.model.resident_bytes / 1e6:g} MB ({cap_mb:g} MB left)")
        for li, layer in enumerate(self.model.layers):
            if q.min_shards_per_layer > len(layer.shards):
                raise SpecError(file, "min_shards_per_layer",
                                f"{q.min_shards_per_layer} exceeds the {len(layer.shards)} "
                                f"shards of layer {li} of model {self.model.name!r}")
        if self.device.dequant_ns_per_weight:
            # A per-weight dequantisation term must cover every quantised bitwidth and know
            # every shard's weights: else a plan would decode for free, silently.
            missing = [b for b in self.model.bitwidths
                       if b < FULL_PRECISION_BITS and self.device.dequant_ns(b) is None]
            if missing:
                raise SpecError(file, "device.compute.dequant_ns_per_weight",
                                f"device {self.device.name!r} has no dequantisation cost for "
                                f"{', '.join(map(str, missing))} bits, which model "
                                f"{self.model.name!r} stores (calibrate the device on a store "
                                f"with these bitwidths, or give them)")
            for li, layer in enumerate(self.model.layers):
                for si, s in enumerate(layer.shards):
                    if s.weights is None:
                        raise SpecError(file, f"model.layers[{li}].shards[{si}].weights",
                                        f"model {self.model.name!r} does not give its shards' "
                                        f"weights, which device {self.device.name!r}'s "
                                        f"dequant_ns_per_weight needs (regenerate the profile)")

    def _query_rows(self, file: str | None, q: Question) -> None:
        """An encoder's question prices a streamed table's reads at its query_tokens: the
        model carries them (ModelProfile.query_rows), for every program and the runtime."""
        if q.decoding or self.model.query_rows == q.query_tokens:
            return
        if q.query_tokens is not None and q.query_tokens > self.model.seq_len:
            raise SpecError(file, "query_tokens",
                            f"{q.query_tokens} exceeds model {self.model.name!r}'s seq_len "
                            f"{self.model.seq_len} (a query has at most seq_len tokens)")
        object.__setattr__(self, "model",
                           dataclasses.replace(self.model, query_rows=q.query_tokens))

    def _decoder(self, file: str | None, q: Question) -> None:
        """A decoder's question plans the model's last decode step (elasticplan.decoding):
        `model` becomes that step's model, `source_model` keeps the profile as loaded."""
        profile = self.source_model or self.model
        if profile.decode_pass is not None and q.decoding:
            raise ValueError(f"scenario {self.name!r}: a pass's model ({profile.decode_pass}) "
                             f"given as the profile; give the profile as loaded")
        if not q.decoding:
            if profile.decoder is not None and self.source_model is not None:
                object.__setattr__(self, "model", profile)
                object.__setattr__(self, "source_model", None)
            return
        if profile.decoder is None:
            raise SpecError(file, "prompt_tokens",
                            f"model {profile.name!r} is not a decoder (its profile has no "
                            f"`decoder` and `head` blocks): prompt_tokens and answer_tokens "
                            f"are a decoder's question")
        if q.context_tokens > profile.decoder.context:
            raise SpecError(file, "answer_tokens",
                            f"prompt_tokens + answer_tokens = {q.context_tokens} exceeds model "
                            f"{profile.name!r}'s context of {profile.decoder.context} tokens")
        if q.answer_tokens < 2:
            raise SpecError(file, "answer_tokens",
                            "must be at least 2 (the first answer token comes from the prompt "
                            "pass; target_latency_ms is the time per token after it)")
        if q.min_shards_per_layer < 1:
            raise SpecError(file, "min_shards_per_layer",
                            "a decoder's question needs at least 1 (its LM head, the table, "
                            "is a layer of one part that must run)")
        object.__setattr__(self, "source_model", profile)
        object.__setattr__(self, "model", step_model(profile, q))

    @property
    def timed_passes(self) -> tuple["TimedPass", ...]:
        """The passes whose latency the question bounds besides `model`'s (a decoder's
        prompt pass, when it asks a time to first token): each with its own model, whose
        layers, shards and bitwidths are `model`'s (their flops differ)."""
        q = self.question
        if not q.decoding or q.target_ttft_ms is None:
            return ()
        return (TimedPass("time to first token",
                          pass_model(self.source_model, q, prefill_pass(q)), q.target_ttft_ms),)

    @property
    def memory_cap_bytes(self) -> int:
        """Most bytes the preload buffer may ever hold: the device memory less resident weights."""
        return max(0, bytes_of_mb(self.device.memory_mb) - self.model.resident_bytes)

    def with_overrides(self, **changes) -> "Scenario":
        """Same inputs, another question: the question's fields (target, budget, objective,
        floor...) and the scenario's own (device, model...) may be changed; checked again,
        errors naming the scenario's file."""
        asked = {k: changes.pop(k) for k in list(changes) if k in READ_THROUGH}
        if "model" in changes:  # a decoder's step model is made from the new one
            changes["source_model"] = None
        question = self.question
        if asked:
            try:
                question = question.replace(**asked)
            except SpecError as e:
                raise SpecError(self.source, e.key_path, e.message) from None
        return dataclasses.replace(self, question=question, **changes)


# --- a decoder's passes (docs/decoders.md, "Planning decoding") ---------------------
# A decoder's question is planned on its last decode step's model (Scenario._decoder);
# the passes' predictions are elasticplan.decoding's. The derivation lives here, with the
# data it derives from, because a Scenario makes its step model when it is made.
FP32 = 4  # bytes
# The LM head dequantises a quantised table this many rows at a time (the compute scratch
# holds them; the dequantisation workspace is sized for them: runtime/decode_layers.py).
HEAD_CHUNK_ROWS = 256


def head_chunk_rows(shape: DecoderShape) -> int:
    """Rows of the table the LM head takes at once."""
    return min(HEAD_CHUNK_ROWS, shape.vocab)


def head_pieces(shape: DecoderShape) -> int:
    """Pieces a streamed table is read in: its rows in pieces of at most
    table_piece_rows (ceil(vocab / pieces) rows each, the last the rest)."""
    return -(-shape.vocab // shape.table_piece_rows)


def table_reads(model: ModelProfile, bit: int) -> int:
    """Read requests for a run of a decoder table's rows at bitwidth index `bit`: fp32
    rows in one, a quantised table's codes and their side data (stored after every row's
    codes) in two."""
    return 1 if model.bitwidths[bit] == FULL_PRECISION_BITS else 2


def attention_flops(shape: DecoderShape, attended: int) -> float:
    """One KV group's attention over `attended` (query, key) position pairs: scores and
    the weighted sum of values, each 2 flops per multiply-add, for its q_per_kv heads."""
    return 4.0 * shape.q_per_kv * shape.head_dim * attended


def kv_group_bytes(shape: DecoderShape, context: int, kv_bits: int) -> int:
    """One layer's KV cache for one kept KV group: its K and V head at every position."""
    return 2 * shape.head_dim * context * kv_bits // 8


def activation_buffers(shape: DecoderShape, prompt: int, context: int,
                       chunk: int | None = None) -> dict[str, int]:
    """Bytes of each activation buffer the runtime holds for a decoder's passes over a prompt
    of up to `prompt` tokens computed `chunk` positions at a time (default: all at once)
    with a KV cache of `context` columns: exactly what runtime.decode_layers.DecodeWorkspace
    allocates, buffer by buffer (it checks so when it is made). fp32 unless said: the
    residual stream, its normed copy and the accumulator [prompt, hidden]; per chunk, one
    shard's projections [chunk, the wider of a KV group's (q_per_kv + 2) head_dim and an
    FFN slice's gate and up], the rotated queries, the rotation's temporary and the
    context vectors twice [q_per_kv, chunk, head_dim], the scores [q_per_kv, chunk x
    prompt, or a decode step's context], the causal mask (bool) [chunk, context]; the
    norm's [prompt]; the column indices (int64) [context]; the rotary tables [context,
    head_dim] twice; the final normed state [hidden] and the logits [vocab]."""
    n, m = prompt, prompt if chunk is None else min(chunk, prompt)
    d, hd, qk, T = shape.hidden, shape.head_dim, shape.q_per_kv, context
    heads = FP32 * qk * m * hd
    return {"x": FP32 * n * d, "h": FP32 * n * d, "acc": FP32 * n * d,
            "y": FP32 * m * max((qk + 2) * hd, 2 * shape.ffn_slice),
            "q": heads, "rot": heads, "ctx": heads, "ctx2": heads,
            "scores": FP32 * qk * max(m * n, T), "mask": m * T, "ms": FP32 * n,
            "col": 8 * T, "cos": FP32 * T * hd, "sin": FP32 * T * hd, "hn": FP32 * d,
            "logits": FP32 * shape.vocab}


def activation_bytes(shape: DecoderShape, prompt: int, context: int,
                     chunk: int | None = None) -> int:
    """The activations a decoder's runtime holds (activation_buffers, summed)."""
    return sum(activation_buffers(shape, prompt, context, chunk).values())


def table_bytes(shape: DecoderShape) -> int:
    """The fp32 embedding / LM-head table, which a decoder profile's resident_bytes hold."""
    return FP32 * shape.vocab * shape.hidden


@dataclass(frozen=True)
class DecodePass:
    """One pass of a decoder: `tokens` run through the layers, their attention over
    `attended` (query, key) pairs in all, `row_reads` embedding rows read first when the
    table is streamed."""

    name: str
    tokens: int
    attended: int
    row_reads: int


def prefill_pass(q: Question) -> DecodePass:
    p = q.prompt_tokens
    return DecodePass("prefill", p, p * (p + 1) // 2, p)


def last_step_pass(q: Question) -> DecodePass:
    return step_pass(q, q.answer_tokens - 1)


def step_pass(q: Question, j: int) -> DecodePass:
    """Decode step j (1..A-1): one token at position P + j - 1, attending P + j."""
    return DecodePass(f"step{j}", 1, q.prompt_tokens + j, 0)


def pass_model(profile: ModelProfile, q: Question, p: DecodePass) -> ModelProfile:
    """The model the cost model prices for pass `p` of question `q`: per-pass flops, the
    KV cache as KV groups' kept bytes, the table as a last pseudo-layer (its LM head runs
    for one position; streamed, it is read in head_pieces pieces), the prompt's rows as
    the streamable embedding rows. Its fixed memory terms are the decode executor's
    (runtime/decoding.py, docs/decoders.md "Memory"): resident, the profile's less the
    fp32 table; activations, the prompt pass's (activation_bytes) + the runtime's scheme
    buffers (workspace_bytes); scratch, the widest shard in fp32 or head_chunk_rows rows of
    the table."""
    shape, head = profile.decoder, profile.head
    if shape is None or head is None:
        raise ValueError(f"model {profile.name!r} is not a decoder (no decoder/head block)")
    kv = kv_group_bytes(shape, q.context_tokens, q.kv_cache_bits)
    layers = []
    for layer in profile.layers:
        shards = []
        for s in layer.shards:
            group = s.kind == shape.kv_kind
            flops = s.flops * p.tokens + (attention_flops(shape, p.attended) if group else 0.0)
            shards.append(dataclasses.replace(s, flops=flops, kept_bytes=kv if group else 0,
                                              vector=p.tokens == 1))
        layers.append(Layer(tuple(shards)))
    layers.append(Layer((dataclasses.replace(head, rows=shape.vocab, vector=True,
                                              pieces=head_pieces(shape)),)))
    full = profile.bit_index(FULL_PRECISION_BITS)
    widest = max((s.bytes[full] for layer in profile.layers for s in layer.shards),
                 default=0) if full is not None else profile.scratch_bytes
    return dataclasses.replace(
        profile, decode_pass=p.name, seq_len=p.tokens if p.row_reads else 1,
        layers=tuple(layers),
        resident_bytes=max(0, profile.resident_bytes - table_bytes(shape)),
        embedding_rows=shape.vocab if p.row_reads else 0,
        embedding_row_bytes=FP32 * shape.hidden if p.row_reads else 0,
        activation_bytes=activation_bytes(shape, q.prompt_tokens, q.context_tokens)
        + shape.workspace_bytes,
        scratch_bytes=max(widest, profile.scratch_bytes,
                          head_chunk_rows(shape) * shape.hidden * FP32))


def with_table_rows(model: ModelProfile, bit: int) -> ModelProfile:
    """A decoder pass's model whose embedding rows are its table's at bitwidth index `bit`
    (the last layer's one part), as the runtime reads them: an fp32 row in one read, a
    quantised row's codes and its scale (stored after every row's codes) in two."""
    head = model.layers[-1].shards[0]
    rows = model.decoder.vocab
    return dataclasses.replace(model, embedding_row_bytes=head.bytes[bit] // rows,
                               embedding_row_reads=table_reads(model, bit))


def step_model(profile: ModelProfile, q: Question) -> ModelProfile:
    """What the programs plan for a decoder's question: its last decode step."""
    return pass_model(profile, q, last_step_pass(q))


def head_layer(model: ModelProfile) -> int:
    """The table's pseudo-layer in a pass model: the last."""
    return len(model.layers) - 1
