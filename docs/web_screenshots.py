"""Screenshots of `vlmcache serve` for docs/web.md: docs/web-1280.png and docs/web-400.png.

A real photo is chosen, four labels ranked, the photo captioned (with --captioner) and a query searched, in
headless Chromium (Debian's chromium + chromium-driver, and selenium), at 1280 px and at a 400 px phone width:

    python docs/web_screenshots.py runs/mlp-infonce --captioner runs/caption --photo IMAGE
"""

from __future__ import annotations

import argparse
import shutil
import socket
import threading
import time
from pathlib import Path

LABELS = "dogs running in the snow, a man riding a bicycle, a plate of food, people in a boat on a lake"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="retrieval run folder")
    parser.add_argument("--captioner", help="captioner run folder, shown on the same page")
    parser.add_argument("--photo", required=True, help="photo to upload")
    parser.add_argument("--query", default="a dog runs through the snow")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent), help="folder for the PNGs")
    args = parser.parse_args()

    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.support.ui import WebDriverWait

    from vlmcache.app.serve import create_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(args.run, captioner=args.captioner), host="127.0.0.1",
                                           port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        for width in (1280, 400):
            shoot(browser, WebDriverWait(browser, 120), f"http://127.0.0.1:{port}/", width, args)
    finally:
        browser.quit()
        server.should_exit = True


def shoot(browser, wait, url: str, width: int, args) -> None:
    """Use the page at one window width, then save the whole page (the window grown to its height)."""
    metrics = {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": width < 600}
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    browser.get(url)
    labels = browser.find_element("id", "labels")
    labels.clear()
    labels.send_keys(LABELS)
    browser.find_element("id", "image").send_keys(str(Path(args.photo).resolve()))
    browser.find_element("id", "query").send_keys(args.query + "\n")
    wait.until(lambda b: b.find_elements("css selector", "#ranking") and b.find_elements("css selector", ".hit")
               and (args.captioner is None or b.find_elements("css selector", "#caption")))
    wait.until(lambda b: b.execute_script("return Array.from(document.images).every(i => i.complete)"))
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {**metrics, "height": browser.execute_script("return document.documentElement.scrollHeight")})
    time.sleep(0.5)  # let the resized page settle before the picture
    path = Path(args.out) / f"web-{width}.png"
    browser.save_screenshot(str(path))
    shrink(path)
    print(f"wrote {path}")


def shrink(path: Path) -> None:
    """256 colours: a third of the bytes, and the page still reads the same."""
    from PIL import Image

    with Image.open(path) as shot:
        small = shot.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG)
    small.save(path, optimize=True)


if __name__ == "__main__":
    main()
