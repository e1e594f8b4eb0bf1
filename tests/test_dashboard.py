"""The dashboard's HTTP side on a real uvicorn server on 127.0.0.1, over a LiveState filled directly: the JSON
API, the live stream, /metrics, the bearer token, and bad input that gets a 4xx JSON error and changes
nothing."""
import io
import logging
import json
import threading

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
from PIL import Image  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from lenet_dist.dashboard import state as state_mod  # noqa: E402
from lenet_dist.dashboard.app import DashboardServer, MAX_BODY  # noqa: E402
from lenet_dist.dashboard.state import LiveState  # noqa: E402
from lenet_dist.evaluation import analysis  # noqa: E402

from tests.trained import data, one_blas_thread, trained  # noqa: E402, F401 (fixtures)

TOKEN = "s3cret-token-of-some-length"


def evaluate_into(state, model, data, step):
    detail = analysis.analyse(model, data.test_images, data.test_labels)
    result = {"step": step, "epoch": 1, "accuracy": detail.accuracy, "loss": detail.loss, "eval_seconds": 0.1,
              "lag_steps": 3, "trainer_step": step + 3, "n_test": 1000, "final": False, "time": 1.0}
    state.add_evaluation(result, model.named_params(), detail, {"lr": 0.05, "epochs": 3})
    return detail


def step_rows(first, n):
    return [{"event": "step", "step": s, "epoch": 0, "loss": 1.0 / s, "acc": 0.5, "lr": 0.05,
             "images_per_s": 1000.0, "rank_images_per_s": [500.0, 500.0]} for s in range(first, first + n)]


@pytest.fixture()
def live(data, trained):
    state = LiveState(data.test_images, data.test_labels)
    server = DashboardServer(state)
    assert server.wait_started()
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield state, client
    server.close()


def test_api_shows_the_history_and_the_newest_checkpoint(live, trained, data):
    state, c = live
    assert c.get("/api/checkpoint").status_code == 404
    state.add_steps(step_rows(1, 5))
    state.add_steps(step_rows(3, 4))                    # overlapping rows are kept once
    detail = evaluate_into(state, trained, data, step=6)
    s = c.get("/api/state").json()
    assert s["config"] == {"lr": 0.05, "epochs": 3} and s["latest_evaluation"]["step"] == 6
    assert s["trainer_step"] == 9 and s["best_accuracy"] == detail.accuracy
    h = c.get("/api/history").json()
    assert [r["step"] for r in h["steps"]] == [1, 2, 3, 4, 5, 6] and len(h["evaluations"]) == 1
    ck = c.get("/api/checkpoint").json()
    assert ck["confusion"] == detail.confusion.tolist() and ck["per_class"] == detail.per_class
    assert np.allclose(ck["conv1_filters"], trained.named_params()["conv1.weight"][:, 0], atol=1e-5)
    w = ck["worst"][0]
    assert w["index"] == detail.worst[0]["index"]
    import base64
    assert base64.b64decode(w["pixels"]) == data.test_images[w["index"]].tobytes()
    d = c.get("/api/digit/7").json()
    assert d["label"] == data.test_labels[7] and d["conv2"]["shape"] == [16, 10, 10]
    assert len(base64.b64decode(d["conv2"]["pixels"])) == 1600
    page = c.get("/")
    assert page.status_code == 200 and "uPlot.iife.min.js" in page.text
    for path in ("/static/app.js", "/static/style.css", "/static/vendor/uPlot.iife.min.js",
                 "/static/vendor/LICENSE.uPlot"):
        assert c.get(path).status_code == 200, path


