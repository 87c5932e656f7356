"""The ``retrainer`` command line: a thin click shell over the library."""
from .main import cli, main

__all__ = ["cli", "main"]
