"""The dashboard in a real headless browser (Debian's chromium and chromium-driver, driven by Selenium) while a
real `mpirun -n 2` trainer trains and a real evaluator serves the page: no JavaScript errors, curves that
gain points, the confusion matrix and the filters, and a digit drawn with pointer strokes that trace a
real test image, classified as that digit. The test saves a screenshot and prints where."""
import base64
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")

from tests.test_e2e import finish, free_port, start_evaluator, start_trainer  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def need_browser():
    try:
        import selenium  # noqa: F401
    except ImportError:
        selenium = None
    if CHROMIUM and CHROMEDRIVER and selenium is not None:
        return
    if os.environ.get("CI"):
        pytest.fail("chromium, chromium-driver and selenium are needed (scripts/setup-tests.sh installs them)")
    pytest.skip("chromium, chromium-driver or selenium missing (scripts/setup-tests.sh installs them)")


def chrome(width=1400, height=2100):
    """Headless Chromium through Selenium, its console log kept (severe() reads it)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--window-size={width},{height}", "--force-device-scale-factor=1"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_script_timeout(20)
    return driver


@pytest.fixture()
def browser():
    need_browser()
    driver = chrome()
    try:
        yield driver
    finally:
        driver.quit()


def until(what, check, timeout=90, every=0.2):
    """Wait for `check()` to return something true (it is an event we wait for; the deadline only fails it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"gave up waiting for {what} after {timeout}s")


def js(driver, code):
    return driver.execute_script(code)


def strokes(u8, scale=10, ink=128):
    """Pointer strokes over a 28x28 digit drawn `scale` times bigger: one stroke along every run of inked
    pixels in every row, each a list of canvas points (x, y)."""
    out = []
    for r in range(28):
        row = u8[r] > ink
        c = 0
        while c < 28:
            if row[c]:
                start = c
                while c < 28 and row[c]:
                    c += 1
                y = (r + 0.5) * scale
                out.append([((start + 0.5) * scale, y), ((c - 0.5) * scale, y)])
            c += 1
    return out


