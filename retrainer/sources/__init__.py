"""Where labelled images come from: a folder per class, or (later) a SQL table.

A source yields :class:`ImageRecord` objects; nothing downstream knows which source ran.
"""
from .base import Dataset, ImageRecord, Skipped
from .folder import scan_folder

__all__ = ["Dataset", "ImageRecord", "Skipped", "scan_folder"]
