"""The trainer's end (rank 0): serves the latest published checkpoint, collects evaluators' results."""
from __future__ import annotations

import os
import secrets
import threading
import time

import zmq
from zmq.utils.monitor import parse_monitor_message

from lenet_dist.ratelimit import Limited
from lenet_dist.transport import served, wire
from lenet_dist.transport.base import _as_log, _FAILED, _monitor, _socket, HANDSHAKE_MS, MAX_WAIT_MS, RESULT_TOPIC, TransportError
from lenet_dist.transport.keys import _authenticator, load_key

class TrainerLink:
    """Rank 0's end: serves the latest published checkpoint, collects the evaluators' results.

    `endpoint` is bound (tcp://127.0.0.1:PORT; port * picks a free one, see .endpoint). `results`: also
    subscribe to an evaluator's ResultsPublisher there (evaluators send results over the checkpoint channel
    anyway). `secret_key` (a .key_secret file) and `authorized` (a folder of clients' .key files) turn on
    CurveZMQ. `log`: a logging.Logger or a callable taking one line. `control`: a control.ControlGate that
    admits "control" requests (none: every one is refused and logged).
    """

    def __init__(self, endpoint, *, results=None, secret_key=None, authorized=None, log=None, control=None):
        self._log = Limited(_as_log(log))
        self._error = _as_log(log, "error")
        self.server_id = secrets.token_hex(4)       # tells clients that the trainer was restarted
        self._lock = threading.Lock()
        self._latest = None                         # the served.Published served; swapped by publish()
        self._trainer_step = None
        self._results = served.Results()
        self._telemetry = served.Telemetry()
        self.control = control
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
        item = served.Published(int(step), int(epoch), data, bool(final))
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

    def best_result(self):
        """The result of the best model so far by lenet_dist.selection (validation figures, then the step)."""
        return self._results.best()

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
        h = wire.none_header(req_id=wire.request_id(req), server=self.server_id, trainer_step=self._trainer_step)
        self._send(sock, ident, dict(h, control=bool(self.control and self.control.allowed)))

    def _op_result(self, sock, ident, req, frame, parked):
        self._take_result(frame, "a client", req)

    def _op_telemetry(self, sock, ident, req, frame, parked):
        since = req.get("since")
        if not (isinstance(since, int) and not isinstance(since, bool) and since >= -1):
            raise wire.BadMessage(f"telemetry since {str(since)[:40]!r}, expected an integer >= -1")
        rows, seq = self._telemetry.after(since)
        self._send(sock, ident, wire.telemetry_header(req_id=wire.request_id(req), server=self.server_id,
                                                       trainer_step=self._trainer_step, rows=rows, seq=seq))

    def _op_control(self, sock, ident, req, frame, parked):
        why = self.control.admit(wire.check_control(req)) if self.control else "control is off on this trainer"
        if why and not self.control:
            self._log(f"refused a control message: {why}")
        h = wire.none_header(req_id=wire.request_id(req), server=self.server_id, trainer_step=self._trainer_step,
                             reason=why)
        self._send(sock, ident, h if why else dict(h, control="queued"))

    _OPS = {"fetch": _op_fetch, "status": _op_status, "result": _op_result,   # op -> handler; add new ops here
            "telemetry": _op_telemetry, "control": _op_control}

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
        # Copied, not zero-copy: pyzmq tracks zero-copy frames over 64 KiB with a context of its own that it
        # starts on the first such send, and under an idle-connection flood that has taken every file
        # descriptor libzmq cannot create that context's epoll and aborts the process. The copy is cheap
        # (docs/reliability.md).
        try:                                        # ROUTER drops, never blocks, on a gone or full peer
            sock.send_multipart(frames, zmq.NOBLOCK, copy=True)
        except zmq.Again:
            pass
