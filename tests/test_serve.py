"""`retrainer serve` as a real process on a free loopback port, called over real HTTP."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import COLOURS, loaded_after_help, make_image, train_tiny_model
from PIL import Image

from retrainer.cli import cli
from retrainer.graph import default_replicas

KEY = "s3cret-key"


class Server:
    """A `retrainer serve` subprocess; its stderr is collected on a thread."""

    def __init__(self, model_dir: Path, *args: str, env: dict[str, str] | None = None,
                 ready: str = "serving ", verbose: bool = False) -> None:
        self.lines: list[str] = []
        self.out: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "retrainer", *(["-v"] if verbose else []), "serve",
             "--model-dir", str(model_dir), "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})})
        threading.Thread(target=self._drain, args=(self.proc.stderr, self.lines),
                         daemon=True).start()
        threading.Thread(target=self._drain, args=(self.proc.stdout, self.out),
                         daemon=True).start()
        self.url = ""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.proc.poll() is None:
            hit = next((line for line in self.lines if ready in line), None)
            if hit:
                found = re.search(r"http://[\d.]+:\d+", hit)
                self.url = found.group(0) if found else ""
                break
            time.sleep(0.05)
        else:
            self.stop()
            raise AssertionError("server did not start:\n" + "".join(self.lines))

    @staticmethod
    def _drain(stream, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return train_tiny_model(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(model_dir):
    srv = Server(model_dir, "--max-body-mb", "0.5", "--max-pixels", "1000000", "--max-files", "4")
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def png(colour, size: int = 32, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour) + rng.normal(0, 18, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and body["error"]["message"]
    return body["error"]["code"]


# -- endpoints ------------------------------------------------------------------------------

def test_health_labels_and_model(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/v1/labels").json() == {"labels": sorted(COLOURS)}
    model = client.get("/v1/model").json()
    assert model["backbone"] == "tiny_test_backbone" and model["input_size"] == [32, 32]
    assert model["labels"] == sorted(COLOURS) and len(model["version"]) == 16
    assert model["serving"]["max_pixels"] == 1_000_000
    assert model["serving"]["model_threads"] == default_replicas(os.cpu_count() or 1)
    assert "image_source" not in json.dumps(model)  # no paths of the training machine


def test_small_responses_are_not_held_back_by_nagle(client):
    """Delayed ACKs would add ~40 ms to every response without TCP_NODELAY."""
    times = []
    for _ in range(9):
        t = time.perf_counter()
        assert client.get("/v1/labels").status_code == 200
        times.append(time.perf_counter() - t)
    assert sorted(times)[4] < 0.03


def test_openapi_schema_lists_the_versioned_endpoints(client):
    schema = client.get("/openapi.json").json()
    assert {"/healthz", "/v1/classify", "/v1/classify/batch", "/v1/labels",
            "/v1/model"} <= set(schema["paths"])
    body = schema["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/*"} <= set(body)
    assert "ClassifyOut" in schema["components"]["schemas"]


def test_classify_multipart_and_raw_body_agree(client):
    data = png(COLOURS["green"], seed=5)
    multi = client.post("/v1/classify", files={"file": ("g.png", data, "image/png")}).json()
    raw = client.post("/v1/classify", content=data,
                      headers={"content-type": "image/png"}).json()
    assert multi == raw
    assert multi["predictions"][0]["label"] == "green"
    assert len(multi["predictions"]) == 3  # default top_k 5, but only 3 labels
    assert multi["model"]["backbone"] == "tiny_test_backbone"
    top1 = client.post("/v1/classify", params={"top_k": 1}, content=data).json()
    assert top1["predictions"] == multi["predictions"][:1]


def test_scores_equal_retrainer_label(client, model_dir, tmp_path):
    paths = [make_image(tmp_path / f"{name}.jpg", rgb, size=48, seed=i, fmt="JPEG")
             for i, (name, rgb) in enumerate(COLOURS.items())]
    result = CliRunner().invoke(cli, ["label", "--json", "--top-k", "3", "--model-dir",
                                      str(model_dir), *map(str, paths)])
    assert result.exit_code == 0, result.output
    expected = [json.loads(line) for line in result.stdout.splitlines()]
    for path, want in zip(paths, expected):
        got = client.post("/v1/classify", params={"top_k": 3}, content=path.read_bytes()).json()
        assert [p["label"] for p in got["predictions"]] == [p["label"] for p in want["predictions"]]
        assert np.allclose([p["score"] for p in got["predictions"]],
                           [p["score"] for p in want["predictions"]], atol=1e-4)


def test_batch_scores_each_file_and_reports_bad_ones_alone(client):
    files = [("files", ("red.png", png(COLOURS["red"]), "image/png")),
             ("files", ("notes.txt", b"hello, not an image", "text/plain")),
             ("files", ("blue.png", png(COLOURS["blue sky"]), "image/png"))]
    body = client.post("/v1/classify/batch", params={"top_k": 1}, files=files).json()
    red, notes, blue = body["results"]
    assert red["name"] == "red.png" and red["predictions"][0]["label"] == "red"
    assert blue["predictions"][0]["label"] == "blue sky" and "error" not in blue
    assert notes["error"]["code"] == "not_an_image" and "predictions" not in notes
    single = client.post("/v1/classify", params={"top_k": 1}, content=png(COLOURS["red"])).json()
    assert red["predictions"] == single["predictions"]


def test_concurrent_requests_are_all_answered(client, server):
    before = client.get("/v1/stats").json()["batching"]["images"]
    data = {name: png(rgb, seed=7) for name, rgb in COLOURS.items()}
    answers: dict[int, str] = {}

    def call(i: int) -> None:
        name = list(data)[i % 3]
        with httpx.Client(base_url=server.url, timeout=30) as c:
            r = c.post("/v1/classify", content=data[name], params={"top_k": 1})
            answers[i] = r.json()["predictions"][0]["label"] if r.status_code == 200 else r.text

    threads = [threading.Thread(target=call, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert answers == {i: list(data)[i % 3] for i in range(24)}
    assert client.get("/v1/stats").json()["batching"]["images"] == before + 24


# -- refusals -------------------------------------------------------------------------------

def test_non_image_corrupt_and_empty_bodies_are_4xx_json(client):
    assert error_of(client.post("/v1/classify", content=b"just text"), 415) == "not_an_image"
    good = png(COLOURS["red"], size=64)
    truncated = good[: len(good) // 2]
    assert error_of(client.post("/v1/classify", content=truncated), 422) == "cannot_decode"
    assert error_of(client.post("/v1/classify", content=b""), 400) == "empty_body"
    garbage = good[:40] + bytes(range(256)) * 4  # a PNG header, then nonsense
    assert client.post("/v1/classify", content=garbage).status_code in (415, 422)
    assert error_of(client.post("/v1/classify", files={"other": (None, "x")}), 400) == "no_file"
    assert error_of(client.post("/v1/classify/batch", content=good), 415) == "not_multipart"


def test_too_large_bodies_are_413_declared_or_streamed(client):
    big = os.urandom(600_000)  # over --max-body-mb 0.5
    assert error_of(client.post("/v1/classify", content=big), 413) == "body_too_large"

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(10):
            yield os.urandom(100_000)

    assert error_of(client.post("/v1/classify", content=chunks()), 413) == "body_too_large"
    multipart = client.post("/v1/classify", files={"file": ("big.png", big, "image/png")})
    assert error_of(multipart, 413) == "body_too_large"


def _forged_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb's header)."""
    data = png((1, 2, 3), size=8)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return data[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) \
        + data[33:]


