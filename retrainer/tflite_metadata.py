"""TFLite Metadata for an image classifier: what Android's Task Library and ML Kit read.

The metadata is a flatbuffer of TFLite's metadata schema (``metadata_schema.fbs`` in
TensorFlow Lite Support, file identifier ``M001``) stored in one of the model's buffers under
the name ``TFLITE_METADATA``; its associated files (here the labels) are a zip archive
appended to the model file, as TFLite Support's ``MetadataPopulator`` writes them. The model
still loads in every TFLite runtime: they ignore both.

Only the tables an image classifier needs are written here, with the flatbuffers builder and
the field slots of that schema (version 1.0), so that no dependency pins an old protobuf:
``tflite-support`` does.
"""
from __future__ import annotations

import io
import zipfile
from typing import Any, Sequence

METADATA_NAME = "TFLITE_METADATA"
LABELS_NAME = "labels.txt"
MIN_PARSER_VERSION = "1.0.0"
_IDENTIFIER = b"M001"
# Enum and union values of metadata_schema.fbs.
_TENSOR_AXIS_LABELS = 2
_RGB = 1
_FEATURE_PROPERTIES, _IMAGE_PROPERTIES = 1, 2
_NORMALIZATION_OPTIONS = 1


def metadata_buffer(name: str, description: str, version: str, labels_description: str,
                    input_description: str, output_description: str,
                    mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,),
                    value_range: tuple[float, float] = (0.0, 255.0), author: str = "",
                    license_text: str = "") -> bytes:
    """The ``ModelMetadata`` flatbuffer of a one-input (RGB image), one-output classifier."""
    import flatbuffers

    b = flatbuffers.Builder(1024)

    def strings(**kw: str) -> dict[str, int]:
        return {k: b.CreateString(v) for k, v in kw.items()}

    def floats(values: Sequence[float]) -> int:
        b.StartVector(4, len(values), 4)
        for v in reversed(values):
            b.PrependFloat32(float(v))
        return b.EndVector()

    def offsets(items: Sequence[int]) -> int:
        b.StartVector(4, len(items), 4)
        for item in reversed(items):
            b.PrependUOffsetTRelative(item)
        return b.EndVector()

    def table(fields: dict[int, int], bytes_: dict[int, int] | None = None) -> int:
        b.StartObject(max([*fields, *(bytes_ or {}), 0]) + 1)
        for slot, value in (bytes_ or {}).items():
            b.PrependUint8Slot(slot, value, 0)
        for slot, off in fields.items():
            b.PrependUOffsetTRelativeSlot(slot, off, 0)
        return b.EndObject()

    s = strings(name=name, description=description, version=version, author=author,
                license=license_text, parser=MIN_PARSER_VERSION, labels=LABELS_NAME,
                labels_description=labels_description, image="image",
                input_description=input_description, scores="probability",
                output_description=output_description)
    # input: an RGB image, pixels 0..255 as they are (the graph normalises)
    image_props = table({}, {0: _RGB})                                # ImageProperties
    input_content = table({1: image_props}, {0: _IMAGE_PROPERTIES})  # Content
    norm = table({0: floats(mean), 1: floats(std)})                   # NormalizationOptions
    unit = table({1: norm}, {0: _NORMALIZATION_OPTIONS})               # ProcessUnit
    in_stats = table({0: floats([value_range[1]]), 1: floats([value_range[0]])})  # Stats
    tensor_in = table({0: s["image"], 1: s["input_description"], 3: input_content,
                       4: offsets([unit]), 5: in_stats})            # TensorMetadata
    # output: class probabilities, one per line of the labels file
    labels_file = table({0: s["labels"], 1: s["labels_description"]},
                        {2: _TENSOR_AXIS_LABELS})                   # AssociatedFile
    output_content = table({1: table({})}, {0: _FEATURE_PROPERTIES})
    out_stats = table({0: floats([1.0]), 1: floats([0.0])})
    tensor_out = table({0: s["scores"], 1: s["output_description"], 3: output_content,
                        5: out_stats, 6: offsets([labels_file])})
    subgraph = table({2: offsets([tensor_in]), 3: offsets([tensor_out])})  # SubGraphMetadata
    fields = {0: s["name"], 1: s["description"], 2: s["version"],
              3: offsets([subgraph]), 7: s["parser"]}
    if author:
        fields[4] = s["author"]
    if license_text:
        fields[5] = s["license"]
    b.Finish(table(fields), file_identifier=_IDENTIFIER)
    return bytes(b.Output())


def with_metadata(model: Any, metadata: bytes) -> Any:
    """``model`` (a TFLite ``ModelT``) with ``metadata`` as its ``TFLITE_METADATA`` entry."""
    from ._tf_internals import tflite_schema

    sc = tflite_schema()
    buffer = sc.BufferT()
    import numpy as np

    buffer.data = np.frombuffer(metadata, np.uint8)
    model.buffers.append(buffer)
    entry = sc.MetadataT()
    entry.name, entry.buffer = METADATA_NAME, len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if m.name not in
                      (METADATA_NAME, METADATA_NAME.encode())] + [entry]
    return model


def with_associated_files(tflite: bytes, files: dict[str, bytes]) -> bytes:
    """``tflite`` followed by a zip archive (stored, not compressed) of ``files``."""
    buf = io.BytesIO(tflite)
    buf.seek(0, io.SEEK_END)
    with zipfile.ZipFile(buf, "a", zipfile.ZIP_STORED) as archive:
        for name, data in files.items():
            archive.writestr(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()


def associated_files(tflite: bytes) -> dict[str, bytes]:
    """The files appended to a TFLite model (empty when there are none)."""
    try:
        with zipfile.ZipFile(io.BytesIO(tflite)) as archive:
            return {name: archive.read(name) for name in archive.namelist()}
    except zipfile.BadZipFile:
        return {}


__all__ = ["associated_files", "metadata_buffer", "with_associated_files", "with_metadata"]
