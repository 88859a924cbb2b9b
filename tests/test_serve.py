"""The web page: its JSON endpoints in-process, and a real headless Chromium using it as a person does.

One app (a retrieval run with a captioner beside it) serves every test, and one browser session drives the
page through all the browser tests; each test reloads the page, so none depends on another's state.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import SNOW_DOGS, SNOW_DOGS_LABELS, require_shared_data
from PIL import Image

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from vlmcache.app.predictor import MAX_LABELS  # noqa: E402
from vlmcache.app.serve import MAX_UPLOAD_BYTES, Gallery, PageSpec, create_app, render_page  # noqa: E402


@pytest.fixture(scope="module")
def caption_run(real_cache, tmp_path_factory):
    """A tiny captioner on the same cache (trained on the 200 val images only: seconds; its words are poor)."""
    pytest.importorskip("pycocoevalcap")
    from vlmcache.caption.config import CaptionConfig
    from vlmcache.caption.train import train_captioner

    run = tmp_path_factory.mktemp("caption-run") / "captioner"
    train_captioner(real_cache, run, CaptionConfig(epochs=1, width=32, layers=1, heads=2, batch_size=256, max_length=8,
                                                   min_count=2, train_split="val"))
    return run


@pytest.fixture(scope="module")
def app(real_run, caption_run):
    require_shared_data()
    return create_app(real_run, captioner=caption_run)


@pytest.fixture(scope="module")
def client(app):
    return TestClient(app)


def _upload(client, path=SNOW_DOGS, labels=None, endpoint="/classify", name="dogs.jpg", data=None):
    form = {} if labels is None else {"labels": labels}
    return client.post(endpoint, files={"image": (name, path.read_bytes() if data is None else data, "image/jpeg")},
                       data=form)


def test_page_describes_the_run_in_words_and_leaks_no_paths(client, real_run, real_cache, caption_run):
    reply = client.get("/")
    page = reply.text
    assert reply.status_code == 200 and '<meta name="viewport"' in page
    assert "a linear projector trained with InfoNCE" in page and "1,000 Flickr8k training images" in page
    assert "text→image R@1" in page and "a captioner" in page and "Label and caption a photo" in page
    assert "Searches the 200 images of the <strong>val</strong> split" in page
    for path in (real_run, real_cache, caption_run, real_run.parent, "/tmp/", "/work/"):
        assert str(path) not in page
    policy = reply.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "http" not in policy
    icon = client.get("/favicon.svg")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"
    assert client.get("/favicon.ico").status_code == 200


def test_classify_caption_search_and_image(client, real_cache):
    reply = _upload(client, labels=", ".join(SNOW_DOGS_LABELS))
    assert reply.status_code == 200
    rows = reply.json()["rows"]
    assert rows[0]["prompt"] == "dogs running in the snow" and abs(sum(r["probability"] for r in rows) - 1) < 1e-5
    caption = _upload(client, endpoint="/caption")
    assert caption.status_code == 200 and isinstance(caption.json()["caption"], str)
    found = client.get("/search", params={"q": "a dog in the snow", "top": 3}).json()
    hits = found["hits"]
    assert found["searched"] == 200 and found["split"] == "val"
    assert len(hits) == 3 and hits[0]["score"] >= hits[2]["score"]
    # Each hit carries its image's captions from the cache, the same ones the split holds for it.
    from vlmcache.cache.store import open_cache

    split = open_cache(real_cache).split("val")
    for hit in hits:
        row = split.image_ids.index(hit["image_id"])
        assert hit["captions"] == [split.captions[j] for j in range(len(split.captions)) if split.caption_image[j] == row]
        assert len(hit["captions"]) == 5
    image = client.get(f"/image/{hits[0]['row']}")
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert client.get("/image/999999").status_code == 404


def test_refusals_are_json_in_the_pages_own_words(client):
    replies = {
        "not an image": _upload(client, name="notes.txt", data=b"hello", labels="a,b"),
        "too big": _upload(client, name="big.jpg", data=b"\xff\xd8" + b"0" * (MAX_UPLOAD_BYTES + 1), labels="a,b"),
        "one label": _upload(client, labels="only one"),
        "no labels": _upload(client, labels=" , ,"),
        "too many labels": _upload(client, labels=",".join(f"label {i}" for i in range(MAX_LABELS + 1))),
        "oversize field": _upload(client, labels="x" * (1024 * 1024 + 10)),  # starlette's own limit is plain text
        "no photo": client.post("/classify", data={"labels": "a, b"}),
        "empty query": client.get("/search", params={"q": " "}),
        "long query": client.get("/search", params={"q": "dog " * 400}),
    }
    errors = {}
    for what, reply in replies.items():
        assert reply.status_code in (400, 413), what
        errors[what] = reply.json()["error"]
        assert "--" not in errors[what] and "Pillow" not in errors[what], (what, errors[what])
    assert errors["not an image"] == "notes.txt is not a picture this page can read; choose a JPEG, PNG or WebP photo."
    assert replies["too big"].status_code == 413 and "larger than 10 MB" in errors["too big"]
    assert errors["one label"] == errors["no labels"] == "Type at least two labels, separated by commas, e.g. “a dog, a cat”."
    assert errors["too many labels"] == f"That is {MAX_LABELS + 1} labels; the page ranks at most {MAX_LABELS} at a time."
    assert "form is too large" in errors["oversize field"] and errors["no photo"] == "Choose a photo first."
    assert errors["empty query"].startswith("Type what the picture should show")
    assert errors["long query"].startswith("That description has 1,600 characters")


def test_each_kind_of_page_offers_only_what_it_has_and_escapes_names(tmp_path):
    hostile = '"><script>alert(1)</script>@@script@@'
    image = tmp_path / "x.jpg"
    image.write_bytes(SNOW_DOGS.read_bytes())
    gallery = Gallery("val", "Flickr8k", [hostile], [str(image)], [[hostile]], tmp_path)
    retrieval = render_page(PageSpec(hostile, hostile.replace("<", "&lt;"), classify=True, caption=False,
                                     gallery=gallery, search=True))
    captioner = render_page(PageSpec("c", "a captioner", classify=False, caption=True, gallery=gallery))
    for page in (retrieval, captioner):
        assert "<script>alert" not in page and page.count("<script") == 2 and 'data-row="0"' in page
    assert 'id="labels"' in retrieval and 'id="caption-result"' not in retrieval and "--captioner" in retrieval
    assert 'id="labels"' not in captioner and 'id="search-form"' not in captioner and "--captioner" in captioner


def test_captions_find_their_image_when_skipped_images_renumber_the_rest():
    from vlmcache.app.serve import _kept_rows

    assert _kept_rows(["a", "b", "c", "d"], ["a", "c", "d"]) == [0, None, 1, 2]
    assert _kept_rows(["a", "b"], []) == [None, None]


# --- a real browser --------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def _serving(app):
    """The app on a free local port in a uvicorn thread, stopped on leaving; yields its URL and the server."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/", server
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def live(app):
    with _serving(app) as (url, _):
        yield url


