"""/healthz and /readyz for an orchestrator's probes (Kubernetes, systemd, a load balancer), on a port of
their own and with the standard library only, so they need no dashboard extra:

    GET /healthz    200 while the evaluator's loop turns (it beats at least every --poll-ms, and after each
                    evaluation); 503 once it has not for LIVENESS_S: a stuck process, to be restarted
    GET /readyz     200 once the data is loaded and checkpoints are being evaluated or awaited; 503 before
                    (loading data, connecting) and once it is stopping
    JSON bodies: {"status": ..., "why": ..., "evaluations": N, "last_step": S, "heartbeat_age_s": x}
    GET /metrics    Prometheus' text format (evaluation/metrics.py), when the evaluator gives a source of it

lenet-train --metrics-port serves its /healthz, /readyz and /metrics with the same server
(run/prometheus.py): alive while its steps go on, ready while it trains.

Each connection gets a thread of its own, at most MAX_CLIENTS at once (others are closed at once), and a
5 s socket timeout, so a slow or hostile client cannot hold the probes off for long.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from lenet_dist.exposition import CONTENT_TYPE

LIVENESS_S = 300.0
MAX_CLIENTS = 32


class Health:
    """What the probes report, set by the evaluator's process and loop (thread-safe: plain assignments)."""

    def __init__(self):
        self.why = "starting"               # why not ready; None once ready
        self.heartbeat = time.monotonic()
        self.evaluations = 0
        self.last_step = None

    def not_ready(self, why):
        self.why = why

    def ready(self):
        self.why = None

    def beat(self):
        self.heartbeat = time.monotonic()

    def evaluated(self, step):
        self.evaluations += 1
        self.last_step = step
        self.beat()

    def report(self):
        age = time.monotonic() - self.heartbeat
        return {"alive": age < LIVENESS_S, "ready": self.why is None, "why": self.why,
                "evaluations": self.evaluations, "last_step": self.last_step, "heartbeat_age_s": round(age, 3)}


class HealthServer:
    """The probes' HTTP listener on (host, port) (port 0: a free one; .port says which)."""

    def __init__(self, health, host="127.0.0.1", port=0, metrics=None):
        """metrics: a callable returning /metrics' text (None: no /metrics)."""
        slots = threading.BoundedSemaphore(MAX_CLIENTS)

        class Handler(BaseHTTPRequestHandler):
            timeout = 5.0

            def do_GET(self):
                r = health.report()
                if self.path == "/healthz":
                    ok, status = r["alive"], "alive" if r["alive"] else "stuck"
                elif self.path == "/readyz":
                    ok, status = r["ready"] and r["alive"], "ready" if r["ready"] else "not ready"
                elif self.path == "/metrics" and metrics is not None:
                    self._send(200, metrics().encode(), CONTENT_TYPE)
                    return
                else:
                    self._send(404, {"error": f"no {self.path[:60]!r} here: /healthz, /readyz or /metrics"})
                    return
                self._send(200 if ok else 503, dict(r, status=status))

            def _send(self, code, body, kind="application/json"):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):   # probes every few seconds: not the log's business
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 64

            def process_request(self, request, client_address):
                if not slots.acquire(blocking=False):
                    self.shutdown_request(request)          # full: close at once, never queue a thread
                    return
                super().process_request(request, client_address)

            def process_request_thread(self, request, client_address):
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    slots.release()

            def handle_error(self, request, client_address):
                pass                                        # a client that vanished mid-answer: nothing to say

        if ":" in host:
            Server.address_family = socket.AF_INET6
        self._server = Server((host, port), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        daemon=True, name="lenet-health")
        self._thread.start()

    def close(self):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
