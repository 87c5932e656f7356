"""The backbone on every installed runtime: TensorFlow's outputs, a kept ``auto`` choice, clear
errors for a runtime not installed, and cache ids that are shared only where outputs match."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from retrainer.backbones.factory import create_backbone
from retrainer.bottlenecks.extractor import make_forward
from retrainer.runtimes import RUNTIMES, available, cache_tag, installed
from retrainer.bottlenecks.runtime_choice import choice_path, choose

from conftest import TINY, make_colour_tree

OTHERS = [r for r in RUNTIMES if r != "tensorflow"]


def _batch(n: int = 7, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny backbone, a graphs dir, and TensorFlow's outputs on a batch."""
    root = tmp_path_factory.mktemp("graphs")
    backbone = create_backbone(TINY)
    runner = make_forward(backbone, root, runtime="tensorflow")
    x = _batch()
    out = runner(x)
    runner.close()
    return backbone, root, x, out


@pytest.mark.parametrize("runtime", OTHERS)
def test_each_runtime_gives_tensorflows_outputs(reference, runtime: str) -> None:
    if not installed(runtime):
        pytest.skip(f"{runtime} is not installed")
    backbone, root, x, expected = reference
    runner = make_forward(backbone, root, runtime=runtime)
    assert runner.runtime == runtime and runner.input_size == (32, 32)
    out = runner(x)
    assert out.shape == expected.shape and out.dtype == np.float32
    assert np.allclose(out, expected, rtol=1e-5, atol=1e-5)
    # one image, an empty batch and the pipelined path give the same rows, in order
    assert np.allclose(runner(x[:1]), expected[:1], rtol=1e-5, atol=1e-5)
    assert runner(x[:0]).shape == (0, expected.shape[1])
    streamed = list(runner.stream((i, x[i:i + 3]) for i in range(0, 7, 3)))
    assert [tag for tag, _ in streamed] == [0, 3, 6]
    assert np.allclose(np.concatenate([o for _, o in streamed]), expected, rtol=1e-5, atol=1e-5)
    runner.close()


@pytest.mark.parametrize("runtime", OTHERS)
def test_a_runner_rebuilt_from_its_bytes_matches(reference, runtime: str) -> None:
    """What a Spark worker does with the runner it is shipped."""
    if not installed(runtime):
        pytest.skip(f"{runtime} is not installed")
    from retrainer.runner import runner_from_bytes, shippable

    backbone, root, x, expected = reference
    name, precision, data = shippable(make_forward(backbone, root, runtime=runtime))
    rebuilt = runner_from_bytes(name, data, threads=1, precision=precision)
    assert (name, rebuilt.runtime, rebuilt.replicas) == (runtime, runtime, 1)
    assert np.allclose(rebuilt(x), expected, rtol=1e-5, atol=1e-5)


def test_openvino_bf16_runs_and_is_cached_apart(reference) -> None:
    if not installed("openvino"):
        pytest.skip("openvino is not installed")
    _, root, x, expected = reference
    backbone = create_backbone(TINY, precision="bf16")
    runner = make_forward(backbone, root, runtime="openvino")
    assert runner.precision == "bf16"
    out = runner(x)  # bfloat16 keeps ~3 significant digits (or exact fp32 on CPUs without it)
    assert np.allclose(out, expected, rtol=2e-2, atol=2e-2)


def test_cache_ids_are_shared_only_where_outputs_match() -> None:
    ids = {}
    for precision in ("fp32", "bf16"):
        for runtime in RUNTIMES:
            backbone = create_backbone(TINY, precision=precision, lazy=True)
            backbone.runtime = runtime
            ids[precision, runtime] = backbone.cache_id
    assert len({ids["fp32", r] for r in RUNTIMES}) == 1  # every fp32 runtime: one cache
    assert ids["bf16", "tensorflow"] != ids["fp32", "tensorflow"]
    assert ids["bf16", "openvino"] not in {ids["bf16", "tensorflow"], ids["fp32", "openvino"]}
    assert cache_tag("fp32", "openvino") == "fp32"
    assert cache_tag("bf16", "tensorflow") == "bf16"
    assert cache_tag("bf16", "openvino") == "bf16-openvino"


