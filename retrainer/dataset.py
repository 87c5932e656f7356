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
    if config.db:
        from .db.source import scan_database

        return scan_database(config.db, where=config.db_where)
    if not config.image_dir:
        raise DatasetError("no images to train on.",
                           "Give an image folder (image_dir=DIR) or a database (db=URL).")
    from .sources.folder import scan_folder

    exclude = [config.output_dir] + ([config.bottleneck_dir] if config.bottleneck_dir else [])
    return scan_folder(config.image_dir, exclude=exclude)


def load_dataset(config: TrainConfig, split: bool = True) -> Dataset:
    """:func:`open_source`, with every record given a split (``split=False``: only the
    source's own splits; ``fill`` then groups copies of one image into one split)."""
    from .split import assign_splits

    dataset = open_source(config)
    if not split:
        return dataset
    return assign_splits(dataset, config.validation_percentage, config.testing_percentage)
