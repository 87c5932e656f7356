"""Writing a trained classifier out: frozen graph, labels, SavedModel, TFLite, metadata.

Every export carries ``metadata.json`` (backbone, input size, normalisation, resize method,
labels, training figures), and the graphs take raw RGB 0..255 with the normalisation built in,
so nothing about preprocessing is passed by hand at label time.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import unicodedata
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from .files import atomic_write, writable_dir
from .errors import DatasetError, FolderNotWritable
from .graph import INPUT_NAME, OUTPUT_NAME, freeze, input_shape
from ._tf_internals import import_tensorflow

log = logging.getLogger(__name__)

GRAPH_FILE = "retrained_graph.pb"
LABELS_FILE = "retrained_labels.txt"
METADATA_FILE = "metadata.json"
SAVED_MODEL_DIR = "saved_model"
TFLITE_FILE = "model.tflite"
FORMATS = ("graph", "saved_model", "tflite")


def build_classifier(backbone_model: Any, head_model: Any) -> Any:
    """Backbone and head as one Keras model: RGB 0..255 in, class probabilities out."""
    import keras

    inputs = keras.Input(backbone_model.input_shape[1:], name=INPUT_NAME)
    outputs = head_model(backbone_model(inputs))
    return keras.Model(inputs, outputs, name="retrained")


def check_labels(labels: list[str]) -> None:
    """Refuse labels a labels file (one label per line, UTF-8) cannot hold as they are."""
    for label in labels:
        shown = os.fsencode(label).decode("utf-8", "backslashreplace")
        try:
            label.encode("utf-8")
        except UnicodeEncodeError:
            raise DatasetError(f"the class folder name '{shown}' is not valid UTF-8, and labels "
                               "are written as UTF-8.",
                               "Rename the folder to UTF-8 (e.g. convmv -f latin1 -t utf8 -r "
                               "--notest DIR).") from None
        bad = next((c for c in label if unicodedata.category(c) in ("Cc", "Zl", "Zp")), None)
        if bad is not None:
            raise DatasetError(f"the class folder name {label!r} contains a control character "
                               f"({bad!r}); a labels file holds one label per line.",
                               "Rename the folder without line breaks or control characters.")


def write_labels(path: Path, labels: list[str]) -> None:
    check_labels(labels)
    atomic_write(path, lambda fh: fh.write("".join(f"{label}\n" for label in labels).encode()))


def write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    try:
        blob = text.encode("utf-8")
    except UnicodeEncodeError:  # a path that is not UTF-8: escaped, so the file stays UTF-8
        blob = (json.dumps(data, indent=2) + "\n").encode("ascii")
    atomic_write(path, lambda fh: fh.write(blob))


def export_model(model: Any, labels: list[str], metadata: dict[str, Any], output_dir: str | Path,
                 formats: tuple[str, ...] = FORMATS, output_graph: str | None = None,
                 output_labels: str | None = None) -> dict[str, str]:
    """Write a Keras ``model`` (see :func:`build_classifier`) in ``formats``; return what went where."""
    return export_graph(freeze(model), labels, metadata, output_dir, formats, output_graph,
                        output_labels)


def export_graph(graph_def: Any, labels: list[str], metadata: dict[str, Any],
                 output_dir: str | Path, formats: tuple[str, ...] = FORMATS,
                 output_graph: str | None = None, output_labels: str | None = None,
                 tflite: bytes | None = None) -> dict[str, str]:
    """Write a frozen classifier graph (``input`` -> ``final_result``) in ``formats``.

    Every format comes from the one frozen graph: the SavedModel holds it as it is (no Keras
    model or function is traced) and TFLite is converted from it directly, unless the caller
    has the ``tflite`` model already (:func:`tflite_with_head`).

    The files of ``output_dir`` are written as one set: into a new folder beside it that then
    takes its place (in one atomic exchange on Linux), so a reader sees the old model or the
    new one, never a mix, and a failure half-way leaves the old model as it was. Other files
    in the folder are kept. Where no folder can be made beside it (it is a mount point, the
    working directory, or its parent is not writable) the files are staged inside it and
    renamed into place one by one, ``metadata.json`` last. ``output_graph`` and
    ``output_labels`` outside the folder are each written atomically.
    """
    check_labels(labels)
    out = Path(output_dir)
    labels_path = Path(output_labels) if output_labels else out / LABELS_FILE
    graph_path = Path(output_graph) if output_graph else out / GRAPH_FILE
    stage, in_place = _staging(out)
    try:
        written: dict[str, str] = {}
        outside: dict[str, tuple[Path, bytes]] = {}

        def put(kind: str, path: Path, data: bytes) -> None:
            written[kind] = str(path)
            if _inside(path, out):
                atomic_write(stage / path.name, lambda fh: fh.write(data))
            else:
                outside[kind] = (path, data)

        put("labels", labels_path, "".join(f"{label}\n" for label in labels).encode("utf-8"))
        if "graph" in formats:
            put("graph", graph_path, graph_def.SerializeToString())
        if "saved_model" in formats:
            write_saved_model(graph_def, metadata, stage / SAVED_MODEL_DIR)
            written["saved_model"] = str(out / SAVED_MODEL_DIR)
        if "tflite" in formats:
            put("tflite", out / TFLITE_FILE, tflite or with_signature(tflite_model(graph_def)))
        meta = dict(metadata, labels=labels,
                    files={k: _rel(v, out) for k, v in written.items()})
        write_json(stage / METADATA_FILE, meta)
        written["metadata"] = str(out / METADATA_FILE)
        for path, data in outside.values():
            atomic_write(path, lambda fh, data=data: fh.write(data))
        if in_place:
            _commit_in_place(stage, out)
        else:
            _carry_others(out, stage)
            replace_dir(stage, out)
    except OSError as exc:
        where, name = out, getattr(exc, "filename", None)
        if name and stage.name not in str(name) and not _inside(Path(name), out):
            where = Path(name) if Path(name).is_dir() else Path(name).parent  # --output-graph
        raise FolderNotWritable(
            where, "output folder", exc.strerror or str(exc),
            "Choose an output folder you can write to (with free space), or give this one to "
            "your user (chown/chmod); the previous model there is unchanged.") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log.info("exported %s to %s", ", ".join(sorted(written)), out)
    return written


#: What an export writes, and the evaluation of that model: never carried over from the model
#: a new export replaces.
MODEL_FILES = frozenset({GRAPH_FILE, LABELS_FILE, METADATA_FILE, SAVED_MODEL_DIR, TFLITE_FILE,
                         "report.json", "confusion_matrix.png"})


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().parent == folder.resolve()


def _staging(out: Path) -> tuple[Path, bool]:
    """A new, empty folder for the export's files, and whether it is inside ``out``."""
    tag = uuid.uuid4().hex[:12]
    if out.exists() and not out.is_dir():
        raise FolderNotWritable(out, "output folder", "a file of that name is in the way",
                                "Choose another output folder, or move the file.")
    resolved = out.resolve()
    movable = not (resolved == Path.cwd().resolve() or resolved == resolved.parent
                   or (out.is_dir() and os.path.ismount(out)))
    if movable:
        stage = out.parent / f".{out.name}.export-{tag}"
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            stage.mkdir()
            return stage, False
        except OSError:
            pass
    writable_dir(out, "output folder")
    stage = out / f".export-{tag}"
    try:
        stage.mkdir()
    except OSError as exc:
        raise FolderNotWritable(out, "output folder", exc.strerror or str(exc)) from None
    return stage, True


