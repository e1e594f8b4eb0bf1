"""The dashboard's HTTP side: a Starlette app over a LiveState, served by uvicorn on a thread of its own
(the evaluator runs it in a process of its own: process.py).

    GET  /                      the page (static/index.html; its scripts and uPlot from /static/)
    GET  /api/state             run configuration, newest step and evaluation, the best (chosen on validation)
    GET  /api/history           telemetry rows, marks (lr, control), the newest timeline window, evaluations
    GET  /api/runs              every run the evaluator knows (key, name, status, best validation accuracy)
    GET  /api/checkpoint        the newest checkpoint's analysis (confusion, per class, worst, conv1 filters)
    GET  /api/digit/N           test image N, its label, and how the newest checkpoint sees it (feature maps)
    POST /api/predict           a drawn digit -> MNIST-style 28x28 input, ten probabilities, feature maps;
                                body: JSON {"pixels": [784 values in [0,1]]} (a 28x28 drawing), or a PNG of
                                at most 64 KiB and 1024x1024 (bright ink on dark); ?model=newest|best
    ?run=KEY on state, history, checkpoint, digit and predict: that run's (a key from /api/runs), not the
    shown run's
    GET  /api/control           may the page steer the shown run; POST: a control action (dashboard/control.py)
    GET  /api/stream            server-sent events: steps, evaluation, checkpoint (replays from Last-Event-ID)
    GET  /metrics               Prometheus text format

Why Starlette + uvicorn: an ASGI app holds each live stream as a coroutine, not a thread, so fifty open
streams cost fifty small objects on one event loop; Starlette brings routing, static files with path
checks and streaming responses, uvicorn is the reference ASGI server. Errors are JSON with a 4xx status;
bodies are read with a bound; with a token every request needs "Authorization: Bearer TOKEN" (or the
cookie that GET /?token=TOKEN sets, for a browser, whose EventSource cannot send headers). The limits of a
server on a network (header size and read time, connections, a client that stops reading, any exception)
are guard.py's; the live streams' own (how many, how much is replayed) are here.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import io
import json
import logging
import socket
import threading
import time
import warnings
from pathlib import Path

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from lenet_dist.dashboard import control, guard
from lenet_dist.dashboard.metrics import metrics_text
from lenet_dist.evaluation import analysis

STATIC = Path(__file__).parent / "static"
MAX_BODY = 64 << 10
MAX_PNG_SIDE = 1024
KEEPALIVE_S = 15.0
COOKIE = "lenet_token"
MAX_STREAMS = 200           # live streams at once (a page holds one); more get a 503
REPLAY_BYTES = 256 << 10    # at most this much is replayed to a client; further behind, it reloads instead
MAX_EVENT_ID = 18           # digits in a Last-Event-ID: ours are counters, never longer


class BadInput(Exception):
    """A request the server refuses; becomes a JSON error with `status`."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


async def _read_body(request):
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise BadInput(f"body over {MAX_BODY} bytes", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise BadInput(f"body over {MAX_BODY} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def drawing_from_body(body, content_type):
    """A predict body -> the drawing as floats in [0, 1] (bright ink), or BadInput naming the fault."""
    if content_type.startswith("image/png"):
        return _png(body)
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise BadInput("body is neither JSON nor a PNG (Content-Type image/png)") from None
    except RecursionError:
        raise BadInput("JSON nested too deep") from None
    pixels = obj.get("pixels") if isinstance(obj, dict) else None
    if not isinstance(pixels, list) or len(pixels) != 784:
        raise BadInput(f'expected {{"pixels": [784 numbers in [0, 1]]}}, got '
                       f'{len(pixels) if isinstance(pixels, list) else type(pixels).__name__} values')
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pixels):
        raise BadInput("pixels must all be numbers")
    a = np.asarray(pixels, np.float64).reshape(28, 28)
    if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
        raise BadInput("pixels must be in [0, 1]")
    return a


def _png(body):
    from PIL import Image, UnidentifiedImageError
    if not body.startswith(b"\x89PNG\r\n\x1a\n"):
        raise BadInput("body is not a PNG")
    try:
        with warnings.catch_warnings():     # a size claimed past Pillow's bomb limit: refused, not a warning
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(body), formats=["PNG"]) as im:
                if max(im.size) > MAX_PNG_SIDE:
                    raise BadInput(f"PNG of {im.size[0]}x{im.size[1]}, more than {MAX_PNG_SIDE} on a side")
                gray = np.asarray(im.convert("L"), np.float64) / 255.0
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadInput(f"PNG too large: {str(e)[:120]}", 413) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise BadInput(f"unreadable PNG: {e}") from None
    return gray


