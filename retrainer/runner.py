"""Running a model on numpy batches over lanes side by side, on any runtime.

A *lane* is one model instance with its own threads (a TensorFlow session, a LiteRT
interpreter). A batch is split over the lanes and each share runs on its lane's thread, so two
single-threaded lanes keep two cores busy where one two-threaded instance leaves them idle on
small convolutions (docs/performance.md). :class:`LaneRunner` holds that scheduling once;
:class:`retrainer.graph.GraphRunner` (TensorFlow) and :class:`LiteRTRunner` only say how one lane
runs a batch. Nothing here imports TensorFlow.
"""
from __future__ import annotations

import os
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np

T = TypeVar("T")

#: What ``--runtime`` accepts (see :mod:`retrainer.runtimes`).
RUNTIMES = ("auto", "tensorflow", "onnxruntime", "openvino", "litert")

#: Images a lane runs at once when it decodes its own share (``label``, extraction): on a
#: 2-core CPU every runtime's forward pass is fastest at batches of 2 to 8, and at 2 the
#: activations stay in the caches while decoding runs beside them (docs/performance.md). A
#: model's outputs do not depend on the batch they run in.
LANE_STEP = 2


def default_replicas(cores: int) -> int:
    """Lanes a runner spreads a batch over: two whenever there are two cores."""
    return 2 if cores >= 2 else 1


class LaneRunner:
    """Batches split over ``replicas`` lanes, each with one thread of its own.

    Subclasses set ``input_shape`` (with a free batch dimension) and ``output_dim`` and
    implement :meth:`run_on`, which must be thread-safe for its lane.
    """

    runtime = "none"
    input_shape: tuple[int | None, ...]
    output_dim: int

    def __init__(self, replicas: int) -> None:
        self._n = max(1, replicas)
        # One thread per lane, for as long as the runner lives: a batch's shares queue on
        # them, so a lane goes on to its next share without waiting for the others.
        self._lanes = [ThreadPoolExecutor(1, thread_name_prefix=f"{self.runtime}-lane-{i}")
                       for i in range(self._n)] if self._n > 1 else []

    @property
    def replicas(self) -> int:
        return self._n

    @property
    def input_size(self) -> tuple[int, int]:
        return int(self.input_shape[1]), int(self.input_shape[2])  # type: ignore[arg-type]

    def run_on(self, replica: int, batch: np.ndarray) -> np.ndarray:
        """The forward pass of ``batch`` on lane ``replica`` only (thread-safe)."""
        raise NotImplementedError

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch)
        if not self._lanes or len(batch) <= 1:
            return self.run_on(0, batch)
        return _joined(self._submit(batch))

    def _submit(self, batch: np.ndarray) -> list[Future]:
        """Split ``batch`` over the lanes, each share queued on its lane's thread."""
        parts = np.array_split(np.asarray(batch), max(1, min(len(self._lanes), len(batch))))
        return [lane.submit(self.run_on, i, part)
                for i, (lane, part) in enumerate(zip(self._lanes, parts))]

    def stream(self, batches: Iterable[tuple[T, np.ndarray]], depth: int = 2
               ) -> Iterator[tuple[T, np.ndarray]]:
        """(tag, output) for each (tag, batch), in order, keeping every lane busy.

        Up to ``depth`` batches are in flight, so a lane moves on to its share of the next
        batch as soon as it is done instead of waiting for the slowest share: with decoding
        competing for the same cores, the shares never finish together.
        """
        if not self._lanes:
            for tag, batch in batches:
                yield tag, self.run_on(0, batch)
            return
        pending: deque[tuple[T, list[Future]]] = deque()
        try:
            for tag, batch in batches:
                pending.append((tag, self._submit(batch)))
                if len(pending) >= max(1, depth):
                    tag, parts = pending.popleft()
                    yield tag, _joined(parts)
            while pending:
                tag, parts = pending.popleft()
                yield tag, _joined(parts)
        finally:  # stopped early: drop the shares not started, let the running ones end
            for _, parts in pending:
                for future in parts:
                    future.cancel()
            wait([f for _, parts in pending for f in parts])

    def stream_made(self, jobs: Iterable[Callable[[], tuple[T, np.ndarray]]], depth: int = 2,
                    step: int | None = None) -> Iterator[tuple[T, np.ndarray]]:
        """(tag, output) for each job, in order: a job makes ``(tag, batch)`` (reads and
        decodes its images) on a lane's own thread, which then runs that batch at once, in
        runs of ``step`` images (default: all at once).

        Decoding on separate threads kept more threads runnable than cores, and the lanes'
        batches waited in queues; here each of the ``replicas`` threads alternates between
        making a batch and running it, and takes the next job as soon as it is free. Up to
        ``depth`` jobs per lane are queued ahead. A batch is not used after its job's output
        comes back, so a job may build it in a buffer of its thread's own.
        """
        if not self._lanes:
            for job in jobs:
                tag, batch = job()
                yield tag, self._run_made(0, batch, step)
            return
        free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for lane in range(self._n):
            free.put(lane)

        def work(job: Callable[[], tuple[T, np.ndarray]]) -> tuple[T, np.ndarray]:
            lane = free.get()  # as many threads as lanes: never waits
            try:
                tag, batch = job()
                return tag, self._run_made(lane, batch, step)
            finally:
                free.put(lane)

        pending: deque[Future] = deque()
        with ThreadPoolExecutor(self._n, thread_name_prefix=f"{self.runtime}-made") as pool:
            try:
                for job in jobs:
                    pending.append(pool.submit(work, job))
                    if len(pending) >= max(1, depth) * self._n:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:  # stopped early: drop the jobs not started, let the running ones end
                for future in pending:
                    future.cancel()

    def _run_made(self, lane: int, batch: np.ndarray, step: int | None) -> np.ndarray:
        if not len(batch):  # every image of the job failed
            return np.zeros((0, self.output_dim), np.float32)
        if not step or len(batch) <= step:
            return self.run_on(lane, batch)
        return np.concatenate([self.run_on(lane, batch[i:i + step])
                               for i in range(0, len(batch), step)])

    def close(self) -> None:
        for lane in self._lanes:
            lane.shutdown(wait=True)


