"""Which runtime runs a model: TensorFlow, ONNX Runtime, OpenVINO or LiteRT.

Every runtime runs the same frozen graph (or its ONNX / TFLite conversion, made once and kept
beside it in the cache dir) as a :class:`retrainer.runner.LaneRunner`. A runtime whose package
is not installed is never a candidate for ``auto``, and asking for it by name gives a one-line
error naming the package. Nothing here imports TensorFlow or any runtime until one is built.

Caching: fp32 runtimes give TensorFlow's outputs to float round-off (tests check 1e-5), so their
bottlenecks share one cache id; a reduced precision gives other outputs on each runtime, so
``bf16`` on TensorFlow and ``bf16`` on OpenVINO are cached apart (:func:`cache_tag`).
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache

from ..errors import RetrainerError

#: The runtimes by name, in the order ``auto`` prefers them when they are equally fast.
RUNTIMES = ("tensorflow", "onnxruntime", "openvino", "litert")
#: What ``--runtime`` accepts.
CHOICES = ("auto", *RUNTIMES)
#: The pip packages each runtime needs (ONNX Runtime runs tf2onnx conversions), and the
#: modules they must make importable.
PACKAGES = {"tensorflow": ("tensorflow",), "onnxruntime": ("onnxruntime", "tf2onnx"),
            "openvino": ("openvino",), "litert": ("ai-edge-litert",)}
_MODULES = {"tensorflow": ("tensorflow",), "onnxruntime": ("onnxruntime", "tf2onnx"),
            "openvino": ("openvino",), "litert": ("ai_edge_litert",)}
#: The precisions each runtime runs a backbone at.
PRECISIONS = {"tensorflow": ("fp32", "bf16"), "onnxruntime": ("fp32",),
              "openvino": ("fp32", "bf16"), "litert": ("fp32",)}


class RuntimeNotInstalled(RetrainerError):
    """A runtime asked for by name whose package is missing."""


@lru_cache(maxsize=None)
def installed(runtime: str) -> bool:
    """True when ``runtime``'s package can be imported (checked without importing it)."""
    try:
        return all(importlib.util.find_spec(m) is not None for m in _MODULES[runtime])
    except (ImportError, ValueError):
        return False


def available(precision: str = "fp32") -> list[str]:
    """The installed runtimes that run a backbone at ``precision``, in :data:`RUNTIMES` order."""
    return [r for r in RUNTIMES if installed(r) and precision in PRECISIONS[r]]


def check_runtime(runtime: str, precision: str = "fp32") -> str:
    """``runtime`` when it can be used at ``precision`` here, else a one-line error."""
    if runtime not in CHOICES:
        raise RetrainerError(f"unknown runtime {runtime!r}.", f"Use one of: {', '.join(CHOICES)}.")
    if runtime == "auto":
        return runtime
    if not installed(runtime):
        names = PACKAGES[runtime]
        what = (f"the {names[0]} package, which is not installed" if len(names) == 1 else
                f"the {' and '.join(names)} packages, which are not all installed")
        raise RuntimeNotInstalled(f"runtime {runtime!r} needs {what}.",
                                  f"Install {'it' if len(names) == 1 else 'them'} "
                                  f"(pip install {' '.join(names)}) or use --runtime auto.")
    if precision not in PRECISIONS[runtime]:
        raise RetrainerError(
            f"runtime {runtime!r} does not run {precision}.",
            f"Use --precision {PRECISIONS[runtime][0]}, or a runtime that runs {precision}: "
            f"{', '.join(r for r in RUNTIMES if precision in PRECISIONS[r])}.")
    return runtime


def cache_tag(precision: str, runtime: str) -> str:
    """What the bottleneck cache id records of how bottlenecks were computed.

    fp32 on any runtime: ``fp32`` (one cache: the outputs match TensorFlow's to round-off).
    bf16 on TensorFlow: ``bf16`` (as before runtimes existed). bf16 elsewhere: ``bf16-<runtime>``,
    since each runtime rounds differently.
    """
    if precision == "fp32" or runtime == "tensorflow":
        return precision
    return f"{precision}-{runtime}"


def versions() -> dict[str, str]:
    """The installed version of each runtime's package (what a cached choice depends on)."""
    from importlib import metadata

    out = {}
    for runtime in RUNTIMES:
        if installed(runtime):
            found = []
            for package in PACKAGES[runtime]:
                try:
                    found.append(metadata.version(package))
                except metadata.PackageNotFoundError:
                    found.append("?")
            out[runtime] = "+".join(found)
    return out