def test_decompression_bombs_are_refused_before_decoding(client):
    huge = Image.new("RGB", (2000, 2000), (200, 10, 10))  # 4 MP, a few kB as PNG
    buf = io.BytesIO()
    huge.save(buf, format="PNG")
    assert len(buf.getvalue()) < 100_000
    response = client.post("/v1/classify", content=buf.getvalue())
    assert error_of(response, 413) == "too_many_pixels" and "2000x2000" in response.text
    forged = client.post("/v1/classify", content=_forged_png(100_000, 100_000))
    assert error_of(forged, 413) == "too_many_pixels"
    files = [("files", ("bomb.png", _forged_png(50_000, 50_000), "image/png")),
             ("files", ("ok.png", png(COLOURS["green"]), "image/png"))]
    bomb, ok = client.post("/v1/classify/batch", files=files).json()["results"]
    assert bomb["error"]["code"] == "too_many_pixels" and ok["predictions"]


def test_bad_parameters_routes_and_file_counts(client):
    assert error_of(client.post("/v1/classify", params={"top_k": 0}, content=b"x"),
                    422) == "invalid_request"
    assert error_of(client.get("/v1/nothing"), 404) == "not_found"
    assert error_of(client.get("/v1/classify"), 405) == "method_not_allowed"
    files = [("files", (f"{i}.png", png(COLOURS["red"], seed=i), "image/png")) for i in range(5)]
    assert error_of(client.post("/v1/classify/batch", files=files), 413) == "too_many_files"