def _carry_others(out: Path, stage: Path) -> None:
    """Hard-link (or copy) what ``out`` holds besides a model into ``stage``."""
    if not out.is_dir():
        return
    for entry in out.iterdir():
        if entry.name in MODEL_FILES or (stage / entry.name).exists() \
                or entry.name.startswith(".export-"):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), stage / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, stage / entry.name, symlinks=True, copy_function=_link)
        else:
            _link(entry, stage / entry.name)


def _link(src: Any, dst: Any) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _commit_in_place(stage: Path, out: Path) -> None:
    """Rename the staged files into ``out`` one by one, metadata last; drop a stale format."""
    entries = sorted(stage.iterdir(), key=lambda e: e.name == METADATA_FILE)
    stale_names = MODEL_FILES - {e.name for e in entries}
    for entry in entries:
        if entry.name == METADATA_FILE:
            for name in stale_names:
                stale = out / name
                if stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale)
                else:
                    stale.unlink(missing_ok=True)
        if entry.is_dir():
            replace_dir(entry, out / entry.name)
        else:
            os.replace(entry, out / entry.name)


def replace_dir(new: Path, target: Path) -> None:
    """Put the folder ``new`` at ``target``: one atomic exchange where the system has it
    (Linux ``renameat2``), else two renames; the old folder is deleted."""
    if not target.exists() and not target.is_symlink():
        os.rename(new, target)
        return
    if _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # now the old folder
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:12]}")
    os.rename(target, old)
    try:
        os.rename(new, target)
    except OSError:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _rel(path: str, base: Path) -> str:
    try:
        return Path(path).resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(Path(path).resolve())


