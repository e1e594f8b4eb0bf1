"""lenet-evaluator --health: /healthz and /readyz from the standard library, without the dashboard extra
(starlette and uvicorn made unimportable in the evaluator process), with a real evaluator watching a folder."""
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from lenet_dist.checkpoints import format as checkpoint
from lenet_dist.files import atomic_write

from tests.fakes import make_ckpt
from tests.mpiutil import REPO, env
from tests.test_e2e import free_port

NO_DASHBOARD = ("import sys; sys.modules.update(starlette=None, uvicorn=None, prometheus_client=None); "
                "from workers.evaluator import main; sys.exit(main())")


def get(url):
    """(status, JSON body) of a GET, or (None, None) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")
    except OSError:
        return None, None


def wait(what, check, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"gave up waiting for {what}")


def test_health_and_readiness_without_the_dashboard_extra(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    ev = subprocess.Popen([sys.executable, "-c", NO_DASHBOARD, "--watch", str(d), "--subset", "--poll-ms", "100",
                           "--health", f"127.0.0.1:{port}"], cwd=REPO, env=env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    try:
        status, body = wait("/readyz ready", lambda: (lambda r: r if r[0] == 200 else None)(get(base + "/readyz")))
        assert body["ready"] and body["status"] == "ready" and body["evaluations"] == 0
        status, body = get(base + "/healthz")
        assert status == 200 and body["alive"] and body["heartbeat_age_s"] < 5
        atomic_write(d / checkpoint.file_name(7), make_ckpt(7))
        wait("an evaluation counted", lambda: get(base + "/readyz")[1]["last_step"] == 7)
        assert get(base + "/nope")[0] == 404
    finally:
        ev.send_signal(signal.SIGTERM)
        out, err = ev.communicate(timeout=30)
    assert ev.returncode == 0 and "Traceback" not in err, err
    assert get(base + "/healthz") == (None, None)             # gone with the process


def test_the_probes_follow_the_state(monkeypatch):
    from lenet_dist.evaluation import health as h
    state = h.Health()
    server = h.HealthServer(state)
    try:
        status, body = get(server.url + "/readyz")
        assert status == 503 and body["why"] == "starting" and body["status"] == "not ready"
        state.not_ready("loading data")
        status, body = get(server.url + "/readyz")
        assert status == 503 and body["why"] == "loading data" and get(server.url + "/healthz")[0] == 200
        state.ready()
        assert get(server.url + "/readyz")[0] == 200
        monkeypatch.setattr(h, "LIVENESS_S", 0.0)          # a loop that no longer turns
        assert get(server.url + "/healthz")[0] == 503 and get(server.url + "/readyz")[0] == 503
    finally:
        server.close()
