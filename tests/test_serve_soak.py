"""Issue #23 "Trust, round 3": the web page under many clients at once.

A real uvicorn server on loopback, fresh (nothing loaded lazily yet), then a bounded burst of mixed
requests from tens of concurrent clients: searches with new and repeated queries, image uploads to
classify, and image fetches. Every reply must be a 200 — concurrent first uploads used to load and
export the image encoder several times at once and answer some of them with HTTP 500.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import FLICKR, SNOW_DOGS, SNOW_DOGS_LABELS, require_shared_data

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from vlmcache.app.serve import create_app  # noqa: E402

CLIENTS = 20
REQUESTS = 200
DEADLINE_S = 60  # the whole burst; a hang fails the test instead of the CI job's timeout


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _photos() -> list[bytes]:
    """A few real photos to upload: the snow dogs and the first dev images."""
    names = (FLICKR / "Flickr_8k.devImages.txt").read_text().split()[:3]
    return [SNOW_DOGS.read_bytes(), *[(FLICKR / "Images" / name).read_bytes() for name in names]]


def _request(number: int, base: str, photos: list[bytes]) -> tuple[str, int, float]:
    """Request `number` of the burst (its kind chosen by number): (kind, HTTP status, seconds)."""
    started = time.perf_counter()
    with httpx.Client(base_url=base, timeout=DEADLINE_S) as client:
        if number % 4 == 0:
            kind = "upload"
            reply = client.post("/classify", data={"labels": ", ".join(SNOW_DOGS_LABELS)},
                                files={"image": ("photo.jpg", photos[number % len(photos)], "image/jpeg")})
        elif number % 4 == 3:
            kind = "image"
            reply = client.get(f"/image/{number % 50}")
        else:  # half the queries repeat (kept in the prompt store), half are new (run the text encoder)
            kind = "search"
            query = f"a dog number {number} in the snow" if number % 4 == 1 else "a dog running on the grass"
            reply = client.get("/search", params={"q": query, "top": 5})
    return kind, reply.status_code, time.perf_counter() - started


@pytest.fixture
def server(real_run, tmp_path):
    """A fresh server on a free loopback port, in a thread; stopped afterwards."""
    require_shared_data()
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(real_run), host="127.0.0.1", port=port, log_level="warning",
                                           limit_concurrency=4 * CLIENTS))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_tens_of_concurrent_clients_get_no_errors(server):
    photos = _photos()
    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(lambda number: _request(number, server, photos), range(REQUESTS),
                                timeout=DEADLINE_S))
    wall = time.perf_counter() - started
    failed = [(kind, status) for kind, status, _ in results if status != 200]
    latencies = sorted(seconds for _, _, seconds in results)
    p50, p99 = statistics.median(latencies), latencies[int(0.99 * (len(latencies) - 1))]
    print(f"\nsoak: {REQUESTS} requests from {CLIENTS} clients in {wall:.1f} s; "
          f"latency p50 {1000 * p50:.0f} ms, p99 {1000 * p99:.0f} ms; {len(failed)} errors")
    assert not failed, f"{len(failed)} of {REQUESTS} requests failed: {failed[:5]}"