@pytest.fixture(scope="module")
def browser():
    require_shared_data()
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    yield driver
    driver.quit()


def _wait(browser, condition, seconds=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, seconds).until(lambda b: condition())


def _text(browser, css):
    found = browser.find_elements("css selector", css)
    return found[0].text if found else ""


def _give_photo(browser, path, how="drop"):
    """Hand the page a photo as a person would: dropped on the drop zone, or pasted (a real file, through a real
    DataTransfer: the browser itself builds the File from the path)."""
    carrier = browser.execute_script(
        "const input = document.createElement('input'); input.type = 'file'; input.id = 'carrier';"
        "input.style.display = 'none'; document.body.append(input); return input;")
    carrier.send_keys(str(path))
    browser.execute_script("""
        const carrier = document.getElementById('carrier'), data = new DataTransfer();
        data.items.add(carrier.files[0]); carrier.remove();
        const target = document.getElementById('drop');
        if (arguments[0] === 'paste') {
          document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true}));
        } else {
          for (const type of ['dragenter', 'dragover', 'drop'])
            target.dispatchEvent(new DragEvent(type, {dataTransfer: data, bubbles: true, cancelable: true}));
        }""", how)


def _open(browser, url, labels=None):
    browser.get(url)
    browser.get_log("browser")  # start each test with an empty console
    if labels is not None:
        field = browser.find_element("id", "labels")
        field.clear()
        field.send_keys(labels)


