"""Writing a trained classifier out: frozen graph, labels, SavedModel, TFLite, ONNX, metadata.

Every export carries ``metadata.json`` (backbone, input size, normalisation, resize method,
labels, training figures), and the graphs take raw RGB 0..255 with the normalisation built in,
so nothing about preprocessing is passed by hand at label time. The SavedModel's
``classify_images`` signature decodes and resizes as ``label`` does (:mod:`retrainer.preprocess`).
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import threading
import unicodedata
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from .config import ExportConfig
from .errors import DatasetError, FolderNotWritable, ModelDirError, RetrainerError
from .files import atomic_write, read_regular_file, writable_dir
from .graph import INPUT_NAME, OUTPUT_NAME, input_shape, output_dim, tflite_model
from ._tf_internals import import_tensorflow, tflite_schema

log = logging.getLogger(__name__)

GRAPH_FILE = "retrained_graph.pb"
LABELS_FILE = "retrained_labels.txt"
METADATA_FILE = "metadata.json"
SAVED_MODEL_DIR = "saved_model"
TFLITE_FILE = "model.tflite"
INT8_FILE = "model_int8.tflite"
ONNX_FILE = "model.onnx"
#: Every format an export can write.
FORMATS = ("graph", "saved_model", "tflite", "int8", "onnx")
#: What ``train`` writes unless told: ``int8`` (a calibration pass over training images, tens
#: of seconds) and ``onnx`` (an optional dependency) are asked for.
DEFAULT_FORMATS = ("graph", "saved_model", "tflite")
#: Training images the int8 model is calibrated on (spread over the classes).
REPRESENTATIVE_IMAGES = 100


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


def json_bytes(data: dict[str, Any]) -> bytes:
    """``data`` as the UTF-8 JSON text :func:`write_json` writes."""
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a path that is not UTF-8: escaped, so the file stays UTF-8
        return (json.dumps(data, indent=2) + "\n").encode("ascii")


def write_json(path: Path, data: dict[str, Any]) -> None:
    blob = json_bytes(data)
    atomic_write(path, lambda fh: fh.write(blob))


def model_metadata(spec: Any, backbone_cache_id: str, precision: str,
                   training: dict[str, Any]) -> dict[str, Any]:
    """What ``metadata.json`` says of a model beside its files and labels: the backbone
    (``spec``: a BackboneSpec), the graph's input and output, and ``training``'s figures."""
    from datetime import datetime, timezone

    from . import __version__

    return {
        "retrainer_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backbone": spec.to_dict(),
        "backbone_cache_id": backbone_cache_id,
        "precision": precision,
        "input": {"name": INPUT_NAME, "shape": [None, *spec.input_size, 3],
                  "pixels": "RGB 0..255, float32; normalisation is inside the graph"},
        "output": {"name": OUTPUT_NAME, "kind": "softmax"},
        "training": training,
    }


def export_classifier(backbone_graph: Any, kernel: np.ndarray, bias: np.ndarray,
                      labels: list[str], metadata: dict[str, Any], config: ExportConfig,
                      backbone_tflite: Callable[[], bytes] | None = None,
                      representative: Callable[[], Iterable[np.ndarray]] | None = None,
                      saved_model: SavedModelGraph | None = None,
                      more_files: dict[str, tuple[str, bytes]] | None = None) -> dict[str, str]:
    """Write the classifier, a backbone's frozen graph (``backbone_graph``, fp32) with the head
    ``softmax(x @ kernel + bias)`` composed onto it, as ``config`` says (:func:`export_graph`);
    return what went where.

    No second freeze of the whole classifier; and the TFLite model, when asked for, is the
    backbone's (``backbone_tflite()``: converted once and kept) with the head appended, or
    converted from the composed graph without it. ``more_files``: more files of the model, as
    :func:`export_graph` takes them.
    """
    from .graph import compose, dense_softmax_graph

    classifier = compose(backbone_graph, dense_softmax_graph(kernel, bias))
    tflite = None
    if backbone_tflite is not None and "tflite" in config.formats:
        tflite = tflite_with_head(backbone_tflite(), kernel, bias)
    return export_graph(classifier, labels, metadata, config.output_dir, config.formats,
                        config.output_graph, config.output_labels, tflite, representative,
                        saved_model=saved_model, more_files=more_files)


def export_graph(graph_def: Any, labels: list[str], metadata: dict[str, Any],
                 output_dir: str | Path, formats: tuple[str, ...] = DEFAULT_FORMATS,
                 output_graph: str | None = None, output_labels: str | None = None,
                 tflite: bytes | None = None,
                 representative: Callable[[], Iterable[np.ndarray]] | None = None,
                 keep: bool = False, saved_model: SavedModelGraph | None = None,
                 more_files: dict[str, tuple[str, bytes]] | None = None) -> dict[str, str]:
    """Write a frozen classifier graph (``input`` -> ``final_result``) in ``formats``.

    Every format comes from the one frozen graph: the SavedModel holds it as it is (no Keras
    model or function is traced; ``saved_model``: its decoding part built already) and TFLite
    is converted from it directly, unless the caller has the ``tflite`` model already
    (:func:`tflite_with_head`). ``int8`` needs ``representative``: a function giving training
    images' pixels (as ``label`` prepares them). ``more_files``: more files that belong to this
    model (kind -> (file name, content): the hashes of the images it was fitted on, its
    evaluation report), written with it as part of the one set.

    With ``keep``, the folder's other model files stay as they are (``retrainer export``
    adding a format to a model); without it, they are a previous model's and are removed.

    The files of ``output_dir`` are written as one set: into a new folder beside it that then
    takes its place (in one atomic exchange on Linux), so a reader sees the old model or the
    new one, never a mix, and a failure half-way leaves the old model as it was. Other files
    in the folder are kept. Where no folder can be made beside it (it is a mount point, the
    working directory, or its parent is not writable) the files are staged inside it and
    renamed into place one by one, ``metadata.json`` last. ``output_graph`` and
    ``output_labels`` outside the folder are each written atomically.
    """
    check_labels(labels)
    check_formats(formats)
    more = more_files or {}
    if "int8" in formats and representative is None:
        raise RetrainerError("the int8 export needs training images to calibrate on.",
                             "Give the images the model was trained on (--image-dir DIR).")
    out = Path(output_dir)
    labels_path = Path(output_labels) if output_labels else out / LABELS_FILE
    graph_path = Path(output_graph) if output_graph else out / GRAPH_FILE
    stage, in_place, lock = _staging(out)
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
            # deterministic: one model, one byte string (maps in a fixed order)
            put("graph", graph_path, graph_def.SerializeToString(deterministic=True))
        if "saved_model" in formats:
            write_saved_model(graph_def, metadata, stage / SAVED_MODEL_DIR, saved_model)
            written["saved_model"] = str(out / SAVED_MODEL_DIR)
        if "tflite" in formats:
            put("tflite", out / TFLITE_FILE, tflite_for_devices(
                tflite or with_signature(tflite_model(graph_def)), labels, metadata))
        extra: dict[str, Any] = {}
        if "int8" in formats:
            assert representative is not None
            blob, extra["int8"] = int8_tflite(graph_def, representative())
            put("int8", out / INT8_FILE, tflite_for_devices(blob, labels, metadata, True))
        if "onnx" in formats:
            from .onnx_export import onnx_model

            put("onnx", out / ONNX_FILE, onnx_model(graph_def, labels, metadata))
        for kind, (name, data) in more.items():
            put(kind, out / name, data)
        files = dict(metadata.get("files") or {}) if keep else {}
        files = {k: v for k, v in files.items() if k not in ("labels", "metadata")}
        files.update({k: _rel(v, out) for k, v in written.items()})
        meta = dict(metadata, **extra, labels=labels, files=files)
        write_json(stage / METADATA_FILE, meta)
        written["metadata"] = str(out / METADATA_FILE)
        for path, data in outside.values():
            atomic_write(path, lambda fh, data=data: fh.write(data))
        if in_place:
            with _signals_held():
                _commit_in_place(stage, out, keep)
        else:
            _carry_others(out, stage, keep)
            with _signals_held():
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
        if lock is not None:
            os.close(lock)
    log.info("exported %s to %s", ", ".join(sorted(k for k in written if k not in more)), out)
    return written


def check_output_dir(output_dir: str | Path, flag: str = "--output-dir") -> None:
    """Fail at once, not after the extraction, where the output folder (given by ``flag``)
    cannot be made: the nearest existing path at or above it must be a folder this user can
    write to."""
    out = Path(output_dir).absolute()
    probe = out
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    reason = None
    if not probe.is_dir():
        reason = f"'{probe}' is a file, not a folder"
    elif not os.access(probe, os.W_OK | os.X_OK):
        reason = "permission denied"
    if reason:
        what = "output folder" if flag == "--output-dir" else f"folder of {flag}"
        raise FolderNotWritable(out, what, reason, f"Choose a folder you can write to ({flag}).")


#: What an export writes, and the evaluation of that model: never carried over from the model
#: a new export replaces.
MODEL_FILES = frozenset({GRAPH_FILE, LABELS_FILE, METADATA_FILE, SAVED_MODEL_DIR, TFLITE_FILE,
                         INT8_FILE, ONNX_FILE, "report.json", "confusion_matrix.png",
                         "fitted_images.sha256"})


class UnknownFormat(RetrainerError):
    def __init__(self, names: list[str]) -> None:
        super().__init__(f"unknown export format {', '.join(map(repr, names))}.",
                         f"Choose from: {', '.join(FORMATS)}.")


def check_formats(formats: Iterable[str]) -> None:
    """Refuse a format name this module cannot write (before any work is done)."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise UnknownFormat(unknown)


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().parent == folder.resolve()


