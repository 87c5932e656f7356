"""Loading an export and scoring images with it (``label``, ``evaluate``, ``serve``).

The frozen graph is run directly: no Keras model is rebuilt, and preprocessing (input size,
resize method) comes from the export's metadata, so it always matches training.
"""
from __future__ import annotations

import functools
import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .errors import ModelDirError
from .files import file_sha256, read_regular_file
from .export import (GRAPH_FILE, LABELS_FILE, METADATA_FILE, TFLITE_FILE, read_labels,
                     read_metadata)
from .images import RESAMPLE, load_pixels
from .sources.base import ImageRecord

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class Prediction:
    label: str
    score: float


@dataclass
class LabelResult:
    """The top-k predictions for one image, or why it could not be labelled."""

    path: str
    predictions: list[Prediction] = field(default_factory=list)
    error: str | None = None
    probabilities: np.ndarray | None = field(default=None, repr=False)
    label: str | None = None  # the answer under a confidence floor: top label or UNKNOWN

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        out: dict[str, Any] = {"path": self.path}
        if self.label is not None:
            out["label"] = self.label
        out["predictions"] = [{"label": p.label, "score": round(p.score, 6)}
                              for p in self.predictions]
        return out


UNKNOWN = "unknown"


def apply_min_confidence(result: LabelResult, min_confidence: float) -> LabelResult:
    """Set ``result.label``: the top label, or ``unknown`` when its score is below the floor.

    A softmax always picks some class; a floor turns out-of-domain photos (a car shown to a
    flower model) into an explicit "unknown" instead of a confident-looking wrong label.
    """
    if result.error is None and result.predictions:
        top = result.predictions[0]
        result.label = top.label if top.score >= min_confidence else UNKNOWN
    return result


