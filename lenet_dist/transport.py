"""Checkpoint bytes over ZeroMQ, trainer side and evaluator side. The only module that imports zmq.

    trainer, rank 0                                          evaluator
    TrainerLink (bind)    ROUTER <- fetch {newer_than S, wait_ms T} -- DEALER  CheckpointClient (connect)
                                 -- [header, .npz bytes] | [none] ->
                                 <- result {step, accuracy, loss..} --        (its figures; no reply)
                     SUB (optional) <-- results ---------------------- PUB     ResultsPublisher (bind)

Latest value with long polling: publish() only swaps a reference under a lock; a background thread owns
the socket and answers each fetch with the newest checkpoint past step S at once, or parks the request
until one is published or T ms have passed. So training never waits for an evaluator, and a busy
evaluator simply asks again when it is ready and gets the newest, skipping whatever it missed.
Either side may restart: the client gives up on a request after T ms plus a grace period (at once if
the connection drops) and reconnects with a fresh socket, the "lazy pirate" pattern of the zguide.

Wire format and its checks: wire.py. Every receiving socket has ZMQ_MAXMSGSIZE; nothing is unpickled.
CurveZMQ (opt-in): the trainer has a key pair and admits only clients whose public key is in a folder
(zmq.auth ThreadAuthenticator); a client presents its key pair and the trainer's public key. Results on
the ResultsPublisher PUB socket are not encrypted (figures only, no model data; loopback by default);
the copy each evaluator sends the trainer travels on the checkpoint channel, authenticated.
"""
from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import parse_monitor_message

from . import wire
from .checkpoint import MAX_BYTES

RESULT_TOPIC = b"lenet-result"
MAX_WAIT_MS = 60_000            # the longest a fetch may be parked
HANDSHAKE_MS = 5_000            # a peer that has not completed the ZMTP handshake by then is dropped (it holds
                                # a file descriptor; libzmq's default waits 30 s)
