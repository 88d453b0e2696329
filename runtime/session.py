"""A plan put to use: a session that encodes (and classifies) a user's own texts through the
executor that `elasticplan run` measures, within the plan's memory.

    from runtime.session import open_session

    with open_session("out/mem10.plan.json") as session:
        vectors = session.encode(["the bus is late again", "what a lovely morning"])
        print(session.stats().format())

Opening a session checks the plan as `run` does (`check_plan`: the verifier with the
scenario's hash, the model of the store, every planned shard's size), then builds one
`runtime.executor.Executor` (every buffer allocated once at its predicted size, each
planned shard checked against its checksum), fills its preload buffer and runs one
discarded warm-up. Each text is then one query of the plan's shape: tokenised, truncated
to the profile's `seq_len` and padded to it (the shape whose latency the plan predicts and
whose activations it counts), run, pooled and normalised as the model declares. The
session records each query's latency (arrival to pooled embedding) and the process's peak
memory above a baseline taken when it opened (as runtime/measurement/memprobe.py measures
it: a throwaway run of the plan first, then gc and malloc_trim, VmRSS as the baseline and
the peak reset through /proc/self/clear_refs); `stats()` sets both beside the plan's
prediction. `close()` (or leaving the `with` block) closes the store's files, drops every
buffer and restores torch's thread count. docs/session.md has the details.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from elasticplan.cli import MAX_THREADS
from elasticplan.errors import InvalidArgument, StoreError
from elasticplan.plans.plan import Plan
from elasticplan.plans.verify import scenario_for, verify_plan
from elasticplan.problem.inputs import not_unicode
from elasticplan.problem.spec import Scenario
from runtime.defaults import head_for, store_for
from runtime.executor import Executor, check_model, planned_variants
from runtime.families import family
from runtime.measurement.measure import query_schedules
from runtime.measurement.memprobe import release, status_bytes, trim
from runtime.sources.task import TaskHead
from runtime.store import ShardStore

WARMUP_TEXT = "a warm-up query, discarded"
LATENCY_WINDOW = 10_000  # the latencies kept for stats(): the last 10,000 queries' (80 KB)


@dataclass(frozen=True)
class CheckedPlan:
    """A plan checked against its scenario and store as `run` checks it, before anything is
    allocated: what a session runs, and every file it reads (no output may go onto them)."""

    plan: Plan
    plan_path: str
    scenario: Scenario
    store: ShardStore
    head: TaskHead | None
    head_path: str | None

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.plan_path, str(self.store.path),
                *([self.head_path] if self.head_path else []), *self.scenario.files)


def check_plan(plan_path: str | os.PathLike, *, scenario: str | os.PathLike | None = None,
               store: str | os.PathLike | None = None, head: str | os.PathLike | bool = True
               ) -> CheckedPlan:
    """Load the plan and its scenario (the path the plan records, or `scenario`), refuse a
    decoder's plan (InvalidArgument: use `generate`), find the store and the task head as
    `run` finds them (`store`, else the one the model profile names, else MiniLM's; `head`:
    True for the profile's, False for none, or a file), verify the plan (a stale or tampered
    plan stops here), and check that the store holds the plan's model with every planned
    shard at the size the profile claims (StoreError)."""
    plan = Plan.load(plan_path)
    sc = scenario_for(plan, scenario)
    if sc.question.decoding:
        raise InvalidArgument(f"{plan_path}: the plan answers a decoder's question (it "
                              f"generates token by token): use `elasticplan generate`")
    store_path = store_for(None if store is None else str(store), sc.model)
    head_path = head_for(str(head), sc.model) if not isinstance(head, bool) else \
        (head_for(None, sc.model) if head else None)
    verify_plan(sc, plan)
    shards = ShardStore(store_path)
    if family(shards.config.family).decoder:
        raise StoreError(f"{store_path}: the store holds a decoder; encode needs an "
                         f"encoder's plan and store (a decoder answers with `generate`)")
    check_model(plan, shards)
    planned_variants(plan, sc.model, shards)
    task_head = None
    if head_path is not None:
        task_head = TaskHead.load(head_path)
        task_head.check_width(shards.config.hidden, head_path, shards.path)
    return CheckedPlan(plan, str(plan_path), sc, shards, task_head, head_path)


@dataclass(frozen=True)
class Classification:
    """`Session.classify`'s answer: per text its label, the probability of every class (in
    `classes` order) and the embedding the head read."""

    labels: list[str]
    probabilities: np.ndarray  # [texts, classes] float32
    classes: tuple[str, ...]
    embeddings: np.ndarray  # [texts, hidden] float32


@dataclass(frozen=True)
class SessionStats:
    """A session's queries measured against its plan's prediction. Latencies are per query
    (arrival to pooled embedding, the figure the plan predicts), warm-up excluded, over the
    last LATENCY_WINDOW queries (a bounded record: a session may run for days); memory
    in bytes: the plan's predicted peak, the executor's own exact accounting of what it
    holds (its IO ring at the high-water mark of every query), and the process's peak above
    the baseline taken when the session opened (None when not measured)."""

    queries: int
    truncated: int  # texts longer than seq_len tokens, cut to seq_len
    seq_len: int
    latency_median_ms: float | None
    latency_p95_ms: float | None
    # the plan's prediction, or, when it streams the embedding table, the median of each
    # query's at the rows it read (one per distinct token; the plan's own, priced at its
    # query_tokens, is planned_latency_ms)
    predicted_latency_ms: float
    latency_quantile: float  # the quantile the plan was made for (0.5: the median)
    planned_quantile_latency_ms: float | None  # the plan's latency at that quantile
    predicted_peak_bytes: int
    measured_peak_bytes: int
    process_peak_bytes: int | None
    storage: str
    planned_latency_ms: float = 0.0

    @property
    def latency_error(self) -> float | None:
        """(measured median - predicted) / predicted."""
        if self.latency_median_ms is None or self.predicted_latency_ms <= 0:
            return None
        return (self.latency_median_ms - self.predicted_latency_ms) / self.predicted_latency_ms

    @property
    def process_error(self) -> float | None:
        """(process peak - predicted peak) / predicted peak."""
        if self.process_peak_bytes is None:
            return None
        return (self.process_peak_bytes - self.predicted_peak_bytes) / self.predicted_peak_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "latency_error": self.latency_error,
                "process_error": self.process_error}

    def format(self) -> str:
        """Two lines: latency per query and peak memory, each against the prediction."""
        if self.latency_median_ms is None:
            lat = f"latency per query: no queries yet; predicted {self.predicted_latency_ms:.2f} ms"
        else:
            lat = (f"latency per query ({self.queries} queries, {self.storage}): median "
                   f"{self.latency_median_ms:.2f} ms, p95 {self.latency_p95_ms:.2f} ms; "
                   f"predicted {self.predicted_latency_ms:.2f} ms ({self.latency_error:+.1%})")
            if abs(self.planned_latency_ms - self.predicted_latency_ms) > 1e-9:
                lat += (f" at the embedding rows each query read; the plan, priced at its "
                        f"query_tokens: {self.planned_latency_ms:.2f} ms")
            if self.planned_quantile_latency_ms is not None:
                lat += (f"; planned at quantile {self.latency_quantile:g}: "
                        f"{self.planned_quantile_latency_ms:.2f} ms")
        mem = (f"peak memory: predicted {self.predicted_peak_bytes / 1e6:.3f} MB, executor "
               f"{self.measured_peak_bytes / 1e6:.3f} MB")
        if self.process_peak_bytes is not None:
            mem += (f", process {self.process_peak_bytes / 1e6:.3f} MB above its baseline "
                    f"({self.process_error:+.1%})")
        return f"{lat}\n{mem}"


class Session:
    """One plan's executor, open for a user's queries (`open_session` opens one)."""

    def __init__(self, checked: CheckedPlan, *, emulate: bool = True, threads: int = 1,
                 measure_process: bool = True):
        """Build the executor for `checked` (allocate, check every planned shard, fill the
        preload buffer, one discarded warm-up query). `emulate`: storage read at the plan's
        device's speed (as `run`), else at this machine's; `threads`: torch threads while
        the session is open (1, as calibrated); `measure_process`: take the process's
        baseline first (a throwaway run of the plan, gc, malloc_trim; resets the process's
        VmHWM through /proc/self/clear_refs), so that `stats()` reports its peak."""
        if not isinstance(threads, int) or isinstance(threads, bool) \
                or not 1 <= threads <= MAX_THREADS:
            raise InvalidArgument(f"threads must be a whole number from 1 to {MAX_THREADS}, "
                                  f"got {threads!r}")
        # one query at a time: the executor's buffers are the plan's memory, one query's
        # worth; a second thread waits for the first (encode, classify, stats, close)
        self._lock = threading.RLock()
        self.checked = checked
        self.plan, self.scenario, self.store = checked.plan, checked.scenario, checked.store
        self.head = checked.head
        self.seq_len = self.scenario.model.seq_len
        self._threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        self.executor: Executor | None = None
        self._latency = np.zeros(LATENCY_WINDOW)  # a ring, allocated before the baseline
        self._predicted = np.zeros(LATENCY_WINDOW)  # each query's prediction, likewise
        self._at_rows: dict[int, float] = {}  # a streamed table: prediction per rows read
        self.queries = self.truncated = 0
        try:
            self.tokenizer = self.store.tokenizer(self.seq_len)
            self._baseline = self._take_baseline(emulate) if measure_process else None
            self.executor = self._warm_executor(emulate)
        except BaseException:
            self.close()
            raise

    def _warm_executor(self, emulate: bool) -> Executor:
        """The plan's executor, its preload buffer filled, after one discarded query through
        the path every query takes (first-call costs: kernels, code pages, thread pools)."""
        ex = Executor(self.plan, self.scenario, self.store, emulate=emulate)
        try:
            ex.fill_preload()
            row = np.empty((1, self.store.config.hidden), np.float32)
            self._query(ex, WARMUP_TEXT, row[0])
            if self.head is not None:
                self.head_outputs(row)
        except BaseException:
            ex.close()
            raise
        return ex

    def _take_baseline(self, emulate: bool) -> int | None:
        """The process's VmRSS after a throwaway executor of the plan ran a query (warm
        kernels, thread pools, code pages) and was released, with the peak reset; None where
        /proc cannot do it (not Linux)."""
        self._warm_executor(emulate).close()
        release()
        try:
            baseline = status_bytes("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except (OSError, RuntimeError):
            return None
        return baseline

    def _batch(self, text: str):
        """One query of the plan's shape (truncated to seq_len tokens and padded to it) and
        whether the text was longer."""
        return (self.tokenizer([text], pad_to=self.seq_len),
                bool(self.tokenizer.tok.encode(text).overflowing))

    # --- queries ---------------------------------------------------------------------

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """The texts' embeddings, [len(texts), hidden] float32, one query each through the
        plan's executor, pooled and normalised as the model declares. Every text must be a
        non-empty string of Unicode text (InvalidArgument naming the first that is not).
        Safe to call from several threads: their queries run one at a time."""
        if isinstance(texts, str):
            raise InvalidArgument("encode takes a sequence of texts, not one string: "
                                  "encode([text])")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InvalidArgument(f"text {i} is a {type(t).__name__}, not a string")
            if not t.strip():
                raise InvalidArgument(f"text {i} is empty")
            why = not_unicode(t)
            if why:
                raise InvalidArgument(f"text {i} {why}")
        with self._lock:
            if self.executor is None:
                raise InvalidArgument("the session is closed")
            out = np.empty((len(texts), self.store.config.hidden), np.float32)
            for i, t in enumerate(texts):
                latency, longer, rows = self._query(self.executor, t, out[i])
                self._latency[self.queries % LATENCY_WINDOW] = latency
                self._predicted[self.queries % LATENCY_WINDOW] = self._prediction(rows)
                self.queries += 1
                self.truncated += longer
            return out

    def _prediction(self, rows: int) -> float:
        """A query's predicted latency: the plan's, or at the rows it read from a streamed
        table (memoised per count)."""
        if self.plan.embeddings != "streamed":
            return self.plan.predicted_latency_ms
        if rows not in self._at_rows:
            self._at_rows[rows] = query_schedules(self.plan, self.scenario, [rows])[rows] \
                .latency_ms
        return self._at_rows[rows]

    def _query(self, ex: Executor, text: str, row: np.ndarray) -> tuple[float, bool, int]:
        """One text through `ex` into `row`: its latency (ms), whether it was cut and the
        embedding rows it read."""
        batch, longer = self._batch(text)
        trace = ex.run(batch)
        if not bool(torch.isfinite(trace.embedding).all()):
            raise StoreError(f"{self.store.path}: the plan's output is not finite: the "
                             f"store's weights overflow fp32; rebuild the store from a "
                             f"sound checkpoint")
        row[:] = trace.embedding[0].numpy()
        # Freed heap pages back to the system after every query (~0.1 ms here): without it,
        # this VM's glibc heap grew 0.3-1.1 MB over 200 tweets (fragmentation: the
        # tokenizer's and torch's blocks of varying size), most of a 10 % margin at 8 MB.
        trim()
        return trace.latency_ms, longer, trace.embedding_rows

    def classify(self, texts: Sequence[str]) -> Classification:
        """The task head's label and class probabilities for each text (InvalidArgument
        without a head), with the embeddings it read."""
        if self.head is None:
            raise InvalidArgument("the session has no task head: give one (head=FILE), or "
                                  "use encode")
        with self._lock:
            return self.head_outputs(self.encode(texts))

    def head_outputs(self, embeddings: np.ndarray) -> Classification:
        """The task head on embeddings this session made."""
        if self.head is None:
            raise InvalidArgument("the session has no task head")
        t = torch.from_numpy(embeddings)
        labels = [self.head.labels[k] for k in self.head.predict(t)]
        probs = self.head.probabilities(t).astype(np.float32, copy=False)
        return Classification(labels, probs, self.head.labels, embeddings)

    # --- what it measured ------------------------------------------------------------

    def stats(self) -> SessionStats:
        """Latency per query and peak memory so far, beside the plan's prediction."""
        with self._lock:
            return self._stats()

    def _stats(self) -> SessionStats:
        ex = self.executor
        if ex is None:
            raise InvalidArgument("the session is closed: take stats() before closing it")
        runs = self._latency[:min(self.queries, LATENCY_WINDOW)]
        process = None
        if self._baseline is not None:
            try:
                process = status_bytes("VmHWM") - self._baseline
            except (OSError, RuntimeError):
                process = None
        device = self.scenario.device
        return SessionStats(
            queries=self.queries, truncated=self.truncated, seq_len=self.seq_len,
            latency_median_ms=float(np.median(runs)) if runs.size else None,
            latency_p95_ms=float(np.percentile(runs, 95)) if runs.size else None,
            predicted_latency_ms=float(np.median(self._predicted[:runs.size])) if runs.size
            else self.plan.predicted_latency_ms,
            planned_latency_ms=self.plan.predicted_latency_ms,
            latency_quantile=self.scenario.latency_quantile,
            planned_quantile_latency_ms=self.plan.quantile_latency_ms,
            predicted_peak_bytes=ex.predicted_memory.peak_bytes,
            measured_peak_bytes=ex.memory.peak_bytes, process_peak_bytes=process,
            storage=(f"storage emulated at {device.bandwidth_mb_s:g} MB/s" if ex.clock.emulated
                     else "this machine's disk"))

    # --- closing ---------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.executor is None

    def close(self) -> None:
        """Close the store's files, drop every buffer the executor holds, restore torch's
        thread count. Idempotent; waits for a query running in another thread."""
        with self._lock:
            ex, self.executor = self.executor, None
            if ex is not None:
                ex.close()
                del ex
                release()
            torch.set_num_threads(self._threads)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # a session dropped without close(): its files still get closed
        if getattr(self, "executor", None) is not None:
            self.executor.close()


def open_session(plan_path: str | os.PathLike, *, store: str | os.PathLike | None = None,
                 head: str | os.PathLike | bool = True, scenario: str | os.PathLike | None = None,
                 emulate: bool = True, threads: int = 1, measure_process: bool = True
                 ) -> Session:
    """A session on the plan at `plan_path`: checked as `run` checks it (`check_plan`), its
    executor built and warm (`Session`). `store` and `scenario` default to what the plan's
    profile and file name, `head` to the profile's task head (False: none)."""
    return Session(check_plan(plan_path, scenario=scenario, store=store, head=head),
                   emulate=emulate, threads=threads, measure_process=measure_process)


__all__ = ["CheckedPlan", "Classification", "Session", "SessionStats", "check_plan",
           "open_session"]
