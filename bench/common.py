"""Shared helpers for the benchmarks: data sets, timing, JSON output, child processes.

Every benchmark prints one JSON document on stdout (progress and logs go to stderr). Data sets
come from ``--data-root`` or ``$RETRAINER_DATA`` (a folder holding ``flowers/``,
``cats_vs_dogs/`` and ``hymenoptera_data/``); large sets are generated.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

BENCH = Path(__file__).resolve().parent
BACKBONES = ("efficientnet_lite0", "inception_v3")
#: The ImageNet weights of inception_v3 cannot be downloaded offline; random weights time the same.
WEIGHTS = {"inception_v3": "random", "efficientnet_lite0": None}


def parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0])
    p.add_argument("--data-root", default=os.environ.get("RETRAINER_DATA"),
                   help="Folder with the benchmark data sets (default: $RETRAINER_DATA).")
    p.add_argument("--work-dir", default=None,
                   help="Scratch folder for generated images, caches and models "
                        "(default: bench/results/work).")
    p.add_argument("--backbones", default=",".join(BACKBONES),
                   help="Comma-separated backbones to measure.")
    return p


def data_root(args: argparse.Namespace) -> Path:
    if not args.data_root:
        sys.exit("error: no data sets: pass --data-root DIR or set RETRAINER_DATA "
                 "(a folder with flowers/, cats_vs_dogs/ and hymenoptera_data/).")
    root = Path(args.data_root)
    if not root.is_dir():
        sys.exit(f"error: --data-root '{root}' is not a folder.")
    return root


def work_dir(args: argparse.Namespace) -> Path:
    path = Path(args.work_dir) if args.work_dir else BENCH / "results" / "work"
    path.mkdir(parents=True, exist_ok=True)
    return path


def backbones(args: argparse.Namespace) -> list[str]:
    return [b for b in args.backbones.split(",") if b]


def jpeg_set_500(root: Path, dest: Path) -> Path:
    """500 real JPEGs in 7 classes: all of flowers (5 x 60) and 100 cats + 100 dogs (symlinks)."""
    marker = dest / ".complete"
    if marker.exists():
        return dest
    pairs: list[tuple[str, Path]] = []
    flowers = root / "flowers"
    for cls in sorted(p for p in flowers.iterdir() if p.is_dir()):
        pairs += [(cls.name, f) for f in sorted(cls.iterdir()) if f.suffix.lower() in (".jpg", ".jpeg")]
    for cls in ("cats", "dogs"):
        pairs += [(cls, f) for f in sorted((root / "cats_vs_dogs" / "train" / cls).iterdir())][:100]
    if len(pairs) < 500:
        sys.exit(f"error: expected 500 JPEGs under {root}/flowers and cats_vs_dogs, found {len(pairs)}")
    for cls, src in pairs[:500]:
        link = dest / cls / src.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(src.resolve())
    marker.touch()
    return dest


COLOURS = [(200, 40, 40), (40, 180, 60), (40, 60, 210), (220, 200, 40)]


def synthetic_set(dest: Path, n: int, size: int = 96, seed: int = 0) -> Path:
    """``n`` distinct noisy JPEGs in 4 colour classes (generated once, then reused)."""
    from PIL import Image

    marker = dest / f".complete-{n}"
    if marker.exists():
        return dest
    rng = np.random.default_rng(seed)
    for i in range(n):
        c = i % len(COLOURS)
        path = dest / f"class{c}" / f"img{i:06d}.jpg"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        base = np.array(COLOURS[c], np.float32)
        arr = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(path, quality=85)
    marker.touch()
    return dest


class Clock:
    """Wall time and this process's CPU time (all threads) over a block.

    A throughput alone does not say where the time went; CPU-ms per item and how busy the cores
    were do: the profile that a missed goal is explained with.
    """

    def __enter__(self) -> "Clock":
        self.start, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.start
        self.cpu = time.process_time() - self._cpu

    def rate(self, items: int) -> "Rate":
        return Rate(items / self.wall, 1000 * self.cpu / items,
                    self.cpu / (self.wall * (os.cpu_count() or 1)))


@dataclass(frozen=True, order=True)
class Rate:
    """Items per second, with the CPU-ms each item cost and the share of all cores kept busy."""

    per_s: float
    cpu_ms: float = 0.0
    busy: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {"img_s": round(self.per_s, 2), "cpu_ms_per_img": round(self.cpu_ms, 2),
                "cores_busy": round(self.busy, 3)}


def best_rate(fn: Callable[[], int], seconds: float = 8.0, rounds: int = 1) -> Rate:
    """The rate of ``fn`` (returns items done per call), after one warm-up call."""
    fn()
    best = Rate(0.0)
    for _ in range(rounds):
        n = 0
        with Clock() as clock:
            while time.perf_counter() - clock.start < seconds:
                n += fn()
        best = max(best, clock.rate(n))
    return best


def stream_rate(runner: Any, x: np.ndarray, seconds: float = 8.0) -> Rate:
    """The rate of ``runner.stream`` fed the same batch for ``seconds``."""
    def feed(until: float) -> Any:
        while time.perf_counter() < until:
            yield None, x

    for _ in runner.stream(feed(time.perf_counter() + 1.0)):  # warm-up
        pass
    with Clock() as clock:
        done = sum(len(out) for _, out in runner.stream(feed(time.perf_counter() + seconds)))
    return clock.rate(done)


def raw_forward_rate(runner: Any, size: tuple[int, int], batches: tuple[int, ...] = (16, 32, 64),
                     seconds: float = 8.0, by_sessions: dict[int, float] | None = None
                     ) -> tuple[Rate, int]:
    """The fastest forward pass of a model runner on pre-decoded tensors: (rate, batch).

    A runner with several sessions is measured both called batch by batch and pipelined
    (``stream``), and also as one plain session on the same graph; the fastest counts: the
    baseline is the best the backbone can do here.
    ``by_sessions`` gets the best img/s of each session count.
    """
    rng = np.random.default_rng(0)
    candidates = [runner]
    if getattr(runner, "replicas", 1) > 1:
        if getattr(runner, "runtime", "tensorflow") == "tensorflow":
            from retrainer.graph import GraphRunner

            candidates.append(GraphRunner(runner.graph_def, replicas=1,
                                          optimized=getattr(runner, "optimized", False)))
        else:  # the same model on one lane, as a Spark worker would rebuild it
            from retrainer.runner import runner_from_bytes, shippable

            runtime, precision, data = shippable(runner)
            candidates.append(runner_from_bytes(runtime, data, replicas=1, precision=precision))
    best = (Rate(0.0), 0)
    for candidate in candidates:
        n = getattr(candidate, "replicas", 1)
        for bs in batches:
            x = rng.uniform(0, 255, (bs, *size, 3)).astype(np.float32)

            def step(x: np.ndarray = x, candidate: Any = candidate) -> int:
                candidate(x)
                return len(x)

            modes = {"one call per batch": best_rate(step, seconds)}
            if n > 1:  # the pipelined path that train and label take
                modes["pipelined"] = stream_rate(candidate, x, seconds)
            for mode, rate in modes.items():
                print(f"raw forward pass, {n} session(s), batch {bs}, {mode}: "
                      f"{rate.per_s:.1f} images/s, {rate.cpu_ms:.2f} CPU-ms per image",
                      file=sys.stderr)
                if rate > best[0]:
                    best = (rate, bs)
                if by_sessions is not None:
                    by_sessions[n] = max(by_sessions.get(n, 0.0), rate.per_s)
    for candidate in candidates[1:]:
        candidate.close()
    return best


#: Starts the measured command from a small Python process and writes its wall time and peak
#: RSS to a file. Linux counts the memory of the process a child was forked from into the
#: child's peak RSS, so a command started straight from a benchmark that has loaded
#: TensorFlow reported that benchmark's GBs; from this launcher it carries ~10 MB.
_LAUNCHER = """\
import os, subprocess, sys, time
t = time.perf_counter()
p = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(p.pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{time.perf_counter() - t} {usage.ru_maxrss}")
sys.exit(os.waitstatus_to_exitcode(status) & 255)
"""


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str, float]:
    """Run a command; return (wall seconds, stdout, peak RSS of that child in MB)."""
    import tempfile

    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.NamedTemporaryFile("r", suffix=".txt") as measured:
        proc = subprocess.run([sys.executable, "-c", _LAUNCHER, measured.name, *cmd],
                              stdout=out, stderr=err, text=True, env=full_env)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
        wall, rss = (float(v) for v in (measured.read().split() or ["0", "0"]))
    if proc.returncode != 0:
        sys.stderr.write(stderr[-4000:])
        raise SystemExit(f"error: {' '.join(cmd[:6])} ... failed with exit code {proc.returncode}")
    return wall, stdout, rss / 1024


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def retrainer_cmd() -> list[str]:
    """The installed ``retrainer`` console script beside this Python (else ``-m retrainer``)."""
    script = Path(sys.executable).with_name("retrainer")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "retrainer"]


def emit(result: dict[str, Any]) -> None:
    """Print the result, with the machine's load average (other work skews wall times)."""
    result = dict(result, cpus=os.cpu_count(), load_average_1m=round(os.getloadavg()[0], 2))
    json.dump(result, sys.stdout, indent=2, default=float)
    sys.stdout.write("\n")
