"""lenet-evaluator: scores the trainer's checkpoints as they come, on their validation split and the test set.

    lenet-evaluator --connect tcp://127.0.0.1:5555 --report eval.jsonl   # from lenet-train --publish
    lenet-evaluator --watch ckpt --report eval.jsonl                     # or poll its --checkpoint-dir
    lenet-evaluator --connect tcp://127.0.0.1:5555 --once                # the newest checkpoint, then exit
    lenet-evaluator --connect tcp://trainer-host:5555 --curve-secret-key keys/evaluator.key_secret \\
                    --curve-server-key keys/trainer.key                  # CurveZMQ, keys from lenet-keys
    lenet-evaluator --connect tcp://127.0.0.1:5555 --subset              # 1,000 shipped test images: quick

It evaluates the newest checkpoint available whenever it is ready, skipping stale ones; each report says
how many steps the trainer was ahead by then (lag_steps). One line on stdout and one JSON object in
--report per evaluation; results also go back to the trainer (which logs them) and to --results-bind.
Anything malformed that arrives is logged with its reason and skipped; the daemon keeps serving.

Exit status: 0 after the trainer's final checkpoint, after --once or --max-evaluations, and on SIGTERM;
130 on Ctrl-C; 1 on a setup error (data, keys, bind); 3 when --timeout passes with nothing to evaluate.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from lenet_dist import analysis, checkpoint, selection, wire
from lenet_dist.checkpoint import CheckpointError
from lenet_dist.data import DataError
from lenet_dist.files import atomic_write, check_writable_path, open_regular, read_regular
from lenet_dist.stopsignal import StopSignal
from lenet_dist.transport import TransportError

from . import evaluator_live
from .common import HelpFormatter, add_data_flags, number, one_line, read_dataset
from .judge import DataRefused, Judge

log = logging.getLogger("lenet.evaluator")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="lenet-evaluator", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--connect", metavar="ENDPOINT", help="the trainer's --publish endpoint, e.g. tcp://127.0.0.1:5555")
    src.add_argument("--watch", metavar="DIR", type=Path, help="poll this checkpoint directory instead")
    add_data_flags(p)       # the trainer's own: a checkpoint is scored only on the data it was trained for
    g = p.add_argument_group("output")
    g.add_argument("--report", type=Path, help="append one JSON object per evaluation here")
    g.add_argument("--results-bind", metavar="ENDPOINT", help="also publish results on a PUB socket here")
    g.add_argument("--best-dir", type=Path,
                   help="keep the best checkpoint (by validation accuracy, never test) here as best.npz")
    g = p.add_argument_group("when to stop, pacing")
    g.add_argument("--once", action="store_true", help="evaluate the newest checkpoint, then exit")
    g.add_argument("--max-evaluations", type=int, default=0, metavar="N", help="exit after N (0: no limit)")
    g.add_argument("--timeout", type=float, default=0.0, metavar="SECONDS",
                   help="exit 3 after this long without a new checkpoint (0: wait forever)")
    g.add_argument("--poll-ms", type=int, default=500, help="how long one request waits for a new checkpoint")
    g.add_argument("--delay", type=float, default=0.0, metavar="SECONDS",
                   help="artificial slowness before each evaluation (tests, rehearsals)")
    g.add_argument("--threads", type=int, default=1, help="BLAS threads")
    g.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="WARNING: only problems and the evaluation lines")
    g = p.add_argument_group("CurveZMQ (with --connect; keys from lenet-keys generate)")
    g.add_argument("--curve-secret-key", type=Path, metavar="FILE", help="this evaluator's .key_secret file")
    g.add_argument("--curve-public-key", type=Path, metavar="FILE", help="its .key file (optional, checked)")
    g.add_argument("--curve-server-key", type=Path, metavar="FILE", help="the trainer's public .key file")
    evaluator_live.add_arguments(p)
    args = p.parse_args(argv)
    evaluator_live.check_args(p, args)
    if args.max_evaluations < 0 or args.timeout < 0 or args.delay < 0 or args.threads < 1:
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
    for flag in ("connect", "results_bind"):
        if getattr(args, flag):
            try:
                setattr(args, flag, wire.check_endpoint(getattr(args, flag), bind=flag != "connect"))
            except ValueError as e:
                p.error(f"--{flag.replace('_', '-')}: {e}")
    curve = (args.curve_secret_key, args.curve_public_key, args.curve_server_key)
    if any(curve) and (args.watch or not (args.curve_secret_key and args.curve_server_key)):
        p.error("CurveZMQ needs --connect with both --curve-secret-key and --curve-server-key")
    return args


def _dataset(args):
    ds = read_dataset(args, log)
    log.info("data: %s, %d test images (and %d training images for validation splits) from %s", ds.name,
             len(ds.test_images), len(ds.train_images), ds.source)
    return ds


def _source(args, stop):
    if args.watch:
        from lenet_dist.watch import DirectoryWatcher
        return DirectoryWatcher(args.watch, interrupted=stop.__bool__, warn=log.warning)
    from lenet_dist.transport import CheckpointClient
    return CheckpointClient(args.connect, secret_key=args.curve_secret_key, public_key=args.curve_public_key,
                            server_key=args.curve_server_key, interrupted=stop.__bool__)


class BestKeeper:
    """--best-dir: the best checkpoint seen (lenet_dist.selection's rule) as best.npz, and its figures as
    best.json, both written atomically. A restarted evaluator carries on from best.json if it describes the
    same run (same training config, same validation split); anything else starts afresh."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.best = None                    # the best result so far
        self.loaded = False
        self.warned = False

    def offer(self, result, data, config):
        if "val_accuracy" not in result:    # choosing on the test set would make its figure optimistic
            if not self.warned:
                log.warning("--best-dir keeps nothing: the checkpoints have no validation split (--val-size 0)")
                self.warned = True
            return False
        if not self.loaded:
            self.loaded = True
            try:
                prev = json.loads(read_regular(self.dir / "best.json", 1 << 20))
                if prev.get("config") == config and prev.get("n_val") == result["n_val"]:
                    self.best = prev
            except (OSError, ValueError, TypeError, AttributeError):
                pass
        if not selection.is_better(result, self.best):
            return False
        atomic_write(self.dir / "best.npz", data)
        atomic_write(self.dir / "best.json", json.dumps(dict(result, config=config)).encode())
        self.best = result
        return True


def run(args, stop):
    from threadpoolctl import threadpool_limits

    from lenet_dist.model import LeNet5
    ds = _dataset(args)
    with contextlib.ExitStack() as stack:
        source = _source(args, stop)
        stack.callback(source.close)
        out = []                                    # where each result goes besides stdout
        if args.report:
            report = stack.enter_context(open_regular(args.report, "a"))   # a FIFO is refused, never waited on
            out.append(lambda r: (report.write(json.dumps(r) + "\n"), report.flush()))
        out.append(source.send_result)              # back to the trainer, which logs it
        if args.results_bind:
            from lenet_dist.transport import ResultsPublisher
            pub = ResultsPublisher(args.results_bind)
            stack.callback(pub.close)
            out.append(pub.publish)
            log.info("publishing results on %s", pub.endpoint)
        best = BestKeeper(args.best_dir) if args.best_dir else None
        stack.enter_context(threadpool_limits(limits=args.threads, user_api="blas"))
        model = LeNet5()
        model.evaluate(ds.test_images[:500], ds.test_labels[:500])  # warm-up: the first evaluation is not slower
        live = evaluator_live.start(args, ds.test_images, ds.test_labels, stop)     # --http, --tensorboard
        if live is not None:
            stack.callback(live.close)
        log.info("evaluating checkpoints from %s", source.endpoint)
        return _loop(args, stop, source, model, Judge(ds), out, best, live)


def _loop(args, stop, source, model, judge, out, best, live=None):
    whoami = f"{socket.gethostname()}:{os.getpid()}"
    last_step, last_final, evaluations, status = -1, False, 0, None
    idle_since = time.monotonic()
    reminder = Reminder()
    while not stop:
        if source.status != status:
            status = source.status
            ok = status.startswith(("connecting to", "connected to", "watching"))
            (log.info if ok else log.warning)("%s", status)
            reminder.restart()
        elif not ok and (waited := reminder.due()) is not None:
            log.warning("still %s%s, for %.0fs; waiting (%s)", status[0].lower(), status[1:], waited,
                        f"giving up at --timeout {args.timeout:g}s" if args.timeout else "--timeout SECONDS to give up")
        behind = getattr(source, "trainer_step", None)
        if behind is not None and behind < last_step:
            # The trainer is behind what we evaluated: a new run, or one resumed from an older checkpoint.
            log.warning("the trainer is at step %d, before the last evaluated step %d: following it", behind,
                        last_step)
            last_step, last_final = -1, False
        if args.timeout and time.monotonic() - idle_since > args.timeout:
            log.error("no new checkpoint from %s in %.1f s; giving up", source.endpoint, args.timeout)
            return 3
        try:
            got = source.fetch_newer(last_step, args.poll_ms, seen_final=last_final)
        except wire.BadMessage as e:
            log.warning("rejected a message from %s%s: %s", source.endpoint,
                        "" if e.step is None else f" (step {e.step})", e)
            if e.step is not None and e.step >= last_step:     # skip that checkpoint, don't ask for it again
                last_final = e.step == last_step    # the same step served again can only be its final copy
                last_step = e.step
            stop.sleep(0.2)
            continue
        if got is None:
            continue
        header, data = got
        step = header["step"]
        try:
            ckpt = checkpoint.from_bytes(data, name=f"checkpoint of step {step}")
            if ckpt.step != step:
                raise CheckpointError(f"header says step {step}, the checkpoint's meta says {ckpt.step}")
        except CheckpointError as e:
            log.warning("rejected a checkpoint from %s: %s", source.endpoint, e)
            last_step, last_final = step, header["final"]
            continue
        final = bool(header["final"] or ckpt.meta.get("final"))
        last_step, last_final = step, final
        if args.delay and stop.sleep(args.delay):
            break
        model.load_named(ckpt.params)
        try:
            figures, detail = judge.score(model, ckpt, f"the checkpoint of step {step}")
        except DataRefused as e:
            log.error("%s", one_line(e))
            return 1
        trainer_step = source.trainer_step_now()
        result = {"step": step, "epoch": int(ckpt.meta["epoch"]), **figures,
                  "lag_steps": max(0, (trainer_step or step) - step), "trainer_step": trainer_step,
                  "sha256": header["sha256"], "final": final, "time": round(time.time(), 3), "evaluator": whoami,
                  "server": header.get("server")}     # which trainer process served it
        val = (f"validation accuracy {100 * result['val_accuracy']:.2f}% loss {number(result['val_loss'])}, "
               if "val_accuracy" in result else "")
        print(f"step {step} epoch {_epoch_text(ckpt.meta)}: {val}test accuracy {100 * result['accuracy']:.2f}% "
              f"loss {number(result['loss'])} ({result['n_test']} images, {result['eval_seconds']:.2f}s), "
              f"{result['lag_steps']} steps behind"
              + (", final" if final else ""), flush=True)
        if live is not None:
            live.on_evaluation(result, ckpt.params, detail, ckpt.meta.get("config"))
        full = dict(result, per_class=detail.per_class, confusion=detail.confusion.tolist(), worst=detail.worst)
        for send in out:                            # the report gets the analysis too; the link the figures
            send(full if args.report and send is out[0] else result)
        try:
            if best and best.offer(result, data, ckpt.meta.get("config")):
                log.info("new best: step %d, validation %.2f%% (test %.2f%%), in %s", step,
                         100 * result["val_accuracy"], 100 * result["accuracy"], best.dir / "best.npz")
        except OSError as e:                        # a full or broken --best-dir: say so, keep evaluating
            log.error("could not keep the best checkpoint: %s", e)
        evaluations += 1
        idle_since = time.monotonic()
        if final:
            log.info("evaluated the final checkpoint (step %d); exiting", step)
            return 0
        if args.once or evaluations == args.max_evaluations:
            return 0
    log.info("stopped by signal %d (%s) after %d evaluations", stop.signum, stop.name, evaluations)
    return 130 if stop.signum == signal.SIGINT else 0


class Reminder:
    """When to repeat a warning that still holds: after 10 s, then 20, 40, ... at most every 10 minutes, so
    that a daemon waiting for a trainer that never comes keeps saying so without flooding its log."""

    def __init__(self, first=10.0, longest=600.0, clock=time.monotonic):
        self.first, self.longest, self.clock = first, longest, clock
        self.restart()

    def restart(self):
        self.since = self.clock()
        self.interval = self.first
        self.next_at = self.since + self.first

    def due(self):
        """Seconds since restart() when a reminder is due now, else None."""
        now = self.clock()
        if now < self.next_at:
            return None
        self.interval = min(2 * self.interval, self.longest)
        self.next_at = now + self.interval
        return now - self.since


def _epoch_text(meta):
    """The epoch as the trainer's lines say it: 'epoch 1/5' is the first epoch, in progress or just done."""
    epoch = int(meta["epoch"]) + (int(meta.get("pos", 0)) > 0)
    epochs = (meta.get("config") or {}).get("epochs")
    return f"{epoch}/{epochs}" if isinstance(epochs, int) else str(epoch)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s evaluator %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr, level=args.log_level, force=True)
    stop = StopSignal()
    try:
        return run(args, stop)
    except KeyboardInterrupt:
        log.warning("interrupted")
        return 130
    except (DataError, TransportError, OSError) as e:
        log.error("%s", one_line(e))
        return 1


if __name__ == "__main__":
    sys.exit(main())
