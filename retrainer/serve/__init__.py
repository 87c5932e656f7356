"""A trained model as a real-time REST service: ``retrainer serve``.

:func:`create_app` builds the FastAPI application around a loaded
:class:`retrainer.predict.Classifier`; :func:`serve` loads, binds and runs it with uvicorn.
FastAPI and uvicorn come with the ``serve`` extra and are imported only when used.
"""
from __future__ import annotations

from typing import Any

from .settings import ServeConfig

__all__ = ["ServeConfig", "create_app", "serve"]


def create_app(*args: Any, **kw: Any) -> Any:
    from .app import create_app as _create_app

    return _create_app(*args, **kw)


def serve(*args: Any, **kw: Any) -> Any:
    from .server import serve as _serve

    return _serve(*args, **kw)