def _joined(parts: list[Future]) -> np.ndarray:
    return np.concatenate([f.result() for f in parts])


def litert_available() -> bool:
    """True when the LiteRT interpreter (package ai-edge-litert) is installed."""
    from .runtimes import installed

    return installed("litert")


def lane_threads(threads: int | None, replicas: int | None) -> tuple[int, int]:
    """(lanes, threads per lane) for ``threads`` cores in all (default: every core)."""
    cores = threads or os.cpu_count() or 1
    n = max(1, replicas or default_replicas(cores))
    return n, max(1, cores // n)


class LiteRTRunner(LaneRunner):
    """A TFLite model on LiteRT interpreters (XNNPACK), one per lane, without TensorFlow.

    An exported ``model.tflite`` runs through its ``serving_default`` signature (``images`` ->
    ``scores``); a model without signatures (the kept backbone conversion) through its one
    input and output. Starting takes a fraction of a second where TensorFlow takes seconds,
    which is what makes a one-image ``retrainer label`` fast; the scores match the frozen
    graph's to float round-off (docs/performance.md).
    """

    runtime = "litert"

    def __init__(self, path: str | Path | None = None, threads: int | None = None,
                 replicas: int | None = None, content: bytes | None = None) -> None:
        """``path`` of a .tflite file, or its ``content``."""
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(path) if path is not None else None
        self.content = content
        n, per = lane_threads(threads, replicas)
        source = {"model_content": content} if content is not None else {"model_path": str(path)}
        self._interpreters = [Interpreter(**source, num_threads=per) for _ in range(n)]
        self._locks = [threading.Lock() for _ in range(n)]
        first = self._interpreters[0]
        if "serving_default" in first.get_signature_list():
            self._runners = [i.get_signature_runner("serving_default") for i in self._interpreters]
            details = self._runners[0].get_input_details()["images"]
            out = self._runners[0].get_output_details()["scores"]
        else:
            self._runners = []
            (details,), (out,) = first.get_input_details(), first.get_output_details()
            self._io = (details["index"], out["index"])
            self._shapes: list[tuple[int, ...] | None] = [None] * n
        self.input_shape = (None, *(int(d) for d in details["shape"][1:]))
        self.output_dim = int(out["shape"][-1])
        super().__init__(n)

    def run_on(self, replica: int, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, np.float32)
        if not len(batch):
            return np.zeros((0, self.output_dim), np.float32)
        with self._locks[replica]:
            if self._runners:
                out = self._runners[replica](images=batch)["scores"]
            else:
                interpreter = self._interpreters[replica]
                if self._shapes[replica] != batch.shape:
                    interpreter.resize_tensor_input(self._io[0], batch.shape)
                    interpreter.allocate_tensors()
                    self._shapes[replica] = batch.shape
                interpreter.set_tensor(self._io[0], batch)
                interpreter.invoke()
                out = interpreter.get_tensor(self._io[1])
        return np.array(out, np.float32)  # a copy: the interpreter reuses its buffers


class ONNXRunner(LaneRunner):
    """An ONNX model on ONNX Runtime (CPU), one single-threaded session per lane.

    The backbone's frozen graph converted once by tf2onnx
    (:func:`retrainer.bottlenecks.extractor.backbone_onnx`); its outputs match TensorFlow's to
    round-off.
    """

    runtime = "onnxruntime"

    def __init__(self, model: str | Path | bytes, threads: int | None = None,
                 replicas: int | None = None) -> None:
        """``model``: the path of a .onnx file, or its bytes."""
        import onnxruntime as ort

        self.model = model
        n, per = lane_threads(threads, replicas)
        source = model if isinstance(model, bytes) else str(model)
        self._sessions = []
        for _ in range(n):
            options = ort.SessionOptions()
            options.intra_op_num_threads = per
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.log_severity_level = 3
            self._sessions.append(ort.InferenceSession(source, options,
                                                       providers=["CPUExecutionProvider"]))
        (inp,), (out,) = self._sessions[0].get_inputs(), self._sessions[0].get_outputs()
        self._names = (inp.name, out.name)
        self.input_shape = (None, *(int(d) for d in inp.shape[1:]))
        self.output_dim = int(out.shape[-1])
        super().__init__(n)

    def run_on(self, replica: int, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, np.float32)
        if not len(batch):
            return np.zeros((0, self.output_dim), np.float32)
        (out,) = self._sessions[replica].run([self._names[1]], {self._names[0]: batch})
        return np.asarray(out, np.float32)


_OPENVINO_FIRST_USE = threading.Lock()


class OpenVINORunner(LaneRunner):
    """A model on OpenVINO's CPU plugin, one inference stream (and request) per lane.

    It reads ONNX, TFLite and frozen TensorFlow graphs itself (no TensorFlow import).
    ``precision`` ``bf16`` runs the convolutions in bfloat16 where the CPU has AVX512-BF16 or
    AMX (its outputs differ from fp32 ones: cached apart, see :func:`retrainer.runtimes.cache_tag`).
    """

    runtime = "openvino"

    def __init__(self, path: str | Path, threads: int | None = None,
                 replicas: int | None = None, precision: str = "fp32") -> None:
        import openvino as ov

        self.path = Path(path)
        self.precision = precision
        n, per = lane_threads(threads, replicas)
        core = ov.Core()
        model = core.read_model(str(path))
        shape = model.input(0).get_partial_shape()
        if not shape[0].is_dynamic:  # a free batch dimension (conversions have one already)
            shape[0] = -1
            model.reshape({model.input(0): shape})
        config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                  "NUM_STREAMS": str(n), "INFERENCE_NUM_THREADS": str(n * per),
                  "ENABLE_CPU_PINNING": "NO"}  # a shared machine: let the OS place threads
        self._compiled = core.compile_model(model, "CPU", config)
        self._requests = [self._compiled.create_infer_request() for _ in range(n)]
        self._output = self._compiled.output(0)
        self.input_shape = (None, *(int(d.get_length()) for d in list(shape)[1:]))
        self.output_dim = int(self._output.get_partial_shape()[-1].get_length())
        # OpenVINO's Python bindings set up their NumPy interface on first use behind a
        # call-once that deadlocks when two threads get there together (two lanes' first
        # batches): one request runs once here, on one thread, before any lane does.
        with _OPENVINO_FIRST_USE:
            self._requests[0].infer({0: np.zeros((1, *self.input_shape[1:]), np.float32)})
        super().__init__(n)

    def run_on(self, replica: int, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, np.float32)
        if not len(batch):
            return np.zeros((0, self.output_dim), np.float32)
        out = self._requests[replica].infer({0: batch})[self._output]
        return np.array(out, np.float32)  # a copy: the request reuses its buffers


