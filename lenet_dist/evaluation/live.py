"""The evaluator's live outputs: the web dashboard (--http), TensorBoard (--tensorboard) and the trainer's
step telemetry that feeds them. workers/evaluator.py calls three hooks: add_arguments, start, and the
returned Live's on_evaluation / close.

    lenet-evaluator --connect tcp://127.0.0.1:5555 --http 127.0.0.1:8080          # then open the URL
    lenet-evaluator --connect tcp://trainer:5555 --http 0.0.0.0:8080 --http-token-file token.txt
"""
from __future__ import annotations

import importlib.util
import ipaddress
import logging
import sys
import threading
from pathlib import Path

from lenet_dist.files import read_regular

log = logging.getLogger("lenet.evaluator")

TELEMETRY_POLL_S = 0.5


def add_arguments(p):
    g = p.add_argument_group("dashboard and TensorBoard")
    g.add_argument("--http", metavar="[HOST:]PORT",
                   help="serve the live dashboard here (host 127.0.0.1 unless given; 0 picks a free port)")
    g.add_argument("--http-token-file", type=Path, metavar="FILE",
                   help="every HTTP request must carry this file's token (Authorization: Bearer TOKEN)")
    g.add_argument("--http-no-token", action="store_true",
                   help="allow --http on a non-loopback address without --http-token-file (anyone who can "
                        "reach the port sees the run and can query the model)")
    g.add_argument("--tensorboard", type=Path, metavar="DIR",
                   help="write TensorBoard event files (scalars, the confusion matrix) under DIR/evaluator")


def check_args(p, args):
    """Parse --http into (host, port) and read the token; p.error on a bad value."""
    args.http_address, args.http_token = None, None
    for flag, modules, extra in (("http", ("starlette", "uvicorn", "prometheus_client", "PIL"), "dashboard"),
                                 ("tensorboard", ("tensorboardX",), "tensorboard")):
        if getattr(args, flag) and not all(importlib.util.find_spec(m) for m in modules):
            p.error(f"--{flag} needs the {extra} extra: pip install 'lenet-dist[{extra}]'")
    if args.http_token_file and not args.http:
        p.error("--http-token-file needs --http")
    if args.http:
        host, _, port = args.http.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        if not port.isdigit() or not 0 <= int(port) <= 65535:
            p.error(f"--http {args.http!r}: expected [HOST:]PORT with a port in [0, 65535]")
        args.http_address = (host, int(port))
        if not args.http_token_file and not _loopback(host):
            if not args.http_no_token:
                p.error(f"--http {args.http}: a non-loopback address needs --http-token-file (or --http-no-token "
                        f"to serve it to anyone who can reach it)")
            print(f"lenet-evaluator: warning: --http {args.http} without a token: anyone who can reach this port "
                  f"sees the run and can query the model", file=sys.stderr)
    if args.http_token_file:
        try:
            token = read_regular(args.http_token_file, 4096).decode("utf-8", "replace").strip()
        except OSError as e:
            p.error(f"--http-token-file {e.strerror or e}")
        if len(token) < 16 or any(c.isspace() for c in token):
            p.error(f"--http-token-file {args.http_token_file}: the token must be one word of 16 characters "
                    f"or more")
        args.http_token = token


def _loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False                        # a name: it may resolve to anything


def start(args, images, labels, stop):
    """A Live for these flags, or None when none of them is given."""
    if not (args.http_address or args.tensorboard):
        return None
    return Live(args, images, labels, stop)


class Live:
    def __init__(self, args, images, labels, stop):
        self.dashboard = self.tb = self.follower = None
        try:
            if args.http_address:
                from lenet_dist.dashboard.process import DashboardProcess
                self.dashboard = DashboardProcess(images, labels, *args.http_address, token=args.http_token)
                log.info("dashboard on %s%s", self.dashboard.url, " (bearer token required)" if args.http_token else "")
            if args.tensorboard:
                from .tensorboard import EvaluatorBoard
                self.tb = EvaluatorBoard(args.tensorboard)
            if args.connect and self.dashboard is not None:     # the trainer's own --tensorboard logs its steps
                self.follower = TelemetryFollower(args, self._on_steps, stop)
        except BaseException:
            self.close()
            raise

    def _on_steps(self, rows):
        if self.dashboard is not None:
            self.dashboard.add_steps(rows)

    def on_evaluation(self, result, params, detail, config):
        if self.dashboard is not None:
            self.dashboard.add_evaluation(result, params, detail, config)
        if self.tb is not None:
            self.tb.add_evaluation(result, detail)

    def close(self):
        for part in (self.follower, self.dashboard, self.tb):
            if part is not None:
                part.close()


class TelemetryFollower:
    """A thread with a connection of its own to the trainer, asking for its step rows twice a second,
    so that the curves move while the evaluator's loop is busy evaluating."""

    def __init__(self, args, on_rows, stop):
        from lenet_dist.transport import CheckpointClient
        self.client = CheckpointClient(args.connect, secret_key=args.curve_secret_key,
                                       public_key=args.curve_public_key, server_key=args.curve_server_key,
                                       interrupted=stop.__bool__)
        self.on_rows, self.stop = on_rows, stop
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="lenet-telemetry")
        self._thread.start()

    def _run(self):
        from lenet_dist.wire import MAX_TELEMETRY_ROWS, BadMessage
        since, server = -1, None
        while not self._done.is_set() and not self.stop:
            try:
                got = self.client.fetch_telemetry(since)
            except BadMessage as e:
                log.warning("rejected telemetry from %s: %s", self.client.endpoint, e)
                got = None
            if got is not None:
                rows, seq = got
                restarted = server is not None and self.client.server != server
                server = self.client.server
                if restarted or seq < since:            # a new trainer numbers its rows afresh
                    since = -1
                    continue
                since = seq
                if rows:
                    self.on_rows(rows)
                if len(rows) == MAX_TELEMETRY_ROWS:     # more waiting: ask again at once
                    continue
            self._done.wait(TELEMETRY_POLL_S)

    def close(self):
        self._done.set()
        self._thread.join(5)
        self.client.close()
