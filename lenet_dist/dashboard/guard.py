"""The dashboard's limits as a network server, enforced where uvicorn has none: its HTTP protocol (httptools)
with a header-size limit, a request-read timeout, a connection cap with eviction, a small write buffer and
the drop of a client that stops reading; and the catch-all that turns any exception into a one-line log
and a JSON 500. The figures are chosen and measured in docs/reliability.md.

    Limits.for_process()            the caps for this process's open-files limit
    protocol_class(limits)          a uvicorn HttpToolsProtocol subclass enforcing them (Config(http=...))
    CatchAll(app)                   ASGI: an exception in a handler is one log line and a 500, no traceback
    quiet_loop_errors(loop)         asyncio's own errors (an accept that failed) as one line each
    OncePerSecond                   a logging filter for uvicorn's own warnings under a flood
"""
from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from lenet_dist.ratelimit import Limited

log = logging.getLogger("lenet.dashboard")


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int = 16 << 10        # request line and headers together (nginx: 1 KB + 4 x 8 KB)
    read_timeout_s: float = 10.0            # from a request's first byte (or the connection) to its last
    keepalive_s: float = 5.0                # idle between two requests on one connection
    max_connections: int = 900              # open at once; beyond it the oldest idle or unfinished one goes
    write_buffer: int = 16 << 10            # bytes queued per client before its sender waits
    send_stall_s: float = 10.0              # a client whose queue does not move this long is dropped
    reserve_fds: int = 64                   # descriptors for all else: files, pipes, the log
    backlog: int = 128                      # how many connections asyncio accepts in one loop turn
    listen_queue: int = 4096                # the kernel's queue of connections not yet accepted: a burst
                                            # waits there instead of its SYNs being dropped (1 s retries)

    @classmethod
    def for_process(cls, **kw):
        """Limits whose connection cap stays well below this process's open-files limit: at the cap new
        clients still get in (old idle ones are closed), and accept() does not fail for lack of descriptors
        although asyncio accepts up to `backlog` connections a loop turn before any of them is seen."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY:
            kw.setdefault("max_connections", max(16, min(cls.max_connections, (soft - cls.reserve_fds) // 2)))
        return cls(**kw)


def protocol_class(limits: Limits):
    """HttpToolsProtocol with `limits` (one class per server: uvicorn's Config takes a class)."""

    class Guarded(_Guarded):
        LIMITS = limits
    return Guarded


class _Guarded(HttpToolsProtocol):
    LIMITS = Limits()

    def connection_made(self, transport):
        super().connection_made(transport)
        lim = self.LIMITS
        self.born = time.monotonic()
        self.reading_head = True                # before a request's headers are complete
        self.head_bytes = 0
        self.read_timer = self.loop.call_later(lim.read_timeout_s, self._read_timeout)
        self.buffered, self.moved_at = 0, time.monotonic()
        transport.set_write_buffer_limits(high=lim.write_buffer)
        _Sweeper.ensure(self.loop, self.connections, lim)
        if len(self.connections) > lim.max_connections:
            _evict(self.connections, self, lim.max_connections)

    def connection_lost(self, exc):
        self._cancel_read_timer()
        super().connection_lost(exc)

    def data_received(self, data):
        if self.reading_head:
            self.head_bytes += len(data)        # an over-count when the body came along: checked after parsing
            if self.read_timer is None:         # the first bytes of a next request on a kept-alive connection
                self.read_timer = self.loop.call_later(self.LIMITS.read_timeout_s, self._read_timeout)
        super().data_received(data)
        if self.reading_head and self.head_bytes > self.LIMITS.max_header_bytes:
            self._refuse(431, "request headers too large")

    def on_headers_complete(self):
        self.reading_head = False
        super().on_headers_complete()

    def on_message_complete(self):
        self._cancel_read_timer()
        self.reading_head, self.head_bytes = True, 0     # what comes next is the next request's
        super().on_message_complete()

    def is_idle(self):
        """Nothing in progress: no request being read or answered (kept alive, or never spoke)."""
        return self.cycle is None or self.cycle.response_complete

    def _cancel_read_timer(self):
        if self.read_timer is not None:
            self.read_timer.cancel()
            self.read_timer = None

    def _read_timeout(self):
        self.read_timer = None                  # it runs only while a request is being received
        self._refuse(408, "request not received in time")

    def _refuse(self, status, message):
        self._cancel_read_timer()
        if self.transport.is_closing():
            return
        started = self.cycle is not None and self.cycle.response_started
        if not started:
            body = json.dumps({"error": message, "status": status}).encode()
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                                 b"connection: close\r\n\r\n" % (status, message.encode(), len(body)) + body)
        self.transport.close()
        self.parser = _NullParser()             # whatever else arrives is not parsed any more


