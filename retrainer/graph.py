"""Freezing Keras models into GraphDefs, and running frozen graphs fast.

A frozen graph holds its weights as constants, which lets TensorFlow fold BatchNorm into the
convolutions: it runs markedly faster on CPU than the Keras call, and it is what the export writes
as ``retrained_graph.pb`` for plain-TF users.

Freezing a large backbone takes seconds, so a backbone is frozen once and its graph kept in the
cache dir (:func:`cached_freeze`); the exported classifier is that graph with the small frozen
head spliced on (:func:`compose`), not a second freeze of the whole.
The graph the backbone runs as is kept too, already rewritten as a session would on its first
run (:func:`optimize`).
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np

from ._tf_internals import convert_to_constants, grappler_optimize, import_tensorflow
from .runner import LaneRunner, default_replicas

log = logging.getLogger(__name__)

T = TypeVar("T")

INPUT_NAME = "input"
OUTPUT_NAME = "final_result"


def freeze(model: Any, input_name: str = INPUT_NAME, output_name: str = OUTPUT_NAME) -> Any:
    """A frozen ``tf.compat.v1.GraphDef`` of ``model`` with a float input and a named output."""
    tf = import_tensorflow()
    spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32, name=input_name)

    @tf.function(input_signature=[spec])
    def forward(x: Any) -> Any:
        return tf.identity(tf.cast(model(x, training=False), tf.float32), name=output_name)

    frozen = convert_to_constants(forward.get_concrete_function())
    return frozen.graph.as_graph_def()


def dense_softmax_graph(kernel: np.ndarray, bias: np.ndarray, input_name: str = INPUT_NAME,
                        output_name: str = OUTPUT_NAME) -> Any:
    """A frozen GraphDef of ``softmax(x @ kernel + bias)``: the trained head, without Keras."""
    tf = import_tensorflow()

    with tf.Graph().as_default() as graph:
        x = tf.compat.v1.placeholder(tf.float32, [None, kernel.shape[0]], name=input_name)
        logits = tf.nn.bias_add(tf.matmul(x, tf.constant(kernel, tf.float32)),
                                tf.constant(bias, tf.float32))
        tf.identity(tf.nn.softmax(logits), name=output_name)
    return graph.as_graph_def()


def cached_freeze(path: str | Path, build: Callable[[], Any]) -> Any:
    """:func:`freeze` of the model ``build()`` returns, kept at ``path`` (written atomically)
    and read back on the next run without building the model.

    The caller picks a path that changes whenever the model's weights or structure do (the
    bottleneck cache id does), plus the TensorFlow version.
    """
    return kept_graph(path, lambda: freeze(build()), "frozen graph")


def kept_graph(path: str | Path, make: Callable[[], Any], what: str = "graph") -> Any:
    """The GraphDef kept at ``path``; made by ``make()`` and kept when missing or damaged."""
    return kept_file(path, make, lambda g: g.SerializeToString(), parse_graph_def, what)


def kept_file(path: str | Path, make: Callable[[], T], dump: Callable[[T], bytes],
              load: Callable[[bytes], T], what: str) -> T:
    """``load`` of the file at ``path``; when it is missing or ``load`` fails, ``make()``,
    written there atomically as ``dump`` gives it. A cache dir that cannot be written costs
    only the time."""
    from .files import atomic_write

    path = Path(path)
    if path.is_file():
        try:
            return load(path.read_bytes())
        except Exception as exc:  # noqa: BLE001 - protobuf and flatbuffers raise their own kinds
            log.warning("%s %s is damaged (%s); making it again", what, path.name, exc)
    value = make()
    try:
        atomic_write(path, lambda fh: fh.write(dump(value)))
    except OSError as exc:
        log.warning("cannot keep the %s at %s (%s)", what, path, exc.strerror or exc)
    return value


CPU = "/job:localhost/replica:0/task:0/device:CPU:0"


def optimize(graph_def: Any, output_name: str = OUTPUT_NAME) -> Any:
    """``graph_def`` as a CPU session rewrites it on its first run (grappler: constants
    folded, BatchNorm folded into the convolutions, ops fused), done once and kept.

    A session then runs it with its own rewriting turned off (``GraphRunner(optimized=True)``):
    the same outputs bit for bit and the same speed, with a faster first run and less memory
    (figures in docs/performance.md).
    """
    tf = import_tensorflow()

    placed = tf.compat.v1.GraphDef()
    placed.CopyFrom(graph_def)
    for node in placed.node:
        node.device = CPU  # the CPU-only rewrites (fusions) look at the placement
    with tf.Graph().as_default() as graph:
        tf.compat.v1.import_graph_def(placed, name="")
        meta = tf.compat.v1.train.export_meta_graph(graph=graph)
    meta.collection_def["train_op"].node_list.value.append(output_name)  # what must survive
    out = grappler_optimize(tf.compat.v1.ConfigProto(), meta)
    for node in out.node:
        node.device = ""
    del placed, graph, meta
    release_free_memory()  # grappler's buffers, which the sessions would never reuse
    return out


def cpu_only() -> bool:
    """True when TensorFlow sees no GPU: :func:`optimize` rewrites for the CPU."""
    tf = import_tensorflow()

    return not tf.config.list_physical_devices("GPU")


def compose(backbone: Any, head: Any, input_name: str = INPUT_NAME,
            output_name: str = OUTPUT_NAME) -> Any:
    """One frozen GraphDef: ``backbone``'s output feeds ``head``'s input; names as in
    :func:`freeze`.

    The nodes are copied under ``backbone/`` and ``head/``, the names ``import_graph_def``
    would give them, without importing either graph (several times faster than importing both
    and extracting the subgraph).
    """
    tf = import_tensorflow()

    out = tf.compat.v1.GraphDef()
    out.versions.CopyFrom(backbone.versions)
    out.library.CopyFrom(backbone.library)
    out.library.MergeFrom(head.library)
    _copy_nodes(out, backbone, output_name, "backbone", {input_name: input_name})
    _copy_nodes(out, head, output_name, "head", {input_name: f"backbone/{output_name}"})
    final = out.node.add(name=output_name, op="Identity", input=[f"head/{output_name}"])
    final.attr["T"].type = tf.float32.as_datatype_enum
    return out


def _copy_nodes(out: Any, graph_def: Any, output: str, scope: str, rename: dict[str, str]) -> None:
    """Add the nodes ``output`` needs from ``graph_def`` to ``out``, under ``scope/``; a node
    named in ``rename`` is not copied but stands for the node it maps to (itself: unscoped)."""
    def name_of(ref: str) -> str:
        return rename.get(ref, f"{scope}/{ref}")

    def input_of(ref: str) -> str:
        control = "^" if ref.startswith("^") else ""
        node, sep, port = ref.lstrip("^").partition(":")
        return f"{control}{name_of(node)}{sep}{port}"

    nodes = {node.name: node for node in graph_def.node}
    needed, todo = set(), [output]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(ref.lstrip("^").partition(":")[0] for ref in nodes[name].input)
    for node in graph_def.node:
        if node.name not in needed:
            continue
        if node.name in rename:
            if rename[node.name] == node.name:
                out.node.add().CopyFrom(node)
            continue
        new = out.node.add()
        new.CopyFrom(node)
        new.name = name_of(node.name)
        del new.input[:]
        new.input.extend(input_of(ref) for ref in node.input)
        if "_class" in new.attr:  # colocation with other nodes, by name
            refs = new.attr["_class"].list.s
            refs[:] = [b"loc:@" + name_of(r[5:].decode()).encode() if r.startswith(b"loc:@")
                       else r for r in refs]


def _without(graph_def: Any, name: str) -> Any:
    """A copy of ``graph_def`` without node ``name`` (an input about to be replaced)."""
    tf = import_tensorflow()

    body = tf.compat.v1.GraphDef()
    body.versions.CopyFrom(graph_def.versions)
    body.library.CopyFrom(graph_def.library)
    body.node.extend(n for n in graph_def.node if n.name != name)
    return body


def input_shape(graph_def: Any, name: str) -> list[int | None]:
    """The placeholder's shape with a free batch dimension."""
    for node in graph_def.node:
        if node.name == name:
            return [None] + [int(d.size) for d in node.attr["shape"].shape.dim[1:]]
    raise ValueError(f"the graph has no input node {name!r}")


