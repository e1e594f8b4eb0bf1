"""The dashboard in a process of its own (lenet_dist/dashboard/process.py): the frames between the evaluator
and its dashboard child, and what happens when either side dies. Real processes and real sockets."""
import io
import logging
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")

from lenet_dist.dashboard import frames, process  # noqa: E402
from lenet_dist.data import load_subset  # noqa: E402
from lenet_dist.evaluation import analysis  # noqa: E402
from lenet_dist.nn.model import LeNet5  # noqa: E402
from lenet_dist.transport import TrainerLink  # noqa: E402

from tests.fakes import make_ckpt  # noqa: E402
from tests.mpiutil import REPO, env  # noqa: E402
from tests.test_browser import until  # noqa: E402
from tests.test_e2e import finish, free_port  # noqa: E402


def test_frames_carry_json_and_arrays_both_ways():
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "u": np.arange(4, dtype=np.uint8),
              "none": np.zeros((0, 5), np.int64)}
    stream = io.BytesIO(frames.encode({"kind": "x", "n": [1, 2.5, None]}, arrays) + frames.encode({"kind": "y"}))
    head, got = frames.read(stream)
    assert head == {"kind": "x", "n": [1, 2.5, None]}
    assert set(got) == set(arrays) and all(np.array_equal(got[k], arrays[k]) and got[k].dtype == arrays[k].dtype
                                           for k in arrays)
    assert frames.read(stream) == ({"kind": "y"}, {})
    assert frames.read(stream) is None


def test_what_cannot_travel_is_refused_when_sent():
    with pytest.raises(ValueError, match="cannot travel"):
        frames.encode({}, {"o": np.array([object()])})
    with pytest.raises(ValueError):
        frames.encode({"loss": float("nan")})


def frame(head, body=b""):
    return struct.pack("<II", 4 + len(head) + len(body), len(head)) + head + body


@pytest.mark.parametrize("raw, message", [
    (b"\x01\x00\x00", "truncated frame header"),
    (struct.pack("<II", 100, 10) + b"{}", "truncated frame"),
    (struct.pack("<II", 1 << 30, 2), "frame of"),
    (struct.pack("<II", 8, 50) + b"{}", "header"),
    (frame(b'{"arrays": [["a", "object", [2]]]}'), "dtype 'object'"),
    (frame(b'{"arrays": [["a", "float32", [-1]]]}'), "shape"),
    (frame(b'{"arrays": [["a", "float32", [1000]]]}', b"\0" * 16), "runs past the frame"),
])
def test_bad_frames_are_named_not_unpickled(raw, message):
    with pytest.raises(frames.BadFrame, match=message):
        frames.read(io.BytesIO(raw))


@pytest.fixture()
def subset():
    return load_subset()


