"""The dashboard's pictures in docs/, made again: two runs compared, or a running page with a digit drawn.

    python scripts/screenshot_dashboard.py runs docs/dashboard-runs.png [--epochs 10] [--width 1280]
    python scripts/screenshot_dashboard.py page http://127.0.0.1:8080 docs/dashboard.png [--digit 3]

`runs` trains two runs on the shipped subset (`mpirun -n 2` at --lr 0.05 with a --timeline window, one process at
--lr 0.02), follows both with ONE `lenet-evaluator --http`, waits until both have finished, opens the page in
headless Chromium, ticks both runs in the list and shoots the runs, the charts and the hyperparameters. The
PNG is written with 128 colours to stay small. `page` shoots a dashboard that has evaluated a checkpoint,
with a test image of --digit traced on the drawing pad, at 3/4 scale. Both need what tests/test_browser.py
needs (chromium, chromium-driver, selenium); `runs` also MPI, and runs everything in a temporary folder.
"""
from __future__ import annotations

import argparse
import base64
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.mpiutil import REPO, env, mpirun_cmd, python  # noqa: E402
from tests.test_browser import chrome, draw, js, strokes, until  # noqa: E402
from tests.test_e2e import free_port  # noqa: E402

RUNS = (("0.05", 2, ["--timeline", "t.json", "--timeline-steps", "40:60"]), ("0.02", 0, []))


def train(folder, endpoint, lr, ranks, extra, epochs):
    folder.mkdir()
    cmd = [python(), "-m", "workers.trainer", "--subset", "--val-size", "200", "--batch-size", "50",
           "--checkpoint-every", "20", "--epochs", str(epochs), "--lr", lr, "--log-every", "4", "--no-progress",
           "--log-level", "WARNING", "--publish", endpoint, "--linger", "120", *extra]
    cmd = [*mpirun_cmd(ranks), *cmd] if ranks else [sys.executable, *cmd[1:]]
    return subprocess.Popen(cmd, cwd=folder, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _up(url):
    import httpx
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def shoot(url, width):
    driver = chrome(width, 1600)
    try:
        driver.get(url)
        until("both runs listed", lambda: js(driver, "return document.querySelectorAll('#runs tr[data-run]').length") == 2)
        js(driver, "document.querySelectorAll('#runs tr[data-run] input:not([disabled]):not(:checked)')"
                   ".forEach((b) => b.click())")
        until("both runs drawn", lambda: len(js(driver, "return drawn()")) == 2)
        until("the timeline bars", lambda: js(driver, "return document.querySelectorAll('#timeline .tl-row').length") >= 2)
        until("the lr row marked", lambda: js(driver, "return document.querySelectorAll('#compare tr.differs').length"))
        js(driver, "window.scrollTo(0, 0)")
        bottom = js(driver, "return document.getElementById('hyper').getBoundingClientRect().bottom + window.scrollY")
        driver.set_window_size(width, int(bottom) + 200)
        time.sleep(0.5)             # the charts rebuild at the new size on the next animation frame
        until("charts rebuilt", lambda: js(driver, "return !redrawPending"))
        return driver.get_screenshot_as_png(), int(bottom) + 8
    finally:
        driver.quit()


def shoot_page(url, width, digit):
    """A running dashboard with a test image of `digit` (predicted right) traced on the pad."""
    import httpx
    driver = chrome(width, 1900)
    try:
        driver.get(url)
        until("a checkpoint on the page", lambda: js(driver, "return document.querySelectorAll('#confusion td').length") == 100)
        client = httpx.Client(base_url=url, timeout=10)
        for index in range(500):
            d = client.get(f"/api/digit/{index}").json()
            if d["label"] == digit == d["predicted"]:
                break
        pad = driver.find_element("id", "pad")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", pad)
        draw(driver, pad, strokes(np.frombuffer(base64.b64decode(d["input"]), np.uint8).reshape(28, 28)))
        until("the prediction", lambda: js(driver, "return document.getElementById('prediction').dataset.predicted"))
        driver.execute_script("window.scrollTo(0, 0)")
        driver.set_window_size(width, js(driver, "return document.body.scrollHeight") + 150)
        return driver.get_screenshot_as_png()
    finally:
        driver.quit()


def two_runs(args):
    with tempfile.TemporaryDirectory() as tmp:
        tmp, port = Path(tmp), free_port()
        endpoints = [f"tcp://127.0.0.1:{free_port()}" for _ in RUNS]
        ev = subprocess.Popen([sys.executable, "-m", "workers.evaluator", "--subset", "--poll-ms", "200",
                               "--report", str(tmp / "eval.jsonl"), "--http", f"127.0.0.1:{port}",
                               *[a for e in endpoints for a in ("--connect", e)], "--log-level", "WARNING"],
                              cwd=REPO, env=env(), stdout=subprocess.DEVNULL)
        try:
            until("the evaluator's dashboard", lambda: _up(f"http://127.0.0.1:{port}/api/state"), timeout=120)
            runs = [train(tmp / f"run{k}", e, lr, ranks, extra, args.epochs)
                    for k, (e, (lr, ranks, extra)) in enumerate(zip(endpoints, RUNS))]
            for r in runs:
                _, err = r.communicate()
                if r.returncode != 0:
                    raise SystemExit(f"a training run failed ({r.returncode}): {err[-500:]}")
            return shoot(f"http://127.0.0.1:{port}", args.width)
        finally:
            ev.terminate()
            ev.wait(60)


def save(png, output, bottom=None, scale=1.0):
    """The screenshot as a 128-colour PNG: cut at `bottom` pixels, scaled by `scale`."""
    from PIL import Image
    im = Image.open(io.BytesIO(png)).convert("RGB")
    if bottom:
        im = im.crop((0, 0, im.width, min(im.height, bottom)))
    if scale != 1.0:
        im = im.resize((int(im.width * scale), int(im.height * scale)), Image.LANCZOS)
    im.quantize(colors=128, method=Image.Quantize.FASTOCTREE).save(output, optimize=True)
    print(f"wrote {output} ({output.stat().st_size} bytes, {im.width}x{im.height})")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("runs", help="train two runs on the subset and shoot them compared")
    r.add_argument("output", type=Path)
    r.add_argument("--epochs", type=int, default=10)
    r.add_argument("--width", type=int, default=1280)
    g = sub.add_parser("page", help="shoot a running dashboard with a digit drawn")
    g.add_argument("url")
    g.add_argument("output", type=Path)
    g.add_argument("--digit", type=int, default=3, help="trace a test image of this class")
    g.add_argument("--width", type=int, default=1280)
    args = p.parse_args()
    if args.what == "runs":
        png, bottom = two_runs(args)
        save(png, args.output, bottom)
    else:
        save(shoot_page(args.url, args.width, args.digit), args.output, scale=0.75)


if __name__ == "__main__":
    main()