def draw(driver, canvas, paths):
    """Trace `paths` on the canvas with real pointer events (down, moves, up)."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    w, h = canvas.size["width"], canvas.size["height"]
    for path in paths:
        actions = ActionBuilder(driver, duration=10)
        p = actions.pointer_action
        (x0, y0), rest = path[0], path[1:]
        p.move_to(canvas, int(x0 - w / 2), int(y0 - h / 2))
        p.pointer_down()
        for x, y in rest:
            for t in (0.5, 1.0):                         # a move in between, as a hand would make
                p.move_to(canvas, int(x0 + t * (x - x0) - w / 2), int(y0 + t * (y - y0) - h / 2))
        p.pointer_up()
        actions.perform()


def severe(driver):
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_dashboard_in_a_browser_during_a_real_run(tmp_path, browser):
    endpoint, port = f"tcp://127.0.0.1:{free_port()}", free_port()
    url = f"http://127.0.0.1:{port}"
    # a daemon: the page and drawing must keep working should the run end first on a loaded machine
    ev = start_evaluator(endpoint, tmp_path / "eval.jsonl", "--http", f"127.0.0.1:{port}", daemon=True)
    tr = start_trainer(endpoint, tmp_path, "--log-every", "4", "--val-size", "200", epochs=40)
    try:
        client = httpx.Client(base_url=url, timeout=10)

        def state():
            try:
                return client.get("/api/state").json()
            except httpx.TransportError:
                return None
        until("the dashboard", state)
        browser.get(url)
        until("the page's charts", lambda: js(browser, "return typeof charts === 'object' && 'chart-acc' in charts"))

        def points():
            return js(browser, "return charts['chart-acc'].data[0].length")
        first = until("the first points on the curves", points)
        until("more points as training goes on", lambda: points() > first + 2)
        until("the confusion matrix", lambda: js(browser, "return document.querySelectorAll('#confusion td').length") == 100)
        assert js(browser, "return document.querySelectorAll('#filters canvas').length") == 6
        assert js(browser, "return document.querySelectorAll('#worst canvas').length") > 0
        assert js(browser, "return document.querySelectorAll('#maps2 canvas').length") == 16
        # training's own curves, from the trainer's telemetry over the link: loss, images/s per rank, lr
        assert js(browser, "return charts['chart-loss'].data[1].filter(v => v != null).length") > 0
        assert js(browser, "return charts['chart-speed'].series.length") == 4       # step, total, rank 0, 1
        assert js(browser, "return charts['chart-lr'].data[1].filter(v => v != null).length") > 0
        # a gap in the step rows is drawn as a gap (a null point), never as a line across it
        assert js(browser, "return JSON.stringify(gapped([{step: 10, steps: 10}, {step: 20, steps: 10}, "
                           "{step: 200, steps: 10}], (r) => r.step))") == "[[10,10],[20,20],[21,null],[200,200]]"
        # evaluations without step rows (--watch): a note instead of the two charts that would be empty
        assert js(browser, "const kept = steps.splice(0); redraw(); const got = [$('no-telemetry').hidden, "
                           "$('chart-speed').hidden, $('chart-lr').hidden]; steps.push(...kept); redraw(); "
                           "return got.concat([$('no-telemetry').hidden, $('chart-lr').hidden])") == [
            False, True, True, True, False]
        # validation beside test, and the run listed and named
        assert js(browser, "return charts['chart-acc'].data[3].filter(v => v != null).length") > 0
        assert js(browser, "return charts['chart-loss'].data[3].filter(v => v != null).length") > 0
        run = (state() or {}).get("run") or {}
        assert run.get("name") and js(browser, "return document.getElementById('run-name').textContent") == run["name"]
        assert js(browser, "return document.querySelectorAll('#runs tr.shown').length") == 1

        # A digit the newest checkpoint knows well, traced stroke by stroke on the canvas.
        until("a checkpoint at 85% or better", lambda: ((state() or {}).get("best_accuracy") or 0) >= 0.85)
        for index in range(200):
            d = client.get(f"/api/digit/{index}").json()
            if d["predicted"] == d["label"] and max(d["probabilities"]) > 0.98 and d["label"] not in (1,):
                break
        u8 = np.frombuffer(base64.b64decode(d["input"]), np.uint8).reshape(28, 28)
        js(browser, "document.getElementById('which').value = 'best'")
        pad = browser.find_element("id", "pad")
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", pad)
        paths = strokes(u8)
        draw(browser, pad, paths)
        # Under load a prediction of the half-drawn digit can land first: wait for the one that saw every stroke.
        assert js(browser, "return document.getElementById('pad').dataset.strokes") == str(len(paths))
        until("the drawn digit's class", lambda: js(
            browser, "return document.getElementById('prediction').dataset.strokes") == str(len(paths)), timeout=30)
        predicted = js(browser, "return document.getElementById('prediction').dataset.predicted")
        seen = js(browser, "return document.getElementById('features-title').textContent")
        assert int(predicted) == d["label"], f"drew test image {index} (a {d['label']}), the page says {predicted}"
        assert "drawn digit" in seen

        browser.execute_script("window.scrollTo(0, 0)")
        shots = Path(os.environ.get("LENET_SCREENSHOTS", tmp_path))
        shots.mkdir(parents=True, exist_ok=True)
        shot = shots / "dashboard.png"
        browser.set_window_size(1400, js(browser, "return document.body.scrollHeight") + 200)
        browser.save_screenshot(str(shot))
        print(f"\nscreenshot of the dashboard: {shot}")
        assert shot.stat().st_size > 10_000
        assert severe(browser) == []
    finally:
        for p in (tr, ev):
            if p.poll() is None:
                p.terminate()
        for p in (tr, ev):
            finish(p, timeout=60)
