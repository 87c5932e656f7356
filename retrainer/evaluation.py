"""Scoring predictions against true labels, for ``train`` and ``evaluate``.

The metrics are scikit-learn's definitions (``precision_recall_fscore_support`` with
``zero_division=0``, ``confusion_matrix``, one-vs-rest ``roc_auc_score``), computed here from the
confusion matrix and from ranks: importing ``sklearn.metrics`` alone takes about a second, a
seventh of a whole warm re-train of 10k images. The tests check every figure against
scikit-learn.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .config import DEFAULT_MODEL_DIR


@dataclass
class Misclassified:
    path: str
    true: str
    predicted: str
    score: float


REPORT_FILE = "report.json"
CONFUSION_PNG = "confusion_matrix.png"
#: Beside metadata.json: the SHA-256 of every image the head was fitted on (one per line,
#: sorted), so that ``evaluate`` can leave them out by content whatever their path.
FITTED_IMAGES_FILE = "fitted_images.sha256"


@dataclass
class EvaluationReport:
    """Accuracy, per-class and averaged precision/recall/F1, ROC AUC, confusion, the mistakes."""

    labels: list[str]
    n: int
    accuracy: float
    per_class: dict[str, dict[str, float]]
    macro: dict[str, float]
    weighted: dict[str, float]
    confusion: list[list[int]]
    misclassified: list[Misclassified] = field(default_factory=list)
    roc_auc: dict[str, Any] = field(default_factory=dict)
    split: str = ""
    #: evaluate: images the model was fitted on that were left out (or, with
    #: include_fitted, scored anyway).
    fitted_left_out: int = 0
    fitted_scored: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split, "n": self.n, "accuracy": self.accuracy, "labels": self.labels,
            "fitted_images_left_out": self.fitted_left_out,
            "fitted_images_scored": self.fitted_scored,
            "per_class": self.per_class, "macro": self.macro, "weighted": self.weighted,
            "roc_auc": self.roc_auc, "confusion_matrix": self.confusion,
            "misclassified": [m.__dict__ for m in self.misclassified],
        }

    def table(self) -> str:
        """A readable per-class table, the averages, and the confusion matrix."""
        width = max([len(label) for label in self.labels] + [8])
        auc = self.roc_auc.get("per_class", {})
        lines = [f"{'class':<{width}}  precision  recall  f1      roc_auc  support"]

        def fmt_auc(value: float | None) -> str:
            return f"{value:7.3f}" if value is not None else "      -"

        scored = occurring(np.array(self.confusion)) if self.confusion else None
        for i, label in enumerate(self.labels):
            row = self.per_class[label]
            if scored is not None and not scored[i]:  # not in the macro average
                lines.append(f"{label:<{width}}  {'-':>9}  {'-':>6}  {'-':>6}  "
                             f"{fmt_auc(auc.get(label))}  {0:7d}")
                continue
            lines.append(f"{label:<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  "
                         f"{row['f1']:6.3f}  {fmt_auc(auc.get(label))}  {int(row['support']):7d}")
        for name, avg in (("macro", self.macro), ("weighted", self.weighted)):
            lines.append(f"{name:<{width}}  {avg['precision']:9.3f}  {avg['recall']:6.3f}  "
                         f"{avg['f1']:6.3f}  {fmt_auc(self.roc_auc.get(name))}  {self.n:7d}")
        lines.append(f"accuracy {self.accuracy:.4f} (N={self.n})")
        if self.confusion:
            lines += ["", "confusion matrix (rows: true, columns: predicted)",
                      self.confusion_text()]
        return "\n".join(lines)

    def confusion_text(self) -> str:
        """The confusion matrix as aligned text; columns are numbered like the rows."""
        width = max(len(label) for label in self.labels)
        cell = max(3, len(str(max((max(r) for r in self.confusion), default=0))))
        head = " " * (width + 5) + " ".join(f"{j:>{cell}}" for j in range(len(self.labels)))
        rows = [head]
        for i, (label, counts) in enumerate(zip(self.labels, self.confusion)):
            rows.append(f"{i:>3}  {label:<{width}}" + "".join(f" {c:>{cell}}" for c in counts))
        return "\n".join(rows)

    def write(self, output_dir: str | Path, extra: dict[str, Any] | None = None,
              name: str | None = None) -> dict[str, str]:
        """``report.json`` and ``confusion_matrix.png`` in ``output_dir`` (or, given a
        ``name``, ``evaluation-<name>.json`` and ``.png``); returns their paths."""
        from .export import write_json
        from .files import atomic_write

        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        report, picture = ((REPORT_FILE, CONFUSION_PNG) if name is None
                           else (f"evaluation-{name}.json", f"evaluation-{name}.png"))
        written = {"report": str(out / report)}
        write_json(out / report, {**self.to_dict(), **(extra or {})})
        if self.confusion:
            data = confusion_png(self)
            atomic_write(out / picture, lambda fh: fh.write(data))
            written["confusion_png"] = str(out / picture)
        return written

    def write_png(self, output_dir: str | Path, png: bytes | None, report: bytes) -> str | None:
        """``confusion_matrix.png`` beside the ``report.json`` whose content is ``report``
        (written with the model); its path, or None where that folder holds another model's
        report now (a run exporting to the same folder finished after this one)."""
        from .files import atomic_write

        out = Path(output_dir)
        try:
            if (out / REPORT_FILE).read_bytes() != report:
                return None
        except OSError:
            return None
        data = png if png is not None else confusion_png(self)
        atomic_write(out / CONFUSION_PNG, lambda fh: fh.write(data))
        return str(out / CONFUSION_PNG)


def evaluation_name(text: str) -> str:
    """A file-name-safe name for an evaluation (the scored folder's name, 'db'...)."""
    import re

    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return cleaned or "images"


def fitted_images_text(keys: Sequence[str]) -> bytes:
    """The content of a model's ``fitted_images.sha256``: one hash per line, sorted."""
    return "".join(f"{k}\n" for k in sorted(set(keys))).encode("ascii")


def read_fitted_images(folder: str | Path, metadata: dict[str, Any]) -> set[str] | None:
    """The hashes a model's metadata points to; None for a model without them (older, or a
    bare graph)."""
    entry = (metadata.get("training") or {}).get("fitted_images")
    if not isinstance(entry, dict) or not entry.get("file"):
        return None
    path = Path(folder) / str(entry["file"])
    try:
        return {line.strip() for line in path.read_text(encoding="ascii").splitlines()
                if line.strip()}
    except (OSError, UnicodeDecodeError):
        return None


def confusion_png(report: EvaluationReport) -> bytes:
    """A confusion-matrix heat map (PNG): colour is the share of each true class, text the
    count. An empty matrix gives no picture (b"")."""
    if not report.confusion:
        return b""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(report.confusion, dtype=float)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    k = len(report.labels)
    side = min(4 + 0.6 * k, 24)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    # Class names are text, never mathtext: 'a$_$b' would otherwise fail to parse.
    ax.set_xticks(range(k), report.labels, rotation=45, ha="right", parse_math=False)
    ax.set_yticks(range(k), report.labels, parse_math=False)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    split = f"{report.split} " if report.split else ""
    ax.set_title(f"{split}accuracy {report.accuracy:.3f} (N={report.n})")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=9,
                            color="white" if share[i, j] > 0.5 else "black")
    fig.tight_layout()
    data = io.BytesIO()
    fig.savefig(data, format="png", dpi=100)
    plt.close(fig)
    return data.getvalue()


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den``, 0 where ``den`` is 0 (scikit-learn's ``zero_division=0``)."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den != 0)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts; rows are true classes, columns predicted ones."""
    flat = np.asarray(y_true, np.int64) * n_classes + np.asarray(y_pred, np.int64)
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def precision_recall_f1(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1 and support from a confusion matrix."""
    tp = np.diag(cm)
    predicted, support = cm.sum(axis=0), cm.sum(axis=1)
    return (_ratio(tp, predicted), _ratio(tp, support), _ratio(2 * tp, predicted + support),
            support)


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, ties sharing the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def binary_roc_auc(positives: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the chance that a positive outscores a negative (ties: half)."""
    n_pos = int(positives.sum())
    n_neg = len(positives) - n_pos
    rank_sum = average_ranks(np.asarray(scores, np.float64))[positives].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_auc_scores(y_true: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """One-vs-rest ROC AUC per class and averaged; None where a class has no positive or negative."""
    per_class: dict[str, float | None] = {}
    for i, label in enumerate(labels):
        positives = y_true == i
        if positives.all() or not positives.any():
            per_class[label] = None
        else:
            per_class[label] = binary_roc_auc(positives, probs[:, i])
    scored = [(v, int((y_true == i).sum())) for i, v in enumerate(per_class.values()) if v is not None]
    macro = float(np.mean([v for v, _ in scored])) if scored else None
    weighted = (float(sum(v * n for v, n in scored) / sum(n for _, n in scored))
                if scored else None)
    return {"per_class": per_class, "macro": macro, "weighted": weighted}


def occurring(cm: np.ndarray) -> np.ndarray:
    """The classes a confusion matrix's images show (true or predicted): the macro averages
    run over them, as scikit-learn's report does, since a class absent from the scored images
    would count as a score of 0. All classes when there are no images."""
    seen = (cm.sum(axis=1) > 0) | (cm.sum(axis=0) > 0)
    return seen if seen.any() else np.ones_like(seen)


def evaluate_predictions(y_true: Sequence[int], probs: np.ndarray, labels: list[str],
                         paths: Sequence[str] | None = None, split: str = "") -> EvaluationReport:
    """Metrics for class indices ``y_true`` against predicted probabilities (N, classes)."""
    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=np.float64).reshape(len(y_true), len(labels))
    y_pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=int)
    cm = confusion_matrix(y_true, y_pred, len(labels))
    p, r, f, s = precision_recall_f1(cm)
    per_class = {label: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                         "support": int(s[i])} for i, label in enumerate(labels)}
    seen = occurring(cm)
    averages = {"macro": {"precision": float(p[seen].mean()), "recall": float(r[seen].mean()),
                          "f1": float(f[seen].mean())},
                "weighted": {name: float(_ratio(values @ s, s.sum()))
                             for name, values in (("precision", p), ("recall", r), ("f1", f))}}
    wrong = np.nonzero(y_true != y_pred)[0]
    mistakes = [Misclassified(paths[i] if paths is not None else str(i), labels[y_true[i]],
                              labels[y_pred[i]], float(probs[i, y_pred[i]])) for i in wrong]
    mistakes.sort(key=lambda m: -m.score)  # the most confident mistakes first
    return EvaluationReport(
        labels=labels, n=int(len(y_true)),
        accuracy=float((y_true == y_pred).mean()) if len(y_true) else 0.0,
        per_class=per_class, macro=averages["macro"], weighted=averages["weighted"],
        confusion=cm.tolist() if len(y_true) else [],
        misclassified=mistakes,
        roc_auc=roc_auc_scores(y_true, probs, labels) if len(y_true) else {},
        split=split,
    )


