"""lenet-train: one trainer rank. Flags, logging, signals and the epoch loop; the math is in lenet_dist.

    lenet-train                                            # one process, 5 epochs of MNIST (~99.1%), kept
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
from dataclasses import dataclass, replace

import numpy as np

from lenet_dist.checkpoints import folder as ckptdir, format as checkpoint
from lenet_dist.comm import bcast_json, get_comm
from lenet_dist.data.identity import data_mismatch
from lenet_dist.errors import ResumeError, UsageError
from lenet_dist.launcher_env import launcher_size, LauncherMismatch
from lenet_dist.parallel.balance import straggler
from lenet_dist.parallel.step import DataParallelTrainer
from lenet_dist.parallel.timeline import timeline_for
from lenet_dist.run import control as live_control, exitcodes, setup
from lenet_dist.run.outcome import agreed_signal, position, summary, Tally, train_command, what_was_saved
from lenet_dist.run.process import blas_threads, raise_open_files_limit, setup_logging
from lenet_dist.run.progress import ProgressSink
from lenet_dist.run.sinks import LinkProgressSink, MetricsSink, RunInfo, Sinks, StepState
from lenet_dist.run.stall import StallGuard
from lenet_dist.run.steering import Steering
from lenet_dist.run.telemetry import TelemetrySink
from lenet_dist.run.text import number, one_line
from lenet_dist.stopsignal import signal_name, StopSignal

from workers.common import load_dataset
from workers.train_flags import parse_args

log = logging.getLogger("lenet.trainer")

ALIKE_WAIT_S = 10.0         # how long a rank waits for rank 0 to report an error they both raised
OTHER_WAIT_S = 1.0          # ... and for any other error, which rank 0 may or may not share
ALIKE = ("ResumeError", "DataError", "TrainingError", "UsageError")   # raised on every rank at one point


@dataclass
class Run:
    """One start of a run on this rank: what the loop works with."""
    flags: object               # train_flags.Flags
    comm: object
    trainer: DataParallelTrainer
    state: object               # setup.RunState on rank 0, else None
    steer: Steering             # early stop, the plateau schedule, the learning check (alike on every rank)
    link: object = None         # rank 0's TrainerLink with --publish
    saved: object = None        # rank 0: the newest checkpoint file written
    guard: object = None        # the stall guard of the loop
    progress: object = None     # the loop's StepState: its epoch sums go into checkpoints
    control: object = None      # live control (run/control.py), on every rank
    carried: tuple = (0, 0.0, 0)    # a resumed epoch's sums before the checkpoint (seen, loss sum, correct)

    @property
    def rank0(self):
        return self.comm.rank == 0


def run(flags, comm):
    """Train (or go on training) until the run ends: the exit status."""
    r = _start(flags, comm)
    if r is None:
        return 0
    try:
        r.link = _open_link(flags.args, log, r.state.run_id) if flags.args.publish and r.rank0 else None
        r.control = live_control.LiveControl(comm, r.link and r.link.control)
        return _train(r)
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
    r = Run(flags, comm, trainer, state, steer)
    try:
        return _resume(r, found)
    except BaseException:
        if state:
            state.close()
        raise


def _resume(r, found):
    """With --resume, the trainer restored from `found` (rank 0's pick); None when that run had finished."""
    flags, comm, trainer, state, cfg = r.flags, r.comm, r.trainer, r.state, r.trainer.cfg
    if flags.plan.resume and comm.bcast_(np.array([found is not None], np.int64))[0]:   # rank 0 decided
        if r.rank0:
            _check_same_data(state.resumed_from, found, trainer)
        trainer.restore(found)
        _restore_steering(r, found)
        at = (f"epoch {trainer.epoch + 1}/{cfg.epochs}, batch {trainer.pos} of {trainer.steps_per_epoch}"
              if not trainer.done else "the run has finished")
        log.info("resumed from %s at step %d/%d (%s; run %s)", state.resumed_from if r.rank0 else "",
                 trainer.step, trainer.total_steps, at, state.run_id if r.rank0 else "")
        ended, r.steer.ended = r.steer.ended, None
        if ended and not flags.plan.override:             # ended by a decision (early stop): as finished
            why = (f"has already ended at step {trainer.step}: {ended}; nothing to train (to go on anyway: "
                   f"--resume --override NAMES with a changed flag, e.g. early_stop)")
        elif trainer.done:                  # a finished run resumed (a requeue, a retry): nothing to train
            why = (f"has already finished: step {trainer.step}/{trainer.total_steps}, {cfg.epochs} of "
                   f"{cfg.epochs} epochs; nothing to train (to train longer: --resume --override epochs --epochs N)")
        else:
            return r
        if r.rank0:
            state.close()
            print(f"run {state.run_id} in {flags.plan.directory} {why}", flush=True)
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


def _train(r):
    """The epoch loop, from wherever the trainer stands to the end of the run or a stop: the exit status."""
    flags, comm, trainer, link = r.flags, r.comm, r.trainer, r.link
    args, cfg = flags.args, trainer.cfg
    stop = StopSignal()                    # a repeated SIGTERM (Slurm's time limit) still checkpoints
    t_start = time.perf_counter()
    tally = Tally(flags.plan.directory / "best.json", r.state.run_id) if flags.plan.resume and r.rank0 \
        else Tally()
    sinks = _sinks(flags, link, trainer, r.state.run_id if r.rank0 else None) if r.rank0 else Sinks()
    facts = flags.facts if not r.rank0 else _with_run(flags.facts, r.state.run_id)
    guard = r.guard = _stall_guard(args, comm, trainer)
    timeline = timeline_for(args.timeline, args.timeline_steps).attach(trainer)   # --timeline: wraps its hooks
    timeline.report_to(sinks.on_event)          # rank 0: the window's per-rank summary row
    if r.rank0 and r.state.writer:
        timeline.watch(r.state.writer, "write", "checkpoint write")
    try:
        sinks.on_start(RunInfo(total_steps=trainer.total_steps, start_step=trainer.step,
                               steps_per_epoch=trainer.steps_per_epoch, epochs=cfg.epochs, ranks=comm.size,
                               batch_size=cfg.batch_size, config=cfg.to_dict()))
        state = r.progress = StepState()
        first_step = trainer.step + 1      # logged when done: lenet-launch's restart time ends there
        announced = False                  # the measured allreduce path has been logged
        end = None                         # what ends the run, agreed after a voted step
        while not trainer.done:
            ep_start_step, t0 = trainer.step, time.perf_counter()
            epoch = trainer.epoch
            state.begin_epoch(epoch, t0)
            state.epoch_seen, state.epoch_loss_sum, state.epoch_correct = r.carried
            trainer.examples_by_rank[:] = 0
            trainer.seconds_by_rank[:] = 0
            while trainer.epoch == epoch and not trainer.done:
                flags.fault.maybe_fire(trainer, comm.rank)
                verdict_stop = _verdicts(r)      # rank 0: the evaluator's verdicts may end the run ...
                B, l, c, stop_all, lr = trainer.train_step(stop_request=bool(stop.signum) or verdict_stop
                                                           or r.control.wanted())   # ... and so may live control
                guard.beat()
                if trainer.reducer.chooser and trainer.reducer.chooser.decided and not announced:
                    announced = True
                    m = trainer.reducer.chooser.medians
                    log.info("allreduce: %s (fused %.2f ms a step, 64 KiB buckets %.2f ms, measured over the "
                             "first %d steps; --bucket-kb sets it)", trainer.reducer.path, 1e3 * m["fused"],
                             1e3 * m["buckets"], trainer.reducer.chooser.trial_steps)
                if trainer.step == first_step:
                    log.info("step %d done, the first of this start", trainer.step)
                state.add(trainer.step, B, l, c, lr, trainer.step_compute_seconds, time.perf_counter())
                sinks.on_step(state)
                if args.sync_every and trainer.step % args.sync_every == 0:
                    trainer.check_synced()
                if stop_all and (end := _agreed(r, stop, sinks)):  # [dist] what every rank voted on
                    break
                if args.checkpoint_every and trainer.step % args.checkpoint_every == 0 and trainer.epoch == epoch:
                    _checkpoint(r)
            train_seconds = time.perf_counter() - t0
            tally.add_training(state.epoch_seen - r.carried[0], train_seconds)
            if end:
                return _stop(r, end, stop, sinks, tally, facts, t_start)
            record, decision = _end_epoch(r, state, train_seconds, ep_start_step, lr)
            r.carried = (0, 0.0, 0)
            guard.beat()
            if r.rank0 and tally.add_epoch(record) and r.saved:
                info = dict(step=trainer.step, epoch=trainer.epoch, val_acc=record.get("val_acc"),
                            val_loss=record.get("val_loss"), test_acc=record["test_acc"], run_id=r.state.run_id)
                ckptdir.point(flags.plan.directory, "best", r.saved, info, warn=log.warning)
            sinks.on_epoch(record)
            if decision.lr_row:
                sinks.on_event(decision.lr_row)
                if r.rank0:
                    log.info("learning rate %g from step %d: %s", decision.lr_row["lr"], trainer.step,
                             decision.lr_row["reason"])
            if decision.end:
                return _steered_end(r, decision.end, decision.why, stop, sinks, tally, facts, t_start)
        guard.stop()                        # past the last collective: rank 0 may linger for the evaluator
        if link:
            _serve_final(r, stop, tally)
        sinks.on_end(summary(facts, reason="finished", saved=r.saved, link=link, tally=tally,
                             **position(trainer, comm, t_start)))
        return 0
    finally:
        guard.stop()
        sinks.close()


def _agreed(r, stop, sinks):
    """Every rank, after a step some rank voted on: rank 0's live-control actions applied alike, then what
    ends the run: ("signal", N), ("early_stop", why), ("control_stop", why), or None (train on)."""
    actions, early = r.control.agree(r.steer.ended if r.rank0 else None)     # [dist]
    end = None
    for action in actions:
        end = end or _apply_control(r, action, stop, sinks)
    signum = agreed_signal(r.comm, stop.signum)                         # [dist] the same on every rank
    return ("signal", signum) if signum else ("early_stop", early) if early else end


def _apply_control(r, action, stop, sinks):
    """Every rank, one agreed action after step S: its row and record, then what it does."""
    step, kind = r.trainer.step, action["action"]
    if kind == "resume":                    # not paused: nothing to continue
        if r.rank0:
            log.info("control: continue at step %d, but the run is not paused", step)
        return None
    _control_row(r, sinks, action)
    if kind == "lr_scale":
        r.steer.after_control(action)
        r.trainer.lr_scale = r.steer.lr_scale
        if r.rank0:
            log.info("control: learning rate x%g from step %d (%s)", action["value"], step + 1, action["source"])
    elif kind == "checkpoint":
        _checkpoint(r)
        if r.rank0:
            log.info("control: checkpoint at step %d (%s)", step, action["source"])
    elif kind == "pause":
        log.warning("control: paused after step %d (%s); this rank sleeps until continue or stop", step,
                    action["source"])           # every rank: each says where it sleeps
        ended = r.control.pause(lambda: bool(stop.signum), r.guard.beat)     # [dist]
        if ended["action"] == "signal":
            return None                     # agreed_signal ends the run
        _control_row(r, sinks, ended)
        if r.rank0 and ended["action"] == "resume":
            log.info("control: continued at step %d (%s)", step, ended["source"])
        action = ended
    if action["action"] == "stop":
        return "control_stop", f"stopped from the {action['source']} at step {step} (live control)"
    return None


def _control_row(r, sinks, action):
    row = live_control.row(r.trainer.step, action)
    sinks.on_event(row)
    if r.rank0:
        r.state.config_changes.append(live_control.record(r.trainer.step, action))


def _stop(r, end, stop, sinks, tally, facts, t_start):
    """Every rank agreed to stop (`end`, from _agreed): the stop checkpoint, the end row, the exit status
    128 + signal (0 when a decision or live control stopped it)."""
    comm, trainer = r.comm, r.trainer
    kind, signum = end
    _checkpoint(r)
    if kind != "signal":                    # ... voted by rank 0 alone: the evaluator's verdicts or live control
        return _steered_end(r, kind, signum, stop, sinks, tally, facts, t_start)
    log.warning("stopped by signal %d at step %d (%s); %s; exit status %d", signum, trainer.step,
                signal_name(signum), what_was_saved(r.flags.plan.directory, r.saved, r.link, r.rank0),
                exitcodes.stopped(signum))
    sinks.on_end(summary(facts, reason="signal", signum=signum, saved=r.saved, link=r.link, tally=tally,
                         **position(trainer, comm, t_start)))
    comm.barrier()          # [dist] mpirun ends the job when one rank exits non-zero: rank 0 has written all
    return exitcodes.stopped(signum)


def _end_epoch(r, state, train_seconds, ep_start_step, lr):
    """At an epoch's end: the replica check, the test and validation figures, the checkpoint, the epoch row."""
    comm, trainer, link = r.comm, r.trainer, r.link
    trainer.check_synced()
    test_loss, test_acc = trainer.evaluate()
    val = trainer.evaluate("val")           # the held-out split: what model selection may look at
    seen = state.epoch_seen
    figures = {"train_loss": state.epoch_loss_sum / max(seen, 1), "train_acc": state.epoch_correct / max(seen, 1),
               **({"val_loss": val[0], "val_acc": val[1]} if val else {})}
    # every rank holds the same collective figures, so every rank takes the same decision here
    decision = r.steer.after_validation(figures, trainer.step, trainer.epoch, trainer.cfg.lr, last=trainer.done)
    trainer.lr_scale = r.steer.lr_scale
    _checkpoint(r)                          # with the decision in its steering state
    record = {"event": "epoch", "epoch": trainer.epoch, "step": trainer.step, **figures,
              "test_loss": test_loss, "test_acc": test_acc, "seconds": round(train_seconds, 3),
              "images_per_s": round((seen - r.carried[0]) / train_seconds, 1), "ranks": comm.size,
              "steps": trainer.step - ep_start_step, "lr": lr}
    if comm.size > 1:                       # who did the work: equal shares unless --balance moved them
        record["allreduce"] = trainer.reducer.path
        record["reduction"] = trainer.reducer.name
        record["rank_shares"] = [round(float(v), 4) for v in trainer.examples_by_rank / max(seen, 1)]
        record["rank_compute_s"] = [round(float(v), 3) for v in trainer.seconds_by_rank]
        slow = straggler(trainer.examples_by_rank, trainer.seconds_by_rank)
        if slow and not trainer.cfg.balance and r.rank0:
            log.warning("rank %d computed %.1fx slower per example than rank %d this epoch; "
                        "--balance would give it a smaller share", slow[0], slow[2], slow[1])
    evaluator = link.latest_result() if link else None
    if evaluator:
        record["evaluator"] = evaluator
    return record, decision


def _verdicts(r):
    """Rank 0 with --early-stop and --publish: feed the evaluator's new verdicts to early stopping; True
    once it says stop (the vote then travels in the next step's allreduce, so every rank stops after it)."""
    if not (r.link and r.steer.cfg.early_stop) or r.steer.ended:
        return bool(r.steer.ended) and r.rank0
    for result in sorted(r.link.poll_results(), key=lambda v: v.get("step", 0)):
        if r.steer.after_verdict(result):
            return True
    return False


def _steered_end(r, kind, why, stop, sinks, tally, facts, t_start):
    """Every rank: a steering decision ended the run after the same step, its checkpoint written (marked
    final): say why in one line, serve the final checkpoint, the end row; exit 0, or NOT_LEARNING."""
    comm, trainer = r.comm, r.trainer
    status = exitcodes.NOT_LEARNING if kind == "not_learning" else exitcodes.OK
    r.guard.stop()                          # past the last collective: rank 0 may linger for the evaluator
    if r.rank0:
        (log.error if status else log.warning)("%s (step %d; %s)", why, trainer.step,
                                               what_was_saved(r.flags.plan.directory, r.saved, r.link, True))
    if r.link:
        _serve_final(r, stop, tally)
    sinks.on_end(summary(facts, reason=kind, why=why or kind.replace("_", " "), saved=r.saved, link=r.link,
                         tally=tally, **position(trainer, comm, t_start)))
    if status:
        comm.barrier()      # [dist] mpirun ends the job when one rank exits non-zero: rank 0 has written all
    return status


def _serve_final(r, stop, tally):
    """Keep serving the final checkpoint until an evaluator has judged it: up to --linger seconds when one
    has been in touch, a short grace (5 s) for one that is (re)connecting otherwise."""
    args, link, step = r.flags.args, r.link, r.trainer.step
    in_touch = bool(link.requests_seen or link.latest_result() is not None or args.test_mode)
    patience = args.linger if in_touch else min(args.linger, 5.0)
    if link.failed:
        patience = 0                        # its thread ended: it said so; nothing to wait for
    if patience > 0:
        log.info("serving the final checkpoint (step %d) for up to %.0fs until an evaluator reports", step, patience)
    result = link.wait_final(step, patience, stop=lambda: bool(stop.signum))
    if result is None and not in_touch and link.requests_seen:
        result = link.wait_final(step, args.linger - patience, stop=lambda: bool(stop.signum))
    if result:
        log.info("evaluator: step %d accuracy %s%% loss %s", result["step"],
                 number(result["accuracy"], ".2f", 100), number(result["loss"]))
        tally.add_evaluator(result)


def _with_run(facts, run_id):
    return replace(facts, run_id=run_id)


def _sinks(flags, link, trainer, run_id):
    """Rank 0's outputs: the progress display, epoch lines and summary, the --metrics JSONL, the link's step
    count, step telemetry (--log-every), TensorBoard (--tensorboard) and Prometheus (--metrics-port)."""
    args = flags.args
    sinks = Sinks([ProgressSink(enabled=args.progress, every=args.progress_every)])
    if args.metrics_address:
        sinks.sinks.append(_prometheus(flags, run_id, link))
    metrics = MetricsSink(flags.facts.metrics) if flags.facts.metrics else None
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


def _prometheus(flags, run_id, link):
    """--metrics-port: rank 0's /metrics; a port it cannot have is a usage error (one line)."""
    from lenet_dist.run.prometheus import PrometheusSink
    host, port = flags.args.metrics_address
    try:
        sink = PrometheusSink((host, port), run_id, flags.plan.directory and flags.plan.directory.name, link)
    except OSError as e:
        raise UsageError(f"--metrics-port {flags.args.metrics_port}: cannot serve on {host}:{port} "
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


def _checkpoint(r):
    """Rank 0 writes the checkpoint to disk (r.saved: its path; last.npz then leads to it) and/or publishes
    it; other ranks settle the step's update with it."""
    trainer = r.trainer
    trainer.settle()                        # [dist] every rank, at the same point
    if not (r.flags.plan.directory or r.flags.args.publish):
        return
    params, velocity, meta, residuals = trainer.checkpoint_content()    # [dist] every rank (residuals)
    if not r.rank0:
        return
    p = r.progress
    meta = r.state.meta(dict(meta, created=time.time(), steering=r.steer.state(),
                             epoch_so_far=p and [p.epoch_seen, p.epoch_loss_sum, p.epoch_correct],
                             final=meta["final"] or bool(r.steer.ended)))
    data = checkpoint.to_bytes(params, velocity, meta, residuals)
    if r.state.writer:
        r.saved = r.state.writer.write(meta["step"], data)
        ckptdir.point(r.flags.plan.directory, "last", r.saved,
                      {"step": meta["step"], "epoch": meta["epoch"], "run_id": meta["run_id"]}, warn=log.warning)
        log.debug("checkpoint %s", r.saved)
    if r.link:
        r.link.publish(step=meta["step"], epoch=meta["epoch"], data=data, final=meta["final"])


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
        from workers.preflight import run_checks
        return run_checks(args, comm)
    try:
        with blas_threads(flags.threads):
            return run(flags, comm)
    except KeyboardInterrupt:
        log.error("rank %d: interrupted", comm.rank)
        return 130
    except Exception as e:  # noqa: BLE001 - any failure on any rank must end the whole job, never hang it
        status = exitcodes.status_for(e)
        _end_on_error(comm, one_line(e), status, alike=any(c.__name__ in ALIKE for c in type(e).__mro__))
        return status


if __name__ == "__main__":
    sys.exit(main())
