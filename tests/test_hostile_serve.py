"""The decoder and `retrainer serve` under abuse: wide-pixel PNGs, pixel bombs when the
warnings machinery is not on our side, slow clients, too many connections, DNS rebinding.
Server tests run a real `retrainer serve` on a free loopback port (see test_serve.Server)."""
from __future__ import annotations

import io
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image
from test_serve import Server, model_dir, png  # noqa: F401

from retrainer import images
from retrainer.errors import ImageError


def wide_png(height: int = 2500, width: int = 4000) -> bytes:
    """A 16-bit grayscale PNG of height x width pixels that compresses to a few dozen KB."""
    arr = np.zeros((height, width), np.uint16)
    arr[::7] = 40000
    arr[:, ::13] = 1000
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def header_only_png(width: int, height: int, mode: int = 0) -> bytes:
    """A PNG whose header claims width x height (grayscale) and whose data is a few bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, mode, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


MEASURE = textwrap.dedent("""
    import resource, sys
    from retrainer import images
    data = open(sys.argv[1], "rb").read()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pixels = images.load_pixels(data, (224, 224))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(pixels.shape, (after - before) // 1024)
""")


def test_a_16_bit_png_decodes_without_float64_copies(tmp_path):
    """10 megapixels at 16 bits: the decoded image is 20 MB; converting it to 8-bit RGB used
    three float64 copies (~250 MB of peak memory). Measured in a fresh process."""
    path = tmp_path / "wide.png"
    path.write_bytes(wide_png())
    assert path.stat().st_size < 100_000
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[:3] == ["(224,", "224,", "3)"]
    assert int(out[-1]) < 150, f"decoding took {out[-1]} MB"


def test_16_bit_levels_are_scaled_exactly_as_before():
    arr = np.array([[0, 256, 257, 40000, 65535, 514]], np.uint16)
    got = images._wide_to_uint8(arr, rows=1)
    want = np.clip(arr.astype(np.float64) * (255.0 / 65535.0), 0, 255).astype(np.uint8)
    assert got.tolist() == want.tolist()
    small = np.array([[0, 7, 255]], np.int32)
    assert images._wide_to_uint8(small).tolist() == [[0, 7, 255]]


def test_the_pixel_limit_does_not_depend_on_warning_filters(monkeypatch):
    """Another thread leaving ``warnings.catch_warnings`` can drop the 'error' filter while a
    decode runs; simulated here by making filter changes no-ops. 150 megapixels (between
    Pillow's warning and error thresholds) must still be refused from the header."""
    bomb = header_only_png(15_000, 10_000)
    monkeypatch.setattr(warnings, "simplefilter", lambda *a, **k: None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        for decode in (images.decode_rgb, images.open_image):
            with pytest.raises(ImageError, match="too many pixels"):
                decode(bomb, "bomb.png")


def test_pixel_bombs_are_refused_on_many_threads_at_once():
    bomb = header_only_png(12_000, 10_000)
    small = header_only_png(50, 40)

    def reason(data: bytes) -> str:
        try:
            images.decode_rgb(data, "x.png")
            return "decoded"
        except ImageError as exc:
            return exc.reason

    with ThreadPoolExecutor(8) as pool:
        reasons = list(pool.map(reason, [bomb, small] * 40))
    assert all(r.startswith("too many pixels") for r in reasons[::2])
    assert not any(r.startswith("too many pixels") for r in reasons[1::2])


# -- the server -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(model_dir):  # noqa: F811
    srv = Server(model_dir, "--header-timeout", "1", "--body-timeout", "2",
                 "--max-connections", "6")
    yield srv
    assert srv.stop() == 0


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes | None = None) -> float:
    """Seconds until the server closes ``sock`` (sending ``trickle`` every 0.2 s meanwhile)."""
    start = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - start < seconds:
        try:
            if trickle:
                sock.sendall(trickle)
            if sock.recv(4096) == b"":
                return time.monotonic() - start
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - start
    raise AssertionError(f"the connection was still open after {seconds} s")


def _connect(url: str) -> socket.socket:
    host, port = url.rsplit("/", 1)[1].split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def test_a_slowloris_client_is_cut_off(server):
    with _connect(server.url) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert _closed_within(sock, 6, trickle=b"X-a: b\r\n") < 3
    with _connect(server.url) as idle:  # a connection that never sends anything
        assert _closed_within(idle, 6) < 3
    with _connect(server.url) as slow_body:
        slow_body.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          b"Content-Length: 100000\r\n\r\n")
        assert _closed_within(slow_body, 10, trickle=b"x") < 5
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_connections_beyond_the_limit_get_503(server):
    held = [_connect(server.url) for _ in range(6)]
    try:
        time.sleep(0.2)
        assert httpx.get(server.url + "/healthz").status_code == 503
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    assert httpx.get(server.url + "/healthz").status_code == 200


@pytest.mark.parametrize("host,status", [
    ("127.0.0.1", 200), ("127.0.0.1:8000", 200), ("localhost:1", 200), ("LOCALHOST", 200),
    ("[::1]:8000", 200), ("evil.example", 421), ("evil.example:8000", 421),
    ("127.0.0.1.evil.example", 421), ("localhost.evil.example:80", 421)])
def test_a_keyless_loopback_service_checks_the_host_header(server, host, status):
    response = httpx.get(server.url + "/v1/labels", headers={"Host": host})
    assert response.status_code == status
    if status == 421:
        assert response.json()["error"]["code"] == "misdirected_request"


def test_wide_pngs_from_many_clients_stay_within_the_decode_budget(server):
    """Concurrent 10-megapixel 16-bit PNGs: all answered; the server's peak memory grows by
    a bounded amount (not ~250 MB per image in flight)."""
    def peak_mb() -> int:
        with open(f"/proc/{server.proc.pid}/status") as fh:
            line = next(x for x in fh if x.startswith("VmHWM"))
        return int(line.split()[1]) // 1024

    if not os.path.exists(f"/proc/{server.proc.pid}/status"):
        pytest.skip("needs /proc")
    data = wide_png()
    with httpx.Client(base_url=server.url, timeout=120) as client:
        client.post("/v1/classify", content=png((220, 30, 30)))
        before = peak_mb()
        with ThreadPoolExecutor(4) as pool:  # within --max-connections
            codes = list(pool.map(lambda _: client.post("/v1/classify", content=data).status_code,
                                  range(8)))
    assert codes == [200] * 8
    assert peak_mb() - before < 500, f"peak memory grew {peak_mb() - before} MB"
