"""Audit quality on a damaged copy of a real set: mislabels, exact and near duplicates.

Makes a dirty copy of a folder-per-class set with known damage: a share of the labels flipped at
random (the file moved to another class folder), exact copies filed under another class, and
near copies in the same class (resized 50-80 %, JPEG quality 60, a 5 % crop, brightness
+-15 %). Then runs ``retrainer.audit.audit`` (bottlenecks warm on the second run) and reports
precision / recall / F1 of the flagged mislabels against the flips, beside cleanlab's
``find_label_issues`` on the SAME out-of-fold probabilities (cleanlab is only needed here, and
only if installed: it is AGPL-3.0 and never a dependency of retrainer), the recall of the
planted duplicate groups, the false groups, and the similarities that set the near-duplicate
threshold (planted copies against pairs of different photos of one class).

    python bench/audit.py --data-root DATA --sets flowers,hymenoptera_data \
        --clean-sets fashion_mnist_png/train,mnist_png/train \
        --bottleneck-dir /tmp/bn --work-dir /tmp/audit-bench
"""
from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

TRANSFORMS = ("resize", "jpeg60", "crop5", "brightness")


def near_copy(data: bytes, kind: str, rng: random.Random) -> bytes:
    im = Image.open(io.BytesIO(data)).convert("RGB")
    quality = 92
    if kind == "resize":
        f = rng.uniform(0.5, 0.8)
        im = im.resize((max(1, int(im.width * f)), max(1, int(im.height * f))), Image.BILINEAR)
    elif kind == "jpeg60":
        quality = 60
    elif kind == "crop5":
        dx, dy = int(im.width * 0.025), int(im.height * 0.025)
        im = im.crop((dx, dy, im.width - dx, im.height - dy))
    elif kind == "brightness":
        im = ImageEnhance.Brightness(im).enhance(rng.choice([0.85, 1.15]))
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def make_dirty(src: Path, dst: Path, seed: int, flip: float, n_exact: int, n_near: int) -> dict:
    """dst/<label>/<file> with the damage; returns the ground truth (relative paths)."""
    rng = random.Random(seed)
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower()
                   in (".jpg", ".jpeg", ".png") and not p.name.startswith("."))
    labels = sorted({p.parent.name for p in files})
    if dst.exists():
        shutil.rmtree(dst)
    items = []
    for p in files:
        name = f"{p.parent.parent.name}_{p.name}" if p.parent.parent != src else p.name
        items.append((p, p.parent.name, name))
    flips = set(rng.sample(range(len(items)), round(flip * len(items))))
    truth = {"flipped": [], "exact": [], "near": [], "labels": labels}
    placed = []
    for i, (p, label, name) in enumerate(items):
        new = rng.choice([c for c in labels if c != label]) if i in flips else label
        rel = f"{new}/{name}"
        (dst / new).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dst / rel)
        placed.append((rel, new, i in flips))
        if i in flips:
            truth["flipped"].append(rel)
    clean = [x for x in placed if not x[2]]
    for n, (rel, label, _) in enumerate(rng.sample(clean, n_exact)):
        other = rng.choice([c for c in labels if c != label])
        copy = f"{other}/exact_copy_{n}{Path(rel).suffix}"
        shutil.copyfile(dst / rel, dst / copy)
        truth["exact"].append([rel, copy])
    for n, (rel, label, _) in enumerate(rng.sample(clean, n_near)):
        kind = TRANSFORMS[n % len(TRANSFORMS)]
        copy = f"{label}/near_{kind}_{n}.jpg"
        (dst / copy).write_bytes(near_copy((dst / rel).read_bytes(), kind, rng))
        truth["near"].append([rel, copy, kind])
    return truth


def prf(flagged: set, truth: set) -> dict:
    tp = len(flagged & truth)
    p = tp / len(flagged) if flagged else 0.0
    r = tp / len(truth) if truth else 0.0
    return {"flagged": len(flagged), "true_positives": tp, "precision": round(p, 4),
            "recall": round(r, 4), "f1": round(2 * p * r / (p + r), 4) if p + r else 0.0}


