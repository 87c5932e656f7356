"""3. bf16 vs fp32: extraction speed, and accuracy on hymenoptera and flowers.

Each data set is extracted twice through ``train``'s engine, at fp32 and at bf16 (the cache
keeps them apart). Accuracy is a fixed linear probe on the bottlenecks (scikit-learn logistic
regression): hymenoptera trains on train/ and tests on val/ (153 images); flowers uses 5-fold
cross-validation over its 300 images. ``agreement`` is the share of test images both precisions
label alike; ``fp32_only_right`` and ``bf16_only_right`` count the test images only one of them
gets right, and ``mcnemar_p`` is the exact two-sided McNemar p-value of that split (a small p
means the accuracy difference is not chance; with random weights, the features themselves are
noise, so only a small p would say that bf16 costs accuracy).
"""
from __future__ import annotations

import math
import shutil
import time

import numpy as np

from common import WEIGHTS, backbones, data_root, emit, parser, work_dir

DATASETS = ("hymenoptera_data", "flowers")


def features(backbone, precision: str, records: list,  # noqa: ANN001
             cache_root) -> tuple[np.ndarray, float]:  # noqa: ANN001
    """Bottlenecks of ``records`` through ``train``'s engine at ``precision``, and its img/s."""
    from retrainer.backbones.factory import Backbone
    from retrainer.bottlenecks import BottleneckCache, get_engine, hash_records
    from retrainer.bottlenecks.extractor import make_forward

    # The same weights at both precisions (random weights differ at every build).
    backbone = Backbone(backbone.spec, backbone.model, backbone.weights_digest, precision)
    forward = make_forward(backbone, cache_root / "graphs")
    spec = backbone.spec
    shutil.rmtree(cache_root / "bn", ignore_errors=True)
    cache = BottleneckCache(cache_root / "bn", backbone.cache_id, spec.feature_dim)
    forward(np.zeros((2, *spec.input_size, 3), np.float32))  # warm-up, as the raw pass gets
    t = time.perf_counter()
    keys, _ = hash_records(records)
    engine = get_engine("local")
    engine.extract(list(dict(zip(keys, records)).items()), forward, spec.input_size, spec.resize,
                   cache)
    rate = len(records) / (time.perf_counter() - t)
    return BottleneckCache(cache_root / "bn", backbone.cache_id, spec.feature_dim).load(keys), rate


def probe(x: np.ndarray, y: np.ndarray, test: np.ndarray | None) -> np.ndarray:
    """Predictions on the test images (or out-of-fold predictions for every image)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    if test is None:
        return cross_val_predict(model, x, y, cv=StratifiedKFold(5, shuffle=True, random_state=0))
    model.fit(x[~test], y[~test])
    return model.predict(x[test])


def mcnemar_p(a: int, b: int) -> float:
    """Exact two-sided McNemar test: how likely a split of a + b discordant images at least this
    uneven is when both precisions are equally accurate."""
    n = a + b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(a, b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def main() -> None:
    args = parser(__doc__).parse_args()
    root, work = data_root(args), work_dir(args)
    from retrainer.sources.folder import scan_folder

    from retrainer.backbones.factory import create_backbone

    out: dict = {}
    for name in backbones(args):
        out[name] = {}
        backbone = create_backbone(name, WEIGHTS[name])
        for ds in DATASETS:
            dataset = scan_folder(root / ds)
            records = dataset.records
            y = np.array([dataset.classes.index(r.label) for r in records])
            test = (np.array([r.split == "validation" for r in records])
                    if any(r.split for r in records) else None)
            row: dict = {"images": len(records)}
            preds = {}
            for precision in ("fp32", "bf16"):
                x, rate = features(backbone, precision, records, work / "b3" / name)
                preds[precision] = probe(x, y, test)
                truth = y[test] if test is not None else y
                row[f"{precision}_img_s"] = round(rate, 2)
                row[f"{precision}_accuracy"] = round(float((preds[precision] == truth).mean()), 4)
            row["speedup"] = round(row["bf16_img_s"] / row["fp32_img_s"], 2)
            row["accuracy_delta_points"] = round(100 * (row["bf16_accuracy"] - row["fp32_accuracy"]), 2)
            row["agreement"] = round(float((preds["fp32"] == preds["bf16"]).mean()), 4)
            right = {p: preds[p] == truth for p in preds}
            row["fp32_only_right"] = int((right["fp32"] & ~right["bf16"]).sum())
            row["bf16_only_right"] = int((right["bf16"] & ~right["fp32"]).sum())
            row["mcnemar_p"] = round(mcnemar_p(row["fp32_only_right"], row["bf16_only_right"]), 3)
            row["test_images"] = int(test.sum()) if test is not None else len(records)
            out[name][ds] = row
    emit({"benchmark": "bf16", "results": out})


if __name__ == "__main__":
    main()