def build_app(state, token=None, closing=None):
    """The Starlette app over `state`. `token`: required of every request when given. `closing`: a
    threading.Event that, once set (and the state's listeners called), ends every live stream."""
    wakers = set()          # one future per live stream waiting for news, resolved on the next change
    closing = closing if closing is not None else threading.Event()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loop = asyncio.get_running_loop()

        def bump():
            for waiter in wakers:
                if not waiter.done():
                    waiter.set_result(None)
            wakers.clear()

        def listener():                     # called on the evaluator's threads
            loop.call_soon_threadsafe(bump)
        state.listeners.append(listener)
        try:
            yield
        finally:
            state.listeners.remove(listener)

    async def index(request):
        given = request.query_params.get("token")
        if token and given is not None:             # a browser's way in: the token once, then a cookie
            if not hmac.compare_digest(given.encode(), token.encode()):
                return _error(401, "wrong token")
            r = RedirectResponse("/", status_code=303)
            r.set_cookie(COOKIE, token, httponly=True, samesite="strict")
            return r
        return FileResponse(STATIC / "index.html")

    def of_run(request, getter, *args):
        """getter(*args, run key) for the request's ?run= (none: the shown run); an unknown run: a 404."""
        key = request.query_params.get("run")
        try:
            return getter(*args, key) if key is not None else getter(*args)
        except KeyError as e:
            raise HTTPException(404, e.args[0]) from None

    async def api_state(request):
        return JSONResponse(of_run(request, state.summary))

    async def api_history(request):
        return Response(of_run(request, state.history_json), media_type="application/json")

    async def api_runs(request):
        return JSONResponse(state.runs())

    async def api_checkpoint(request):
        ckpt = of_run(request, state.checkpoint)
        if ckpt is None:
            return _error(404, "no checkpoint evaluated yet")
        return JSONResponse(ckpt)

    async def api_digit(request):
        raw = request.path_params["index"]
        if not raw.isdigit():
            return _error(400, f"test image index {raw!r} is not a non-negative integer")
        try:
            u8, label = state.test_digit(int(raw))
        except ValueError as e:
            return _error(404, str(e))
        seen = of_run(request, state.classify, u8, "newest")
        if seen is None:
            return _error(404, "no checkpoint evaluated yet")
        return JSONResponse(dict(seen, index=int(raw), label=label))

    async def api_predict(request):
        t0 = time.perf_counter()
        which = request.query_params.get("model", "newest")
        if which not in ("newest", "best"):
            return _error(400, f"model {which!r}, expected newest or best")
        try:
            drawing = drawing_from_body(await _read_body(request), request.headers.get("content-type", ""))
            u8 = analysis.prepare_digit(drawing)
        except BadInput as e:
            return _error(e.status, str(e))
        except ValueError as e:
            return _error(400, str(e))
        seen = of_run(request, state.classify, u8, which)
        if seen is None:
            return _error(409, "no checkpoint evaluated yet")
        # Server-Timing: the handler's own time, so that a client can tell it from the network and queueing
        return JSONResponse(seen, headers={"Server-Timing": f"handler;dur={1e3 * (time.perf_counter() - t0):.2f}"})

    streams = [0]                           # live streams open now

    async def api_stream(request):
        if streams[0] >= MAX_STREAMS:
            return _error(503, f"{MAX_STREAMS} live streams open already; try again later")
        last = request.headers.get("last-event-id", "")
        # a new client (or a nonsense id) reads the past from /api/history, not from the stream
        start = int(last) if last.isdigit() and len(last) <= MAX_EVENT_ID else state.seq
        other_server = start > state.seq        # an id from a server before a restart: its numbers mean nothing

        async def events():
            loop = asyncio.get_running_loop()
            seq, waiter = start, None
            streams[0] += 1
            try:
                yield b"retry: 1000\n\n"
                if other_server:
                    seq = state.seq
                    yield b"event: reload\ndata: {}\n\n"
                while not closing.is_set():
                    waiter = loop.create_future()               # registered before looking: no news is missed
                    wakers.add(waiter)
                    news = state.events_since(seq)
                    if news:
                        seq = news[-1][0]
                        if sum(len(e[2]) for e in news) > REPLAY_BYTES:
                            yield b"event: reload\ndata: {}\n\n"   # too far behind: the page reloads its history
                        else:
                            for part in _parts(news):           # a slow reader holds back one part at most
                                yield part
                    # a bare future: asyncio.wait makes no task for it (wait_for makes one per call)
                    await asyncio.wait((waiter,), timeout=KEEPALIVE_S)
                    if not waiter.done():
                        yield b": keep-alive\n\n"
                    wakers.discard(waiter)
            finally:
                streams[0] -= 1
                if waiter is not None:
                    wakers.discard(waiter)
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def metrics(request):
        return Response(metrics_text(state), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def internal_error(request, exc):     # the answer; guard.CatchAll writes the one log line
        return _error(500, "internal error")

    async def http_error(request, exc):
        return _error(exc.status_code, exc.detail if isinstance(exc.detail, str) else "error")

    app = Starlette(routes=[
        Route("/", index), Route("/api/state", api_state), Route("/api/history", api_history),
        Route("/api/runs", api_runs), Route("/api/control", control.endpoint, methods=["GET", "POST"]),
        Route("/api/checkpoint", api_checkpoint), Route("/api/digit/{index}", api_digit),
        Route("/api/predict", api_predict, methods=["POST"]), Route("/api/stream", api_stream),
        Route("/metrics", metrics), Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ], exception_handlers={HTTPException: http_error, Exception: internal_error}, lifespan=lifespan)
    return guard.CatchAll(TokenGate(app, token) if token else app)


@functools.lru_cache(maxsize=64)
def _sse(seq, kind, text):
    """One event as the live stream sends it: encoded once for all the clients that are live (the newest
    events; a client replaying older ones after a reconnect has them encoded again). The text is the
    state's own string object, whose hash Python keeps: a lookup does not hash the text again."""
    return f"id: {seq}\nevent: {kind}\ndata: {text}\n\n".encode()


def _parts(events, size=16 << 10):
    """The encoded events, joined into writes of about `size` bytes."""
    part, n = [], 0
    for e in events:
        b = _sse(*e)
        part.append(b)
        n += len(b)
        if n >= size:
            yield b"".join(part)
            part, n = [], 0
    if part:
        yield b"".join(part)


def _error(status, message):
    return JSONResponse({"error": message, "status": status}, status_code=status)


class TokenGate:
    """ASGI middleware: every HTTP request carries the bearer token (header or cookie), else 401 JSON.
    GET /?token=... passes through so that the app can check it and set the cookie."""

    def __init__(self, app, token):
        self.app, self.token = app, token.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not self._allowed(Request(scope)):
            await _error(401, "this dashboard needs a bearer token (see docs/dashboard.md)")(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _allowed(self, request):
        if request.url.path == "/" and "token" in request.query_params:
            return True
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else request.cookies.get(COOKIE, "")
        return hmac.compare_digest(given.encode(), self.token)


def _run(coroutine, loop_factory):
    if loop_factory is None:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coroutine)


def listening_socket(host="127.0.0.1", port=0):
    """A TCP socket bound and listening on (host, port), and its URL. Bound by the caller, so that a busy
    port or a bad host fails at once (OSError) where the flag was given."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    return sock, socket_url(sock)


def socket_url(sock):
    bound = sock.getsockname()
    return f"http://{f'[{bound[0]}]' if sock.family == socket.AF_INET6 else bound[0]}:{bound[1]}"


class DashboardServer:
    """uvicorn serving build_app(state) on a thread, on `sock` (a listening socket) or on a socket bound
    here to (host, port), within guard.Limits; .url is where it listens."""

    def __init__(self, state, host="127.0.0.1", port=0, token=None, sock=None, limits=None):
        import uvicorn
        if sock is None:
            sock, _ = listening_socket(host, port)
        self._sock, self.url = sock, socket_url(sock)
        self._closing, self._state = threading.Event(), state
        self.limits = limits or guard.Limits.for_process()
        config = uvicorn.Config(build_app(state, token, self._closing), log_level="warning", access_log=False,
                                timeout_graceful_shutdown=2, lifespan="on", http=guard.protocol_class(self.limits),
                                timeout_keep_alive=self.limits.keepalive_s, backlog=self.limits.backlog)
        logging.getLogger("uvicorn.error").addFilter(guard.OncePerSecond())
        self._server = uvicorn.Server(config)
        loop_factory = config.get_loop_factory()            # uvloop when installed, as uvicorn.run would
        self._thread = threading.Thread(target=lambda: _run(self._serve(), loop_factory), daemon=True,
                                        name="lenet-dashboard")
        self._thread.start()

    async def _serve(self):
        guard.quiet_loop_errors(asyncio.get_running_loop())
        await self._server.serve(sockets=[self._sock])

    def _listen_queue(self):
        # asyncio listens with its accept batch as the queue; the kernel's queue can be longer
        self._sock.listen(self.limits.listen_queue)

    def wait_started(self, timeout=10.0):
        """True once uvicorn serves (False if it has not after `timeout` seconds, or it died)."""
        end = time.monotonic() + timeout
        while not self._server.started and self._thread.is_alive() and time.monotonic() < end:
            time.sleep(0.02)
        if self._server.started:
            self._listen_queue()
        return self._server.started

    def close(self):
        self._closing.set()                     # the live streams end first: no connection outlives us
        for listener in list(self._state.listeners):
            listener()
        self._server.should_exit = True
        self._thread.join(5)
        self._sock.close()
