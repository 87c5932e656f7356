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
from typing import Any, Callable

from ..config import TrainConfig
from ..errors import RetrainerError
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


@dataclass
class Filled:
    """Everything ``train`` needs after extraction: the cache holds every usable image."""

    spec: Any
    dataset: Dataset
    backbone: Any
    cache: Any
    keys: list[str | None]  # per dataset record; None where the file was unreadable
    skipped: list[Skipped]
    cached: int
    computed: int
    engine: str
    timings: dict[str, float]
    grouping: Any = None  # split.Grouping: the copies found while splitting
    extract: Any = None  # Extractor: more bottlenecks (augmented variants) the same way


class Extractor:
    """Computes bottlenecks into ``cache`` with one run's engine and backbone runner, each
    built once, on first use (``engine``: one given by the caller, e.g. on a running session).
    """

    def __init__(self, config: TrainConfig, backbone: Any, cache: Any, engine: Any = None
                 ) -> None:
        self.config, self.backbone, self.cache = config.extraction, backbone, cache
        self.engine, self.forward = engine, None

    @property
    def name(self) -> str:
        return getattr(self.engine, "name", self.config.engine)

    def __call__(self, items: list[tuple[str, ImageRecord]]) -> list[Skipped]:
        """Compute and cache the bottlenecks of ``items`` (key, record); the ones skipped."""
        from . import get_engine
        from .engines import BackboneModel
        from .extractor import graphs_dir

        if self.engine is None:
            self.engine = get_engine(self.config.engine, workers=self.config.workers,
                                     master=self.config.spark_master)
        if self.forward is None:
            # Built where it runs (the local engine, once: the model keeps its runner) or
            # shipped as bytes (Spark): no runner on the driver for nothing.
            self.forward = BackboneModel(self.backbone, graphs_dir())
        spec = self.backbone.spec
        return self.engine.extract(items, self.forward, spec.input_size, spec.resize,
                                   self.cache, batch_size=self.config.batch_size)


def fill(config: TrainConfig, dataset: Dataset | None = None, engine: Any = None,
         split: bool = True, on_backbone: Callable[[Any], None] | None = None) -> Filled:
    """Compute the bottlenecks ``train(config)`` needs that are not cached yet.

    ``engine`` overrides ``config.extraction.engine`` (e.g. a SparkEngine on a running
    session). With ``split`` the records get their splits once their contents (and
    bottlenecks) are known, so copies of one image land in one split (see
    :func:`retrainer.split.assign_splits`). ``on_backbone`` is called with the run's backbone
    before any image is read (``train`` starts its export helper there).
    """
    from ..backbones.composite import is_composite
    from ..backbones.factory import create_backbone, resolve_spec
    from ..dataset import load_dataset
    from . import BottleneckCache, default_cache_dir, hash_records, verified
    from ..runtimes import check_runtime
    from .runtime_choice import choose
    from .extractor import graphs_dir

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    wanted = config.backbone
    spec = resolve_spec(wanted.name, wanted.feature_layer)  # fails before TF loads
    runtime = check_runtime(wanted.runtime, wanted.precision)
    dataset = dataset or load_dataset(config, split=False)
    log.info("found %d images in %d classes", len(dataset.records), len(dataset.classes))
    if wanted.tta != "none" and config.fine_tune is not None:
        raise RetrainerError("fine-tuning with test-time augmentation is not supported.",
                             "Use tta=none with fine-tuning, or leave fine-tuning off.")
    if config.fine_tune is not None and is_composite(spec):
        raise RetrainerError(f"fine-tuning the composite backbone {spec.name!r} is not "
                             "supported.", "Fine-tune one backbone, or leave fine-tuning off.")
    backbone = create_backbone(spec, wanted.weights, precision=wanted.precision, lazy=True,
                               tta=wanted.tta)
    spec = backbone.spec  # records the TTA mode (options.tta) for the metadata
    backbone.runtime = runtime
    if runtime == "auto" and wanted.precision != "fp32":  # the runtime is part of the cache id
        backbone.runtime = choose(backbone, graphs_dir())
    bottleneck_dir = config.extraction.bottleneck_dir
    cache_root = Path(bottleneck_dir) if bottleneck_dir else default_cache_dir() / "bottlenecks"
    cache = BottleneckCache(cache_root, backbone.cache_id, spec.feature_dim,
                            info={"backbone": spec.to_dict(), "precision": wanted.precision,
                                  "tta": wanted.tta, "weights_sha256": backbone.weights_digest})
    extract = Extractor(config, backbone, cache, engine)
    if on_backbone is not None:
        on_backbone(backbone)
    timings["setup"] = time.perf_counter() - t0

    t = time.perf_counter()
    keys, skipped = hash_records(dataset.records, config.extraction.workers)
    todo: dict[str, ImageRecord] = {}
    for key, rec in zip(keys, dataset.records):
        if key is not None and key not in todo:
            todo[key] = rec
    missing = set(cache.missing(todo))
    timings["hash"] = time.perf_counter() - t
    log.info("bottlenecks: %d cached, %d to compute (cache: %s)",
             len(todo) - len(missing), len(missing), cache.dir)
    t = time.perf_counter()
    if missing:
        skipped += extract([(k, verified(r, k)) for k, r in todo.items() if k in missing])
    timings["extract"] = time.perf_counter() - t
    computed = len(missing) - len(cache.missing(missing))
    if skipped:
        log.warning("skipped %d unusable file(s); see the summary", len(skipped))
    grouping = None
    if split:
        t = time.perf_counter()
        dataset, keys, grouping = _split(config, dataset, keys, cache, spec.feature_dim)
        timings["split"] = time.perf_counter() - t
    return Filled(spec=spec, dataset=dataset, backbone=backbone, cache=cache,
                  keys=keys, skipped=skipped,
                  cached=len(todo) - len(missing), computed=computed,
                  engine=extract.name, timings=timings, grouping=grouping, extract=extract)


