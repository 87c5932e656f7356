"""Exporting from a helper process that starts TensorFlow while the bottlenecks are extracted.

When extraction runs on ONNX Runtime, OpenVINO or LiteRT, a training run needs TensorFlow only
to write the model (frozen graph, SavedModel), and importing it then is the largest single
step of a small set's run. It holds the GIL throughout, so a thread could not overlap it with
extraction or the head; a process can. :class:`ExportWorker` starts ``python -m
retrainer.export_worker``, which imports TensorFlow at once and then waits for one
:class:`ExportJob`: the paths of the backbone's kept graphs and the trained head. It writes the
model with the same function the training process would use
(:func:`retrainer.export.export_classifier`) and sends back what went where, with its log
records. Whatever goes wrong with the helper (it cannot start, dies, or fails), the caller
exports in its own process, as it would have without it: the result is the same files.
"""
from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .config import ExportConfig

log = logging.getLogger(__name__)

#: How long a helper told to stop may take to remove what it was writing.
STOP_SECONDS = 10.0


class _Stopped(BaseException):
    """SIGTERM in the helper: unwinds the export, whose clean-up removes its staging folder."""


@dataclass
class ExportJob:
    """One model to write: a kept backbone graph with the head appended
    (:func:`retrainer.export.export_classifier`'s arguments, files as paths)."""

    frozen_graph: str  # the backbone's kept fp32 frozen graph
    backbone_tflite: str | None  # where its TFLite conversion is kept (made there if missing)
    kernel: np.ndarray
    bias: np.ndarray
    labels: list[str]
    metadata: dict[str, Any]
    config: ExportConfig
    log_level: int = logging.INFO
    #: more files of the model (:func:`retrainer.export.export_graph`'s ``more_files``)
    more_files: dict[str, tuple[str, bytes]] | None = None

    def run(self, saved_model: Any = None) -> dict[str, str]:
        """Write the model here; what went where. ``saved_model``: a
        :class:`retrainer.export.SavedModelGraph` built ahead."""
        from .bottlenecks.extractor import kept_tflite
        from .export import export_classifier
        from .graph import parse_graph_def

        frozen = parse_graph_def(Path(self.frozen_graph).read_bytes())
        tflite_path = self.backbone_tflite
        return export_classifier(
            frozen, self.kernel, self.bias, self.labels, self.metadata, self.config,
            backbone_tflite=(lambda: kept_tflite(tflite_path, lambda: frozen))
            if tflite_path else None, saved_model=saved_model, more_files=self.more_files)


class ExportWorker:
    """A helper process importing TensorFlow now, to export one model later (:meth:`export`).

    Close it (:meth:`close`) when the run ends without exporting.
    """

    def __init__(self, proc: subprocess.Popen) -> None:
        self._proc = proc
        self._sender: threading.Thread | None = None

    @classmethod
    def start(cls, input_size: tuple[int, int] | None = None, resize: str = "bilinear"
              ) -> ExportWorker | None:
        """The started helper, or None where no process can be started (or ``sys.executable``
        is a frozen application, not Python). With the model's ``input_size`` and ``resize``
        method, it builds the SavedModel's decoding part while it waits."""
        if getattr(sys, "frozen", False) or not sys.executable:
            return None
        args = [str(int(v)) for v in input_size] + [resize] if input_size else []
        try:
            proc = subprocess.Popen([sys.executable, "-m", __name__, *args],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    env=_environment())
        except OSError as exc:
            log.debug("no export helper (%s); exporting in this process", exc)
            return None
        return cls(proc)

    def submit(self, job: ExportJob) -> None:
        """Hand ``job`` to the helper and return at once (it may still be importing
        TensorFlow); :meth:`result` waits for the files."""
        def send() -> None:
            try:
                pickle.dump(job, stdin, protocol=pickle.HIGHEST_PROTOCOL)
                stdin.close()
            except (OSError, ValueError) as exc:  # it ended; result() says so
                log.debug("cannot hand the job to the export helper (%s)", exc)

        stdin = self._proc.stdin
        assert stdin is not None
        self._sender = threading.Thread(target=send, name="export-job", daemon=True)
        self._sender.start()

    def result(self) -> dict[str, str] | None:
        """What went where, once the helper has written the model; None when it could not
        (the caller then exports itself). The helper ends either way."""
        stdout = self._proc.stdout
        assert stdout is not None
        try:
            try:
                status, value, records = pickle.load(stdout)
            except (OSError, EOFError, pickle.PickleError, ValueError, TypeError) as exc:
                log.debug("the export helper stopped (%s); exporting in this process", exc)
                return None
        finally:
            self.close()
        for record in records:
            logging.getLogger(record.name).handle(record)
        if status != "ok":
            log.debug("the export helper failed (%s); exporting in this process", value)
            return None
        log.debug("exported by the helper process (TensorFlow started during extraction)")
        return dict(value)

    def export(self, job: ExportJob) -> dict[str, str] | None:
        """:meth:`submit` then :meth:`result`."""
        self.submit(job)
        return self.result()

    def close(self) -> None:
        """End the helper (it may still be importing TensorFlow, or writing: then it removes
        its unfinished files first)."""
        proc = self._proc
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()
        if self._sender is not None:
            self._sender.join()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass


