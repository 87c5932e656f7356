"""The configured source opened: a folder or a SQL database, each record given a split.

The first stage of the pipeline, kept apart from ``train`` so that extraction (``fill``), the
audit and the benchmarks open a source exactly as training does.
"""
from __future__ import annotations

from .config import TrainConfig
from .errors import DatasetError
from .sources.base import Dataset


def open_source(config: TrainConfig) -> Dataset:
    """The records of ``config``'s source, with only the splits the source itself gives
    (train/ val/ test/ folders, database roles)."""
    source = config.source
    if source.db:
        from .db.source import scan_database

        return scan_database(source.db, where=source.db_where)
    if not source.image_dir:
        raise DatasetError("no images to train on.",
                           "Give an image folder (image_dir=DIR) or a database (db=URL).")
    from .sources.folder import scan_folder

    bottleneck_dir = config.extraction.bottleneck_dir
    exclude = [config.export.output_dir] + ([bottleneck_dir] if bottleneck_dir else [])
    return scan_folder(source.image_dir, exclude=exclude)


def load_dataset(config: TrainConfig, split: bool = True) -> Dataset:
    """:func:`open_source`, with every record given a split (``split=False``: only the
    source's own splits; ``fill`` then groups copies of one image into one split)."""
    from .split import assign_splits

    dataset = open_source(config)
    if not split:
        return dataset
    return assign_splits(dataset, config.source.validation_percentage,
                         config.source.testing_percentage)
