"""Extraction only: fill the bottleneck cache for an image folder, with any engine.

This is the first half of ``train`` on its own, so a big set can be featurized where the compute
is (``--engine spark``) and the head trained later by an ordinary ``train``, which then finds
every bottleneck in the cache.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..sources.base import Dataset, ImageRecord, Skipped

log = logging.getLogger(__name__)


@dataclass
class FillResult:
    """What an extraction run did."""

    images: int
    cached: int
    computed: int
    skipped: list[Skipped]
    cache_dir: str
    engine: str
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["skipped"] = [{"name": s.name, "reason": s.reason} for s in self.skipped]
        return data


def fill_cache(config: TrainConfig, dataset: Dataset | None = None, engine: Any = None
               ) -> FillResult:
    """Compute the bottlenecks ``train(config)`` would need and are not cached yet.

    ``engine`` overrides ``config.engine`` (e.g. a SparkEngine on a running session).
    """
    from ..backbones.factory import create_backbone, resolve_spec
    from ..training import load_dataset
    from . import BottleneckCache, default_cache_dir, get_engine, hash_records
    from .extractor import make_forward

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    spec = resolve_spec(config.architecture, config.feature_layer)
    dataset = dataset or load_dataset(config)
    backbone = create_backbone(spec, config.weights, precision=config.precision, lazy=True)
    cache_root = (Path(config.bottleneck_dir) if config.bottleneck_dir
                  else default_cache_dir() / "bottlenecks")
    cache = BottleneckCache(cache_root, backbone.cache_id, spec.feature_dim,
                            info={"backbone": spec.to_dict(), "precision": config.precision,
                                  "weights_sha256": backbone.weights_digest})
    timings["setup"] = time.perf_counter() - t0

    t = time.perf_counter()
    keys, skipped = hash_records(dataset.records, config.workers)
    todo: dict[str, ImageRecord] = {}
    for key, rec in zip(keys, dataset.records):
        if key is not None and key not in todo:
            todo[key] = rec
    missing = set(cache.missing(todo))
    timings["hash"] = time.perf_counter() - t
    log.info("bottlenecks: %d cached, %d to compute (cache: %s)",
             len(todo) - len(missing), len(missing), cache.dir)
    engine = engine or get_engine(config.engine, workers=config.workers,
                                  master=config.spark_master)
    t = time.perf_counter()
    if missing:
        forward = make_forward(backbone, cache_root)
        items = [(k, r) for k, r in todo.items() if k in missing]
        skipped += engine.extract(items, forward, spec.input_size, spec.resize, cache,
                                  batch_size=config.extract_batch_size)
    timings["extract"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    computed = len(missing) - len(cache.missing(missing))
    return FillResult(images=len(dataset.records), cached=len(todo) - len(missing),
                      computed=computed, skipped=skipped, cache_dir=str(cache.dir),
                      engine=getattr(engine, "name", config.engine), timings=timings)