def output_dim(graph_def: Any, name: str = OUTPUT_NAME) -> int | None:
    """The last dimension of node ``name``'s output (None where the graph does not say)."""
    tf = import_tensorflow()

    with tf.Graph().as_default() as graph:
        tf.compat.v1.import_graph_def(graph_def, name="")
        dims = graph.get_tensor_by_name(f"{name}:0").shape.as_list()
    return dims[-1] if dims else None


def tflite_model(graph_def: Any) -> bytes:
    """TFLite of a frozen graph (``input`` -> ``final_result``) with a free batch dimension.

    The GraphDef converter is faster than converting the SavedModel's concrete function (which
    writes and reads back a temporary SavedModel first); the two models give identical scores.
    It names no signature: see :func:`retrainer.export.with_signature`.
    """
    tf = import_tensorflow()

    shape = [-1, *input_shape(graph_def, INPUT_NAME)[1:]]
    converter = tf.compat.v1.lite.TFLiteConverter(
        graph_def, None, None, input_arrays_with_shape=[(INPUT_NAME, shape)],
        output_arrays=[OUTPUT_NAME])
    converter.exclude_conversion_metadata = True  # saves a third unpack and pack of the model
    return bytes(converter.convert())


class GraphRunner(LaneRunner):
    """Calls a frozen GraphDef on numpy batches in ``tf.compat.v1.Session`` s (no Keras), one
    session per lane (:class:`retrainer.runner.LaneRunner`).

    A Session runs the same frozen graph faster than calling it as a TF2 function (same CPU
    time, less wall time): its executor keeps the cores busier. A batch is split
    over ``replicas`` sessions, each with its own threads (:func:`default_replicas`), run side
    by side. Calling the runner, and :meth:`run_on`, is thread-safe.
    """

    runtime = "tensorflow"

    def __init__(self, graph_def: Any, input_name: str = INPUT_NAME,
                 output_name: str = OUTPUT_NAME, threads: int | None = None,
                 replicas: int | None = None, optimized: bool = False) -> None:
        """``threads`` caps the op threads of all sessions together (a Spark worker sharing a
        machine's cores; default: every core); ``replicas`` overrides the session count;
        ``optimized``: the graph comes from :func:`optimize`, so sessions do not rewrite it."""
        tf = import_tensorflow()

        self.graph_def = graph_def  # kept so other processes (Spark workers) can rebuild it
        self.optimized = optimized
        graph = tf.Graph()
        with graph.as_default():
            shape = input_shape(graph_def, input_name)
            inp = tf.compat.v1.placeholder(tf.float32, shape, name=input_name)
            (out,) = tf.compat.v1.import_graph_def(
                _without(graph_def, input_name), input_map={f"{input_name}:0": inp},
                return_elements=[f"{output_name}:0"], name="")
        graph.finalize()
        self._input, self._output = inp, out
        cores = threads or os.cpu_count() or 1
        n = max(1, replicas or default_replicas(cores))
        if n == 1 and not threads:
            configs = [tf.compat.v1.ConfigProto()]  # TensorFlow's own thread pools
        else:
            # Each session gets its own pools: shared global pools would serialise them.
            per = max(1, cores // n)
            configs = [tf.compat.v1.ConfigProto(intra_op_parallelism_threads=per,
                                                inter_op_parallelism_threads=1,
                                                use_per_session_threads=True)
                       for _ in range(n)]
        for config in configs:
            config.graph_options.rewrite_options.disable_meta_optimizer = optimized
        self._sessions = [tf.compat.v1.Session(graph=graph, config=c) for c in configs]
        self._cold = set(range(n))  # sessions that have not run yet
        self._first_runs = threading.Lock()
        self.input_shape = tuple(inp.shape.as_list())
        self.output_dim = int(out.shape[-1])
        super().__init__(n)

    def run_on(self, replica: int, batch: np.ndarray) -> np.ndarray:
        """The forward pass of ``batch`` on session ``replica`` only (thread-safe)."""
        if replica in self._cold:
            # A session's first run optimises the graph (unless it comes optimized) and builds
            # its kernels, with large temporary buffers; two at once peak markedly higher
            # (docs/performance.md), so first runs take turns, and the freed buffers go back
            # to the system.
            with self._first_runs:
                out = self._run(replica, batch)
                self._cold.discard(replica)
                release_free_memory()
            return out
        return self._run(replica, batch)

    def _run(self, replica: int, batch: np.ndarray) -> np.ndarray:
        out = self._sessions[replica].run(self._output, {self._input: np.asarray(batch, np.float32)})
        return np.asarray(out, np.float32)

    def close(self) -> None:
        super().close()
        for session in self._sessions:
            session.close()


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere a
    no-op). TensorFlow frees large buffers that glibc would otherwise keep mapped."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def load_graph_def(path: str) -> Any:
    with open(path, "rb") as fh:
        return parse_graph_def(fh.read())


def parse_graph_def(data: bytes) -> Any:
    tf = import_tensorflow()

    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(data)
    return graph_def
