"""Every private-TensorFlow trick retrainer uses, each beside the public way it replaces.

A TensorFlow upgrade that breaks one of them breaks this module only. The tricks:

- :func:`import_tensorflow` imports TensorFlow without the Keras import it does on the way
  (public way: ``import tensorflow``, about 1.5 s slower).
- :func:`convert_to_constants` freezes a concrete function (no public TF2 API does this; the
  public way is to keep the SavedModel and run it unfrozen, markedly slower on CPU).
- :func:`grappler_optimize` runs the session's graph rewriting once, ahead of time (public way:
  let every session rewrite the graph on its first run).
- :func:`tflite_schema` is the TFLite flatbuffer schema, used to append the head to a kept
  backbone model (public way: convert the whole classifier with ``tf.lite.TFLiteConverter``).
- :func:`run_exit_handlers` runs the ``atexit`` handlers before ``os._exit`` (public way: a
  normal interpreter exit, about 1 s of teardown once TensorFlow is loaded).

Importing TensorFlow without Keras:

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
from typing import Any

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


def convert_to_constants(concrete_function: Any) -> Any:
    """``concrete_function`` with its variables folded in as constants (a frozen function)."""
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    return convert_variables_to_constants_v2(concrete_function)


def grappler_optimize(config: Any, meta_graph: Any) -> Any:
    """The GraphDef a session would run after rewriting ``meta_graph`` under ``config``."""
    from tensorflow.python.grappler import tf_optimizer

    return tf_optimizer.OptimizeGraph(config, meta_graph)


def tflite_schema() -> ModuleType:
    """TFLite's generated flatbuffer schema (object API: ``ModelT``, ``OperatorT`` ...)."""
    from tensorflow.lite.python import schema_py_generated

    return schema_py_generated


def run_exit_handlers() -> None:
    """Run (and clear) the interpreter's ``atexit`` handlers now, before ``os._exit``."""
    import atexit

    atexit._run_exitfuncs()
