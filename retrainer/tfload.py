"""Importing TensorFlow without the Keras import it does on the way.

``tensorflow/__init__.py`` imports ``keras.src.optimizers`` eagerly (to register Keras objects
for SavedModel loading). With Keras 3 that imports all of Keras, which in turn imports
scikit-learn (its wrappers) and ``matplotlib.pyplot`` (its image gallery): about 1.5 s of the
3.5 s that ``import tensorflow`` takes. Labelling, serving and exporting run frozen graphs and
need none of it, so retrainer imports TensorFlow through :func:`import_tensorflow`, which skips
that one import. Keras still imports in full, later, when a backbone is built.
"""
from __future__ import annotations

import sys
import threading
from types import ModuleType

#: The module ``tensorflow/__init__.py`` imports for Keras (its failure to import is tolerated).
KERAS_EAGER_IMPORT = "keras.src.optimizers"
_lock = threading.Lock()


def import_tensorflow() -> ModuleType:
    """``import tensorflow``; the first time, without importing Keras.

    While the first import runs (about 2 s), ``keras.src.optimizers`` cannot be imported: code
    that imports Keras on another thread meanwhile should call this first.
    """
    if "tensorflow" in sys.modules:
        import tensorflow as tf  # waits for an import still running on another thread

        return tf
    with _lock:
        skip = "keras" not in sys.modules and KERAS_EAGER_IMPORT not in sys.modules
        if skip:
            sys.modules[KERAS_EAGER_IMPORT] = None  # type: ignore[assignment]  # import fails fast
        try:
            import tensorflow as tf
        finally:
            if skip and sys.modules.get(KERAS_EAGER_IMPORT, ...) is None:
                del sys.modules[KERAS_EAGER_IMPORT]
    return tf
