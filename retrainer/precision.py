"""Numeric precision of the backbone during extraction: ``fp32`` or ``bf16``.

bf16 runs the convolutions in bfloat16 (Keras ``mixed_bfloat16``: weights stay float32 and are
cast on use; BatchNorm and the output are float32). On CPUs with AVX512-BF16 or AMX (and on
GPUs) oneDNN runs it about 1.6x faster than fp32 for large backbones. Its bottlenecks differ from
fp32 ones by ~1e-2 relative, so the cache id includes the precision. Exports stay fp32, so the
exported model runs anywhere (TFLite, TF Serving, CPUs without bf16).
"""
from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from .errors import RetrainerError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
_POLICY = {"fp32": "float32", "bf16": "mixed_bfloat16"}


def check_precision(precision: str) -> str:
    """The precision, or a clear error; warns when bf16 would be emulated (slow) here."""
    if precision not in PRECISIONS:
        raise RetrainerError(f"unknown precision {precision!r}.",
                             f"Use one of: {', '.join(PRECISIONS)}.")
    if precision == "bf16" and not cpu_has_bf16():
        log.warning("this CPU has no native bfloat16 (AVX512-BF16/AMX): bf16 will be emulated "
                    "and likely slower than fp32 unless a GPU is used")
    return precision


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when the CPU advertises AVX512-BF16 or AMX-BF16 (Linux ``/proc/cpuinfo``)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def with_precision(model: Any, precision: str) -> Any:
    """``model`` itself for fp32; otherwise a copy whose layers compute in ``precision``.

    The copy shares nothing with ``model`` but holds the same (float32) weights.
    """
    if precision == "fp32":
        return model
    import keras

    policy = _POLICY[precision]

    def clone(layer: Any) -> Any:
        config = layer.get_config()
        if "dtype" in config:
            config["dtype"] = policy
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    copy.set_weights(model.get_weights())
    return copy