def _staging(out: Path) -> tuple[Path, bool, int | None]:
    """A new, empty folder for the export's files, whether it is inside ``out``, and the
    descriptor holding its lock (close it when the folder has gone).

    The folder's name carries this process's id, and the folder is locked while it is
    written: staging folders that a run killed half-way left behind (no clean-up runs on
    SIGKILL) are removed here, by the next export to the same folder (:func:`_sweep`).
    """
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    if out.exists() and not out.is_dir():
        raise FolderNotWritable(out, "output folder", "a file of that name is in the way",
                                "Choose another output folder, or move the file.")
    resolved = out.resolve()
    movable = not (resolved == Path.cwd().resolve() or resolved == resolved.parent
                   or (out.is_dir() and os.path.ismount(out)))
    if out.is_dir():
        _sweep(out, ".export-")
    if movable:
        prefix = f".{out.name}.export-"
        stage = out.parent / f"{prefix}{tag}"
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            _sweep(out.parent, prefix)
            stage.mkdir()
            return stage, False, _lock_stage(stage)
        except OSError:
            pass
    writable_dir(out, "output folder")
    stage = out / f".export-{tag}"
    try:
        stage.mkdir()
    except OSError as exc:
        raise FolderNotWritable(out, "output folder", exc.strerror or str(exc)) from None
    return stage, True, _lock_stage(stage)