class _NullParser:
    def feed_data(self, data):
        pass

    def should_upgrade(self):
        return False


def _evict(connections, newcomer, cap):
    """Over the cap: close connections that hold a slot for nothing until a tenth of the cap is free, else
    the newcomer. First those idle after an answer, then those with a request half sent, then those that
    never sent a byte (a legitimate client's request is one packet, often not yet read in a burst), oldest
    first in each. Closed ones count until asyncio has let them go: they are not counted twice."""
    open_now = [c for c in connections if isinstance(c, _Guarded) and not c.transport.is_closing()]
    excess = len(open_now) - (cap - cap // 10)
    if len(open_now) <= cap or excess <= 0:
        return

    def rank(c):
        if c.cycle is not None and c.cycle.response_complete and c.head_bytes == 0:
            return 0
        return 1 if c.head_bytes else 2
    victims = sorted((c for c in open_now if c is not newcomer and (c.is_idle() or c.reading_head)),
                     key=lambda c: (rank(c), c.born))
    for victim in victims[:excess] or [newcomer]:
        victim.transport.abort()


class _Sweeper:
    """Once a second: drop the clients whose write queue has not moved for send_stall_s (they stopped
    reading); their senders, waiting for room, are released by the disconnect."""

    _loops = {}

    @classmethod
    def ensure(cls, loop, connections, limits):
        if loop not in cls._loops:
            cls._loops[loop] = loop.create_task(cls._run(connections, limits))

    @staticmethod
    async def _run(connections, limits):
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for c in list(connections):
                t = getattr(c, "transport", None)
                if t is None or t.is_closing() or not isinstance(c, _Guarded):
                    continue
                size = t.get_write_buffer_size()
                if size == 0 or size < c.buffered:
                    c.moved_at = now
                elif now - c.moved_at > limits.send_stall_s:
                    t.abort()
                c.buffered = size


class CatchAll:
    """ASGI middleware: any exception below becomes one log line (the request and the error, no traceback)
    and a JSON 500 if no response has started; a started one is cut off. The server goes on."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        started = False

        async def tracked(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)
        try:
            await self.app(scope, receive, tracked)
        except Exception as e:                  # a bug or a hostile input we did not foresee
            if scope["type"] == "lifespan":
                raise
            log.error("%s %s: %s: %s", scope.get("method", ""), scope.get("path", ""), type(e).__name__,
                      str(e).splitlines()[0][:200] if str(e) else "")
            if not started:
                body = b'{"error": "internal error", "status": 500}'
                await send({"type": "http.response.start", "status": 500,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": body})


def quiet_loop_errors(loop):
    """asyncio's unhandled errors (an accept() that failed, a callback that raised) as one line each, and
    at most one a second of each kind."""
    limited = Limited(lambda line: log.error("%s", line), every=1.0)

    def handler(loop, context):
        exc = context.get("exception")
        message = context.get("message", "event loop error")
        limited(message + (f": {type(exc).__name__}: {exc}" if exc is not None else ""), key=message)
    loop.set_exception_handler(handler)


class OncePerSecond(logging.Filter):
    """A logging filter: each message template at most once a second (uvicorn's warnings under a flood)."""

    def __init__(self):
        super().__init__()
        self.limited = Limited(None, every=1.0)

    def filter(self, record):
        return self.limited.allow(record.msg) is not None
