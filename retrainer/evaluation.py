"""Scoring predictions against true labels (scikit-learn metrics), for ``train`` and ``evaluate``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np


@dataclass
class Misclassified:
    path: str
    true: str
    predicted: str
    score: float


@dataclass
class EvaluationReport:
    """Accuracy, per-class precision/recall/F1, confusion matrix and the mistakes."""

    labels: list[str]
    n: int
    accuracy: float
    per_class: dict[str, dict[str, float]]
    macro: dict[str, float]
    weighted: dict[str, float]
    confusion: list[list[int]]
    misclassified: list[Misclassified] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n, "accuracy": self.accuracy, "labels": self.labels,
            "per_class": self.per_class, "macro": self.macro, "weighted": self.weighted,
            "confusion_matrix": self.confusion,
            "misclassified": [m.__dict__ for m in self.misclassified],
        }

    def table(self) -> str:
        """A readable per-class table."""
        width = max([len(label) for label in self.labels] + [8])
        lines = [f"{'class':<{width}}  precision  recall  f1      support"]
        for label in self.labels:
            row = self.per_class[label]
            lines.append(f"{label:<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  "
                         f"{row['f1']:6.3f}  {int(row['support']):7d}")
        for name, avg in (("macro", self.macro), ("weighted", self.weighted)):
            lines.append(f"{name:<{width}}  {avg['precision']:9.3f}  {avg['recall']:6.3f}  "
                         f"{avg['f1']:6.3f}  {self.n:7d}")
        lines.append(f"accuracy {self.accuracy:.4f} (N={self.n})")
        return "\n".join(lines)


def evaluate_predictions(y_true: Sequence[int], probs: np.ndarray, labels: list[str],
                         paths: Sequence[str] | None = None) -> EvaluationReport:
    """Metrics for class indices ``y_true`` against predicted probabilities (N, classes)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y_true = np.asarray(y_true, dtype=int)
    y_pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=int)
    idx = list(range(len(labels)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=idx, zero_division=0)
    per_class = {label: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                         "support": int(s[i])} for i, label in enumerate(labels)}
    averages = {}
    for avg in ("macro", "weighted"):
        ap, ar, af, _ = precision_recall_fscore_support(y_true, y_pred, labels=idx, average=avg,
                                                         zero_division=0)
        averages[avg] = {"precision": float(ap), "recall": float(ar), "f1": float(af)}
    wrong = np.nonzero(y_true != y_pred)[0]
    mistakes = [Misclassified(paths[i] if paths is not None else str(i), labels[y_true[i]],
                              labels[y_pred[i]], float(probs[i, y_pred[i]])) for i in wrong]
    return EvaluationReport(
        labels=labels, n=int(len(y_true)),
        accuracy=float((y_true == y_pred).mean()) if len(y_true) else 0.0,
        per_class=per_class, macro=averages["macro"], weighted=averages["weighted"],
        confusion=confusion_matrix(y_true, y_pred, labels=idx).tolist() if len(y_true) else [],
        misclassified=mistakes,
    )


def evaluate_folder(image_dir: str, model_dir: str | None = "retrained", graph: str | None = None,
                    labels: str | None = None, batch_size: int = 32) -> EvaluationReport:
    """Score an export on a labelled folder.

    A plain class tree is used whole; a train/ val/ test/ tree is scored on test/ (or val/).
    Images that cannot be decoded are skipped with a warning, as in training.
    """
    from .sources.base import TESTING, VALIDATION
    from .sources.folder import scan_folder

    dataset = scan_folder(image_dir)
    records = dataset.records
    if any(r.split for r in records):
        wanted = TESTING if any(r.split == TESTING for r in records) else VALIDATION
        records = [r for r in records if r.split == wanted]
    return evaluate_records(records, model_dir, graph, labels, batch_size)


def evaluate_records(records: Sequence[Any], model_dir: str | None = "retrained",
                     graph: str | None = None, labels: str | None = None,
                     batch_size: int = 32) -> EvaluationReport:
    """Score an export on labelled records from any source (a folder, a database)."""
    import logging

    from .errors import DatasetError
    from .predict import Classifier
    from .progress import bar

    log = logging.getLogger(__name__)
    classifier = Classifier.load(model_dir, graph=graph, labels=labels)
    index = {label: i for i, label in enumerate(classifier.labels)}
    unknown = sorted({r.label for r in records} - set(index))
    if unknown:
        raise DatasetError(f"class folder(s) {', '.join(map(repr, unknown))} are not labels of "
                           f"this model ({', '.join(classifier.labels)}).")
    y_true, rows, paths = [], [], []
    with bar(len(records), "evaluating") as progress:
        results = classifier.label_records(records, top_k=1, batch_size=batch_size)
        for rec, result in zip(records, results):
            progress.update(1)
            if result.error:
                log.warning("skipped %s: %s", result.path, result.error)
                continue
            y_true.append(index[rec.label])
            rows.append(result.probabilities)
            paths.append(result.path)
    probs = np.stack(rows) if rows else np.zeros((0, len(classifier.labels)), np.float32)
    return evaluate_predictions(y_true, probs, classifier.labels, paths)
