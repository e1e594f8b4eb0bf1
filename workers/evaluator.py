"""lenet-evaluator: scores the trainer's checkpoints as they come, on their validation split and the test set.

    lenet-evaluator --connect tcp://127.0.0.1:5555 --report eval.jsonl   # from lenet-train --publish
    lenet-evaluator --watch ckpt --report eval.jsonl                     # or poll its --checkpoint-dir
    lenet-evaluator --watch runs --report eval.jsonl                     # or a folder of run folders
    lenet-evaluator --connect tcp://h1:5555 --connect tcp://h2:5555      # several trainers at once
    lenet-evaluator --connect tcp://127.0.0.1:5555 --exit-after-run      # one run, then exit (scripts)
    lenet-evaluator --connect tcp://127.0.0.1:5555 --once                # the newest checkpoint, then exit
    lenet-evaluator --connect tcp://trainer-host:5555 --curve-secret-key keys/evaluator.key_secret \\
                    --curve-server-key keys/trainer.key                  # CurveZMQ, keys from lenet-keys
    lenet-evaluator --connect tcp://127.0.0.1:5555 --subset              # 1,000 shipped test images: quick

It evaluates the newest checkpoint available whenever it is ready, skipping stale ones; each report says how
many steps the trainer was ahead by then (lag_steps). It is a daemon: after a run's final checkpoint it
waits for the next run on the same endpoint or folder; each result names its run (run_id, run). One line on
stdout and one JSON object in --report per evaluation; results also go back to the trainer (which logs them)
and to --results-bind. Anything malformed that arrives is logged with its reason and skipped; the daemon
keeps serving.

Exit status: 0 on SIGTERM, after --once or --max-evaluations, and with --exit-after-run after the final
checkpoint of every followed run; 130 on Ctrl-C; 1 on a setup error (data, keys, bind); 3 when --timeout
passes with nothing to evaluate.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import sys
import time
from pathlib import Path

from lenet_dist import cpus, logformat
from lenet_dist.checkpoints import format as checkpoint
from lenet_dist.data import DataError
from lenet_dist.evaluation import live as live_outputs
from lenet_dist.evaluation.best import BestKeeper
from lenet_dist.evaluation.health import Health, HealthServer
from lenet_dist.evaluation.history import History
from lenet_dist.evaluation.loop import LoopConfig, Output, run_loop
from lenet_dist.evaluation.metrics import metrics_text
from lenet_dist.evaluation.scoring import Judge
from lenet_dist.files import check_writable_path, open_regular, read_regular
from lenet_dist.run.text import one_line
from lenet_dist.stopsignal import StopSignal
from lenet_dist.transport import TransportError, wire
from lenet_dist.transport.control import load_key as load_control_key

from workers.common import add_data_flags, HelpFormatter, host_port, read_dataset

log = logging.getLogger("lenet.evaluator")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="lenet-evaluator", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--connect", metavar="ENDPOINT", action="append",
                     help="the trainer's --publish endpoint, e.g. tcp://127.0.0.1:5555 (repeat it to follow several)")
    src.add_argument("--watch", metavar="DIR", type=Path,
                     help="poll this checkpoint directory instead, or each run folder inside it")
    add_data_flags(p)       # the trainer's own: a checkpoint is scored only on the data it was trained for
    g = p.add_argument_group("output")
    g.add_argument("--report", type=Path,
                   help="append one JSON object per evaluation here; read back at start: the history of every "
                        "run evaluated (/metrics' counters, the dashboard)")
    g.add_argument("--results-bind", metavar="ENDPOINT", help="also publish results on a PUB socket here")
    g.add_argument("--best-dir", type=Path,
                   help="keep the best checkpoint (by validation accuracy, never test) here as best.npz")
    g = p.add_argument_group("when to stop, pacing")
    g.add_argument("--once", action="store_true", help="evaluate the newest checkpoint, then exit")
    g.add_argument("--exit-after-run", action="store_true",
                   help="exit after the run's final checkpoint (every run's, when following several) instead of "
                        "waiting for the next run")
    g.add_argument("--max-evaluations", type=int, default=0, metavar="N", help="exit after N (0: no limit)")
    g.add_argument("--timeout", type=float, default=0.0, metavar="SECONDS",
                   help="exit 3 after this long without a new checkpoint (0: wait forever)")
    g.add_argument("--poll-ms", type=int, default=500, help="how long one request waits for a new checkpoint")
    g.add_argument("--delay", type=float, default=0.0, metavar="SECONDS",
                   help="artificial slowness before each evaluation (tests, rehearsals)")
    g.add_argument("--threads", type=int,
                   help="BLAS threads (default: the CPUs it may use, by its affinity mask and cgroup CPU quota)")
    g.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="WARNING: only problems and the evaluation lines")
    g.add_argument("--log-format", default="text", choices=logformat.FORMATS,
                   help="json: one JSON object per line, with an ISO 8601 time and zone (for a log collector)")
    g = p.add_argument_group("CurveZMQ (with --connect; keys from lenet-keys generate)")
    g.add_argument("--curve-secret-key", type=Path, metavar="FILE", help="this evaluator's .key_secret file")
    g.add_argument("--curve-public-key", type=Path, metavar="FILE", help="its .key file (optional, checked)")
    g.add_argument("--curve-server-key", type=Path, metavar="FILE", help="the trainer's public .key file")
    _add_live_flags(p)
    args = p.parse_args(argv)
    _check_live_flags(p, args)
    bad_threads = args.threads is not None and args.threads < 1
    if args.max_evaluations < 0 or args.timeout < 0 or args.delay < 0 or bad_threads:
        p.error("--max-evaluations, --timeout and --delay must be >= 0, --threads >= 1")
    for flag, path in (("--report", args.report), ("--best-dir", args.best_dir and args.best_dir / "best.json")):
        if path:
            try:
                check_writable_path(path)
            except ValueError as e:
                p.error(f"{flag}: {e}")
    if not 10 <= args.poll_ms <= 10_000:
        p.error(f"--poll-ms must be in [10, 10000], got {args.poll_ms}")
    if args.best_dir and ((args.watch and args.best_dir.resolve() == args.watch.resolve())
                          or checkpoint.list_checkpoints(args.best_dir)):
        p.error(f"--best-dir {args.best_dir} is a trainer's checkpoint folder, where the trainer keeps its own "
                f"best.npz and best.json: give the evaluator a folder of its own")
    for flag, bind in (("connect", False), ("results_bind", True)):
        try:
            value = getattr(args, flag)
            if value:
                setattr(args, flag, [wire.check_endpoint(e, bind=bind) for e in value] if flag == "connect"
                        else wire.check_endpoint(value, bind=bind))
        except ValueError as e:
            p.error(f"--{flag.replace('_', '-')}: {e}")
    if args.connect and len(set(args.connect)) != len(args.connect):
        p.error("--connect: the same endpoint twice")
    curve = (args.curve_secret_key, args.curve_public_key, args.curve_server_key)
    if any(curve) and (args.watch or not (args.curve_secret_key and args.curve_server_key)):
        p.error("CurveZMQ needs --connect with both --curve-secret-key and --curve-server-key")
    return args


def _add_live_flags(p):
    g = p.add_argument_group("dashboard and TensorBoard")
    g.add_argument("--http", metavar="[HOST:]PORT",
                   help="serve the live dashboard here (host 127.0.0.1 unless given; 0 picks a free port)")
    g.add_argument("--http-token-file", type=Path, metavar="FILE",
                   help="every HTTP request must carry this file's token (Authorization: Bearer TOKEN)")
    g.add_argument("--http-no-token", action="store_true",
                   help="allow --http on a non-loopback address without --http-token-file (anyone who can "
                        "reach the port sees the run and can query the model)")
    g.add_argument("--control-key-file", type=Path, metavar="FILE",
                   help="the page may steer the shown run (stop, pause, continue, checkpoint, learning rate): each "
                        "action is signed with this secret, the trainer's own --control-key-file (needs --http, "
                        "--connect and lenet-train --allow-control; docs/steering.md)")
    g.add_argument("--tensorboard", type=Path, metavar="DIR",
                   help="write TensorBoard event files (scalars, the confusion matrix) under DIR/evaluator")
    g.add_argument("--health", metavar="[HOST:]PORT",
                   help="serve /healthz (alive), /readyz (data loaded, evaluating) and /metrics (Prometheus) here "
                        "for an orchestrator's probes and scrapes (host 127.0.0.1 unless given; no extra needed)")


def _check_live_flags(p, args):
    """Parse --http into (host, port) and read the token; p.error on a bad value."""
    args.http_address, args.http_token = None, None
    for flag, modules, extra in (("http", ("starlette", "uvicorn", "prometheus_client", "PIL"), "dashboard"),
                                 ("tensorboard", ("tensorboardX",), "tensorboard")):
        if getattr(args, flag) and not all(importlib.util.find_spec(m) for m in modules):
            p.error(f"--{flag} needs the {extra} extra: pip install 'lenet-dist[{extra}]'")
    if args.http_token_file and not args.http:
        p.error("--http-token-file needs --http")
    args.control_key = None
    if args.control_key_file:
        if not (args.http and args.connect):
            p.error("--control-key-file needs --http and --connect")
        try:
            args.control_key = load_control_key(args.control_key_file)
        except ValueError as e:
            p.error(f"--control-key-file {e}")
    args.health_address = host_port(p, "--health", args.health) if args.health else None
    if args.http:
        args.http_address = host, _ = host_port(p, "--http", args.http)
        if not args.http_token_file and not wire.is_loopback(host):
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


def _dataset(args):
    ds = read_dataset(args, log)
    log.info("data: %s, %d test images (and %d training images for validation splits) from %s", ds.name,
             len(ds.test_images), len(ds.train_images), ds.source)
    return ds


def _sources(args, stop, stack):
    """What the loop follows: a callable returning the current sources (a folder of run folders grows)."""
    if args.watch:
        from lenet_dist.transport.watch import RunFolders
        folders = RunFolders(args.watch, interrupted=stop.__bool__, warn=log.warning)
        stack.callback(folders.close)
        return folders.sources, str(args.watch)
    from lenet_dist.transport import CheckpointClient
    clients = []
    for endpoint in args.connect:
        clients.append(CheckpointClient(endpoint, secret_key=args.curve_secret_key,
                                        public_key=args.curve_public_key, server_key=args.curve_server_key,
                                        interrupted=stop.__bool__))
        stack.callback(clients[-1].close)
    return (lambda: clients), ", ".join(args.connect)


def run(args, stop):
    from threadpoolctl import threadpool_limits

    from lenet_dist.nn.model import LeNet5
    with contextlib.ExitStack() as stack:
        health, started = Health(), time.time()
        history = History.load(args.report, warn=log.warning)
        if history.loaded:
            log.info("history: %d evaluations of %d run(s) from %s", history.loaded, len(history.runs()),
                     args.report)
        if args.health_address:                     # first: the probes answer (not ready) while data loads
            probes = HealthServer(health, *args.health_address,
                                  metrics=lambda: metrics_text(history, health, started))
            stack.callback(probes.close)
            log.info("health probes on %s/healthz and /readyz, metrics on /metrics", probes.url)
        health.not_ready("loading data")
        ds = _dataset(args)
        health.not_ready("connecting")
        sources, where = _sources(args, stop, stack)
        outputs = []                                # where each result goes besides stdout
        if args.report:
            report = stack.enter_context(open_regular(args.report, "a"))   # a FIFO is refused, never waited on
            outputs.append(Output(lambda r: (report.write(json.dumps(r) + "\n"), report.flush()), full=True))
        outputs.append(Output(history.add))
        if args.connect:                            # back to the trainer, which logs it
            outputs.append(Output(_send_back(sources())))
        if args.results_bind:
            from lenet_dist.transport import ResultsPublisher
            pub = ResultsPublisher(args.results_bind)
            stack.callback(pub.close)
            outputs.append(Output(pub.publish))
            log.info("publishing results on %s", pub.endpoint)
        best = BestKeeper(args.best_dir) if args.best_dir else None
        threads, why = (args.threads, "--threads") if args.threads else cpus.available()
        log.info("%d BLAS thread%s (%s)", threads, "s" * (threads != 1), why)
        stack.enter_context(threadpool_limits(limits=threads, user_api="blas"))
        model, judge = LeNet5(), Judge(ds)
        model.evaluate(ds.test_images[:500], ds.test_labels[:500])  # warm-up: the first evaluation is not slower
        live = live_outputs.start(live_outputs.LiveConfig(
            http_address=args.http_address, http_token=args.http_token, tensorboard=args.tensorboard,
            connect=tuple(args.connect or ()), curve_secret_key=args.curve_secret_key,
            curve_public_key=args.curve_public_key, curve_server_key=args.curve_server_key), ds.test_images, ds.test_labels, stop, history)
        if live is not None:
            stack.callback(live.close)
            if args.control_key:                    # the page's control actions, signed, to the shown run's trainer
                from lenet_dist.evaluation.control import ControlRelay
                relay = ControlRelay(args.control_key, live, (args.curve_secret_key, args.curve_public_key,
                                                              args.curve_server_key), stop)
                stack.callback(relay.close)
            if best is not None:
                live.restore_best(best, model, judge)
        log.info("evaluating checkpoints from %s%s", where, "" if args.exit_after_run else
                 "; waiting for the next run after each (--exit-after-run: exit instead)")
        cfg = LoopConfig(once=args.once, max_evaluations=args.max_evaluations, timeout=args.timeout,
                         poll_ms=args.poll_ms, delay=args.delay, exit_after_run=args.exit_after_run)
        health.ready()
        stack.callback(health.not_ready, "stopping")
        return run_loop(cfg, stop, sources, model, judge, outputs, best, live, health)


def _send_back(clients):
    """A result goes back to the trainer that served it (the header's server field names its process)."""
    def send(result):
        for c in clients:
            if len(clients) == 1 or c.server == result.get("server"):
                c.send_result(result)
    return send


def main(argv=None):
    args = parse_args(argv)
    logformat.setup("evaluator", args.log_level, args.log_format)
    stop = StopSignal()
    try:
        return run(args, stop)
    except KeyboardInterrupt:
        log.warning("interrupted")
        return 130
    except (DataError, TransportError, OSError) as e:
        log.error("%s", one_line(e))
        return 1
    finally:
        stop.settled()                      # decided: a late SIGTERM must not turn it into a death by signal


if __name__ == "__main__":
    sys.exit(main())
