"""A screenshot of a running dashboard, with a test digit traced on the drawing pad, as in docs/dashboard.png.

    python scripts/dashboard_screenshot.py http://127.0.0.1:8080 docs/dashboard.png [--digit 3] [--width 1280]

Needs chromium, chromium-driver and selenium (what tests/test_browser.py needs), and a dashboard that has
evaluated a checkpoint. The image is written as a 128-colour PNG at 3/4 scale, to keep it small.
"""
from __future__ import annotations

import argparse
import base64
import io
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.test_browser import CHROMEDRIVER, CHROMIUM, draw, js, strokes, until  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url")
    p.add_argument("output", type=Path)
    p.add_argument("--digit", type=int, default=3, help="trace a test image of this class")
    p.add_argument("--width", type=int, default=1280)
    args = p.parse_args()
    import httpx
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size={args.width},1900",
              "--force-device-scale-factor=1"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.get(args.url)
        until("a checkpoint on the page", lambda: js(driver, "return document.querySelectorAll('#confusion td').length") == 100)
        client = httpx.Client(base_url=args.url, timeout=10)
        for index in range(500):
            d = client.get(f"/api/digit/{index}").json()
            if d["label"] == args.digit == d["predicted"]:
                break
        pad = driver.find_element("id", "pad")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", pad)
        draw(driver, pad, strokes(np.frombuffer(base64.b64decode(d["input"]), np.uint8).reshape(28, 28)))
        until("the prediction", lambda: js(driver, "return document.getElementById('prediction').dataset.predicted"))
        driver.execute_script("window.scrollTo(0, 0)")
        driver.set_window_size(args.width, js(driver, "return document.body.scrollHeight") + 150)
        png = driver.get_screenshot_as_png()
    finally:
        driver.quit()
    im = Image.open(io.BytesIO(png)).convert("RGB")
    im = im.resize((im.width * 3 // 4, im.height * 3 // 4), Image.LANCZOS)
    im.quantize(colors=128, method=Image.Quantize.FASTOCTREE).save(args.output, optimize=True)
    print(f"wrote {args.output} ({args.output.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