def children_of(pid):
    """Pids of the dashboard processes whose parent is `pid`."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"lenet_dist.dashboard.process" in cmd:
                out.append(int(d.name))
    return out


def gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_the_child_serves_what_the_parent_feeds_and_ends_with_it(subset):
    dash = process.DashboardProcess(subset.test_images, subset.test_labels)
    try:
        c = httpx.Client(base_url=dash.url, timeout=10)
        dash.add_steps([{"event": "step", "step": 1, "epoch": 0, "loss": 2.0, "config": {"lr": 0.1}}])
        until("the step on the dashboard", lambda: c.get("/api/history").json()["steps"])
        m = LeNet5()
        detail = analysis.analyse(m, subset.test_images, subset.test_labels)
        dash.add_evaluation({"step": 7, "epoch": 1, "accuracy": detail.accuracy, "loss": detail.loss},
                            m.named_params(), detail, {"lr": 0.1})
        ck = until("the checkpoint", lambda: (lambda r: r.status_code == 200 and r.json())(c.get("/api/checkpoint")))
        assert ck["step"] == 7 and ck["confusion"] == detail.confusion.tolist()
        assert ck["worst"][0]["pixels"]                        # the child has the test images
        r = c.post("/api/predict", json={"pixels": (subset.test_images[0] / 255.0).ravel().tolist()})
        assert r.status_code == 200 and r.json()["step"] == 7
        p = m.named_params()["conv1.weight"][:, 0].round(5).tolist()
        assert ck["conv1_filters"] == p
    finally:
        dash.close()
    assert dash.proc.returncode == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(dash.url + "/api/state", timeout=2)


def test_a_dead_dashboard_does_not_stop_its_evaluator(subset, caplog):
    dash = process.DashboardProcess(subset.test_images, subset.test_labels)
    try:
        dash.proc.kill()
        dash.proc.wait(10)
        m = LeNet5()
        detail = analysis.analyse(m, subset.test_images[:50], subset.test_labels[:50])
        with caplog.at_level(logging.WARNING, logger="lenet.evaluator"):
            for step in range(3):               # sends after the death: no exception, one warning
                dash.add_steps([{"event": "step", "step": step}])
                dash.add_evaluation({"step": step, "accuracy": 0.1, "loss": 2.3}, m.named_params(), detail)
                time.sleep(0.2)
    finally:
        dash.close()
    assert [r.message for r in caplog.records].count(
        f"the dashboard process exited (code {-signal.SIGKILL}); evaluation goes on without it") == 1


def test_a_dashboard_that_dies_is_restarted_with_what_it_had(subset, caplog):
    dash = process.DashboardProcess(subset.test_images, subset.test_labels)
    try:
        c = httpx.Client(base_url=dash.url, timeout=10)
        dash.add_steps([{"event": "step", "step": s, "epoch": 0, "loss": 1.0 / s} for s in range(1, 6)])
        m = LeNet5()
        detail = analysis.analyse(m, subset.test_images, subset.test_labels)
        for step, val in ((10, 0.5), (20, 0.4)):           # the best (10) is not the newest (20)
            dash.add_evaluation({"step": step, "accuracy": 0.1, "loss": 2.3, "val_accuracy": val, "val_loss": 2.0},
                                m.named_params(), detail)
        until("both evaluations", lambda: len(c.get("/api/history").json()["evaluations"]) == 2)
        first = dash.proc.pid
        with caplog.at_level(logging.INFO, logger="lenet.evaluator"):
            os.kill(first, signal.SIGKILL)
            until("a new dashboard process", lambda: dash.proc.pid != first and _serves(c), timeout=30)
            until("its history given back", lambda: c.get("/api/checkpoint").status_code == 200)
        h = c.get("/api/history").json()
        assert [r["step"] for r in h["steps"]] == [1, 2, 3, 4, 5]
        assert [e["step"] for e in h["evaluations"]] == [10, 20]
        assert c.get("/api/state").json()["best"]["step"] == 10 and c.get("/api/checkpoint").json()["step"] == 20
        pixels = (subset.test_images[0] / 255.0).ravel().tolist()
        assert c.post("/api/predict?model=best", json={"pixels": pixels}).json()["step"] == 10
        assert c.post("/api/predict", json={"pixels": pixels}).json()["step"] == 20
        said = [r.message for r in caplog.records]
        assert f"the dashboard process exited (code {-signal.SIGKILL}); evaluation goes on without it" in said
        assert any(m.startswith("restarting the dashboard process in 1 s") for m in said), said
    finally:
        dash.close()


def _serves(c):
    try:
        return c.get("/api/state", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_a_stopped_dashboard_costs_the_evaluator_nothing(subset):
    dash = process.DashboardProcess(subset.test_images, subset.test_labels)
    try:
        m = LeNet5()
        detail = analysis.analyse(m, subset.test_images[:50], subset.test_labels[:50])
        os.kill(dash.proc.pid, signal.SIGSTOP)
        for step in range(200):                 # past the queue and the pipe: frames dropped, never waited for
            t0 = time.monotonic()
            dash.add_steps([{"event": "step", "step": step}])
            dash.add_evaluation({"step": step, "accuracy": 0.1, "loss": 2.3}, m.named_params(), detail)
            assert time.monotonic() - t0 < 0.5, f"evaluation {step} waited for the stopped dashboard"
        assert dash.dropped > 0
        os.kill(dash.proc.pid, signal.SIGCONT)
        c = httpx.Client(base_url=dash.url, timeout=10)
        until("it serves again", lambda: _serves(c))
        t0 = time.monotonic()
    finally:
        os.kill(dash.proc.pid, signal.SIGCONT)
        dash.close()
    assert time.monotonic() - t0 < 15


def test_killing_the_evaluator_takes_its_dashboard_along(tmp_path):
    """kill -9 of the evaluator: its dashboard child sees the end of its stdin and exits (no orphan
    holding the port)."""
    port = free_port()
    with TrainerLink("tcp://127.0.0.1:*") as link:
        link.publish(30, 0, make_ckpt(30, seed=1))
        ev = subprocess.Popen([sys.executable, "-m", "workers.evaluator", "--subset", "--connect", link.endpoint,
                               "--http", f"127.0.0.1:{port}"], cwd=REPO, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            until("the dashboard", lambda: _up(port))
            kids = children_of(ev.pid)
            assert len(kids) == 1
            ev.kill()
            until("the dashboard process to exit", lambda: gone(kids[0]), timeout=30)
            assert not _up(port)
        finally:
            finish(ev)


def _up(port):
    try:
        return httpx.get(f"http://127.0.0.1:{port}/api/state", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_a_child_that_cannot_start_is_a_one_line_setup_error(subset, monkeypatch):
    """The evaluator reports OSError (one line, exit 1) rather than serving nothing: here the "python" that
    should run the child exits at once."""
    monkeypatch.setattr(process.sys, "executable", "/bin/false")
    with pytest.raises(OSError, match="dashboard process did not start"):
        process.DashboardProcess(subset.test_images, subset.test_labels)


def test_the_child_asks_for_short_scheduler_slices():
    """On Linux 6.12 and later the dashboard process runs in 0.1 ms slices (so a request preempts the
    training that keeps the cores busy); where the kernel cannot, nothing changes and nothing fails."""
    import platform
    calls = process._SCHED_ATTR_CALLS.get(platform.machine())
    if calls is None:
        pytest.skip(f"no sched_setattr numbers for {platform.machine()}")
    code = ("import ctypes; from lenet_dist.dashboard import process as p; ok = p.short_slices(); "
            "a = p._SchedAttr(); libc = ctypes.CDLL(None); "
            f"libc.syscall({calls[1]}, 0, ctypes.byref(a), ctypes.sizeof(a), 0); print(ok, a.runtime)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True,
                         env=env()).stdout.split()
    release = tuple(int(x) for x in platform.release().split(".")[:2] if x.isdigit())
    if out[0] == "True":
        assert int(out[1]) == process.SLICE_NS
    else:
        assert release < (6, 12), f"kernel {platform.release()} refused a custom slice"
