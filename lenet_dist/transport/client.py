"""The evaluator's end: CheckpointClient fetches checkpoints and sends results back; ResultsPublisher
offers the results to any subscriber."""
from __future__ import annotations

import time

import zmq
from zmq.utils.monitor import parse_monitor_message

from lenet_dist.checkpoints.format import MAX_BYTES
from lenet_dist.transport import wire
from lenet_dist.transport.base import _FAILED, _monitor, _socket, MAX_WAIT_MS, RESULT_TOPIC, TransportError
from lenet_dist.transport.keys import load_key, load_key_pair

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
            pair = load_key_pair(secret_key, public_key)
            self._curve = pair + (load_key(server_key),)
        self._ctx = zmq.Context()
        self._sock = self._mon = None
        self._id = 0
        self.server = None
        self.trainer_step = None
        self.control = None                         # does the trainer take control actions (its status reply)
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

    def send_control(self, signed, timeout_ms=2000):
        """A signed control action (control.Signer.sign) -> True when the trainer queued it, None when it did
        not answer in time; wire.BadMessage naming why it refused it."""
        got = self._ask(dict(signed, op="control"), timeout_ms)
        return None if got is None else got[0].get("control") == "queued"

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
                if isinstance(header.get("control"), bool):     # a status reply: does the trainer take control
                    self.control = header["control"]
                self.status = f"connected to trainer at {self.endpoint}" + (" (it restarted)" if restarted else "")
                if header["kind"] == "error":
                    step = header.get("step")
                    raise wire.BadMessage(f"trainer refused: {header.get('reason')}",
                                          step if isinstance(step, int) and not isinstance(step, bool) else None)
                return header, body


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