def write_saved_model(graph_def: Any, metadata: dict[str, Any], path: Path) -> None:
    """A TF Serving-ready SavedModel around the frozen classifier, renamed into place when whole.

    ``serving_default``: float ``images`` (N, H, W, 3), RGB 0..255 -> ``scores``.
    ``classify_images``: encoded image bytes (N,) -> ``scores``; decoding and resizing run in TF.

    The frozen graph goes in once, as it is, in a graph-mode SavedModel: no ``tf.Module`` is
    traced. For Inception-v3 this takes 1.0 s where tracing and ``tf.saved_model.save`` took
    3.8 s; the scores are identical. TF Serving loads either kind natively;
    ``tf.saved_model.load`` takes longer to read this one (3.0 against 1.6 s).
    """
    tf = import_tensorflow()
    from tensorflow.core.protobuf import meta_graph_pb2

    v1 = tf.compat.v1
    height, width = input_shape(graph_def, INPUT_NAME)[1:3]
    method = metadata.get("backbone", {}).get("resize", "bilinear")

    def decode_one(data: Any) -> Any:
        img = tf.io.decode_image(data, channels=3, expand_animations=False)
        img = tf.image.resize(tf.cast(img, tf.float32), (height, width), method=method,
                              antialias=True)
        return tf.clip_by_value(img, 0.0, 255.0)

    def signature(inputs: dict[str, Any], outputs: dict[str, Any]) -> Any:
        def info(t: Any) -> Any:
            return meta_graph_pb2.TensorInfo(name=t.name, dtype=t.dtype.as_datatype_enum,
                                             tensor_shape=t.shape.as_proto())
        return meta_graph_pb2.SignatureDef(
            inputs={k: info(t) for k, t in inputs.items()},
            outputs={k: info(t) for k, t in outputs.items()},
            method_name=tf.saved_model.PREDICT_METHOD_NAME)

    with tf.Graph().as_default() as graph:
        # Fed images cut the decoding branch off; fed bytes flow through it.
        data = v1.placeholder_with_default(tf.zeros([0], tf.string), [None], name="image_bytes")
        decoded = tf.map_fn(decode_one, data, fn_output_signature=tf.TensorSpec(
            (height, width, 3), tf.float32))
        images = v1.placeholder_with_default(decoded, [None, height, width, 3], name="images")
        (probs,) = v1.import_graph_def(graph_def, input_map={f"{INPUT_NAME}:0": images},
                                       return_elements=[f"{OUTPUT_NAME}:0"], name="classifier")
        scores = tf.identity(probs, name="scores")
        tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:12]}-{path.name}")
        builder = v1.saved_model.Builder(str(tmp))
        with v1.Session(graph=graph) as sess:
            builder.add_meta_graph_and_variables(
                sess, [tf.saved_model.SERVING], strip_default_attrs=True, signature_def_map={
                    "serving_default": signature({"images": images}, {"scores": scores}),
                    "classify_images": signature({"image_bytes": data}, {"scores": scores})})
        try:
            builder.save()
            replace_dir(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def tflite_model(graph_def: Any) -> bytes:
    """TFLite of a frozen graph (``input`` -> ``final_result``) with a free batch dimension.

    The GraphDef converter takes 0.4 s where converting the SavedModel's concrete function
    takes 1.3 s (it writes and reads back a temporary SavedModel first); the two models give
    identical scores. It names no signature: see :func:`with_signature`.
    """
    tf = import_tensorflow()

    shape = [-1, *input_shape(graph_def, INPUT_NAME)[1:]]
    converter = tf.compat.v1.lite.TFLiteConverter(
        graph_def, None, None, input_arrays_with_shape=[(INPUT_NAME, shape)],
        output_arrays=[OUTPUT_NAME])
    converter.exclude_conversion_metadata = True  # saves a third unpack and pack of the model
    return bytes(converter.convert())


def with_signature(tflite: bytes, key: str = "serving_default", input_name: str = "images",
                   output_name: str = "scores") -> bytes:
    """A one-input, one-output TFLite model with its signature ``key`` set to these names."""
    model = schema().ModelT.InitFromPackedBuf(tflite, 0)
    return _packed(_signed(model, key, input_name, output_name))


def tflite_with_head(backbone: bytes, kernel: np.ndarray, bias: np.ndarray) -> bytes:
    """The TFLite classifier: a backbone's TFLite model (:func:`tflite_model`) with the head
    ``softmax(x @ kernel + bias)`` appended as the converter writes it (FULLY_CONNECTED with
    the kernel transposed, then SOFTMAX), and the ``serving_default`` signature.

    The backbone is converted once and kept (Inception-v3: 2.2 s); this takes 0.1 s.
    """
    sc = schema()
    model = sc.ModelT.InitFromPackedBuf(backbone, 0)
    graph = model.subgraphs[0]
    (features,) = graph.outputs

    def buffer(array: np.ndarray) -> int:
        entry = sc.BufferT()
        entry.data = np.frombuffer(np.ascontiguousarray(array, np.float32).tobytes(), np.uint8)
        model.buffers.append(entry)
        return len(model.buffers) - 1

    def tensor(name: str, shape: tuple[int, ...], data: int = 0, batch: bool = False) -> int:
        entry = sc.TensorT()
        entry.name, entry.type, entry.buffer = name.encode(), sc.TensorType.FLOAT32, data
        entry.shape = np.array((1, *shape) if batch else shape, np.int32)
        if batch:
            entry.shapeSignature = np.array((-1, *shape), np.int32)
        graph.tensors.append(entry)
        return len(graph.tensors) - 1

    def opcode(code: int) -> int:
        for i, entry in enumerate(model.operatorCodes):
            if max(entry.builtinCode, entry.deprecatedBuiltinCode) == code:
                return i
        entry = sc.OperatorCodeT()
        entry.builtinCode = entry.deprecatedBuiltinCode = code
        entry.version = 1
        model.operatorCodes.append(entry)
        return len(model.operatorCodes) - 1

    def operator(code: int, inputs: list[int], output: int, kind: int, options: Any) -> None:
        entry = sc.OperatorT()
        entry.opcodeIndex, entry.inputs, entry.outputs = opcode(code), inputs, [output]
        entry.builtinOptionsType, entry.builtinOptions = kind, options
        graph.operators.append(entry)

    classes = int(kernel.shape[1])
    weights = tensor("head/MatMul", (classes, int(kernel.shape[0])), buffer(np.transpose(kernel)))
    biases = tensor("head/BiasAdd", (classes,), buffer(bias))
    logits = tensor("head/logits", (classes,), batch=True)
    scores = tensor(OUTPUT_NAME, (classes,), batch=True)
    operator(sc.BuiltinOperator.FULLY_CONNECTED, [features, weights, biases], logits,
             sc.BuiltinOptions.FullyConnectedOptions, sc.FullyConnectedOptionsT())
    softmax = sc.SoftmaxOptionsT()
    softmax.beta = 1.0
    operator(sc.BuiltinOperator.SOFTMAX, [logits], scores, sc.BuiltinOptions.SoftmaxOptions,
             softmax)
    graph.outputs = [scores]
    return _packed(_signed(model, "serving_default", "images", "scores"))


def schema() -> Any:
    from tensorflow.lite.python import schema_py_generated

    return schema_py_generated


def _signed(model: Any, key: str, input_name: str, output_name: str) -> Any:
    """``model`` (one subgraph, one input, one output) with the signature ``key``."""
    sc = schema()
    graph = model.subgraphs[0]

    def tensor(name: str, index: int) -> Any:
        entry = sc.TensorMapT()
        entry.name, entry.tensorIndex = name, index
        return entry

    signature = sc.SignatureDefT()
    signature.signatureKey, signature.subgraphIndex = key, 0
    signature.inputs = [tensor(input_name, graph.inputs[0])]
    signature.outputs = [tensor(output_name, graph.outputs[0])]
    model.signatureDefs = [signature]
    return model


def _packed(model: Any) -> bytes:
    import flatbuffers

    size = sum(len(b.data) for b in model.buffers if b.data is not None)
    builder = flatbuffers.Builder(size + (1 << 20))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


__all__ = ["build_classifier", "check_labels", "export_graph", "export_model", "GRAPH_FILE", "LABELS_FILE", "METADATA_FILE",
           "OUTPUT_NAME"]
