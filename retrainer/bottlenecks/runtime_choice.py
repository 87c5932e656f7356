"""``--runtime auto``: the runtime that runs this backbone fastest on this machine.

Each installed runtime that runs the backbone's precision is timed on random pixels, run the
way the local engine runs extraction (each lane its share of a batch, a few images at a time:
:func:`_rate`), in rounds alternating between runtimes, the best of each kept (other work on
the machine skews single measurements). The choice is kept as a small JSON file in the cache dir, keyed by
the backbone, the precision, the machine (:func:`retrainer.bottlenecks.extractor.machine_tag`,
core count) and the runtimes' versions: it is measured again only when one of those changes.
Where TensorFlow sees a GPU, TensorFlow runs it (the other runtimes here run on the CPU).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..runtimes import RUNTIMES, available, versions

log = logging.getLogger(__name__)

#: Within this share of the best rate, the earlier runtime of RUNTIMES wins: another runtime
#: replaces TensorFlow only when clearly faster (a loaded machine moves short timings ~10%).
TIE = 0.10


def choice_path(cache_root: str | Path, backbone: Any, precision: str) -> Path:
    from .extractor import machine_tag

    return (Path(cache_root) / backbone.id_for("fp32")
            / f"runtime-choice-{precision}-{machine_tag()}.json")


def choice_key(backbone: Any, precision: str) -> dict[str, Any]:
    """What a kept choice is valid for (``measured``: how, so a choice timed another way is
    measured again)."""
    from .. import __version__
    from ..runner import LANE_STEP
    from .extractor import machine_tag

    return {"backbone": backbone.id_for("fp32"), "precision": precision,
            "machine": machine_tag(), "cores": os.cpu_count(), "versions": versions(),
            "retrainer": __version__, "measured": f"lane shares, {LANE_STEP} at a time"}


def kept_choice(cache_root: str | Path, backbone: Any, precision: str) -> dict[str, Any] | None:
    """The kept measurement for this backbone, precision, machine and runtime versions."""
    path = choice_path(cache_root, backbone, precision)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (not isinstance(data, dict) or data.get("key") != choice_key(backbone, precision)
            or data.get("runtime") not in available(precision)):
        return None
    return data


def choose(backbone: Any, cache_root: str | Path | None, batch: int = 16,
           seconds: float = 0.6, rounds: int = 3) -> str:
    """The fastest installed runtime for ``backbone`` at its precision (kept under
    ``cache_root``; without one, measured every time)."""
    precision = backbone.precision
    candidates = available(precision)
    if len(candidates) <= 1:
        return candidates[0] if candidates else "tensorflow"
    if cache_root is not None and (kept := kept_choice(cache_root, backbone, precision)):
        log.info("runtime: %s (measured before: %s)", kept["runtime"], _rates(kept["img_s"]))
        return str(kept["runtime"])
    from ..graph import cpu_only

    if "tensorflow" in candidates and not cpu_only():
        runtime, rates = "tensorflow", {}
        log.info("runtime: tensorflow (a GPU is visible)")
    else:
        rates = measure(backbone, cache_root, candidates, batch, seconds, rounds)
        best = max(rates.values())
        runtime = next(r for r in RUNTIMES if rates.get(r, 0.0) >= best * (1 - TIE))
        why = ("the fastest here" if rates[runtime] >= best else
               f"within {TIE:.0%} of the fastest, and first in the order {', '.join(RUNTIMES)}")
        log.info("runtime: %s, %s (%s)", runtime, why, _rates(rates))
    if cache_root is not None:
        from ..files import atomic_write

        data = {"key": choice_key(backbone, precision), "runtime": runtime,
                "img_s": {r: round(v, 2) for r, v in rates.items()}, "batch": batch}
        path = choice_path(cache_root, backbone, precision)
        try:
            atomic_write(path, lambda fh: fh.write(json.dumps(data, indent=1).encode()))
        except OSError as exc:
            log.warning("cannot keep the runtime choice at %s (%s)", path, exc.strerror or exc)
    return runtime


def measure(backbone: Any, cache_root: str | Path | None, runtimes: list[str], batch: int = 16,
            seconds: float = 0.5, rounds: int = 2) -> dict[str, float]:
    """Images per second of the backbone's forward pass on each runtime (over its lanes, as
    extraction runs it: :func:`_rate`), best of ``rounds`` rounds of at least ``seconds`` and two
    batches each. A runtime that fails to build or run is left out (with a warning)."""
    from .extractor import make_forward

    runners: dict[str, Any] = {}
    for runtime in runtimes:
        try:
            runners[runtime] = make_forward(backbone, cache_root, runtime=runtime)
        except Exception as exc:  # noqa: BLE001 - each runtime raises its own kinds
            log.warning("runtime %s cannot run this backbone (%s); left out", runtime, exc)
    size = next(iter(runners.values())).input_size if runners else (1, 1)
    x = np.random.default_rng(0).uniform(0, 255, (batch, *size, 3)).astype(np.float32)
    rates: dict[str, float] = {}
    try:
        for runtime, runner in list(runners.items()):
            try:
                runner(x)  # first runs build kernels: not timed
            except Exception as exc:  # noqa: BLE001
                log.warning("runtime %s cannot run this backbone (%s); left out", runtime, exc)
                runners.pop(runtime).close()
        for _ in range(rounds):
            for runtime, runner in runners.items():
                rates[runtime] = max(rates.get(runtime, 0.0), _rate(runner, x, seconds))
    finally:
        for runner in runners.values():
            runner.close()
    return rates or {"tensorflow": 0.0}


def _rate(runner: Any, x: np.ndarray, seconds: float) -> float:
    """Images per second of ``runner`` on ``x``, run as the local engine runs extraction: on
    the CPU each lane takes its share of the batch and runs it
    :data:`retrainer.runner.LANE_STEP` images at a time (where the runtimes differ most: some
    gain more than others from small runs); on a GPU whole batches, pipelined over the lanes."""
    from ..runner import LANE_STEP
    from .engines.local import on_lanes

    done, t = 0, time.perf_counter()
    if on_lanes(runner):
        share = x[:max(1, -(-len(x) // runner.replicas))]

        def jobs():
            while done < 2 * runner.replicas or time.perf_counter() - t < seconds:
                yield lambda: (None, share)

        for _ in runner.stream_made(jobs(), step=LANE_STEP):
            done += 1
        return done * len(share) / (time.perf_counter() - t)

    def feed():
        while done < 2 or time.perf_counter() - t < seconds:
            yield None, x

    for _ in runner.stream(feed()):
        done += 1
    return done * len(x) / (time.perf_counter() - t)


def _rates(rates: dict[str, float]) -> str:
    return ", ".join(f"{r} {v:.0f} img/s" for r, v in rates.items()) or "not measured"
