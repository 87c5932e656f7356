"""Where labelled images come from: a folder per class (the SQL source is retrainer.db.source).

A source yields :class:`ImageRecord` objects; nothing downstream knows which source ran.
"""
from .base import Dataset, ImageRecord, Skipped
from .folder import scan_folder

__all__ = ["Dataset", "ImageRecord", "Skipped", "scan_folder"]