_FAILED = {zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused our CurveZMQ key (is it in the trainer's authorized folder?)",
           zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake failed (wrong server key, or CurveZMQ on one side only?)",
           zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed (wrong server key, or CurveZMQ on one side only?)"}


class TransportError(Exception):
    """A setup problem (cannot bind, unreadable key file); the message is one line."""


# ------------------------------------------------------------------------------------------ CurveZMQ keys

def generate_keys(directory, name, *, overwrite=False):
    """Write NAME.key (public) and NAME.key_secret (the pair, mode 0600) into `directory`; their paths."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    existing = [p for p in (d / f"{name}.key", d / f"{name}.key_secret") if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; not overwriting a key")
    old = os.umask(0o077)                           # the secret file is never readable by others
    try:
        public, secret = zmq.auth.create_certificates(str(d), name)
    finally:
        os.umask(old)
    os.chmod(public, 0o644)
    return Path(public), Path(secret)


def load_key(path, *, secret=False):
    """The z85 public key of a .key or .key_secret file; with secret=True, (public, secret) from the latter."""
    try:
        public, secret_key = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise TransportError(f"{path}: not a readable CurveZMQ key file: {e}") from None
    if secret and not secret_key:
        raise TransportError(f"{path}: holds no secret key (give the .key_secret file)")
    return (public, secret_key) if secret else public


def _authenticator(ctx, folder):
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.glob("*.key")):
        raise TransportError(f"{folder}: no public keys (*.key) there, so no client could connect")
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("lenet.zmq.auth"))
    auth.start()
    auth.configure_curve(domain="*", location=str(folder))   # read once: restart to admit new keys
    return auth


# ---------------------------------------------------------------------------------------------- helpers

def _socket(ctx, kind, max_bytes):
    s = ctx.socket(kind)
    s.linger = 0
    s.maxmsgsize = max_bytes        # per frame: a bigger one drops the connection before it is buffered
    return s


def _as_log(log, level="warning"):
    if log is None:
        log = logging.getLogger("lenet.transport")
    return getattr(log, level) if isinstance(log, logging.Logger) else log


def _monitor(sock):
    events = zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
    for e in _FAILED:
        events |= e
    return sock.get_monitor_socket(events)


# ----------------------------------------------------------------------------------------- trainer side

class TrainerLink:
    """Rank 0's end: serves the latest published checkpoint, collects the evaluators' results.

    `endpoint` is bound (tcp://127.0.0.1:PORT; port * picks a free one, see .endpoint). `results`: also
    subscribe to an evaluator's ResultsPublisher there (evaluators send results over the checkpoint channel
    anyway). `secret_key` (a .key_secret file) and `authorized` (a folder of clients' .key files) turn on
    CurveZMQ. `log`: a logging.Logger or a callable taking one line.
    """

    def __init__(self, endpoint, *, results=None, secret_key=None, authorized=None, log=None):
        self._log = wire.Limited(_as_log(log))
        self._error = _as_log(log, "error")
        self.server_id = secrets.token_hex(4)       # tells clients that the trainer was restarted
        self._lock = threading.Lock()
        self._latest = None                         # the wire.Published served; swapped by publish()
        self._trainer_step = None
        self._results = wire.Results()
        self._telemetry = wire.Telemetry()
        self._stop = threading.Event()
        self._waiting = 0                           # parked requests; written by the server thread only
        self.requests_seen = 0                      # any evaluator asked at all? (trainer's final wait)
        self.refused = 0                            # requests and results refused as malformed or forged
        self.dropped = 0                            # requests that failed in an unforeseen way, dropped
        self.failed = None                          # why the server thread ended, if it did on its own
        self._wake_r, self._wake_w = os.pipe()      # publish() -> server thread: "look again"
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._ctx = zmq.Context()
        self._auth = None
        try:
            if bool(secret_key) != bool(authorized):
                raise TransportError("CurveZMQ needs both a secret key file and a folder of authorized keys")
            sock = _socket(self._ctx, zmq.ROUTER, wire.MAX_HEADER)
            sock.sndhwm = 100                       # queued replies share the published bytes (zero copy)
            sock.handshake_ivl = HANDSHAKE_MS
            if secret_key:
                self._auth = _authenticator(self._ctx, authorized)
                sock.curve_publickey, sock.curve_secretkey = load_key(secret_key, secret=True)
                sock.curve_server = True
            try:
                sock.bind(endpoint)
            except zmq.ZMQError as e:
                raise TransportError(f"cannot bind {endpoint}: {e}") from None
            self.endpoint = sock.last_endpoint.decode()
            self.results_endpoint = results
            sub = None
            if results:
                sub = _socket(self._ctx, zmq.SUB, wire.MAX_HEADER)
                sub.subscribe(RESULT_TOPIC)
                sub.connect(results)
            mon = _monitor(sock)
        except BaseException:
            self._teardown()
            raise
        self._thread = threading.Thread(target=self._serve, args=(sock, sub, mon), daemon=True,
                                        name="lenet-checkpoint-server")
        self._thread.start()

    # ---- called by the training loop: none of these touches the network or waits for it
    def publish(self, step, epoch, data, final=False):
        """Serve `data` (the bytes of checkpoint.to_bytes, kept by reference) from now on."""
        if not isinstance(data, bytes):
            raise TypeError(f"publish() takes the bytes of checkpoint.to_bytes, got {type(data).__name__}")
        item = wire.Published(int(step), int(epoch), data, bool(final))
        with self._lock:
            self._latest = item
            self._trainer_step = max(self._trainer_step or 0, item.step)
        if self._waiting:                           # wake the server thread only if a client is parked
            self._wake()

    def progress(self, step):
        """Optional: the trainer's current step, so that evaluators' lag counts steps not yet published."""
        with self._lock:
            self._trainer_step = max(self._trainer_step or 0, int(step))

    def telemetry(self, row):
        """Keep a step row (a JSON-able dict with an integer step) for evaluators that ask for telemetry."""
        self._telemetry.add(row)

    def poll_results(self):
        """The evaluators' result dicts that arrived since the last call, oldest first."""
        return self._results.take()

    def latest_result(self):
        """The result for the highest step evaluated so far (a dict: step, epoch, accuracy, loss, ...)."""
        return self._results.latest()

    def wait_final(self, step, timeout, stop=None):
        """After training: keep serving until an evaluator reports on `step` (returns its result) or
        `timeout` seconds pass (returns None), the window in which a late evaluator can still fetch the
        final checkpoint. `stop()` returning true ends the wait early."""
        return self._results.wait_for(step, timeout, stop)

    def close(self):
        if not self._stop.is_set():
            self._stop.set()
            self._wake()
            self._thread.join(5)
        self._teardown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _wake(self):
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:
            pass                                    # the pipe is full: a wake-up is pending anyway

    def _teardown(self):
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if not self._ctx.closed:
            self._ctx.destroy(linger=0)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    # ---- the server thread: owns the sockets
    def _serve(self, sock, sub, mon):
        poller = zmq.Poller()
        for s in (sock, self._wake_r, mon) + ((sub,) if sub is not None else ()):
            poller.register(s, zmq.POLLIN)
        parked = {}                                 # client identity -> (request, deadline)
        try:
            while not self._stop.is_set():
                try:
                    soonest = min((d for _, d in parked.values()), default=time.monotonic() + 1.0)
                    events = dict(poller.poll(max(0.0, soonest - time.monotonic()) * 1000 + 1))
                    if self._wake_r in events:
                        os.read(self._wake_r, 4096)  # pending wake-ups: one look covers them all
                    if mon in events:
                        self._client_event(mon)
                    if sock in events:
                        self._take_requests(sock, parked)
                    if sub is not None and sub in events:
                        for _ in range(100):
                            try:
                                frames = sub.recv_multipart(zmq.NOBLOCK)
                            except zmq.Again:
                                break
                            self._take_result(frames[-1], "results socket")
                    self._answer(sock, parked)
                    self._waiting = len(parked)
                except zmq.ZMQError as e:
                    if self._stop.is_set():
                        break
                    self._log(f"checkpoint server: {e}")
                    time.sleep(0.1)
        except BaseException as e:  # noqa: BLE001 - say so at once, and stop claiming to serve
            self.failed = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            self._error(f"checkpoint server on {self.endpoint} stopped: {self.failed}; checkpoints are no "
                        f"longer served (training goes on)")
            self._results.close()
        finally:
            sock.disable_monitor()
            for s in (mon, sock, sub):
                if s is not None:
                    s.close(0)

    def _client_event(self, mon):
        event = parse_monitor_message(mon.recv_multipart())["event"]
        if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            self._log(f"dropped a peer on {self.endpoint}: no complete handshake within {HANDSHAKE_MS // 1000} s "
                      f"(an idle connection, or CurveZMQ on one side only)")
        elif event in _FAILED:
            self._log(f"refused a client on {self.endpoint}: CurveZMQ handshake failed ({zmq.Event(event).name})")

    def _take_requests(self, sock, parked):
        for _ in range(100):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.requests_seen += 1
            try:
                self._handle(sock, frames[0], frames[1:], parked)
            except Exception as e:  # noqa: BLE001 - no message may end the server loop: drop it, count it
                self.dropped += 1
                self._log(f"dropped a request that could not be handled: {type(e).__name__}: {e}"[:300])

    def _handle(self, sock, ident, body, parked):
        """One request: answered, parked, taken (a result) or refused with an error reply naming why."""
        req = {}
        try:
            if len(body) != 1:
                raise wire.BadMessage(f"request of {len(body)} frames, expected 1")
            req = wire.decode_object(body[0], "request")
            op = req.get("op")
            handler = self._OPS.get(op) if isinstance(op, str) else None
            if handler is None:
                raise wire.BadMessage(f"request op {str(req.get('op'))[:40]!r}, expected {', '.join(self._OPS)}")
            handler(self, sock, ident, req, body[0], parked)
        except wire.BadMessage as e:
            self.refused += 1
            self._log(f"bad request from a client: {e}")
            self._send(sock, ident, wire.none_header(req_id=wire.request_id(req), server=self.server_id,
                                                      trainer_step=self._trainer_step, reason=str(e)))

    def _op_fetch(self, sock, ident, req, frame, parked):
        req = wire.check_fetch(req, MAX_WAIT_MS)
        parked[ident] = (dict(req, id=wire.request_id(req)), time.monotonic() + req["wait_ms"] / 1000)
        self._waiting = len(parked)                 # before _answer reads _latest: no wake-up is missed

    def _op_status(self, sock, ident, req, frame, parked):
        self._send(sock, ident, wire.none_header(req_id=wire.request_id(req), server=self.server_id,
                                                  trainer_step=self._trainer_step))

    def _op_result(self, sock, ident, req, frame, parked):
        self._take_result(frame, "a client", req)

    def _op_telemetry(self, sock, ident, req, frame, parked):
        since = req.get("since")
        if not (isinstance(since, int) and not isinstance(since, bool) and since >= -1):
            raise wire.BadMessage(f"telemetry since {str(since)[:40]!r}, expected an integer >= -1")
        rows, seq = self._telemetry.after(since)
        self._send(sock, ident, wire.telemetry_header(req_id=wire.request_id(req), server=self.server_id,
                                                       trainer_step=self._trainer_step, rows=rows, seq=seq))

    _OPS = {"fetch": _op_fetch, "status": _op_status, "result": _op_result,   # op -> handler; add new ops here
            "telemetry": _op_telemetry}

    def _take_result(self, frame, where, envelope=None):
        try:
            envelope = envelope if envelope is not None else wire.decode_object(frame, "result message")
            result = envelope.get("result")
            if isinstance(result, dict) and result.get("server") not in (None, self.server_id):
                return                              # about an earlier trainer on this port: not ours
            self._results.add(envelope)
        except wire.BadMessage as e:
            self.refused += 1
            self._log(f"refused a result from {where}: {e}")

    def _answer(self, sock, parked):
        with self._lock:
            item, trainer_step = self._latest, self._trainer_step
        now = time.monotonic()
        for ident, (req, deadline) in list(parked.items()):
            if item is not None and item.answers(req):
                header, data = item.reply(req, self.server_id, trainer_step)
                if data is not None:
                    self._results.served(header["step"], header["sha256"])
                self._send(sock, ident, header, data)
            elif now >= deadline:
                self._send(sock, ident, wire.none_header(req_id=req["id"], server=self.server_id,
                                                          trainer_step=trainer_step))
            else:
                continue
            del parked[ident]

    def _send(self, sock, ident, header, data=None):
        frames = [ident, wire.encode(header)] + ([data] if data is not None else [])
        try:                                        # ROUTER drops, never blocks, on a gone or full peer
            sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            pass


# --------------------------------------------------------------------------------------- evaluator side

class CheckpointClient:
    """The evaluator's end: fetches checkpoints from a TrainerLink, sends results back.

    CurveZMQ: `secret_key` (this client's .key_secret file; `public_key` may name its .key file, which
    must match) and `server_key` (the trainer's .key file). `max_bytes` bounds every received frame.
    .status is a line saying how the connection stands; .trainer_step the trainer's step as last heard.
    `interrupted()` returning true cuts a wait short (checked every 0.2 s).
    """

    def __init__(self, endpoint, *, secret_key=None, public_key=None, server_key=None, max_bytes=MAX_BYTES,
                 grace_ms=500, interrupted=None):
        self.endpoint = endpoint
        self.interrupted = interrupted              # a callable: true ends a wait early (a signal came)
        self.max_bytes = max_bytes
        self.grace_ms = grace_ms
        self._curve = None
        if secret_key or server_key:
            if not (secret_key and server_key):
                raise TransportError("CurveZMQ needs both our secret key file and the trainer's public key file")
            pair = load_key(secret_key, secret=True)
            if public_key and load_key(public_key) != pair[0]:
                raise TransportError(f"{public_key} is not the public half of {secret_key}")
            self._curve = pair + (load_key(server_key),)
        self._ctx = zmq.Context()
        self._sock = self._mon = None
        self._id = 0
        self.server = None
        self.trainer_step = None
        self.status = f"connecting to {endpoint}"
        try:
            self._open()                            # a malformed endpoint fails here, not later
        except zmq.ZMQError as e:
            self._ctx.destroy(linger=0)
            raise TransportError(f"cannot connect to {endpoint}: {e}") from None

    def fetch_newer(self, than_step, timeout_ms, *, seen_final=False):
        """The newest checkpoint with step > than_step (or == than_step and final, unless seen_final),
        as (header, bytes), waiting up to timeout_ms for one to be published; None if none came (or the
        trainer is unreachable: see .status). Raises wire.BadMessage for a reply that breaks the format."""
        req = {"op": "fetch", "newer_than": int(than_step), "seen_final": bool(seen_final),
               "wait_ms": int(min(timeout_ms, MAX_WAIT_MS)), "max_bytes": self.max_bytes}
        got = self._ask(req, timeout_ms + self.grace_ms)
        if got is None or got[0]["kind"] == "none":
            return None
        return got

    def trainer_step_now(self, timeout_ms=300):
        """Ask the trainer for its current step; the last one heard if it does not answer in time."""
        try:
            self._ask({"op": "status"}, timeout_ms)
        except wire.BadMessage:
            pass
        return self.trainer_step

    def fetch_telemetry(self, since, timeout_ms=500):
        """(rows, seq): the trainer's step rows after telemetry seq `since` (-1: from the oldest it keeps);
        None if the trainer does not answer in time. A trainer that restarted numbers its rows afresh:
        a seq below `since` means "start again from -1"."""
        got = self._ask({"op": "telemetry", "since": int(since)}, timeout_ms)
        if got is None or got[0]["kind"] != "telemetry":
            return None
        return got[0]["rows"], got[0]["seq"]

    def send_result(self, result):
        """Best effort: the trainer logs it; lost if the trainer is away."""
        try:
            self._open().send(wire.encode({"proto": wire.PROTO, "version": wire.VERSION, "op": "result",
                                           "result": result}), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def close(self):
        self._reset(self.status)
        self._ctx.destroy(linger=0)

    def _open(self):
        if self._sock is None:
            s = _socket(self._ctx, zmq.DEALER, max(self.max_bytes, wire.MAX_HEADER))
            if self._curve:
                s.curve_publickey, s.curve_secretkey, s.curve_serverkey = self._curve
            self._mon = _monitor(s)
            s.connect(self.endpoint)
            self._sock = s
        return self._sock

    def _reset(self, status):
        """Lazy pirate: drop the socket (and any reply still owed to it); the next call reconnects."""
        self.status = status
        if self._sock is not None:
            self._sock.disable_monitor()
            self._mon.close(0)
            self._sock.close(0)
            self._sock = self._mon = None

    def _ask(self, req, wait_ms):
        sock = self._open()
        self._id += 1
        req = dict(req, proto=wire.PROTO, version=wire.VERSION, id=self._id)
        try:
            sock.send(wire.encode(req), zmq.NOBLOCK)
        except zmq.Again:
            self._reset(f"cannot send to {self.endpoint}: queue full")
            return None
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._mon, zmq.POLLIN)
        deadline = time.monotonic() + wait_ms / 1000
        failure = None                                  # a handshake failure seen while waiting
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._reset(f"trainer at {self.endpoint} {failure}" if failure else
                            f"no reply from {self.endpoint} (trainer not running?)")
                return None
            events = dict(poller.poll(min(left, 0.2) * 1000 + 1))    # slices, to notice interrupted()
            if self.interrupted is not None and self.interrupted():
                return None                             # a late reply is recognised by its id and dropped
            if self._mon in events:
                event = parse_monitor_message(self._mon.recv_multipart())["event"]
                failure = _FAILED.get(event, failure)
                if event == zmq.EVENT_DISCONNECTED:     # our request died with the connection
                    self._reset(f"trainer at {self.endpoint} {failure}" if failure else
                                f"connection to {self.endpoint} dropped while waiting for a reply: the "
                                f"trainer stopped, or it sent a frame over our {self.max_bytes}-byte limit")
                    time.sleep(min(left, 0.2))          # no hot loop against a peer that keeps dropping us
                    return None
            if sock in events:
                header, body = wire.parse_reply(sock.recv_multipart(), self.max_bytes)
                if header.get("id") != self._id:
                    continue                            # a late answer to an earlier request
                restarted = self.server is not None and header["server"] != self.server
                self.server, self.trainer_step = header["server"], header["trainer_step"]
                self.status = f"connected to trainer at {self.endpoint}" + (" (it restarted)" if restarted else "")
                if header["kind"] == "error":
                    step = header.get("step")
                    raise wire.BadMessage(f"trainer refused: {header.get('reason')}",
                                          step if isinstance(step, int) and not isinstance(step, bool) else None)
                return header, body


# ------------------------------------------------------------------------------------------ results PUB

class ResultsPublisher:
    """The evaluator's results for anyone who subscribes (topic RESULT_TOPIC, frames [topic, JSON])."""

    def __init__(self, endpoint):
        self._ctx = zmq.Context()
        self._sock = _socket(self._ctx, zmq.PUB, wire.MAX_HEADER)
        self._sock.sndhwm = 100
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError as e:
            self._ctx.destroy(linger=0)
            raise TransportError(f"cannot bind {endpoint}: {e}") from None
        self.endpoint = self._sock.last_endpoint.decode()

    def publish(self, result):
        msg = wire.encode({"proto": wire.PROTO, "version": wire.VERSION, "op": "result", "result": result})
        try:
            self._sock.send_multipart([RESULT_TOPIC, msg], zmq.NOBLOCK)
        except zmq.Again:
            pass

    def close(self):
        self._ctx.destroy(linger=0)
