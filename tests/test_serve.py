"""The web page: its JSON endpoints in-process, and a real headless Chromium uploading a real photo."""

from __future__ import annotations

import shutil
import socket
import threading
import time

import pytest
from conftest import SNOW_DOGS, SNOW_DOGS_LABELS, require_shared_data

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from vlmcache.app.serve import MAX_UPLOAD_BYTES, create_app  # noqa: E402


@pytest.fixture(scope="module")
def client(real_run):
    require_shared_data()
    return TestClient(create_app(real_run))


def test_page_classify_search_and_image(client):
    page = client.get("/")
    assert page.status_code == 200 and "Classify an image" in page.text and "linear + infonce" in page.text
    reply = client.post("/classify", files={"image": ("dogs.jpg", SNOW_DOGS.read_bytes(), "image/jpeg")},
                        data={"labels": ", ".join(SNOW_DOGS_LABELS)})
    assert reply.status_code == 200
    rows = reply.json()["rows"]
    assert rows[0]["prompt"] == "dogs running in the snow" and abs(sum(r["probability"] for r in rows) - 1) < 1e-5
    hits = client.get("/search", params={"q": "a dog in the snow", "top": 3}).json()["hits"]
    assert len(hits) == 3 and hits[0]["score"] >= hits[2]["score"]
    image = client.get(f"/image/{hits[0]['row']}")
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert client.get("/image/999999").status_code == 404


def test_rejects_non_images_oversize_and_bad_labels(client):
    reply = client.post("/classify", files={"image": ("notes.txt", b"hello", "text/plain")}, data={"labels": "a,b"})
    assert reply.status_code == 400 and reply.json()["error"] == "notes.txt: not an image file Pillow can read"
    big = b"\xff\xd8" + b"0" * (MAX_UPLOAD_BYTES + 1)
    reply = client.post("/classify", files={"image": ("big.jpg", big, "image/jpeg")}, data={"labels": "a,b"})
    assert reply.status_code == 413 and "larger than 10 MB" in reply.json()["error"]
    reply = client.post("/classify", files={"image": ("dogs.jpg", SNOW_DOGS.read_bytes(), "image/jpeg")},
                        data={"labels": "only one"})
    assert reply.status_code == 400 and "at least two labels" in reply.json()["error"]
    assert client.get("/search", params={"q": " "}).status_code == 400


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_real_browser_uploads_a_photo_and_sees_the_true_label_on_top(real_run):
    require_shared_data()
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    import uvicorn
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(real_run), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        browser.find_element(By.ID, "image").send_keys(str(SNOW_DOGS))
        labels = browser.find_element(By.ID, "labels")
        labels.clear()
        labels.send_keys(", ".join(SNOW_DOGS_LABELS))
        browser.find_element(By.ID, "classify-button").click()
        WebDriverWait(browser, 60).until(expected_conditions.presence_of_element_located((By.ID, "ranking")))
        top_label = browser.find_elements(By.CSS_SELECTOR, "#ranking td.label")[0].text
        assert top_label == "dogs running in the snow"
    finally:
        browser.quit()
        server.should_exit = True
        thread.join(timeout=10)