def test_the_server_survives_every_refusal(client):
    stats = client.get("/v1/stats").json()
    assert stats["refused"] >= 10
    r = client.post("/v1/classify", content=png(COLOURS["blue sky"]), params={"top_k": 1})
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "blue sky"


# -- API key --------------------------------------------------------------------------------

def test_api_key_is_checked_on_every_v1_request(model_dir):
    srv = Server(model_dir, env={"RETRAINER_API_KEY": KEY}, verbose=True)
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            image = png(COLOURS["red"])
            assert c.get("/healthz").status_code == 200  # liveness stays open
            for method, path, kw in (("GET", "/v1/labels", {}), ("GET", "/v1/model", {}),
                                     ("GET", "/v1/stats", {}),
                                     ("POST", "/v1/classify", {"content": image})):
                r = c.request(method, path, **kw)
                assert error_of(r, 401) == "unauthorized" and r.headers["www-authenticate"]
                wrong = c.request(method, path, headers={"X-API-Key": "nope"}, **kw)
                assert wrong.status_code == 401
                bearer = c.request(method, path, headers={"Authorization": f"Bearer {KEY}"},
                                   **kw)
                assert bearer.status_code == 200, bearer.text
            r = c.post("/v1/classify/batch", headers={"X-API-Key": KEY},
                       files=[("files", ("a.png", image, "image/png"))])
            assert r.status_code == 200 and r.json()["results"][0]["predictions"]
            assert "API key required" in "".join(srv.lines)
    finally:
        assert srv.stop() == 0
    logged = "".join(srv.lines)  # -v: one access-log line per request, on stderr
    assert re.search(r'"POST /v1/classify HTTP/1.1" 401', logged)
    assert re.search(r'"POST /v1/classify/batch HTTP/1.1" 200', logged)
    assert srv.out == []


def test_binding_beyond_loopback_requires_a_key(model_dir):
    result = CliRunner().invoke(cli, ["serve", "--model-dir", str(model_dir), "--host",
                                      "0.0.0.0"], env={"RETRAINER_API_KEY": ""})
    assert result.exit_code == 1
    assert "API key is required" in result.output and "Traceback" not in result.output


def test_serve_help_imports_neither_tensorflow_nor_fastapi():
    assert loaded_after_help([["serve", "--help"]], ("tensorflow", "fastapi", "uvicorn")) == []


def test_missing_model_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(cli, ["serve", "--model-dir", str(tmp_path / "none")])
    assert result.exit_code == 1 and "no frozen graph" in result.output


# -- shutdown -------------------------------------------------------------------------------

def test_sigterm_under_load_answers_in_flight_requests_and_exits_0(model_dir):
    srv = Server(model_dir, "--json")
    data = png(COLOURS["green"])
    release = threading.Event()
    results: list[tuple[int, str]] = []

    def slow_upload():  # half an image, then the rest once the server is shutting down
        yield data[:100]
        release.wait(30)
        yield data[100:]

    def call() -> None:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            r = c.post("/v1/classify", content=slow_upload(), params={"top_k": 1})
            results.append((r.status_code, r.json()["predictions"][0]["label"]
                            if r.status_code == 200 else r.text))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        deadline = time.monotonic() + 20
        while c.get("/v1/stats").json()["requests"] < 8 and time.monotonic() < deadline:
            time.sleep(0.02)
    srv.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # shutting down: new connections are refused
        try:
            httpx.get(f"{srv.url}/healthz", timeout=2)
        except httpx.TransportError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the server kept accepting connections after SIGTERM")
    assert srv.proc.poll() is None  # ...but it waits for the 8 uploads in flight
    release.set()
    for t in threads:
        t.join(30)
    assert srv.proc.wait(timeout=30) == 0
    assert results == [(200, "green")] * 8
    time.sleep(0.2)  # let the reader threads take the last lines
    assert "stopped after 8 image(s)" in "".join(srv.lines)
    ready, stopped = (json.loads(line) for line in srv.out)
    assert ready == {"event": "ready", "url": srv.url, "api_key": False}
    assert stopped["event"] == "stopped" and stopped["images"] == 8


def test_sigterm_while_loading_exits_0(model_dir):
    srv = Server(model_dir, verbose=True, ready="loading the model")
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=60) == 0
    time.sleep(0.2)  # let the reader thread take the last line
    assert "stopped while loading the model" in "".join(srv.lines)