class Classifier:
    """An exported model, ready to score pixels or encoded images."""

    def __init__(self, graph_def: Any, labels: list[str], metadata: dict[str, Any],
                 runner: Any = None) -> None:
        """``runner`` runs the model (a :class:`retrainer.runner.LaneRunner`); by default the
        frozen ``graph_def`` on TensorFlow."""
        if runner is None:
            from .graph import GraphRunner

            try:
                runner = GraphRunner(graph_def)
            except (ValueError, KeyError) as exc:
                raise ModelDirError(f"the graph has no float 'input' -> 'final_result' path "
                                    f"({exc}).",
                                    "Use a graph exported by 'retrainer train'.") from None
        self.runner = runner
        self.graph_def = graph_def
        self.labels = labels
        self.metadata = metadata
        #: SHA-256 of the frozen graph file this model was loaded with (:meth:`load` with
        #: ``graph_digest``): the predictions' model id in a database; else None.
        self.graph_sha256: str | None = None
        if self.runner.output_dim != len(labels):
            raise ModelDirError(f"the model has {self.runner.output_dim} outputs but the labels "
                                f"file lists {len(labels)} labels.",
                                "Restore the labels file the model was exported with (one "
                                "label per line), or train again.")
        self.input_size = self.runner.input_size
        backbone = metadata.get("backbone")
        self.resize = (backbone.get("resize") if isinstance(backbone, dict) else None) or "bilinear"
        if self.resize not in RESAMPLE:
            raise ModelDirError(f"the model's metadata names an unknown resize method "
                                f"{self.resize!r} (known: {', '.join(sorted(RESAMPLE))}).",
                                "Fix 'backbone.resize' in metadata.json, or export the model "
                                "again with this version.")

    @property
    def runtime(self) -> str:
        """Which runtime scores the images (a name of :data:`retrainer.runtimes.RUNTIMES`)."""
        return str(getattr(self.runner, "runtime", "tensorflow"))

    @classmethod
    def load(cls, model_dir: str | Path | None = "retrained", graph: str | None = None,
             labels: str | None = None, runtime: str = "auto", graph_digest: bool = False
             ) -> "Classifier":
        """Load from an export folder, or from explicit ``graph`` and ``labels`` files.

        ``runtime``: ``auto`` runs the folder's ``model.tflite`` on LiteRT when it is installed
        (no TensorFlow import: a one-image ``label`` starts in a fraction of a second), else the
        frozen graph on TensorFlow. ``tensorflow``, ``litert``, ``openvino`` (reads the frozen
        graph itself, no TensorFlow import) or ``onnxruntime`` (the graph converted by tf2onnx
        once, kept in the cache dir) force one.

        A folder that an export replaces meanwhile is loaded again, so the graph, labels and
        metadata are always one model's (the old or the new), never a mix. With
        ``graph_digest``, :attr:`graph_sha256` is that model's graph file's.
        """
        base = Path(model_dir) if model_dir else None
        if base is None or graph or labels:
            loaded = cls._load(model_dir, graph, labels, runtime)
            if graph_digest:
                loaded.graph_sha256 = _file_sha256(Path(graph) if graph else base / GRAPH_FILE)
            return loaded
        for _ in range(MODEL_LOAD_ATTEMPTS):
            before = _model_identity(base)
            try:
                loaded = cls._load(model_dir, graph, labels, runtime)
                if graph_digest:
                    loaded.graph_sha256 = _file_sha256(base / GRAPH_FILE)
            except (ModelDirError, OSError):
                if _model_identity(base) == before:
                    raise
                continue  # read while an export replaced it
            if _model_identity(base) == before:
                return loaded
        raise ModelDirError(f"the model folder '{base}' was replaced {MODEL_LOAD_ATTEMPTS} times "
                            "while it was being loaded.",
                            "Load it when the exports writing to it have finished.")

    @classmethod
    def _load(cls, model_dir: str | Path | None, graph: str | None, labels: str | None,
              runtime: str) -> "Classifier":
        from .runner import RUNTIMES
        from .runtimes import RuntimeNotInstalled, check_runtime, installed

        if runtime not in RUNTIMES:
            raise ModelDirError(f"unknown runtime {runtime!r}.",
                                f"Use one of: {', '.join(RUNTIMES)}.")
        check_runtime(runtime)  # a runtime asked for by name must be installed
        base = Path(model_dir) if model_dir else None
        graph_path = Path(graph) if graph else (base / GRAPH_FILE if base else None)
        labels_path = Path(labels) if labels else (base / LABELS_FILE if base else None)
        if labels_path is None and graph_path is not None:  # the labels written beside it
            beside = graph_path.with_name(LABELS_FILE)
            labels_path = beside if beside.is_file() else None
        if graph_path is None or labels_path is None:
            raise ModelDirError("give a model folder, or both a graph and a labels file.",
                                f"Pass labels=FILE too: there is no {LABELS_FILE} beside "
                                "the graph.")
        tflite_path = base / TFLITE_FILE if base and not graph else None
        has_tflite = tflite_path is not None and tflite_path.is_file()
        if runtime == "auto":
            runtime = "litert" if has_tflite and installed("litert") else "tensorflow"
        if runtime == "litert" and not has_tflite:
            raise ModelDirError(f"no {TFLITE_FILE} in the model folder for runtime 'litert'.",
                                "Export it (train with the tflite export format), or use "
                                "another runtime.")
        model_path = tflite_path if runtime == "litert" else graph_path
        if not model_path.is_file():
            raise ModelDirError(f"no frozen graph at '{graph_path}'.",
                                "Train a model first: retrainer train --image-dir DIR.")
        meta_path = (base / METADATA_FILE) if base else graph_path.with_name(METADATA_FILE)
        metadata = read_metadata(meta_path) if meta_path.is_file() else {}
        if runtime != "tensorflow":
            try:
                runner = _export_runner(runtime, model_path)
            except (RuntimeNotInstalled, ModelDirError):
                raise
            except Exception as exc:  # noqa: BLE001 - each runtime raises its own kinds
                what = "TFLite model" if runtime == "litert" else "frozen graph"
                raise ModelDirError(f"'{model_path}' is not a {what} exported by retrainer "
                                    f"({runtime}: {str(exc).splitlines()[0] if str(exc) else exc!r}).",
                                    "Train again, or use runtime 'tensorflow'.") from None
            return cls(None, read_labels(labels_path), metadata, runner=runner)
        from .graph import load_graph_def

        try:
            graph_def = load_graph_def(str(graph_path))
        except Exception as exc:  # noqa: BLE001 - protobuf raises its own kinds
            raise ModelDirError(
                f"'{graph_path}' is not a frozen TensorFlow graph ({exc}).") from None
        return cls(graph_def, read_labels(labels_path), metadata)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) RGB 0..255 -> (N, classes) probabilities."""
        return self.runner(pixels)

    def lanes(self) -> list[Callable[[np.ndarray], np.ndarray]]:
        """Like :meth:`predict`, once per session: each runs a whole batch on one session
        only, so a caller with a thread per lane keeps every session busy on its own."""
        return [functools.partial(self.runner.run_on, i) for i in range(self.runner.replicas)]

    def prepare(self, data: bytes, name: str = "<bytes>") -> np.ndarray:
        return load_pixels(data, self.input_size, self.resize, name=name)

    def top_k(self, probs: np.ndarray, k: int) -> list[Prediction]:
        order = np.argsort(-probs, kind="stable")[: max(1, k)]
        return [Prediction(self.labels[i], float(probs[i])) for i in order]

    def label_records(self, records: Iterable[ImageRecord], top_k: int = 5,
                      batch_size: int = 32, workers: int | None = None) -> Iterator[LabelResult]:
        """Score records in batches, decoding in parallel; failures come back as results, all
        in input order.

        By default each of the runner's lanes reads and decodes its share of a batch
        (``batch_size / lanes`` images) on its own thread and runs it
        (:meth:`retrainer.runner.LaneRunner.stream_made`): no more threads than cores.
        ``workers`` instead reads and decodes on a pool of that many threads beside the lanes
        (slow reads: a remote database).
        """
        if workers is None:
            yield from self._label_on_lanes(records, top_k, batch_size)
            return
        from .decoding import decoded_batches

        failed: dict[tuple[int, int], list[LabelResult]] = {}  # (batch, row) -> results

        def fail(key: str, rec: ImageRecord, reason: str, where: tuple[int, int]) -> None:
            failed.setdefault(where, []).append(LabelResult(rec.display, error=reason))

        items = ((rec.key, rec) for rec in records)
        batches = decoded_batches(items, self.input_size, self.resize, workers, batch_size,
                                  fail)
        for done, (pairs, probs) in enumerate(self.runner.stream(batches)):
            for row, ((_, rec), scores) in enumerate(zip(pairs, probs)):
                yield from failed.pop((done, row), [])  # in input order
                yield LabelResult(rec.display, self.top_k(scores, top_k), probabilities=scores)
        for where in sorted(failed):  # after the last image
            yield from failed[where]

    def _label_on_lanes(self, records: Iterable[ImageRecord], top_k: int, batch_size: int
                        ) -> Iterator[LabelResult]:
        from .decoding import run_on_lanes
        from .runner import LANE_STEP

        for part, errors, probs in run_on_lanes(self.runner, records, lambda rec: rec,
                                                self.input_size, self.resize, batch_size,
                                                LANE_STEP):
            rows = iter(probs)
            for rec, error in zip(part, errors):
                if error is not None:
                    yield LabelResult(rec.display, error=error)
                else:
                    scores = next(rows)
                    yield LabelResult(rec.display, self.top_k(scores, top_k),
                                      probabilities=scores)

    def label_paths(self, paths: Iterable[str], **kw: Any) -> Iterator[LabelResult]:
        records = [ImageRecord(key=p, label="", read=functools.partial(read_regular_file, p),
                               path=p) for p in paths]
        return self.label_records(records, **kw)


#: How many times :meth:`Classifier.load` reads a model folder that exports keep replacing.
MODEL_LOAD_ATTEMPTS = 5


def _file_sha256(path: Path) -> str | None:
    """The file's SHA-256 (hex); None where there is no such file (a model.tflite-only export)."""
    try:
        return file_sha256(path)
    except FileNotFoundError:
        return None


