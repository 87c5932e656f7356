"""The backbone families that ship with retrainer: each module registers its own specs.

Importing them needs neither TensorFlow nor Keras; builders import those when a model is built.
"""
from __future__ import annotations

from . import efficientnet_lite, keras_apps  # noqa: F401 - imported for their registrations
