"""Two real runs compared on one dashboard, as in docs/dashboard-runs.png: how that picture is made.

    python scripts/screenshot_dashboard.py docs/dashboard-runs.png [--epochs 10] [--width 1280]

It trains two runs on the shipped subset (`mpirun -n 2` at --lr 0.05 with a --timeline window, one process at
--lr 0.02), follows both with ONE `lenet-evaluator --http`, waits until both have finished, opens the page in
headless Chromium, ticks both runs in the list and shoots the runs, the charts and the hyperparameters. The
PNG is written with 128 colours to stay small. Needs what tests/test_browser.py needs (chromium,
chromium-driver, selenium) and MPI; everything runs in a temporary folder.
"""
from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.mpiutil import REPO, env, mpirun_cmd, python  # noqa: E402
from tests.test_browser import chrome, js, until  # noqa: E402
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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("output", type=Path)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--width", type=int, default=1280)
    args = p.parse_args()
    from PIL import Image
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
            png, bottom = shoot(f"http://127.0.0.1:{port}", args.width)
        finally:
            ev.terminate()
            ev.wait(60)
    im = Image.open(io.BytesIO(png)).convert("RGB")
    im = im.crop((0, 0, im.width, min(im.height, bottom)))
    im.quantize(colors=128, method=Image.Quantize.FASTOCTREE).save(args.output, optimize=True)
    print(f"wrote {args.output} ({args.output.stat().st_size} bytes, {im.width}x{im.height})")


if __name__ == "__main__":
    main()