def shippable(runner: Any) -> tuple[str, str, bytes] | None:
    """``(runtime, precision, model bytes)``: what another process (a Spark worker) needs to
    build the same runner with :func:`runner_from_bytes`; None for a runner without them."""
    runtime = getattr(runner, "runtime", None)
    if runtime == "tensorflow" and getattr(runner, "graph_def", None) is not None:
        return runtime, "fp32", runner.graph_def.SerializeToString()
    if runtime == "litert":
        data = runner.content if runner.content is not None else runner.path.read_bytes()
        return runtime, "fp32", data
    if runtime == "onnxruntime":
        model = runner.model
        return runtime, "fp32", model if isinstance(model, bytes) else Path(model).read_bytes()
    if runtime == "openvino":
        return runtime, runner.precision, runner.path.read_bytes()
    return None


def runner_from_bytes(runtime: str, data: bytes, threads: int | None = None,
                      replicas: int | None = None, precision: str = "fp32") -> LaneRunner:
    """A runner of ``runtime`` (not TensorFlow: see :class:`retrainer.graph.GraphRunner`) on
    the model ``data`` as :func:`shippable` gives it."""
    if runtime == "litert":
        return LiteRTRunner(content=data, threads=threads, replicas=replicas)
    if runtime == "onnxruntime":
        return ONNXRunner(data, threads=threads, replicas=replicas)
    if runtime == "openvino":
        import tempfile

        with tempfile.TemporaryDirectory(prefix="retrainer-") as tmp:
            # ONNX starts with its ir_version field (tag 0x08), a GraphDef with its nodes (0x0a)
            suffix = (".tflite" if data[4:8] == b"TFL3" else
                      ".onnx" if data[:1] == b"\x08" else ".pb")
            path = Path(tmp) / f"model{suffix}"
            path.write_bytes(data)
            runner = OpenVINORunner(path, threads=threads, replicas=replicas, precision=precision)
        return runner
    raise ValueError(f"no runner for runtime {runtime!r} from bytes")