def _split(config: TrainConfig, dataset: Dataset, keys: list[str | None], cache: Any,
           feature_dim: int) -> tuple[Dataset, list[str | None], Any]:
    """Splits decided with the contents known: copies of one image land in one split."""
    import numpy as np

    from ..split import NEAR_DUPLICATE_MIN_DIM, Grouping, assign_splits

    vectors = None
    if feature_dim >= NEAR_DUPLICATE_MIN_DIM:
        known = [i for i, k in enumerate(keys) if k is not None and k in cache]
        vectors = np.full((len(keys), feature_dim), np.nan, np.float32)
        if known:
            vectors[known] = cache.load([keys[i] for i in known])
    grouping = Grouping()
    content = {rec.key: k for rec, k in zip(dataset.records, keys)}
    source = config.source
    dataset = assign_splits(dataset, source.validation_percentage, source.testing_percentage,
                            content_keys=keys, vectors=vectors, grouping=grouping,
                            keep_conflicting=source.keep_conflicting_duplicates)
    keys = [content[rec.key] for rec in dataset.records]
    found = grouping.exact_groups or grouping.near_groups or grouping.straddling
    (log.warning if grouping.conflicting or grouping.straddling else log.info)(
        "%s%s", grouping.summary() if found else "duplicates: none found",
        "; keep them with keep_conflicting_duplicates=True" if grouping.excluded else "")
    return dataset, keys, grouping


def fill_cache(config: TrainConfig, dataset: Dataset | None = None, engine: Any = None
               ) -> FillResult:
    """:func:`fill`, summarised for the ``bottlenecks`` command."""
    t0 = time.perf_counter()
    done = fill(config, dataset, engine, split=False)
    done.cache.close()
    timings = {**done.timings, "total": time.perf_counter() - t0}
    return FillResult(images=len(done.dataset.records), cached=done.cached,
                      computed=done.computed, skipped=done.skipped, cache_dir=str(done.cache.dir),
                      engine=done.engine, timings=timings)
