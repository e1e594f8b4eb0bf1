"""The epoch loop of one trainer rank, from wherever the trainer stands to the end of the run or a stop.

Every step: the fault rehearsal, rank 0's votes (a signal, the evaluator's verdicts, live control), the step,
the sinks, the replica check and periodic checkpoints; after a voted step every rank agrees on what happens
(live control's actions, then a stop). At an epoch's end: the replica check, the test and validation
figures, the steering decision, the checkpoint, best.npz and the epoch row. How the run ends: finished, a
signal (its stop checkpoint, exit 128 + N), or a steering decision (early stop, not learning, a stop from the
page). workers/trainer.py builds the Run and its outputs; this module reads no flags.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

from lenet_dist.checkpoints import folder as ckptdir, format as checkpoint
from lenet_dist.parallel.balance import straggler
from lenet_dist.parallel.step import DataParallelTrainer
from lenet_dist.run import control as live_control, exitcodes
from lenet_dist.run.outcome import agreed_signal, position, RunFacts, summary, Tally, what_was_saved
from lenet_dist.run.setup import FolderPlan
from lenet_dist.run.sinks import RunInfo, StepState
from lenet_dist.run.steering import Steering
from lenet_dist.run.text import number
from lenet_dist.stopsignal import signal_name, StopSignal

log = logging.getLogger("lenet.trainer")


@dataclass(frozen=True)
class LoopSettings:
    """What the loop takes from the command line (workers/trainer.py fills it)."""
    plan: FolderPlan            # the checkpoint folder (plan.directory None: nothing written)
    facts: RunFacts             # what the end row says about the run's files and how to go on
    fault: object               # run/faults.FaultInjector: --fault's rehearsal, fired before a step
    publish: bool = False       # checkpoints are published to evaluators (rank 0's link)
    sync_every: int = 0         # check the replicas every N steps (0: at epoch ends only)
    checkpoint_every: int = 0   # a checkpoint every N steps too (0: at epoch ends only)
    linger: float = 0.0         # seconds rank 0 serves the final checkpoint for an evaluator's verdict
    evaluator_expected: bool = False   # an evaluator is sure to come (--test-mode starts one)


@dataclass
class Run:
    """One start of a run on this rank: what the loop works with."""
    settings: "LoopSettings"
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


def train(r, sinks, timeline):
    """The epoch loop, from wherever the trainer stands to the end of the run or a stop: the exit status.
    `sinks`: rank 0's outputs (run/sinks.py; Sinks() elsewhere); `timeline`: the --timeline recorder (or its
    no-op twin). r.guard is started; train stops it and closes the sinks however it ends."""
    s, comm, trainer, link = r.settings, r.comm, r.trainer, r.link
    cfg = trainer.cfg
    stop = StopSignal()                    # a repeated SIGTERM (Slurm's time limit) still checkpoints
    t_start = time.perf_counter()
    tally = Tally(s.plan.directory / "best.json", r.state.run_id) if s.plan.resume and r.rank0 else Tally()
    facts = replace(s.facts, run_id=r.state.run_id) if r.rank0 else s.facts
    guard = r.guard
    timeline.attach(trainer)                    # --timeline: wraps its hooks
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
                s.fault.maybe_fire(trainer, comm.rank)
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
                if s.sync_every and trainer.step % s.sync_every == 0:
                    trainer.check_synced()
                if stop_all and (end := _agreed(r, stop, sinks)):  # [dist] what every rank voted on
                    break
                if s.checkpoint_every and trainer.step % s.checkpoint_every == 0 and trainer.epoch == epoch:
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
                ckptdir.point(s.plan.directory, "best", r.saved, info, warn=log.warning)
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
                signal_name(signum), what_was_saved(r.settings.plan.directory, r.saved, r.link, r.rank0),
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
    final, but for a live control stop, which --resume continues): say why in one line, serve the final
    checkpoint, the end row; exit 0, NOT_LEARNING, or STOPPED (a run that did not finish: not 0)."""
    comm, trainer = r.comm, r.trainer
    status = {"not_learning": exitcodes.NOT_LEARNING, "control_stop": exitcodes.STOPPED}.get(kind, exitcodes.OK)
    r.guard.stop()                          # past the last collective: rank 0 may linger for the evaluator
    if r.rank0:
        (log.error if status == exitcodes.NOT_LEARNING else log.warning)(
            "%s (step %d; %s)", why, trainer.step, what_was_saved(r.settings.plan.directory, r.saved, r.link, True))
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
    s, link, step = r.settings, r.link, r.trainer.step
    in_touch = bool(link.requests_seen or link.latest_result() is not None or s.evaluator_expected)
    patience = s.linger if in_touch else min(s.linger, 5.0)
    if link.failed:
        patience = 0                        # its thread ended: it said so; nothing to wait for
    if patience > 0:
        log.info("serving the final checkpoint (step %d) for up to %.0fs until an evaluator reports", step, patience)
    result = link.wait_final(step, patience, stop=lambda: bool(stop.signum))
    if result is None and not in_touch and link.requests_seen:
        result = link.wait_final(step, s.linger - patience, stop=lambda: bool(stop.signum))
    if result:
        log.info("evaluator: step %d accuracy %s%% loss %s", result["step"],
                 number(result["accuracy"], ".2f", 100), number(result["loss"]))
        tally.add_evaluator(result)


def _checkpoint(r):
    """Rank 0 writes the checkpoint to disk (r.saved: its path; last.npz then leads to it) and/or publishes
    it; other ranks settle the step's update with it."""
    trainer = r.trainer
    trainer.settle()                        # [dist] every rank, at the same point
    if not (r.settings.plan.directory or r.settings.publish):
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
        ckptdir.point(r.settings.plan.directory, "last", r.saved,
                      {"step": meta["step"], "epoch": meta["epoch"], "run_id": meta["run_id"]}, warn=log.warning)
        log.debug("checkpoint %s", r.saved)
    if r.link:
        r.link.publish(step=meta["step"], epoch=meta["epoch"], data=data, final=meta["final"])