def _preview_shown(browser) -> bool:
    return browser.execute_script("const p = document.getElementById('preview');"
                                  "return !p.hidden && p.complete && p.naturalWidth > 0;")


def test_a_dropped_photo_is_previewed_ranked_and_captioned(browser, live):
    _open(browser, live, ", ".join(SNOW_DOGS_LABELS))
    _give_photo(browser, SNOW_DOGS, "drop")
    _wait(browser, lambda: _text(browser, "#ranking td.label") and _text(browser, "#caption"))
    assert _text(browser, "#ranking td.label") == "dogs running in the snow"
    assert _preview_shown(browser) and _text(browser, "#photo-name") == SNOW_DOGS.name
    # Nothing went wrong in the console (a missing favicon would be a 404 here), and nothing came from elsewhere.
    assert [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"] == []
    sources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert sources and all(source.startswith(live) for source in sources), sources


def test_a_chosen_pasted_or_example_photo_is_previewed_and_ranked(browser, live):
    _open(browser, live, ", ".join(SNOW_DOGS_LABELS))
    browser.find_element("id", "image").send_keys(str(SNOW_DOGS))
    _wait(browser, lambda: _text(browser, "#ranking td.label") == "dogs running in the snow")
    assert _preview_shown(browser)
    browser.find_element("id", "photo-clear").click()
    assert not _text(browser, "#classify-result") and not browser.find_element("id", "preview").is_displayed()
    _give_photo(browser, SNOW_DOGS, "paste")
    _wait(browser, lambda: _text(browser, "#ranking td.label") == "dogs running in the snow")
    example = browser.find_elements("css selector", "#examples button")[1]
    example.click()
    _wait(browser, lambda: _text(browser, "#photo-name") == example.get_attribute("data-name"))
    _wait(browser, lambda: _preview_shown(browser) and _text(browser, "#ranking td.label") and _text(browser, "#caption"))


def test_search_results_show_their_captions_and_open_the_full_image(browser, live):
    _open(browser, live)
    browser.find_element("id", "query").send_keys("a dog runs through the snow\n")
    _wait(browser, lambda: browser.find_elements("css selector", ".hit"))
    assert "The 12 closest of 200 images" in _text(browser, "#search-summary")
    assert "200 images of the val split" in _text(browser, "#search-scope")
    first = browser.find_elements("css selector", ".hit")[0]
    caption = first.find_element("css selector", ".text").text
    assert len(caption) > 10 and "dog" in " ".join(h.text for h in browser.find_elements("css selector", ".hit .text"))
    first.find_element("css selector", "button").click()
    _wait(browser, lambda: browser.find_element("id", "viewer").is_displayed())
    captions = [item.text for item in browser.find_elements("css selector", "#viewer-captions li")]
    assert len(captions) == 5 and captions[0] == caption
    _wait(browser, lambda: browser.execute_script("return document.getElementById('viewer-image').naturalWidth > 0"))
    browser.find_element("id", "viewer-use").click()  # the result becomes the photo to label and caption
    _wait(browser, lambda: _preview_shown(browser) and _text(browser, "#ranking td.label"))
    browser.find_element("id", "search-clear").click()
    assert not browser.find_elements("css selector", ".hit") and browser.find_element("id", "query").get_attribute("value") == ""


def test_errors_use_page_words_and_a_running_request_cannot_be_doubled(browser, live):
    _open(browser, live, " , ")
    browser.find_element("id", "photo-button").click()
    no_photo = "Choose a photo first: drop one on the page, paste one, or click an example."
    assert _text(browser, "#classify-result .error") == no_photo
    _give_photo(browser, SNOW_DOGS)
    _wait(browser, lambda: _text(browser, "#classify-result .error"))
    assert _text(browser, "#classify-result .error") == "Type at least two labels, separated by commas, e.g. “a dog, a cat”."
    _wait(browser, lambda: _text(browser, "#caption"))
    # Hold the next requests open: while one runs its button is disabled and a spinner shows, so a double
    # click sends one request.
    browser.execute_script("""
        window.calls = []; window.realFetch = window.fetch;
        window.fetch = (url, init) => { window.calls.push(url);
          return new Promise(resolve => { window.release = () => resolve(window.realFetch(url, init)); }); };""")
    labels = browser.find_element("id", "labels")
    labels.clear()
    labels.send_keys(", ".join(SNOW_DOGS_LABELS))
    button = browser.find_element("id", "photo-button")
    button.click()
    browser.execute_script("arguments[0].click(); arguments[0].click();", button)
    assert browser.execute_script("return window.calls") == ["classify"] and not button.is_enabled()
    assert browser.find_element("css selector", "#classify-result .spinner").is_displayed()
    browser.execute_script("window.release()")
    _wait(browser, lambda: _text(browser, "#ranking td.label") == "dogs running in the snow")
    assert button.is_enabled()
    # A reply that is not JSON (the server's plain-text 404) is an error in words, and the buttons come back.
    browser.execute_script("window.fetch = (url, init) => window.realFetch('no-such-endpoint', init);")
    button.click()
    _wait(browser, lambda: _text(browser, "#classify-result .error"))
    assert _text(browser, "#classify-result .error").startswith("The server sent a reply this page does not understand (HTTP")
    browser.find_element("id", "query").send_keys("a dog\n")
    _wait(browser, lambda: _text(browser, "#search-result .error"))
    assert button.is_enabled() and browser.find_element("id", "search-button").is_enabled()


def test_a_stopped_server_is_reported_and_the_buttons_come_back(browser, app):
    with _serving(app) as (url, _):
        _open(browser, url, ", ".join(SNOW_DOGS_LABELS))
        _wait(browser, lambda: browser.execute_script(
            "return Array.from(document.querySelectorAll('#examples img')).every(i => i.complete)"))
    _give_photo(browser, SNOW_DOGS)
    browser.find_element("id", "query").send_keys("a dog\n")
    words = "The vlmcache server cannot be reached: it may have stopped. Start it again, then retry."
    _wait(browser, lambda: _text(browser, "#search-result .error") and _text(browser, "#classify-result .error")
          and _text(browser, "#caption-result .error"))
    assert {_text(browser, f"#{kind}-result .error") for kind in ("search", "classify", "caption")} == {words}
    assert browser.find_element("id", "photo-button").is_enabled() and browser.find_element("id", "search-button").is_enabled()
    assert _preview_shown(browser)  # the photo is shown even though nothing could be asked about it


def test_a_phone_sized_window_has_no_sideways_scroll(browser, live):
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": 400, "height": 860, "deviceScaleFactor": 1,
                                                                   "mobile": True})
    try:
        _open(browser, live, ", ".join(SNOW_DOGS_LABELS) + ", a very-long-label-without-any-space-at-all-to-wrap")
        _give_photo(browser, SNOW_DOGS)
        browser.find_element("id", "query").send_keys("a dog runs through the snow\n")
        _wait(browser, lambda: _text(browser, "#ranking td.label") and browser.find_elements("css selector", ".hit")
              and _text(browser, "#caption"))
        width, inner = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert inner == 400 and width <= inner
        labels = browser.find_element("id", "labels").rect
        assert labels["x"] >= 0 and labels["x"] + labels["width"] <= inner
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_paths_named_inside_imported_data_are_never_served(tmp_path):
    """An imported cache's image paths come from a parquet column: the page serves none of them, and paths that
    no folder holds (absolute mixed with relative) serve nothing rather than crash."""
    import os

    from vlmcache.app.serve import _image_root, servable_image

    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8)).save(photo)
    for dataset_format in ("imported:clip-retrieval", "imported:datacomp", "synthetic"):
        root = _image_root(dataset_format, [str(photo)])
        assert root == Path(os.devnull) and servable_image(str(photo), root) is None
    assert _image_root("flickr8k", [str(photo), "relative/name.jpg"]) == Path(os.devnull)
    assert _image_root("flickr8k", [str(photo)]) == tmp_path and servable_image(str(photo), tmp_path) == photo