def run_set(name: str, src: Path, args: argparse.Namespace) -> dict:
    from retrainer.audit import audit, find_label_issues
    from retrainer.bottlenecks.fill import fill
    from retrainer.config import (BackboneConfig, ExportConfig, ExtractionConfig, SourceConfig,
                                  TrainConfig)
    from retrainer.split import normalised

    dirty = Path(args.work_dir) / f"dirty_{name}"
    truth = make_dirty(src, dirty, args.seed, args.flip, args.exact, args.near)
    config = TrainConfig(source=SourceConfig(image_dir=str(dirty)),
                         backbone=BackboneConfig(args.backbone),
                         extraction=ExtractionConfig(bottleneck_dir=args.bottleneck_dir),
                         export=ExportConfig(output_dir=str(Path(args.work_dir) / "o")))
    t = time.perf_counter()
    audit(config, folds=args.folds)  # fills the cache
    cold = time.perf_counter() - t
    t = time.perf_counter()
    result = audit(config, folds=args.folds)
    warm = time.perf_counter() - t
    rel = [str(Path(r.display).relative_to(dirty)) for r in result.records]
    cross_copies = {c for _, c in truth["exact"]} | {o for o, _ in truth["exact"]}
    scored = [p for p in rel if p not in cross_copies]  # identical bytes under two labels: no truth
    flips = set(truth["flipped"]) & set(scored)
    ours = {str(Path(d["_path"]).relative_to(dirty)) for d in result.label_issues} & set(scored)
    out = {"images": len(rel), "flipped": len(truth["flipped"]), "ours": prf(ours, flips),
           "seconds_cold": round(cold, 2), "seconds_warm": round(warm, 2),
           "audit_seconds_warm": result.summary["seconds"]}
    try:
        from cleanlab.filter import find_label_issues as cleanlab_issues
        import cleanlab

        mask = cleanlab_issues(result._labels, result._probs)
        theirs = {rel[i] for i in np.flatnonzero(mask)} & set(scored)
        out["cleanlab"] = {"version": cleanlab.__version__, **prf(theirs, flips)}
    except ImportError:
        out["cleanlab"] = "not installed"
    mask = find_label_issues(result._labels, result._probs)
    assert {rel[i] for i in np.flatnonzero(mask)} & set(scored) == ours

    def groups(kind: str) -> list[set]:
        return [{str(Path(p).relative_to(dirty)) for p in d["paths"]}
                for d in result.duplicates if d["kind"] == kind]

    exact, near = groups("exact"), groups("near")
    anyg = exact + near
    found_exact = sum(any({a, b} <= g for g in exact) for a, b in truth["exact"])
    found_near = {k: 0 for k in TRANSFORMS}
    for a, b, kind in truth["near"]:
        found_near[kind] += any({a, b} <= g for g in anyg)
    planted = [set(x[:2]) for x in truth["exact"] + truth["near"]]
    false = [sorted(g) for g in anyg if not any(p <= g for p in planted)]
    out["duplicates"] = {
        "exact_recall": round(found_exact / max(1, len(truth["exact"])), 4),
        "near_recall": round(sum(found_near.values()) / max(1, len(truth["near"])), 4),
        "near_found_by_kind": found_near, "near_planted": len(truth["near"]),
        "groups_reported": len(anyg), "false_groups": len(false),
        "false_group_share": round(len(false) / max(1, len(anyg)), 4), "false": false[:10]}

    # The similarities behind the threshold: planted near copies vs different photos of a class.
    filled = fill(config, split=False)
    keys = [k for k in filled.keys]
    x = normalised(filled.cache.load(keys))
    filled.cache.close()
    rel_all = [str(Path(r.display).relative_to(dirty)) for r in filled.dataset.records]
    pos = {p: i for i, p in enumerate(rel_all)}
    near_sims = {k: [] for k in TRANSFORMS}
    for a, b, kind in truth["near"]:
        near_sims[kind].append(float(x[pos[a]] @ x[pos[b]]))
    sims = x @ x.T
    labels = [p.split("/")[0] for p in rel_all]
    dup_of = {}
    for a, b in [tuple(p)[:2] for p in planted]:
        dup_of.setdefault(a, set()).add(b)
        dup_of.setdefault(b, set()).add(a)
    distinct = []
    for i in range(len(rel_all)):
        for j in range(i + 1, len(rel_all)):
            if labels[i] == labels[j] and rel_all[j] not in dup_of.get(rel_all[i], ()) \
                    and keys[i] != keys[j]:
                distinct.append(sims[i, j])
    distinct = np.array(distinct)
    # The second signal: thumbnail correlation of the planted copies, and the highest of two
    # different images that reach the cosine floor (the only pairs it is asked about).
    from retrainer.split import NEAR_DUPLICATE_PIXEL_FLOOR, thumbnail

    thumbs = [thumbnail(r.read())[0] for r in filled.dataset.records]
    pixel = {k: [] for k in TRANSFORMS}
    for a, b, kind in truth["near"]:
        pixel[kind].append(float(thumbs[pos[a]] @ thumbs[pos[b]]))
    candidates = [float(thumbs[i] @ thumbs[j]) for i in range(len(rel_all))
                  for j in range(i + 1, len(rel_all))
                  if sims[i, j] >= NEAR_DUPLICATE_PIXEL_FLOOR and keys[i] != keys[j]
                  and rel_all[j] not in dup_of.get(rel_all[i], ())
                  and thumbs[i] is not None and thumbs[j] is not None]
    out["thumbnail_correlation"] = {
        "near_copies_min": {k: round(min(v), 4) for k, v in pixel.items() if v},
        "distinct_max_above_cosine_floor": round(max(candidates), 4) if candidates else None}
    out["similarity"] = {
        "near_copies_min": {k: round(min(v), 4) for k, v in near_sims.items() if v},
        "near_copies_p5": round(float(np.percentile(sum(near_sims.values(), []), 5)), 4),
        "distinct_same_class_max": round(float(distinct.max()), 4),
        "distinct_same_class_p99_99": round(float(np.percentile(distinct, 99.99)), 4),
        "distinct_pairs": int(distinct.size),
        "distinct_above_threshold": int((distinct > result.summary["near_duplicate_similarity"]).sum()),
        "top_distinct": [[rel_all[i], rel_all[j], round(float(sims[i, j]), 4)] for i, j in
                         sorted(((i, j) for i in range(len(rel_all)) for j in range(i + 1, len(rel_all))
                                 if labels[i] == labels[j] and keys[i] != keys[j]
                                 and rel_all[j] not in dup_of.get(rel_all[i], ())),
                                key=lambda ij: -sims[ij])[:5]]}
    return out