def test_auto_choice_is_measured_once_kept_and_reused(tmp_path: Path) -> None:
    backbone = create_backbone(TINY)
    candidates = available("fp32")
    first = choose(backbone, tmp_path, seconds=0.05, rounds=1)
    assert first in candidates
    path = choice_path(tmp_path, backbone, "fp32")
    kept = json.loads(path.read_text())
    if len(candidates) == 1:
        pytest.skip("only one runtime installed: nothing to measure")
    assert kept["runtime"] == first and set(kept["img_s"]) == set(candidates)
    assert kept["key"]["versions"]["tensorflow"]
    # The kept choice is what later runs use, without measuring again: point it elsewhere.
    other = next(r for r in candidates if r != first)
    kept["runtime"] = other
    path.write_text(json.dumps(kept))
    mtime = path.stat().st_mtime_ns
    assert choose(backbone, tmp_path) == other
    assert path.stat().st_mtime_ns == mtime
    runner = make_forward(backbone, tmp_path, runtime="auto")
    assert runner.runtime == other
    # A choice made with other runtime versions (or on another machine) is measured again.
    kept["key"]["versions"]["tensorflow"] = "0.0"
    path.write_text(json.dumps(kept))
    assert choose(backbone, tmp_path, seconds=0.05, rounds=1) in candidates
    assert json.loads(path.read_text())["key"]["versions"]["tensorflow"] != "0.0"


def _retrainer(*args: str):
    from click.testing import CliRunner

    from retrainer.cli import cli

    return CliRunner().invoke(cli, list(args))


def test_a_runtime_not_installed_is_a_one_line_error_naming_its_package(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = make_colour_tree(tmp_path / "images", per_class=2)
    monkeypatch.setitem(sys.modules, "openvino", None)  # as when it is not installed
    installed.cache_clear()
    try:
        out = _retrainer("bottlenecks", "--image-dir", str(images), "--architecture", TINY,
                         "--bottleneck-dir", str(tmp_path / "bn"), "--runtime", "openvino")
        assert not installed("openvino")
    finally:
        monkeypatch.undo()
        installed.cache_clear()
    assert out.exit_code == 1, out.output
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert "'openvino' needs the openvino package, which is not installed" in lines[0], lines
    assert "pip install openvino" in out.output
    assert "Traceback" not in out.output and len(lines) <= 2
    assert not list((tmp_path / "bn").rglob("*.npy"))


def test_fp32_runtimes_fill_one_cache(tmp_path: Path) -> None:
    """Bottlenecks computed on one fp32 runtime are found by a run on another."""
    others = [r for r in OTHERS if installed(r)]
    if not others:
        pytest.skip("no runtime besides TensorFlow is installed")
    images = make_colour_tree(tmp_path / "images", per_class=3)
    common = ["bottlenecks", "--image-dir", str(images), "--architecture", TINY,
              "--bottleneck-dir", str(tmp_path / "bn"), "--json"]
    first = _retrainer(*common, "--runtime", others[0])
    assert first.exit_code == 0, first.output
    second = _retrainer(*common, "--runtime", "tensorflow")
    assert second.exit_code == 0, second.output
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert (a["computed"], a["cached"]) == (9, 0)
    assert (b["computed"], b["cached"]) == (0, 9)


def test_onnxruntime_needs_its_converter_too(monkeypatch: pytest.MonkeyPatch) -> None:
    from retrainer.runtimes import RuntimeNotInstalled, check_runtime

    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # as when it is not installed
    installed.cache_clear()
    try:
        assert "onnxruntime" not in available("fp32")
        with pytest.raises(RuntimeNotInstalled, match="needs the onnxruntime and tf2onnx "
                                                      "packages") as caught:
            check_runtime("onnxruntime")
        assert "pip install onnxruntime tf2onnx" in caught.value.hint
    finally:
        monkeypatch.undo()
        installed.cache_clear()


def test_bf16_on_a_runtime_without_it_is_a_clear_error() -> None:
    from retrainer.errors import RetrainerError
    from retrainer.runtimes import check_runtime

    if not installed("litert"):
        pytest.skip("litert is not installed")
    with pytest.raises(RetrainerError, match="runtime 'litert' does not run bf16"):
        check_runtime("litert", "bf16")