def _environment() -> dict[str, str]:
    """This environment, with retrainer importable in the helper: where it is not installed in
    a site directory (a checkout on ``sys.path``), its folder goes first on PYTHONPATH."""
    import site

    root = os.path.realpath(Path(__file__).resolve().parent.parent)
    sites = [*site.getsitepackages(), site.getusersitepackages()]
    if root in {os.path.realpath(p) for p in sites}:
        return dict(os.environ)
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([root, path] if path else [root]))


class _Kept(logging.Handler):
    """Keeps the helper's log records, made picklable, to be logged by the caller."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        record.msg, record.args = record.getMessage(), None
        record.exc_info = record.exc_text = None
        self.records.append(record)


def _serve(jobs: BinaryIO, replies: BinaryIO, args: list[str]) -> None:
    """The helper's side: import TensorFlow (and build the SavedModel's decoding for the input
    size and resize method ``args`` give, if any), then write the one job that comes, if any."""
    from ._tf_internals import import_tensorflow

    import_tensorflow()
    saved_model = None
    if len(args) == 3:
        from .export import SavedModelGraph

        try:
            saved_model = SavedModelGraph((int(args[0]), int(args[1])), args[2])
        except Exception:  # noqa: BLE001 - the export builds it again, and says what fails
            saved_model = None
    try:
        job = pickle.load(jobs)
    except EOFError:  # the run ended without exporting
        return
    kept = _Kept()
    logger = logging.getLogger("retrainer")
    logger.handlers[:] = [kept]
    logger.setLevel(job.log_level)
    logger.propagate = False
    for name in ("tensorflow", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        reply = ("ok", job.run(saved_model), kept.records)
    except Exception as exc:  # noqa: BLE001 - reported; the caller exports itself
        reply = ("error", f"{type(exc).__name__}: {exc}", kept.records)
    pickle.dump(reply, replies, protocol=pickle.HIGHEST_PROTOCOL)
    replies.flush()


def main() -> None:
    # Ctrl-C in a terminal reaches the whole process group: the training process handles it
    # (and ends this one), so no second traceback comes from here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop)  # ExportWorker.close
    # Replies go on the real stdout; anything else printed goes to stderr.
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    try:
        _serve(sys.stdin.buffer, replies, sys.argv[1:])
    except (_Stopped, OSError):  # told to stop, or the training process is gone: no one to tell
        pass
    finally:
        sys.stderr.flush()
        os._exit(0)  # no interpreter teardown (about 1 s with TensorFlow loaded): nothing is left


def _stop(signum: int, frame: Any) -> None:
    raise _Stopped


if __name__ == "__main__":
    main()
