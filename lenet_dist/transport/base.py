"""What both ends of the transport share: the error type, socket helpers, constants."""
from __future__ import annotations

import logging

import zmq

RESULT_TOPIC = b"lenet-result"
MAX_WAIT_MS = 60_000            # the longest a fetch may be parked
HANDSHAKE_MS = 5_000            # a peer that has not completed the ZMTP handshake by then is dropped (it holds
                                # a file descriptor; libzmq's default waits 30 s)
_FAILED = {zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused our CurveZMQ key (is it in the trainer's authorized folder?)",
           zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake failed (wrong server key, or CurveZMQ on one side only?)",
           zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed (wrong server key, or CurveZMQ on one side only?)"}


class TransportError(Exception):
    """A setup problem (cannot bind, unreadable key file); the message is one line."""


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
