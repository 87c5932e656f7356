"""``model.onnx``: the frozen classifier graph converted by tf2onnx, labels in its properties.

Needs the ``onnx`` extra (``pip install 'retrainer[onnx]'``: tf2onnx and onnx; onnxruntime to
run it). The opset is 17: ONNX Runtime has run it since 1.14 (2023), including its mobile and
web builds, and it is the newest opset tf2onnx 1.17 maps every op of retrainer's backbones
to; nothing in these graphs gains from a newer one.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from .errors import RetrainerError
from .graph import INPUT_NAME, OUTPUT_NAME

OPSET = 17


class OnnxUnavailable(RetrainerError):
    def __init__(self, missing: str) -> None:
        super().__init__(f"the ONNX export needs {missing}, which is not installed.",
                         "Install it with: pip install 'retrainer[onnx]', or leave 'onnx' out "
                         "of the formats.")


def onnx_model(graph_def: Any, labels: list[str], metadata: dict[str, Any]) -> bytes:
    """The ONNX model of a frozen classifier (``input`` -> ``final_result``), serialised.

    Input ``input:0``: float32 (N, H, W, 3), RGB 0..255; output ``final_result:0``: class
    probabilities. ``metadata_props`` holds ``labels`` (a JSON list, in output order) and
    ``retrainer`` (the export's metadata.json, less its file list).
    """
    try:
        import tf2onnx
    except ImportError as exc:
        raise OnnxUnavailable(exc.name or "tf2onnx") from None
    proto = _converted(tf2onnx, graph_def)
    proto.doc_string = "retrainer image classifier: RGB 0..255 in, class probabilities out"
    described = {k: v for k, v in metadata.items() if k != "files"}
    for key, value in (("labels", json.dumps(labels, ensure_ascii=False)),
                       ("retrainer", json.dumps(described, ensure_ascii=False, default=str))):
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, value
    return proto.SerializeToString()


def graph_onnx(graph_def: Any) -> bytes:
    """A frozen graph (``input`` -> ``final_result``) converted for a runtime to run: the model
    only, no labels or metadata (a backbone's graph, or an export's for ONNX Runtime)."""
    try:
        import tf2onnx
    except ImportError:
        raise RetrainerError("runtime 'onnxruntime' needs the tf2onnx package to convert the "
                             "graph, which is not installed.",
                             "Install it (pip install tf2onnx) or use --runtime auto.") from None
    return _converted(tf2onnx, graph_def, quiet=logging.ERROR).SerializeToString()


def tf2onnx_version() -> str:
    """The installed tf2onnx's version ("none" without it): kept conversions are named by it."""
    from importlib import metadata

    try:
        return metadata.version("tf2onnx")
    except metadata.PackageNotFoundError:
        return "none"


def _converted(tf2onnx: Any, graph_def: Any, quiet: int = logging.WARNING) -> Any:
    from ._tf_internals import import_tensorflow

    import_tensorflow()
    for name in ("tf2onnx", "tensorflow"):
        logging.getLogger(name).setLevel(max(logging.getLogger(name).level, quiet))
    proto, _ = tf2onnx.convert.from_graph_def(
        graph_def, input_names=[f"{INPUT_NAME}:0"], output_names=[f"{OUTPUT_NAME}:0"],
        opset=OPSET)
    return proto


__all__ = ["OPSET", "OnnxUnavailable", "graph_onnx", "onnx_model", "tf2onnx_version"]