def _png(a):
    buf = io.BytesIO()
    Image.fromarray(np.asarray(a, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_predict_prepares_a_drawing_and_classifies_it(live, trained, data):
    state, c = live
    assert c.post("/api/predict", json={"pixels": [0.5] * 784}).status_code == 409   # no checkpoint yet
    evaluate_into(state, trained, data, step=10)
    hits = 0
    for i in range(10):
        u8, label = data.test_images[i], int(data.test_labels[i])
        big = np.zeros((300, 300), np.uint8)
        big[40:40 + 224, 60:60 + 224] = np.kron(u8, np.ones((8, 8), np.uint8))    # drawn big, off centre
        r = c.post("/api/predict", content=_png(big), headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["probabilities"]) == 10 and abs(sum(body["probabilities"]) - 1) < 1e-4
        import base64
        seen = np.frombuffer(base64.b64decode(body["input"]), np.uint8).reshape(28, 28)
        assert (seen == analysis.prepare_digit(big / 255.0)).all()
        hits += body["predicted"] == label
    assert hits >= 8
    r = c.post("/api/predict?model=best", json={"pixels": (data.test_images[0] / 255.0).ravel().tolist()})
    assert r.status_code == 200 and r.json()["model"] == "best"


BAD_PREDICTS = [
    ("783 values", dict(json={"pixels": [0.5] * 783}), 400),
    ("values above 1", dict(json={"pixels": [2.0] * 784}), 400),
    ("strings", dict(json={"pixels": ["a"] * 784}), 400),
    ("booleans", dict(json={"pixels": [True] * 784}), 400),
    ("not JSON", dict(content=b"\xff\xfe garbage"), 400),
    ("a JSON list", dict(json=[0.5] * 784), 400),
    ("blank drawing", dict(json={"pixels": [0.0] * 784}), 400),
    ("a PNG that is not", dict(content=b"\x89PNG\r\n\x1a\n" + b"x" * 100, headers={"Content-Type": "image/png"}), 400),
    ("not a PNG at all", dict(content=b"GIF89a....", headers={"Content-Type": "image/png"}), 400),
    ("a huge PNG", dict(content=_png(np.zeros((1, 2000))), headers={"Content-Type": "image/png"}), 400),
    ("oversized body", dict(content=b"0" * (MAX_BODY + 1)), 413),
    ("unknown model", dict(json={"pixels": [0.5] * 784}, params={"model": "worst"}), 400),
]


@pytest.mark.parametrize("name, kw, status", BAD_PREDICTS, ids=[b[0] for b in BAD_PREDICTS])
def test_bad_predict_bodies_get_a_json_error_and_change_nothing(live, trained, data, name, kw, status):
    state, c = live
    evaluate_into(state, trained, data, step=10)
    before = (state.seq, c.get("/api/history").json())
    r = c.post("/api/predict", **kw)
    assert r.status_code == status and r.json()["status"] == status and r.json()["error"]
    assert (state.seq, c.get("/api/history").json()) == before
    assert c.post("/api/predict", json={"pixels": (data.test_images[1] / 255.0).ravel().tolist()}).status_code == 200


def test_oversized_body_without_a_length_is_cut_off(live):
    _, c = live

    def chunks():
        for _ in range(100):
            yield b"0" * 4096                   # streamed: no Content-Length, 400 KiB in all
    r = c.post("/api/predict", content=chunks())
    assert r.status_code == 413


@pytest.mark.parametrize("path", ["/nope", "/api/nope", "/static/../app.py", "/static/%2e%2e/app.py",
                                  "/static/..%2fapp.py", "/static/..%2f..%2fdashboard/app.py",
                                  "/static//etc/passwd", "/static/%2fetc%2fpasswd", "/api/digit/99999",
                                  "/api/digit/-1"])
def test_unknown_paths_and_path_tricks_are_json_404s(live, trained, data, path):
    state, c = live
    evaluate_into(state, trained, data, step=1)
    r = c.get(path)
    assert r.status_code in (400, 404) and r.json()["error"]
    assert "import" not in r.text and "root:" not in r.text


def test_wrong_method_is_a_json_405(live):
    _, c = live
    r = c.get("/api/predict")
    assert r.status_code == 405 and r.json()["status"] == 405


def _events(response, want):
    """Read server-sent events until `want` of them (kind, data) arrived; the client's timeout fails a hang."""
    got, kind, ident = [], None, None
    for line in response.iter_lines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("id: "):
            ident = int(line[4:])
        elif line.startswith("data: "):
            got.append((ident, kind, json.loads(line[6:])))
            if len(got) == want:
                return got
    raise AssertionError(f"stream ended after {got}")


def test_live_stream_pushes_steps_and_evaluations_and_replays_from_last_event_id(live, trained, data):
    state, c = live
    state.add_steps(step_rows(1, 2))                                  # before: read from /api/history
    with c.stream("GET", "/api/stream") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        threading.Timer(0.2, lambda: (state.add_steps(step_rows(3, 2)),
                                      evaluate_into(state, trained, data, step=4))).start()
        got = _events(r, 3)
    assert [k for _, k, _ in got] == ["steps", "evaluation", "checkpoint"]
    assert [row["step"] for row in got[0][2]] == [3, 4] and got[1][2]["step"] == 4
    assert "confusion" in got[2][2]
    with c.stream("GET", "/api/stream", headers={"Last-Event-ID": str(got[0][0])}) as r:
        again = _events(r, 2)
    assert [k for _, k, _ in again] == ["evaluation", "checkpoint"]


def test_metrics_in_prometheus_text_format(live, trained, data):
    state, c = live
    state.add_steps(step_rows(1, 3))
    detail = evaluate_into(state, trained, data, step=3)
    r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values = {m.name: m.samples[0].value for m in text_string_to_metric_families(r.text) if m.samples}
    assert values["lenet_eval_accuracy"] == pytest.approx(detail.accuracy)
    assert values["lenet_eval_loss"] == pytest.approx(detail.loss)
    assert values["lenet_eval_step"] == 3 and values["lenet_eval_lag_steps"] == 3
    assert values["lenet_train_images_per_second"] == 1000 and values["lenet_train_step"] == 6
    assert values["lenet_eval_seconds"] == pytest.approx(0.1)


def test_bounded_history(data, monkeypatch):
    monkeypatch.setattr(state_mod, "MAX_STEPS", 10)
    state = LiveState(data.test_images, data.test_labels)
    for first in range(1, 100, 7):
        state.add_steps(step_rows(first, 7))
    steps = state.history()["steps"]
    assert len(steps) == 10 and steps[-1]["step"] == 105


def test_token_guards_every_request(data, trained):
    state = LiveState(data.test_images, data.test_labels)
    evaluate_into(state, trained, data, step=2)
    server = DashboardServer(state, token=TOKEN)
    try:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            for path in ("/", "/api/state", "/metrics", "/static/app.js", "/api/stream", "/nope"):
                r = c.get(path)
                assert r.status_code == 401 and r.json()["status"] == 401, path
            assert c.get("/api/state", headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert c.post("/api/predict", json={"pixels": [0.5] * 784}).status_code == 401
            ok = c.get("/api/state", headers={"Authorization": f"Bearer {TOKEN}"})
            assert ok.status_code == 200 and ok.json()["latest_evaluation"]["step"] == 2
            assert c.get("/?token=wrong").status_code == 401
            r = c.get(f"/?token={TOKEN}")                    # a browser's way in: a cookie, then the page
            assert r.status_code == 303 and "httponly" in r.headers["set-cookie"].lower()
            assert c.get("/api/state").status_code == 200 and c.get("/").status_code == 200
    finally:
        server.close()


def test_busy_port_fails_at_once(data):
    state = LiveState(data.test_images, data.test_labels)
    first = DashboardServer(state)
    try:
        port = int(first.url.rsplit(":", 1)[1])
        with pytest.raises(OSError):
            DashboardServer(state, port=port)
    finally:
        first.close()


def test_closing_the_server_ends_open_streams(data):
    state = LiveState(data.test_images, data.test_labels)
    server = DashboardServer(state)
    opened, ended = threading.Event(), threading.Event()

    def watch():
        with httpx.stream("GET", server.url + "/api/stream", timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("retry:"):
                    opened.set()
        ended.set()                                  # the server finished the response: a clean end
    threading.Thread(target=watch, daemon=True).start()
    assert opened.wait(10) and not ended.is_set()
    server.close()
    assert ended.wait(10)


def test_every_static_file_ships_as_package_data():
    """A file added to static/ but not to [tool.setuptools.package-data] would work here and 404 when installed."""
    import fnmatch
    import tomllib
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["lenet_dist"]
    static = root / "lenet_dist" / "dashboard" / "static"
    files = [p.relative_to(root / "lenet_dist").as_posix() for p in static.rglob("*") if p.is_file()]
    assert len(files) >= 7
    for f in files:
        assert any(fnmatch.fnmatch(f, g) and f.count("/") == g.count("/") for g in globs), f
    assert (static / "vendor" / "LICENSE.uPlot").read_text().startswith("The MIT License")


def _png_claiming(width, height):
    """A PNG signature and an IHDR chunk claiming width x height, then a little data: the header alone."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100_000))
            + chunk(b"IEND", b""))


HOSTILE = [
    ("JSON nested 30,000 deep", dict(content=b'{"pixels": ' + b"[" * 30000 + b"]" * 30000 + b"}"), 400),
    ("a PNG claiming 60000x60000", dict(content=_png_claiming(60000, 60000), headers={"Content-Type": "image/png"}),
     413),
    ("a PNG claiming 12000x12000", dict(content=_png_claiming(12000, 12000), headers={"Content-Type": "image/png"}),
     413),
]


@pytest.mark.parametrize("name, kw, status", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_bodies_are_one_line_4xx_without_a_traceback(live, trained, data, name, kw, status, caplog):
    state, c = live
    evaluate_into(state, trained, data, step=10)
    with caplog.at_level(logging.WARNING):
        r = c.post("/api/predict", **kw)
    assert r.status_code == status and r.json()["status"] == status, r.text
    assert not [rec for rec in caplog.records if rec.exc_info], [rec.getMessage() for rec in caplog.records]


def test_a_last_event_id_of_five_thousand_digits_is_no_id(live):
    state, c = live
    state.add_steps(step_rows(1, 2))
    with c.stream("GET", "/api/stream", headers={"Last-Event-ID": "9" * 5000}) as r:
        assert r.status_code == 200
        threading.Timer(0.2, lambda: state.add_steps(step_rows(3, 1))).start()
        got = _events(r, 1)
    assert got[0][1] in ("steps", "reload")


def test_a_replay_is_bounded_in_bytes(live, trained, data):
    state, c = live
    for step in range(1, 40):               # ~40 checkpoint events of ~20 KB: more than REPLAY_BYTES
        evaluate_into(state, trained, data, step=step)
    with c.stream("GET", "/api/stream", headers={"Last-Event-ID": "0"}) as r:
        got = _events(r, 1)
    assert got[0][1] == "reload"            # not megabytes of replay: the page reloads its history instead
    with c.stream("GET", "/api/stream", headers={"Last-Event-ID": str(state.seq - 2)}) as r:
        assert [k for _, k, _ in _events(r, 2)] == ["evaluation", "checkpoint"]    # a short replay as before


def test_any_exception_is_a_json_500_and_one_log_line(live, caplog, monkeypatch):
    state, c = live

    def broken():
        raise RuntimeError("a bug\nwith a second line")
    monkeypatch.setattr(state, "summary", broken)
    with caplog.at_level(logging.WARNING):
        r = c.get("/api/state")
    assert r.status_code == 500 and r.json() == {"error": "internal error", "status": 500}
    lines = [rec for rec in caplog.records if "RuntimeError" in rec.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0].getMessage() and not lines[0].exc_info
    assert c.get("/api/history").status_code == 200
