"""``audit``: duplicates, leakage and likely mislabelled images, from the cached bottlenecks.

Everything here works on bottlenecks the cache already holds (they are computed first when
missing, exactly as ``train`` would): exact duplicates by content hash, near-duplicates by cosine
similarity of centred bottlenecks, likely mislabels by Confident Learning (Northcutt, Jiang &
Chuang, "Confident Learning: Estimating Uncertainty in Dataset Labels", JAIR 70, 2021) on
out-of-fold probabilities of a linear head, outliers far from every class, and a per-class
summary. Nothing in the image folder or database is changed.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .config import TrainConfig
from .errors import DatasetError, RetrainerError
from .sources.base import ImageRecord, shown
from .split import (MAX_NEAR_GROUP, NEAR_DUPLICATE_MIN_DIM, NEAR_DUPLICATE_SIMILARITY,
                    Grouping, LookAlikes, _Union, join_near, near_duplicate_pairs, normalised)

log = logging.getLogger(__name__)

#: Outliers: a distance to the nearest class centre beyond Q3 + OUTLIER_IQR * IQR (Tukey's
#: "far out" fence) of all images' distances.
OUTLIER_IQR = 3.0
#: Principal components the cross-validated head sees.
PCA_DIMS = 128


@dataclass
class AuditResult:
    """The findings; :meth:`to_dict` is the ``--json`` document."""

    label_issues: list[dict[str, Any]]
    duplicates: list[dict[str, Any]]
    outliers: list[dict[str, Any]]
    summary: dict[str, Any]
    records: list[ImageRecord] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        def public(d: dict[str, Any], extra: tuple[str, ...] = ()) -> dict[str, Any]:
            return {k: v for k, v in d.items() if not k.startswith("_") and k not in extra}

        return {"label_issues": [public(d) for d in self.label_issues],
                "duplicates": [public(d, ("straddles_labels", "straddles_splits"))
                               for d in self.duplicates],
                "outliers": self.outliers, "summary": self.summary}

    def write_relabel(self, path: str | Path) -> int:
        """path,label,suggested_label for every likely mislabel (undecodable name bytes kept).

        Written whole or not at all (a temporary file renamed into place): a run stopped while
        writing leaves no partial list, and the previous one stays as it was."""
        from .files import atomic_write

        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow(["path", "label", "suggested_label"])
        for row in self.label_issues:
            writer.writerow([row["_path"], row["label"], row["suggested_label"]])
        data = text.getvalue().encode("utf-8", "surrogateescape")
        try:
            target = Path(os.path.realpath(path))
            if target.exists() and not target.is_file():  # /dev/stdout, a named pipe: as it is
                with open(target, "wb") as fh:
                    fh.write(data)
            else:
                atomic_write(target, lambda fh: fh.write(data))
        except OSError as exc:
            raise RetrainerError(f"cannot write the relabel CSV '{path}' "
                                 f"({exc.strerror or exc}).",
                                 "Give a file in a folder you can write to "
                                 "(--write-relabel FILE).") from None
        return len(self.label_issues)

    def write_report(self, folder: str | Path) -> Path:
        """A self-contained HTML page (thumbnails inlined as base64) of every flagged image."""
        from .files import atomic_write

        out = Path(folder)
        try:
            out.mkdir(parents=True, exist_ok=True)
            page = out / "index.html"
            data = _html(self).encode("utf-8")
            atomic_write(page, lambda fh: fh.write(data))  # whole, or the previous page
        except OSError as exc:
            raise RetrainerError(f"cannot write the report to '{folder}' ({exc.strerror or exc}).",
                                 "Give a writable folder with --report DIR.") from exc
        return page


def out_of_fold_probabilities(x: np.ndarray, y: np.ndarray, n_classes: int, folds: int = 5,
                              groups: Sequence[int] | None = None, seed: int = 0,
                              c: float = 0.1) -> np.ndarray:
    """P(label | image) for every row from a head that never saw it (or any copy of it).

    Stratified group k-fold (copies of one image share a fold) of a logistic regression on
    standardised bottlenecks reduced to at most PCA_DIMS principal components.
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    counts = np.bincount(y, minlength=n_classes)
    k = int(max(2, min(folds, counts[counts > 0].min())))
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    probs = np.zeros((len(y), n_classes), np.float64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has only ..."
        folds_iter = list(splitter.split(x, y, groups))
    for train_idx, test_idx in folds_iter:
        # PCA first: the same fit in ~1/10 of the time on 1280-d bottlenecks (bench/audit.py).
        dims = min(PCA_DIMS, len(train_idx) - 1, x.shape[1])
        model = make_pipeline(StandardScaler(), PCA(dims, random_state=seed),
                              LogisticRegression(C=c, max_iter=500))
        model.fit(x[train_idx], y[train_idx])
        p = model.predict_proba(x[test_idx])
        probs[np.ix_(test_idx, model.classes_)] = p
        missing = np.setdiff1d(np.arange(n_classes), model.classes_)
        if missing.size:  # a class absent from this fold's training part: no probability mass
            probs[np.ix_(test_idx, missing)] = 0.0
    return probs


def confident_joint(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C, t): the confident joint C[given, true] and the per-class thresholds t (paper, 3.1).

    t_j is the mean self-confidence p(j | x) over the images labelled j. An image counts in
    C[i, j] when its given label is i and j is the most probable class among those whose
    probability reaches their threshold; images that reach no threshold are not counted.
    """
    n, m = probs.shape
    t = np.array([probs[labels == j, j].mean() if np.any(labels == j) else 1.0
                  for j in range(m)])
    above = probs >= t[None, :] - 1e-12
    guess = np.where(above, probs, -np.inf).argmax(axis=1)
    counted = above.any(axis=1)
    c = np.zeros((m, m), np.int64)
    np.add.at(c, (labels[counted], guess[counted]), 1)
    return c, t


def joint_estimate(c: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Q[given, true]: the confident joint calibrated to the label counts, normalised (eq. 3)."""
    calibrated = calibrated_counts(c, labels).astype(np.float64)
    total = calibrated.sum()
    return calibrated / total if total else calibrated


def calibrated_counts(c: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The confident joint calibrated so that row i sums to the number of images labelled i.

    The calibration (paper, eq. 2) scales every row of C to the observed count of its given
    label; n * Q[i, j] is then a count of images. Rounded per row by the largest remainder, so
    each row still sums to its label count (rounding each cell alone can add or lose an image in
    a row: 2.64 + 59.46 + 6.61 + 2.64 + 2.64 = 74 rounds to 75). Ties go to the larger count,
    then to the lower column.
    """
    m = c.shape[0]
    counts = np.bincount(labels, minlength=m)
    rows = c.sum(axis=1)
    out = np.zeros((m, m), np.int64)
    for i in range(m):
        if rows[i] == 0:
            continue
        exact = c[i] * (counts[i] / rows[i])
        floor = np.floor(exact + 1e-9).astype(np.int64)
        short = int(counts[i] - floor.sum())
        remainder = exact - floor
        order = sorted(range(m), key=lambda j: (-round(remainder[j], 9), -exact[j], j))
        floor[order[:max(short, 0)]] += 1
        out[i] = floor
    return out


def find_label_issues(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Boolean mask of likely label errors: Confident Learning, prune by noise rate (3.2).

    For every off-diagonal cell (i, j) of the calibrated confident joint (n * Q[i, j] images),
    that many images labelled i with the largest margin p(j | x) - p(i | x) are flagged; an
    image whose most probable class is its own label is never flagged.
    """
    n, m = probs.shape
    counts = calibrated_counts(confident_joint(labels, probs)[0], labels)
    flagged = np.zeros(n, bool)
    for i in range(m):
        idx = np.flatnonzero(labels == i)
        if not idx.size:
            continue
        for j in range(m):
            k = int(counts[i, j])
            if j == i or k <= 0:
                continue
            margin = probs[idx, j] - probs[idx, i]
            take = idx[np.argsort(-margin, kind="stable")[:min(k, idx.size)]]
            flagged[take] = True
    flagged &= probs.argmax(axis=1) != labels
    return flagged


def normalized_margin(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """p(given) - max p(other): low is suspicious (the paper's normalized margin ranking)."""
    own = probs[np.arange(len(labels)), labels]
    other = probs.copy()
    other[np.arange(len(labels)), labels] = -np.inf
    return own - other.max(axis=1)


def audit(config: TrainConfig, folds: int = 5,
          near_threshold: float = NEAR_DUPLICATE_SIMILARITY) -> AuditResult:
    """Audit the configured image folder or database (see the module docstring).

    Past the bottlenecks everything runs with one BLAS thread: the matrices are small, and BLAS
    threads competing with other work for the cores made the 2,000-image audit 20x slower on a
    busy 2-core machine (54 s against 2.7 s).
    """
    from threadpoolctl import threadpool_limits

    from .bottlenecks.fill import fill

    t0 = time.perf_counter()
    filled = fill(config, split=False)
    t_fill = time.perf_counter() - t0
    with threadpool_limits(limits=1):
        return _audit(config, filled, folds, near_threshold, t_fill)


def _audit(config: TrainConfig, filled: Any, folds: int, near_threshold: float,
           t_fill: float) -> AuditResult:
    from .split import assign_splits

    dataset, cache = filled.dataset, filled.cache
    t1 = time.perf_counter()
    pairs = [(k, r) for k, r in zip(filled.keys, dataset.records) if k is not None and k in cache]
    if not pairs:
        raise DatasetError("no usable image to audit.", "Check the folder or database.")
    keys = [k for k, _ in pairs]
    records = [r for _, r in pairs]
    unique = sorted(set(keys))
    row_of = {k: i for i, k in enumerate(unique)}
    vectors = cache.load(unique)
    cache.close()

    near_ok = vectors.shape[1] >= NEAR_DUPLICATE_MIN_DIM  # as in train: see split.py
    # Near-duplicates among the distinct contents, once: for the report and the split.
    reader = {row_of[k]: r for k, r in zip(keys, records)}
    lookalikes = Grouping()
    try:
        near_pairs = sorted(near_duplicate_pairs(vectors, near_threshold,
                                                 lambda u: reader[u].read(),
                                                 max_pairs=MAX_NEAR_GROUP * len(vectors) // 2)
                            if near_ok else [], key=lambda p: -p[2])
    except LookAlikes:
        log.warning("most images look alike to the backbone: near-duplicates not searched")
        lookalikes.near_skipped = True
        near_pairs = []
    first_record = {}
    for i, k in enumerate(keys):
        first_record.setdefault(row_of[k], i)
    # The splits train would use: copies grouped into one split.
    split_view = assign_splits(type(dataset)(classes=dataset.classes, records=records,
                                             root=dataset.root),
                               config.source.validation_percentage,
                               config.source.testing_percentage,
                               content_keys=keys, keep_conflicting=True,
                               near_pairs=[(first_record[a], first_record[b])
                                           for a, b, _ in near_pairs])
    split_by_content = {}
    split_of_rec = {r.key: r.split for r in split_view.records}
    for k, r in zip(keys, records):
        if r.key in split_of_rec:
            split_by_content.setdefault(k, split_of_rec[r.key])
    splits = [split_of_rec.get(r.key, split_by_content.get(k)) for k, r in zip(keys, records)]

    by_content: dict[str, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        by_content[k].append(i)
    duplicates: list[dict[str, Any]] = []
    dup_rows: set[int] = set()

    def group_doc(kind: str, idx: list[int], similarity: float) -> dict[str, Any]:
        idx = sorted(idx, key=lambda i: records[i].key)
        labels = [records[i].label for i in idx]
        ss = [splits[i] for i in idx]
        return {"kind": kind, "paths": [shown(records[i].display) for i in idx],
                "labels": labels, "splits": ss, "similarity": round(similarity, 4),
                "straddles_labels": len(set(labels)) > 1, "straddles_splits": len(set(ss)) > 1}

    for k, idx in sorted(by_content.items(), key=lambda kv: records[kv[1][0]].key):
        if len(idx) > 1:
            duplicates.append(group_doc("exact", idx, 1.0))
            dup_rows.update(idx)
    union = _Union(len(unique))
    join_near(union, [(a, b) for a, b, _ in near_pairs], lookalikes)
    weakest: dict[int, float] = {}  # per group: the lowest cosine of the pairs that join it
    for a, b, s in near_pairs:
        root = union.find(a)
        if root == union.find(b):
            weakest[root] = min(weakest.get(root, 1.0), s)
    near: dict[int, list[int]] = defaultdict(list)
    for u in range(len(unique)):
        near[union.find(u)].append(u)
    for root, members in near.items():
        if len(members) < 2:
            continue
        idx = [i for u in members for i in by_content[unique[u]]]
        duplicates.append(group_doc("near", idx, weakest[root]))
        dup_rows.update(idx)
    duplicates.sort(key=lambda d: (d["kind"] != "exact", not d["straddles_labels"],
                                   not d["straddles_splits"], d["paths"]))

    # Likely mislabels: out-of-fold probabilities, copies of one image in one fold.
    class_index = {c: i for i, c in enumerate(dataset.classes)}
    y = np.array([class_index[r.label] for r in records])
    x = vectors[[row_of[k] for k in keys]]
    groups_near = [union.find(row_of[k]) for k in keys]
    present = np.unique(y)
    label_issues: list[dict[str, Any]] = []
    margins = np.zeros(len(y))
    flagged = np.zeros(len(y), bool)
    probs = None
    if present.size >= 2 and np.bincount(y)[present].min() >= 2:
        probs = out_of_fold_probabilities(x, y, len(dataset.classes), folds, groups_near,
                                          seed=config.head.seed)
        flagged = find_label_issues(y, probs)
        margins = normalized_margin(y, probs)
        for i in np.flatnonzero(flagged):
            label_issues.append({
                "path": shown(records[i].display), "label": records[i].label,
                "suggested_label": dataset.classes[int(probs[i].argmax())],
                "score": round(float((1 - margins[i]) / 2), 4),
                "_path": records[i].display})
        label_issues.sort(key=lambda d: (-d["score"], d["path"]))

    # Outliers: far from every class centre (centred, unit-length bottlenecks).
    xn = normalised(x)
    centres = np.stack([xn[y == j].mean(axis=0) if np.any(y == j) else np.zeros(xn.shape[1])
                        for j in range(len(dataset.classes))])
    centres /= np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
    distance = 1 - (xn @ centres.T).max(axis=1)
    q1, q3 = np.percentile(distance, [25, 75])
    fence = q3 + OUTLIER_IQR * (q3 - q1)
    outliers = [{"path": shown(records[i].display), "label": records[i].label,
                 "score": round(float(distance[i]), 4)}
                for i in np.flatnonzero(distance > fence)]
    outliers.sort(key=lambda d: (-d["score"], d["path"]))
    outlier_set = {d["path"] for d in outliers}

    per_class = {}
    for j, name in enumerate(dataset.classes):
        rows = np.flatnonzero(y == j)
        n_issues = int(flagged[rows].sum())
        per_class[name] = {
            "images": int(rows.size), "label_issues": n_issues,
            "suspected_share": round(n_issues / rows.size, 4) if rows.size else 0.0,
            "in_duplicate_groups": int(sum(1 for i in rows if i in dup_rows)),
            "outliers": int(sum(1 for i in rows if shown(records[i].display) in outlier_set))}
    summary = {
        "images": len(records), "classes": len(dataset.classes), "skipped": len(filled.skipped),
        "exact_duplicate_groups": sum(d["kind"] == "exact" for d in duplicates),
        "near_duplicate_groups": sum(d["kind"] == "near" for d in duplicates),
        "groups_straddling_labels": sum(d["straddles_labels"] for d in duplicates),
        "groups_straddling_splits": sum(d["straddles_splits"] for d in duplicates),
        "label_issues": len(label_issues), "outliers": len(outliers),
        "near_duplicate_similarity": near_threshold,
        "near_duplicates_not_searched": lookalikes.near_skipped,
        "lookalike_images": lookalikes.lookalikes,
        "folds": folds if probs is not None else 0, "backbone": filled.spec.name,
        "bottlenecks_computed": filled.computed, "per_class": per_class,
        "seconds": {"bottlenecks": round(t_fill, 3),
                    "audit": round(time.perf_counter() - t1, 3)},
    }
    result = AuditResult(label_issues, duplicates, outliers, summary, records)
    result._probs = probs  # type: ignore[attr-defined] - for benchmarks on the same probabilities
    result._labels = y  # type: ignore[attr-defined]
    return result


def _thumb(rec: ImageRecord | None, size: int = 160) -> str:
    if rec is None:
        return ""
    try:
        from PIL import Image

        with Image.open(io.BytesIO(rec.read())) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
    except Exception:  # noqa: BLE001 - an unreadable image gets no thumbnail, not an abort
        return '<div class="missing">no preview</div>'
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img src="data:image/jpeg;base64,{data}" alt="">'


def _html(result: AuditResult) -> str:
    by_path = {shown(r.display): r for r in result.records}
    e = html.escape
    s = result.summary

    def card(path: str, caption: str) -> str:
        return (f'<figure>{_thumb(by_path.get(path))}<figcaption><b>{e(caption)}</b><br>'
                f'<span class="p">{e(path)}</span></figcaption></figure>')

    parts = [f"<h2>Likely mislabelled ({len(result.label_issues)})</h2><div class=row>"]
    for d in result.label_issues:
        parts.append(card(d["path"], f"{d['label']} \u2192 {d['suggested_label']} "
                                     f"({d['score']:.2f})"))
    parts.append(f"</div><h2>Duplicates ({len(result.duplicates)} groups)</h2>")
    for d in result.duplicates:
        flag = " straddles labels" if d["straddles_labels"] else ""
        flag += " straddles splits" if d["straddles_splits"] else ""
        parts.append(f'<div class="group"><div class=h>{e(d["kind"])} similarity '
                     f'{d["similarity"]:.3f}<b>{e(flag)}</b></div><div class=row>')
        for p, label, split in zip(d["paths"], d["labels"], d["splits"]):
            parts.append(card(p, f"{label} / {split}"))
        parts.append("</div></div>")
    parts.append(f"<h2>Outliers ({len(result.outliers)})</h2><div class=row>")
    for d in result.outliers:
        parts.append(card(d["path"], f"{d['label']} (distance {d['score']:.2f})"))
    parts.append("</div><h2>Classes</h2><table><tr><th>class</th><th>images</th>"
                 "<th>likely mislabelled</th><th>share</th><th>in duplicate groups</th>"
                 "<th>outliers</th></tr>")
    for name, c in s["per_class"].items():
        parts.append(f"<tr><td>{e(name)}</td><td>{c['images']}</td><td>{c['label_issues']}</td>"
                     f"<td>{100 * c['suspected_share']:.1f}%</td>"
                     f"<td>{c['in_duplicate_groups']}</td><td>{c['outliers']}</td></tr>")
    parts.append("</table>")
    head = (f"{s['images']} images, {s['classes']} classes, backbone {e(s['backbone'])}: "
            f"{s['label_issues']} likely mislabelled, {s['exact_duplicate_groups']} exact and "
            f"{s['near_duplicate_groups']} near duplicate groups, {s['outliers']} outliers")
    style = ("body{font-family:sans-serif;margin:1em;background:#fff;color:#222}"
             ".row{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;width:170px;"
             "border:1px solid #ccc;padding:4px;background:#f6f6f6}figure img{max-width:160px;"
             "max-height:160px;display:block}figcaption{font-size:12px;word-break:break-all}"
             ".p{color:#666}.group{border-left:4px solid #c60;padding-left:6px;margin:8px 0}"
             ".h{font-size:13px;margin-bottom:4px}.h b{color:#c00}table{border-collapse:"
             "collapse}td,th{border:1px solid #ccc;padding:2px 8px}")
    return ("<!DOCTYPE html><html><head><meta charset=utf-8><title>retrainer audit</title>"
            f"<style>{style}</style></head><body><h1>retrainer audit</h1><p>{head}</p>"
            + "".join(parts) + "</body></html>")
