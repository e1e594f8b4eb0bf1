"""lenet-train: one trainer rank. Flags, logging, the run's wiring and the one line an error ends it with; the
epoch loop is lenet_dist/run/loop.py, the math is in lenet_dist.

    lenet-train                                            # one process, 5 epochs of MNIST (~99.3%), kept
                                                           # in runs/<time>-<id>/ (--no-save: nothing)
    mpirun -n 4 lenet-train --batch-size 256               # four synchronized data-parallel ranks
    mpirun -n 2 lenet-train --checkpoint-dir ckpt --checkpoint-every 200 --publish tcp://127.0.0.1:5555
    mpirun -n 2 lenet-train --checkpoint-dir ckpt --resume # continue this run, or stop saying why
    mpirun -n 2 lenet-train --checkpoint-dir ckpt --resume auto   # retries, requeues: continue, or start
    lenet-train --test-mode                                # trainer + evaluator end to end

Rank 0's duties: broadcast the initial weights, log, write metrics and checkpoints, publish checkpoints.
An exception on any rank ends the whole job with one line and an exit status lenet-launch reads
(lenet_dist/run/exitcodes.py).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import replace

import numpy as np

from lenet_dist.comm import bcast_json, get_comm
from lenet_dist.data.identity import data_mismatch
from lenet_dist.errors import ResumeError, UsageError
from lenet_dist.launcher_env import launcher_size, LauncherMismatch
from lenet_dist.parallel.step import DataParallelTrainer
from lenet_dist.parallel.timeline import timeline_for
from lenet_dist.run import control as live_control, exitcodes, loop, setup
from lenet_dist.run.loop import LoopSettings, Run
from lenet_dist.run.outcome import train_command
from lenet_dist.run.process import blas_threads, raise_open_files_limit, setup_logging
from lenet_dist.run.progress import ProgressSink
from lenet_dist.run.sinks import LinkProgressSink, MetricsSink, Sinks
from lenet_dist.run.stall import StallGuard
from lenet_dist.run.steering import Steering
from lenet_dist.run.telemetry import TelemetrySink
from lenet_dist.run.text import one_line
from lenet_dist.stopsignal import settle

from workers.common import load_dataset
from workers.train_flags import parse_args

log = logging.getLogger("lenet.trainer")

ALIKE_WAIT_S = 10.0         # how long a rank waits for rank 0 to report an error they both raised
OTHER_WAIT_S = 1.0          # ... and for any other error, which rank 0 may or may not share
ALIKE = ("ResumeError", "DataError", "TrainingError", "UsageError")   # raised on every rank at one point


def run(flags, comm):
    """Train (or go on training) until the run ends: the exit status."""
    r = _start(flags, comm)
    if r is None:
        return 0
    args = flags.args
    try:
        r.link = _open_link(args, log, r.state.run_id) if args.publish and r.rank0 else None
        r.control = live_control.LiveControl(comm, r.link and r.link.control)
        sinks = _sinks(args, r.settings, r.link, r.trainer, r.state.run_id) if r.rank0 else Sinks()
        r.guard = _stall_guard(args, comm, r.trainer)
        return loop.train(r, sinks, timeline_for(args.timeline, args.timeline_steps))
    finally:
        if r.link:
            r.link.close()
        if r.state:
            r.state.close()


def _start(flags, comm):
    """Data, configuration and the trainer, resumed when asked; None when a resumed run had finished."""
    data = load_dataset(flags.args, comm, log)
    _check_val_size(flags.config, len(data.train_images))           # every rank alike: a usage error
    if flags.plan.run_folder:                                       # no --checkpoint-dir: runs/<name>/
        plan, facts = setup.settle_folder(flags.plan, flags.facts, comm)
        flags = replace(flags, plan=plan, facts=facts)
        if comm.rank == 0:
            log.info("run folder %s/: checkpoints, last.npz, best.npz%s (continue: %s; --no-save keeps "
                     "nothing)", plan.directory, ", metrics.jsonl" if facts.metrics.parent == plan.directory
                     else "", train_command(facts.argv, comm.size, ["--resume"]))
    cfg, found, state = setup.prepare(flags.config, flags.plan, comm, data, log)
    trainer = DataParallelTrainer(cfg, comm, data)
    steer = Steering(cfg, from_evaluator=bool(flags.args.publish))
    trainer.lr_scale = steer.lr_scale
    _describe(trainer, comm, data, steer)
    if flags.args.checkpoint_every and not (flags.plan.directory or flags.args.publish) and comm.rank == 0:
        log.warning("--checkpoint-every %d keeps nothing without --checkpoint-dir: --no-save (and no --publish) "
                    "writes no checkpoint", flags.args.checkpoint_every)
    args = flags.args
    settings = LoopSettings(plan=flags.plan, facts=flags.facts, fault=flags.fault, publish=bool(args.publish),
                            sync_every=args.sync_every, checkpoint_every=args.checkpoint_every,
                            linger=args.linger, evaluator_expected=bool(args.test_mode))
    r = Run(settings, comm, trainer, state, steer)
    try:
        return _resume(r, found)
    except BaseException:
        if state:
            state.close()
        raise


def _resume(r, found):
    """With --resume, the trainer restored from `found` (rank 0's pick); None when that run had finished."""
    plan, comm, trainer, state, cfg = r.settings.plan, r.comm, r.trainer, r.state, r.trainer.cfg
    if plan.resume and comm.bcast_(np.array([found is not None], np.int64))[0]:   # rank 0 decided
        if r.rank0:
            _check_same_data(state.resumed_from, found, trainer)
        trainer.restore(found)
        _restore_steering(r, found)
        at = (f"epoch {trainer.epoch + 1}/{cfg.epochs}, batch {trainer.pos} of {trainer.steps_per_epoch}"
              if not trainer.done else "the run has finished")
        log.info("resumed from %s at step %d/%d (%s; run %s)", state.resumed_from if r.rank0 else "",
                 trainer.step, trainer.total_steps, at, state.run_id if r.rank0 else "")
        ended, r.steer.ended = r.steer.ended, None
        if ended and not plan.override:             # ended by a decision (early stop): as finished
            why = (f"has already ended at step {trainer.step}: {ended}; nothing to train (to go on anyway: "
                   f"--resume --override NAMES with a changed flag, e.g. early_stop)")
        elif trainer.done:                  # a finished run resumed (a requeue, a retry): nothing to train
            why = (f"has already finished: step {trainer.step}/{trainer.total_steps}, {cfg.epochs} of "
                   f"{cfg.epochs} epochs; nothing to train (to train longer: --resume --override epochs --epochs N)")
        else:
            return r
        if r.rank0:
            state.close()
            print(f"run {state.run_id} in {plan.directory} {why}", flush=True)
        return None
    return r


def _restore_steering(r, found):
    """Every rank: the steering state saved with rank 0's checkpoint (none in an older one)."""
    saved = bcast_json(r.comm, {k: found.meta.get(k) for k in ("steering", "epoch_so_far")} if r.rank0
                       else None)                                                     # [dist]
    r.steer.load(saved["steering"])
    if saved["epoch_so_far"] and r.trainer.pos > 0:     # the epoch's figures count its steps before the stop
        r.carried = tuple(saved["epoch_so_far"])
    r.trainer.lr_scale = r.steer.lr_scale


def _describe(trainer, comm, data, steer):
    cfg = trainer.cfg
    if cfg.lr_scaling == "linear":
        log.info("--lr-scaling linear: learning rate %g x %d / 64 = %g after the warm-up", cfg.lr, cfg.batch_size,
                 cfg.lr * steer.factor)
    if steer.source():
        log.info("--early-stop %d: %s, watched for %s", cfg.early_stop, cfg.early_stop_metric, steer.source())
    log.info("%d ranks, global batch %d (%s per rank), %d steps per epoch, %d training examples (%d held out "
             "for validation), data: %s from %s", comm.size, cfg.batch_size, "~%d" % -(-cfg.batch_size // comm.size),
             trainer.steps_per_epoch, trainer.n, len(trainer.val_images), data.name, data.source)
    if comm.size > 1:
        log.info("gradient sum: %s (%d rank(s) per node at most; --bucket-kb sets it)", trainer.reducer.description,
                 comm.ranks_per_node)
    if comm.nap is not None:
        tuned = " ".join(f"{k}={v}" for k, v in comm.tuning.items()) or "nothing (set by the user, or unknown)"
        log.info("more ranks than cores on this node: a rank that waits for the others naps %g us between "
                 "checks (LENET_MPI_NAP_US); set for %s: %s", comm.nap * 1e6, comm.family or comm.library, tuned)
    if cfg.balance and comm.size > 1:
        log.info("--balance: shards follow each rank's measured speed (rank_shares in the metrics)")


def _open_link(args, log, run_id):
    """Rank 0 with --publish: the link that serves checkpoints to evaluators (and admits live control)."""
    from lenet_dist.transport import TrainerLink, load_key_pair
    from lenet_dist.transport.control import ControlGate
    if args.curve_public_key and args.curve_secret_key:
        load_key_pair(args.curve_secret_key, args.curve_public_key)
    raise_open_files_limit(log)
    link = TrainerLink(args.publish, results=args.results, secret_key=args.curve_secret_key,
                       authorized=args.curve_authorized, log=log,
                       control=ControlGate(args.control_key, run_id, args.allow_control, log.warning))
    if args.allow_control:
        log.info("live control on (--allow-control): stop, pause, continue, checkpoint, lr_scale from a signed "
                 "evaluator")
    log.info("serving checkpoints on %s%s", link.endpoint,
             f", results also from {link.results_endpoint}" if link.results_endpoint else "")
    return link


def _sinks(args, settings, link, trainer, run_id):
    """Rank 0's outputs: the progress display, epoch lines and summary, the --metrics JSONL, the link's step
    count, step telemetry (--log-every), TensorBoard (--tensorboard) and Prometheus (--metrics-port)."""
    sinks = Sinks([ProgressSink(enabled=args.progress, every=args.progress_every)])
    if args.metrics_address:
        sinks.sinks.append(_prometheus(args, settings.plan, run_id, link))
    metrics = MetricsSink(settings.facts.metrics) if settings.facts.metrics else None
    if metrics:
        sinks.sinks.append(metrics)
    if link:
        sinks.sinks.append(LinkProgressSink(link))
    board = None
    if args.tensorboard:
        from lenet_dist.evaluation.tensorboard import TrainerBoard
        board = TrainerBoard(args.tensorboard, trainer.model)
    outputs = [f for f in (metrics and metrics.write, link and link.telemetry, board and board.add_row) if f]
    if args.log_every and outputs:
        sinks.sinks.append(TelemetrySink(args.log_every, outputs, rank_examples=lambda: trainer.examples_by_rank,
                                         event_outputs=[link.telemetry] if link else []))   # --metrics has them
    if board:
        sinks.sinks.append(board)
    return sinks


def _prometheus(args, plan, run_id, link):
    """--metrics-port: rank 0's /metrics; a port it cannot have is a usage error (one line)."""
    from lenet_dist.run.prometheus import PrometheusSink
    host, port = args.metrics_address
    try:
        sink = PrometheusSink((host, port), run_id, plan.directory and plan.directory.name, link)
    except OSError as e:
        raise UsageError(f"--metrics-port {args.metrics_port}: cannot serve on {host}:{port} "
                         f"({e.strerror or e}); pick another port, or 0 for a free one") from None
    log.info("Prometheus metrics on %s/metrics (and /healthz, /readyz)", sink.url)
    return sink


def _check_val_size(cfg, n_data):
    """--val-size must leave training examples: a usage error (UsageError), not a failure of the run."""
    n = min(cfg.train_subset, n_data) if cfg.train_subset else n_data
    if cfg.val_size >= n:
        raise UsageError(f"--val-size {cfg.val_size}: must be less than the {n} training examples "
                         f"({'--train-subset' if cfg.train_subset else 'the data set'}), or -1 for 1/12 of them")


def _check_same_data(path, ckpt, trainer):
    """Rank 0, --resume: the checkpoint must have been trained on this data with this validation split."""
    recorded = ckpt.meta.get("data")
    why = data_mismatch(recorded, trainer.data_record)
    if why is None and recorded and recorded.get("split") != trainer.data_record["split"]:
        theirs, ours = recorded.get("split") or {}, trainer.data_record["split"]
        why = (f"it held out {theirs.get('val_size')} of {theirs.get('of')} examples for validation (seed "
               f"{theirs.get('seed')}), this run {ours['val_size']} of {ours['of']} (seed {ours['seed']})")
    if why:
        raise ResumeError(f"{path} was trained on other data: {why}; resume with that run's --dataset, "
                          f"--data-dir, --train-subset, --val-size and --seed, or use a new --checkpoint-dir")
    if not recorded:
        log.warning("%s records no data identity (an older checkpoint): cannot check it was trained on %s",
                    path, trainer.data_record["name"])


def _end_on_error(comm, text, status, alike):
    """Say the error in one line, once, and end the job with `status` (exitcodes.py). An error every rank
    raises at the same point (`alike`) is said by rank 0, whose abort ends the others; they speak only if
    that did not come. MPI's own abort lines would repeat it: they go to /dev/null where we can send them."""
    if comm.size == 1:
        _fatal(comm, text)
        return
    if comm.rank != 0:                      # rank 0 may have the same error: let its abort end us first
        time.sleep(ALIKE_WAIT_S if alike else OTHER_WAIT_S)
    _fatal(comm, text)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    comm.abort(status)


def _fatal(comm, text):
    """The one line a failing rank leaves on stderr: it names the rank, and tests and users grep for it. One
    write, so that lines of several ranks on one pipe never run together."""
    sys.stderr.flush()
    os.write(2, f"lenet-train: rank {comm.rank}/{comm.size}: error: {text}\n".encode(errors="replace"))


def _stall_guard(args, comm, trainer):
    """Under MPI, a guard that ends this rank when no step finishes for --stall-timeout seconds."""
    def on_stall(seconds):                  # the guard's thread: the main one is stuck, maybe inside MPI
        _fatal(comm, f"no training step finished in {seconds:.0f}s after step {trainer.step}: "
                     f"a rank died or hangs (--stall-timeout); exiting")
        os._exit(exitcodes.STALL)

    return StallGuard(args.stall_timeout if comm.size > 1 else 0, on_stall).start()


def main(argv=None):
    flags = parse_args(argv)
    args = flags.args
    if args.test_mode:
        started, var = launcher_size()
        if started and started > 1:         # N copies of the whole demo would fight over one port
            print(f"lenet-train: error: --test-mode runs in one process, but the launcher started {started} "
                  f"({var}={started}): run it without mpirun", file=sys.stderr, flush=True)
            return 2
        from workers.test_mode import run_test_mode
        return run_test_mode(flags, run)          # the loop is handed over: test_mode never imports us
    try:
        comm = get_comm()
    except (ValueError, LauncherMismatch) as e:   # a bad setting in the environment, or the wrong mpirun
        print(f"lenet-train: error: {one_line(e)}", file=sys.stderr, flush=True)
        return 2
    setup_logging(comm, args.log_level, args.log_format)
    if args.check:
        from lenet_dist.run.preflight import CheckPlan, run_checks
        from workers.common import read_dataset
        plan = CheckPlan(**{k: getattr(args, k) for k in CheckPlan.__dataclass_fields__ if k != "read_idx"},
                         read_idx=lambda: read_dataset(args, None))
        return run_checks(plan, comm)
    try:
        with blas_threads(flags.threads):
            status = run(flags, comm)
        settle()                            # decided: a late SIGTERM must not turn it into a death by signal
        return status
    except KeyboardInterrupt:
        log.error("rank %d: interrupted", comm.rank)
        return 130
    except Exception as e:  # noqa: BLE001 - any failure on any rank must end the whole job, never hang it
        status = exitcodes.status_for(e)
        _end_on_error(comm, one_line(e), status, alike=any(c.__name__ in ALIKE for c in type(e).__mro__))
        return status


if __name__ == "__main__":
    sys.exit(main())