def evaluate_folder(image_dir: str, model_dir: str | None = DEFAULT_MODEL_DIR,
                    graph: str | None = None, labels: str | None = None, batch_size: int = 32,
                    include_fitted: bool = False, runtime: str = "auto"
                    ) -> EvaluationReport:
    """Score an export on a labelled folder.

    A plain class tree is used whole; a train/ val/ test/ tree is scored on test/ (or val/).
    Images that cannot be decoded are skipped with a warning, as in training. Images the
    model was fitted on are left out (see :func:`evaluate_records`).
    """
    from .sources.base import TESTING, VALIDATION
    from .sources.folder import scan_folder

    dataset = scan_folder(image_dir, min_classes=1)  # one class's photos can be scored too
    records = dataset.records
    if any(r.split for r in records):
        wanted = TESTING if any(r.split == TESTING for r in records) else VALIDATION
        records = [r for r in records if r.split == wanted]
    return evaluate_records(records, model_dir, graph, labels, batch_size, include_fitted, runtime)


def evaluate_records(records: Sequence[Any], model_dir: str | None = DEFAULT_MODEL_DIR,
                     graph: str | None = None, labels: str | None = None,
                     batch_size: int = 32, include_fitted: bool = False,
                     runtime: str = "auto") -> EvaluationReport:
    """Score an export on labelled records from any source (a folder, a database).

    Every record is hashed (SHA-256 of its bytes, as the bottleneck cache keys them) and
    those the model was fitted on (its ``fitted_images.sha256``) are left out, with a warning
    and their count in the report; with ``include_fitted`` they are scored too (the accuracy
    is then optimistic). If nothing is left, a :class:`DatasetError` says so.
    """
    import logging

    from .errors import DatasetError
    from .predict import Classifier
    from .progress import bar

    log = logging.getLogger(__name__)
    classifier = Classifier.load(model_dir, graph=graph, labels=labels, runtime=runtime)
    index = {label: i for i, label in enumerate(classifier.labels)}
    unknown = sorted({r.label for r in records} - set(index))
    if unknown:
        raise DatasetError(f"class folder(s) {', '.join(map(repr, unknown))} are not labels of "
                           f"this model ({', '.join(classifier.labels)}).")
    folder = Path(model_dir) if model_dir and not graph else Path(graph or ".").parent
    fitted = read_fitted_images(folder, classifier.metadata)
    n_fitted = 0
    if fitted:
        from .bottlenecks import hash_records

        keys, _ = hash_records(records)  # unreadable files are reported when scored
        is_fitted = [k is not None and k in fitted for k in keys]
        n_fitted = sum(is_fitted)
        if n_fitted and not include_fitted:
            kept = [r for r, f in zip(records, is_fitted) if not f]
            if not kept:
                raise DatasetError(
                    f"all {len(records)} images were used to fit this model; nothing is left "
                    "to evaluate.",
                    "Evaluate on images it has not seen (e.g. a test/ folder), or score them "
                    "anyway (optimistic): include_fitted=True.")
            log.warning("left out %d of %d images: the model was fitted on them "
                        "(--include-training-images, include_fitted=True in Python, scores "
                        "them too)", n_fitted, len(records))
            records = kept
        elif n_fitted:
            log.warning("%d of %d images were used to fit this model: the accuracy is "
                        "optimistic", n_fitted, len(records))
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
    split = records[0].split if records and records[0].split else ""
    report = evaluate_predictions(y_true, probs, classifier.labels, paths, split=split or "all")
    if include_fitted:
        report.fitted_scored = n_fitted
    else:
        report.fitted_left_out = n_fitted
    return report