def _model_identity(folder: Path) -> tuple[int, ...] | None:
    """What changes when an export replaces the model in ``folder``: the folder itself (a new
    one takes its place) or, where the files are renamed in one by one, ``metadata.json``
    (renamed in last)."""
    try:
        d, m = os.stat(folder), os.stat(folder / METADATA_FILE)
    except OSError:
        return None
    return d.st_dev, d.st_ino, m.st_ino, m.st_mtime_ns, m.st_size


def _export_runner(runtime: str, path: Path) -> Any:
    """An export's model (``model.tflite`` for LiteRT, else the frozen graph) on ``runtime``."""
    from .runner import LiteRTRunner, ONNXRunner, OpenVINORunner

    if runtime == "litert":
        return LiteRTRunner(path)
    if runtime == "openvino":
        return OpenVINORunner(path)
    return ONNXRunner(export_onnx(path))


def export_onnx(graph_path: Path) -> bytes:
    """The frozen graph at ``graph_path`` as ONNX: converted once (this imports TensorFlow)
    and kept in the cache dir under the digest of the graph's bytes."""
    import hashlib

    from .files import default_cache_dir
    from .onnx_export import graph_onnx, tf2onnx_version
    from .graph import kept_file, parse_graph_def

    data = graph_path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()[:24]
    kept = (default_cache_dir() / "graphs" / "exports"
            / f"{digest}-tf2onnx{tf2onnx_version()}.onnx")
    return kept_file(kept, lambda: graph_onnx(parse_graph_def(data)), bytes, bytes, "ONNX model")


def expand_inputs(items: Iterable[str]) -> tuple[list[str], list[str]]:
    """Files, folders (recursively) and globs -> (image paths, inputs that matched nothing)."""
    paths: list[str] = []
    missing: list[str] = []
    for item in items:
        if os.path.isdir(item):
            for dirpath, dirnames, filenames in os.walk(item):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                paths.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                             if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES)
        elif os.path.exists(item):
            paths.append(item)
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            paths.extend(found) if found else missing.append(item)
        else:
            missing.append(item)
    return paths, missing
