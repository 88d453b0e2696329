"""What a plan keeps of the model: its submodel's fidelity and task accuracy, measured.

A plan runs exactly its planned shards at their planned bitwidths. That submodel is
rebuilt here from the shard store (the same weights the executor reads) and run on the
1,000 held-out test tweets (runtime/sources/task.py; a user's task: its CSV's test split),
batched: fidelity is the mean cosine of its embedding to the fp32 model's, accuracy the
task head's on the test labels (none without a head). The
executor's output equals this submodel's (tests/test_runtime.py checks it against an
independent oracle), so these are the plan's real quality figures, measured on far more
text than a latency run's few queries.

Evaluations are memoised by the submodel itself: two plans that keep the same shards at
the same bitwidths (preloaded or not) are one evaluation.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from elasticplan.plans.plan import Plan
from elasticplan.problem.spec import FULL_PRECISION_BITS
from runtime.families.encoder import cosine
from runtime.profiling.profile import DROP, Profiler, profile_seq_len
from runtime.sources.task import TaskHead, tweet_task
from runtime.store import ShardStore


@dataclass(frozen=True)
class Quality:
    fidelity: float  # mean cosine to the fp32 model's embedding, test split
    accuracy: float | None  # task head accuracy on the test split's labels (None: no head)


@dataclass(frozen=True)
class Evaluation:
    """A plan's submodel on the test split, with the sampling error of each figure: the
    standard error of the mean cosine (sample standard deviation / sqrt(n)) and of the
    accuracy (sqrt(p (1 - p) / n))."""

    texts: int
    fidelity: float
    fidelity_stderr: float
    accuracy: float | None  # None: no task head (fidelity only)
    accuracy_stderr: float | None
    fp32_accuracy: float | None  # the full model's, on the same texts

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def plan_changes(plan: Plan, shard_names: list[str]) -> list[dict[str, int]]:
    """Per layer: shard name -> DROP or bits, for every shard the plan does not run at fp32."""
    out = []
    for layer in plan.layers:
        chosen = {c.name: c.bits for c in layer.shards}
        out.append({n: chosen.get(n, DROP) for n in shard_names
                    if chosen.get(n, DROP) != FULL_PRECISION_BITS})
    return out


class TestSplit:
    """Submodels of one shard store, evaluated on the test split (memoised)."""

    __test__ = False  # not a pytest class

    def __init__(self, store: ShardStore, head_path: str | Path | None):
        head = TaskHead.load(head_path) if head_path is not None else None
        if head is not None:
            head.check_width(store.config.hidden, head_path, store.path)
        test = (head.load_task(head_path) if head else tweet_task()).splits.test
        self.store = store
        self.names = store.config.shard_names()
        self._profiler = Profiler(store, list(test.texts), test.labels, head,
                                  profile_seq_len(store))
        self._memo: dict[tuple, Quality] = {}
        self.evaluations = 0  # submodels actually run (not answered from the memo)

    def changes(self, changes: list[dict[str, int]]) -> Quality:
        key = tuple(tuple(sorted(ch.items())) for ch in changes)
        if key not in self._memo:
            fid, acc, _ = self._profiler.measure_selection(changes)
            self._memo[key] = Quality(fid, acc)
            self.evaluations += 1
        return self._memo[key]

    def plan(self, plan: Plan) -> Quality:
        return self.changes(plan_changes(plan, self.names))

    def evaluate(self, plan: Plan) -> Evaluation:
        """The plan's submodel on every test text, with sampling errors."""
        return self.evaluate_changes(plan_changes(plan, self.names))

    def evaluate_uniform(self, bits: int) -> Evaluation:
        """Every shard at `bits`, on every test text, with sampling errors."""
        one = {} if bits == FULL_PRECISION_BITS else {n: bits for n in self.names}
        return self.evaluate_changes([dict(one) for _ in range(self.store.config.layers)])

    def evaluate_changes(self, changes: list[dict[str, int]]) -> Evaluation:
        """A submodel (per layer: shard -> DROP or bits) on every test text."""
        p = self._profiler
        emb = p.check_finite(p.embed_selection(changes))
        cos = cosine(emb, p.reference).double()
        n = cos.numel()
        fid = dict(texts=n, fidelity=float(cos.mean()),
                   fidelity_stderr=float(cos.std()) / math.sqrt(n) if n > 1 else 0.0)
        if p.head is None:
            return Evaluation(**fid, accuracy=None, accuracy_stderr=None, fp32_accuracy=None)
        acc = p.head.accuracy(emb, p.sorted_labels)
        return Evaluation(**fid, accuracy=float(acc),
                          accuracy_stderr=math.sqrt(acc * (1 - acc) / n),
                          fp32_accuracy=float(p.head.accuracy(p.reference, p.sorted_labels)))

    def uniform(self, bits: int) -> Quality:
        """Every shard at `bits` (FULL_PRECISION_BITS: the full model)."""
        one = {} if bits == FULL_PRECISION_BITS else {n: bits for n in self.names}
        return self.changes([dict(one) for _ in range(self.store.config.layers)])
