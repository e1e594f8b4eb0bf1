"""lenet-evaluator's live outputs as a process: --http serves the evaluations and the trainer's telemetry
(over the link, no shared file), --tensorboard writes event files, --report carries the analysis; flag
mistakes are usage errors."""
import json
import os
import signal
import subprocess
import sys

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("tensorboardX")

from lenet_dist.transport import TrainerLink  # noqa: E402

from tests import tbevents  # noqa: E402
from tests.fakes import make_ckpt  # noqa: E402
from tests.mpiutil import REPO, env  # noqa: E402
from tests.test_browser import until  # noqa: E402
from tests.test_e2e import finish, free_port  # noqa: E402


def evaluator(*argv):
    return subprocess.Popen([sys.executable, "-m", "workers.evaluator", "--subset", "--poll-ms", "100", "--exit-after-run",
                             *map(str, argv)],
                            cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_dashboard_tensorboard_and_report_of_a_live_evaluator(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with TrainerLink("tcp://127.0.0.1:*") as link:
        for s in range(1, 31):
            link.telemetry({"event": "step", "step": s, "epoch": 0, "loss": 1.0 / s, "acc": 0.5, "lr": 0.1,
                            "images_per_s": 800.0, "config": {"lr": 0.1}} if s == 1 else
                           {"event": "step", "step": s, "epoch": 0, "loss": 1.0 / s, "acc": 0.5, "lr": 0.1,
                            "images_per_s": 800.0})
        link.publish(30, 0, make_ckpt(30, seed=1))
        ev = evaluator("--connect", link.endpoint, "--http", f"127.0.0.1:{port}", "--report", tmp_path / "r.jsonl",
                       "--tensorboard", tmp_path / "tb")
        try:
            c = httpx.Client(base_url=url, timeout=10)

            def history():
                try:
                    return c.get("/api/history").json()
                except httpx.TransportError:
                    return None
            h = until("steps and an evaluation on the dashboard",
                      lambda: (lambda h: h if h and len(h["steps"]) == 30 and h["evaluations"] else None)(history()))
            assert h["evaluations"][0]["step"] == 30 and [r["step"] for r in h["steps"]] == list(range(1, 31))
            link.telemetry({"event": "step", "step": 31, "epoch": 0, "loss": 0.01, "acc": 0.9, "lr": 0.1,
                            "images_per_s": 900.0})
            until("a step row that came later", lambda: len(history()["steps"]) == 31)
            assert c.get("/api/state").json()["config"] == {"seed": 1}          # the checkpoint's own config
            ck = c.get("/api/checkpoint").json()
            assert ck["step"] == 30 and sum(map(sum, ck["confusion"])) == 1000
            assert "lenet_train_images_per_second 900.0" in c.get("/metrics").text
        finally:
            ev.send_signal(signal.SIGTERM)
            rc, out, err = finish(ev)
    assert rc == 0, err
    r = json.loads((tmp_path / "r.jsonl").read_text().splitlines()[0])
    assert r["step"] == 30 and len(r["per_class"]) == 10 and sum(map(sum, r["confusion"])) == 1000
    assert r["worst"] and {"index", "label", "predicted", "confidence"} <= set(r["worst"][0])
    got = tbevents.scalars(tmp_path / "tb" / "evaluator")
    assert got["eval/test_accuracy"] == [(30, pytest.approx(r["accuracy"]))] and r["test_accuracy"] == r["accuracy"]
    assert tbevents.image(tmp_path / "tb" / "evaluator", "eval/confusion").shape == (160, 160, 3)


def test_busy_http_port_is_a_one_line_setup_error(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        ev = evaluator("--watch", tmp_path, "--http", f"127.0.0.1:{s.getsockname()[1]}")
        rc, out, err = finish(ev)
    assert rc == 1 and "Address already in use" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["--http", "1:2:x"], "expected [HOST:]PORT"),
    (["--http", "70000"], "expected [HOST:]PORT"),
    (["--http-token-file", "tok"], "--http-token-file needs --http"),
    (["--http", "0", "--http-token-file", "missing"], "No such file"),
    (["--http", "0", "--http-token-file", "short"], "16 characters"),
    (["--http", "0", "--http-token-file", "fifo"], "fifo: not a regular file (a FIFO)"),
    (["--http", "0.0.0.0:0"], "a non-loopback address needs --http-token-file"),
    (["--http", "[::]:0"], "a non-loopback address needs --http-token-file"),
])
def test_flag_mistakes_are_usage_errors(tmp_path, argv, message):
    (tmp_path / "short").write_text("abc\n")
    os.mkfifo(tmp_path / "fifo")                            # opened, it would block the evaluator at start
    p = subprocess.run([sys.executable, "-m", "workers.evaluator", "--watch", str(tmp_path), *argv], cwd=tmp_path,
                       env=env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and message in p.stderr.strip().splitlines()[-1]


def test_an_open_dashboard_off_loopback_needs_a_flag_and_says_so(tmp_path):
    port = free_port()
    ev = evaluator("--watch", tmp_path, "--http", f"0.0.0.0:{port}", "--http-no-token")
    try:
        until("the dashboard", lambda: _answers(f"http://127.0.0.1:{port}/api/state"))
    finally:
        ev.send_signal(signal.SIGTERM)
        rc, _, err = finish(ev)
    assert rc == 0 and "warning: --http 0.0.0.0" in err and "without a token" in err, err


def _answers(url):
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_token_file_with_a_good_token(tmp_path):
    (tmp_path / "tok").write_text("a-good-long-token-value\n")
    os.chmod(tmp_path / "tok", 0o600)
    port = free_port()
    ev = evaluator("--watch", tmp_path, "--http", f"127.0.0.1:{port}", "--http-token-file", tmp_path / "tok")
    try:
        def get(**kw):
            try:
                return httpx.get(f"http://127.0.0.1:{port}/api/state", timeout=5, **kw).status_code
            except httpx.TransportError:
                return None
        assert until("the dashboard", get) == 401
        assert get(headers={"Authorization": "Bearer a-good-long-token-value"}) == 200
    finally:
        ev.send_signal(signal.SIGTERM)
        finish(ev)


def test_telemetry_reaches_the_dashboard_over_curvezmq(tmp_path):
    import shutil
    from lenet_dist.transport import generate_keys
    keys = {name: generate_keys(tmp_path / "keys", name) for name in ("trainer", "evaluator")}
    auth = tmp_path / "authorized"
    auth.mkdir()
    shutil.copy(keys["evaluator"][0], auth)
    port = free_port()
    with TrainerLink("tcp://127.0.0.1:*", secret_key=keys["trainer"][1], authorized=auth) as link:
        for s in range(1, 6):
            link.telemetry({"event": "step", "step": s, "epoch": 0, "loss": 0.5, "acc": 0.5, "lr": 0.1,
                            "images_per_s": 700.0})
        ev = evaluator("--connect", link.endpoint, "--http", f"127.0.0.1:{port}", "--curve-secret-key",
                       keys["evaluator"][1], "--curve-server-key", keys["trainer"][0])
        try:
            def steps():
                try:
                    return len(httpx.get(f"http://127.0.0.1:{port}/api/history", timeout=5).json()["steps"])
                except httpx.TransportError:
                    return 0
            assert until("the rows over CurveZMQ", lambda: steps() == 5)
        finally:
            ev.send_signal(signal.SIGTERM)
            finish(ev)