def _lock_stage(stage: Path) -> int | None:
    """Hold an exclusive lock on the staging folder ``stage`` (None where there is none)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    try:
        fd = os.open(stage, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _sweep(folder: Path, prefix: str) -> None:
    """Remove the staging folders ``folder/<prefix><pid>-<tag>`` of exports that were killed:
    their process is gone from this machine and no one holds their lock (so a run on another
    machine, or in another container, sharing the folder keeps its own)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no way to tell a live export
        return
    try:
        entries = [e for e in folder.iterdir() if e.name.startswith(prefix)]
    except OSError:
        return
    for entry in entries:
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)) or entry.is_symlink():
            continue
        try:
            fd = os.open(entry, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # an export is writing it
        else:
            shutil.rmtree(entry, ignore_errors=True)
            log.debug("removed %s, left by an export that was stopped", entry)
        finally:
            os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process (EPERM): alive
        return True
    return True


def _carry_others(out: Path, stage: Path, keep: bool = False) -> None:
    """Hard-link (or copy) what ``out`` holds besides a model (with ``keep``: besides the
    files just written) into ``stage``."""
    if not out.is_dir():
        return
    for entry in out.iterdir():
        if (entry.name in MODEL_FILES and not keep) or (stage / entry.name).exists() \
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


@contextlib.contextmanager
def _signals_held() -> Any:
    """Hold Ctrl-C and SIGTERM (where Python handles them: the CLI, the export helper) until
    the block ends, so the files of a model renamed in one by one are all renamed; then the
    held one is handled as it would have been."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[tuple[int, Any]] = []
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    handlers = {sig: h for sig, h in handlers.items() if callable(h)}
    for sig in handlers:
        signal.signal(sig, lambda signum, frame: held.append((signum, frame)))
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if held:
            signum, frame = held[0]
            handlers[signum](signum, frame)


def _commit_in_place(stage: Path, out: Path, keep: bool = False) -> None:
    """Rename the staged files into ``out`` one by one, metadata last; drop a stale format
    (unless ``keep``)."""
    entries = sorted(stage.iterdir(), key=lambda e: e.name == METADATA_FILE)
    stale_names = set() if keep else MODEL_FILES - {e.name for e in entries}
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


def write_saved_model(graph_def: Any, metadata: dict[str, Any], path: Path,
                      prepared: SavedModelGraph | None = None) -> None:
    """A TF Serving-ready SavedModel around the frozen classifier, renamed into place when whole.

    ``serving_default``: float ``images`` (N, H, W, 3), RGB 0..255 -> ``scores``.
    ``classify_images``: encoded image bytes (N,) -> ``scores``; decoding and resizing run in
    TF, as ``label`` does them (:func:`retrainer.preprocess.decode_and_resize`).

    The frozen graph goes in once, as it is, in a graph-mode SavedModel: no ``tf.Module`` is
    traced, which is several times faster to write with identical scores (docs/performance.md).
    TF Serving loads either kind natively. ``prepared``: its decoding part, built already for
    this input size and resize method (else it is built here).
    """
    size = tuple(input_shape(graph_def, INPUT_NAME)[1:3])
    method = metadata.get("backbone", {}).get("resize", "bilinear")
    if prepared is None or not prepared.fits(size, method):
        prepared = SavedModelGraph(size, method)  # type: ignore[arg-type]
    prepared.write(graph_def, path)


class SavedModelGraph:
    """The SavedModel's graph before the classifier goes in: ``image_bytes`` decoded and
    resized in TF, feeding the ``images`` input. Building it is a third of a Lite0 export and
    needs only the input size and resize method, so the export helper
    (:mod:`retrainer.export_worker`) builds it while the head trains. Written once."""

    def __init__(self, size: tuple[int, int], resize: str) -> None:
        tf = import_tensorflow()

        from .preprocess import decode_and_resize

        v1 = tf.compat.v1
        height, width = self.size = (int(size[0]), int(size[1]))
        self.resize, self.written = resize, False

        @tf.autograph.experimental.do_not_convert
        def decode_one(data: Any) -> Any:
            return decode_and_resize(data, (height, width), resize)

        with tf.Graph().as_default() as self.graph:
            # Fed images cut the decoding branch off; fed bytes flow through it.
            self.data = v1.placeholder_with_default(tf.zeros([0], tf.string), [None],
                                                    name="image_bytes")
            decoded = tf.map_fn(decode_one, self.data, fn_output_signature=tf.TensorSpec(
                (height, width, 3), tf.float32))
            self.images = v1.placeholder_with_default(decoded, [None, height, width, 3],
                                                      name="images")

    def fits(self, size: tuple[int | None, ...], resize: str) -> bool:
        return not self.written and tuple(size) == self.size and resize == self.resize

    def write(self, graph_def: Any, path: Path) -> None:
        """The SavedModel of the classifier ``graph_def`` at ``path`` (see
        :func:`write_saved_model`)."""
        tf = import_tensorflow()
        v1 = tf.compat.v1
        if self.written:
            raise RuntimeError("a SavedModelGraph is written once")
        self.written = True

        def signature(inputs: dict[str, Any], outputs: dict[str, Any]) -> Any:
            info = v1.saved_model.utils.build_tensor_info
            return v1.saved_model.signature_def_utils.build_signature_def(
                inputs={k: info(t) for k, t in inputs.items()},
                outputs={k: info(t) for k, t in outputs.items()},
                method_name=tf.saved_model.PREDICT_METHOD_NAME)

        with self.graph.as_default():
            (probs,) = v1.import_graph_def(graph_def, input_map={f"{INPUT_NAME}:0": self.images},
                                           return_elements=[f"{OUTPUT_NAME}:0"],
                                           name="classifier")
            scores = tf.identity(probs, name="scores")
            tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:12]}-{path.name}")
            builder = v1.saved_model.Builder(str(tmp))
            with v1.Session(graph=self.graph) as sess:
                builder.add_meta_graph_and_variables(
                    sess, [tf.saved_model.SERVING], strip_default_attrs=True,
                    signature_def_map={
                        "serving_default": signature({"images": self.images},
                                                     {"scores": scores}),
                        "classify_images": signature({"image_bytes": self.data},
                                                     {"scores": scores})})
        try:
            builder.save()
            replace_dir(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def with_signature(tflite: bytes, key: str = "serving_default", input_name: str = "images",
                   output_name: str = "scores") -> bytes:
    """A one-input, one-output TFLite model with its signature ``key`` set to these names."""
    model = schema().ModelT.InitFromPackedBuf(tflite, 0)
    return _packed(_signed(model, key, input_name, output_name))


def tflite_with_head(backbone: bytes, kernel: np.ndarray, bias: np.ndarray) -> bytes:
    """The TFLite classifier: a backbone's TFLite model (:func:`tflite_model`) with the head
    ``softmax(x @ kernel + bias)`` appended as the converter writes it (FULLY_CONNECTED with
    the kernel transposed, then SOFTMAX), and the ``serving_default`` signature.

    The backbone is converted once and kept; appending the head takes a fraction of that.
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
    return tflite_schema()


def tflite_for_devices(tflite: bytes, labels: list[str], metadata: dict[str, Any],
                       quantized: bool = False) -> bytes:
    """``tflite`` with TFLite Metadata: the labels (as an associated file), the input's
    normalisation (none: the graph takes RGB 0..255) and a description; what Android's Task
    Library and ML Kit need to load it with no other file."""
    from .tflite_metadata import metadata_buffer, with_associated_files, with_metadata

    backbone = metadata.get("backbone") or {}
    name = backbone.get("name", "backbone") if isinstance(backbone, dict) else str(backbone)
    kind = "full-integer (uint8) " if quantized else ""
    height, width = (metadata.get("input") or {}).get("shape", [None, "H", "W"])[1:3]
    blob = metadata_buffer(
        name=f"retrainer {name} classifier",
        description=f"{kind}image classifier over {len(labels)} classes, trained with "
                    f"retrainer on a {name} backbone.",
        version=str(metadata.get("retrainer_version", "")),
        labels_description="class labels, one per line, in the order of the scores",
        input_description=f"RGB image, {width}x{height}, pixel values 0..255 as they are "
                          f"(the model normalises them); resized as retrainer.preprocess does",
        output_description="probability of each class" + (" (uint8, scale 1/256)" if quantized
                                                          else ""))
    model = schema().ModelT.InitFromPackedBuf(tflite, 0)
    packed = _packed(with_metadata(model, blob))
    labels_file = "".join(f"{label}\n" for label in labels).encode("utf-8")
    return with_associated_files(packed, {"labels.txt": labels_file})


def representative_images(records: Iterable[Any], size: tuple[int, int], resize: str = "bilinear",
                          limit: int = REPRESENTATIVE_IMAGES) -> list[np.ndarray]:
    """Up to ``limit`` images of ``records`` (``ImageRecord``: ``label``, ``read()``), taken in
    turn from each class, prepared as ``label`` prepares them; unreadable ones are passed over."""
    from .errors import ImageError
    from .images import load_pixels

    by_label: dict[str, list[Any]] = {}
    for rec in records:
        by_label.setdefault(rec.label, []).append(rec)
    queues = [sorted(recs, key=lambda r: r.key) for _, recs in sorted(by_label.items())]
    images: list[np.ndarray] = []
    for i in range(max((len(q) for q in queues), default=0)):
        for queue in queues:
            if i < len(queue) and len(images) < limit:
                try:
                    images.append(load_pixels(queue[i].read(), size, resize,
                                              name=queue[i].display))
                except (ImageError, OSError):
                    continue
    return images


def int8_tflite(graph_def: Any, images: Iterable[np.ndarray]) -> tuple[bytes, dict[str, Any]]:
    """The classifier fully quantised to 8-bit integers: uint8 RGB 0..255 in, uint8 scores out.

    ``images`` are float32 (H, W, 3) RGB 0..255 training images (as ``label`` prepares them);
    the activations' ranges are calibrated on them. Returns the model (signature
    ``serving_default``: ``images`` -> ``scores``, batch of one) and what it was made from.
    """
    tf = import_tensorflow()

    shape = [1, *input_shape(graph_def, INPUT_NAME)[1:]]
    pool = [np.asarray(img, np.float32)[None] for img in images]
    if not pool:
        raise RetrainerError("the int8 export found no images to calibrate on.",
                             "Give the folder of training images (--image-dir DIR).")
    converter = tf.compat.v1.lite.TFLiteConverter(
        graph_def, None, None, input_arrays_with_shape=[(INPUT_NAME, shape)],
        output_arrays=[OUTPUT_NAME])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([img] for img in pool)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.uint8
    converter.exclude_conversion_metadata = True
    blob = with_signature(bytes(converter.convert()))
    return blob, {"representative_images": len(pool), "input": "uint8 RGB 0..255",
                  "output": "uint8 scores (dequantise with the output's scale and zero point)"}


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


__all__ = ["check_labels", "DEFAULT_FORMATS", "export_classifier", "export_graph",
           "FORMATS", "GRAPH_FILE", "INT8_FILE", "LABELS_FILE", "METADATA_FILE", "ONNX_FILE",
           "OUTPUT_NAME", "TFLITE_FILE"]


def read_labels(path: str | Path) -> list[str]:
    try:
        # Universal newlines, as Path.read_text; a FIFO or a device is refused, not waited on.
        text = read_regular_file(path).decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except OSError as exc:
        raise ModelDirError(f"cannot read labels file '{path}' ({exc.strerror or exc}).") from None
    except UnicodeDecodeError as exc:
        raise ModelDirError(f"the labels file '{path}' is not UTF-8 ({exc.reason} at byte "
                            f"{exc.start}).", "Save it as UTF-8, one label per line.") from None
    return [line for line in text.split("\n") if line != ""]


def read_metadata(path: str | Path) -> dict[str, Any]:
    """An export's ``metadata.json`` as a dict, or a :class:`ModelDirError` saying what is wrong."""
    hint = "Export the model again, or delete the file to load the graph without it."
    try:
        data = json.loads(read_regular_file(path).decode("utf-8"))
    except OSError as exc:
        raise ModelDirError(f"cannot read '{path}' ({exc.strerror or exc}).") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelDirError(f"'{path}' is not valid JSON ({exc}).", hint) from None
    if not isinstance(data, dict):
        raise ModelDirError(f"'{path}' holds a JSON {_json_type(data)}, not an object.", hint)
    wrong = _wrongly_typed(data)
    if wrong:
        key, want, value = wrong
        raise ModelDirError(f"'{path}': '{key}' is a JSON {_json_type(value)}, not {want}.", hint)
    return data


#: The metadata fields the tool reads, and the JSON type each must have where present.
_METADATA_TYPES = {("backbone",): dict, ("training",): dict, ("files",): dict, ("input",): dict,
                   ("output",): dict, ("backbone", "resize"): str, ("backbone", "name"): str,
                   ("training", "image_source"): str, ("training", "fitted_images"): dict,
                   ("training", "fitted_images", "file"): str}


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _wrongly_typed(data: dict[str, Any]) -> tuple[str, str, Any] | None:
    """(dotted key, wanted type, value) of the first metadata field of the wrong type."""
    want_names = {dict: "an object", str: "a string"}
    for keys, want in _METADATA_TYPES.items():
        value: Any = data
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None and not isinstance(value, want):
            return ".".join(keys), want_names[want], value
    files = data.get("files") or {}
    for key, value in files.items():
        if not isinstance(value, str):
            return f"files.{key}", "a string", value
    return None


def export_existing(model_dir: str | Path, formats: tuple[str, ...],
                    image_dir: str | Path | None = None) -> dict[str, str]:
    """Write ``formats`` of a model already exported to ``model_dir`` (its frozen graph), with
    no retraining; the folder's other files stay. ``int8`` calibrates on ``image_dir``, or on
    the training folder ``metadata.json`` records."""
    from .graph import load_graph_def

    check_formats(formats)
    out = Path(model_dir)
    meta_path = out / METADATA_FILE
    if not meta_path.is_file():
        raise ModelDirError(f"no {METADATA_FILE} in '{out}': not a folder 'retrainer train' "
                            "wrote.", "Give the folder of a trained model (--model-dir DIR).")
    metadata = read_metadata(meta_path)
    files = metadata.get("files") if isinstance(metadata.get("files"), dict) else {}
    graph_path = out / files.get("graph", GRAPH_FILE)
    labels_path = out / files.get("labels", LABELS_FILE)
    if not graph_path.is_file():
        raise ModelDirError(f"no frozen graph at '{graph_path}': every format is made from it.",
                            "Train with the 'graph' format (the default), then export.")
    try:
        graph_def = load_graph_def(str(graph_path))
    except Exception as exc:  # noqa: BLE001 - protobuf raises its own kinds
        raise ModelDirError(f"'{graph_path}' is not a frozen TensorFlow graph ({exc}).") from None
    labels = read_labels(labels_path)
    try:
        outputs = output_dim(graph_def)
    except (ValueError, KeyError) as exc:
        raise ModelDirError(f"'{graph_path}' has no '{OUTPUT_NAME}' output ({exc}).",
                            "Use a graph exported by 'retrainer train'.") from None
    if outputs is not None and outputs != len(labels):
        raise ModelDirError(f"the model has {outputs} outputs but '{labels_path}' lists "
                            f"{len(labels)} labels.",
                            "Restore the labels file the model was exported with (one label "
                            "per line), or train again.")
    representative = None
    if "int8" in formats:
        representative = _representative_from(image_dir, metadata, graph_def)
    inside = {k: str(out / v) for k, v in files.items()}
    return export_graph(graph_def, labels, metadata, out, formats,
                        output_graph=inside.get("graph") if "graph" in files else None,
                        output_labels=str(labels_path), representative=representative,
                        keep=True)


def _representative_from(image_dir: str | Path | None, metadata: dict[str, Any],
                         graph_def: Any) -> Callable[[], list[np.ndarray]]:
    from .sources.base import TRAINING
    from .sources.folder import scan_folder

    recorded = (metadata.get("training") or {}).get("image_source")
    source = image_dir or recorded
    if not source or not Path(str(source)).is_dir():
        shown = f" ('{recorded}' is not a folder here)" if recorded and not image_dir else ""
        raise RetrainerError(f"the int8 export needs training images to calibrate on{shown}.",
                             "Give the folder the model was trained on: --image-dir DIR.")
    backbone = metadata.get("backbone") if isinstance(metadata.get("backbone"), dict) else {}
    size = tuple(input_shape(graph_def, INPUT_NAME)[1:3])
    resize = str(backbone.get("resize") or "bilinear")

    def images() -> list[np.ndarray]:
        records = scan_folder(str(source)).records
        training = [r for r in records if r.split == TRAINING]
        return representative_images(training or records, size, resize)  # type: ignore[arg-type]

    return images