def clean_set(root: Path, args: argparse.Namespace) -> dict:
    """Near-duplicate groups on a set with no planted copies (look-alike items must not chain)."""
    from retrainer.audit import audit
    from retrainer.config import (BackboneConfig, ExportConfig, ExtractionConfig, SourceConfig,
                                  TrainConfig)

    config = TrainConfig(source=SourceConfig(image_dir=str(root)),
                         backbone=BackboneConfig(args.backbone),
                         extraction=ExtractionConfig(bottleneck_dir=args.bottleneck_dir),
                         export=ExportConfig(output_dir=str(Path(args.work_dir) / "o")))
    audit(config, folds=args.folds)  # fills the cache
    t = time.perf_counter()
    result = audit(config, folds=args.folds)
    near = [len(d["paths"]) for d in result.duplicates if d["kind"] == "near"]
    return {"images": len(result.records), "near_groups": len(near),
            "largest_near_group": max(near, default=0),
            "seconds_warm": round(time.perf_counter() - t, 2),
            "audit_seconds_warm": result.summary["seconds"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--sets", default="flowers,hymenoptera_data")
    p.add_argument("--work-dir", required=True)
    p.add_argument("--bottleneck-dir", required=True)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--flip", type=float, default=0.10)
    p.add_argument("--exact", type=int, default=10)
    p.add_argument("--near", type=int, default=40)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clean-sets", default="",
                   help="Also audit these sets as they are (e.g. fashion_mnist_png/train): "
                        "near-duplicate groups formed, and seconds with warm bottlenecks.")
    args = p.parse_args()
    report = {}
    for name in filter(None, args.sets.split(",")):
        report[name] = run_set(name, Path(args.data_root) / name, args)
        print(json.dumps({name: report[name]}), file=sys.stderr)
    for name in filter(None, args.clean_sets.split(",")):
        report[name] = clean_set(Path(args.data_root) / name, args)
        print(json.dumps({name: report[name]}), file=sys.stderr)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
