"""The evaluator's loop: fetch the newest checkpoint from each source (a trainer's socket or a folder),
check it, score it, print one line and hand the result to the outputs, run after run, until a limit, a
stop signal, or (cfg.exit_after_run) the final checkpoint of every source's run. The process (workers/evaluator.py) parses the flags and wires the parts.

    status = run_loop(LoopConfig(once=True), stop, source, LeNet5(), Judge(dataset), [Output(print)])
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import Callable

from lenet_dist.checkpoints import format as checkpoint
from lenet_dist.checkpoints.format import CheckpointError
from lenet_dist.evaluation.scoring import DataRefused
from lenet_dist.run.text import number, one_line
from lenet_dist.transport import wire

log = logging.getLogger("lenet.evaluator")


@dataclass(frozen=True)
class LoopConfig:
    once: bool = False              # evaluate the newest checkpoint, then return
    max_evaluations: int = 0        # return after this many (0: no limit)
    timeout: float = 0.0            # return 3 after this many seconds without a new checkpoint (0: never)
    poll_ms: int = 500              # how long one request waits for a new checkpoint
    delay: float = 0.0              # artificial slowness before each evaluation (tests, rehearsals)
    exit_after_run: bool = False    # return once every source's run has served its final checkpoint


@dataclass
class Output:
    """Where each result goes besides stdout: send(result); full: with the analysis (a report file)."""
    send: Callable[[dict], object]
    full: bool = False


class Track:
    """What the loop knows of one source (a trainer's endpoint or a checkpoint folder): the last step it
    evaluated there, the run that step belongs to, whether that run has ended."""

    def __init__(self, source):
        self.source = source
        self.last_step, self.last_final = -1, False
        self.status, self.ok = None, True
        self.reminder = Reminder()
        self.run_id, self.named, self.finished = None, None, False

    def run_name(self, run_id, named=None):
        """A watched folder's name, else the name the checkpoint carries (`named`: its run folder's, from a
        trainer over a socket), else the run id's first 8 characters; None for checkpoints with no run id."""
        return getattr(self.source, "run_name", None) or named or (run_id[:8] if run_id else None)


def run_loop(cfg, stop, sources, model, judge, outputs, best=None, live=None, health=None):
    """Evaluate what the sources serve until cfg's limits or `stop` (a StopSignal); a daemon by default:
    after a run's final checkpoint it waits for the next run on the same source. `sources`: one source, or a
    callable returning the current list of them (a folder of run folders grows). The exit status: 0 done or
    stopped by SIGTERM, 130 by SIGINT, 1 for a checkpoint of other data, 3 on timeout.
    `health` (health.Health): told each turn of the loop and each evaluation."""
    listing = sources if callable(sources) else (lambda: [sources])
    ctx = _Context(cfg, stop, model, judge, outputs, best, live, health)
    tracks = {}
    idle_since = time.monotonic()
    while not stop:
        if health is not None:
            health.beat()
        current = listing()
        for s in current:
            if id(s) not in tracks:
                tracks[id(s)] = Track(s)
            ctx.say_status(tracks[id(s)])
        if cfg.timeout and time.monotonic() - idle_since > cfg.timeout:
            log.error("no new checkpoint from %s in %.1f s; giving up",
                      ", ".join(s.endpoint for s in current) or "anywhere", cfg.timeout)
            return 3
        if not current:
            stop.sleep(cfg.poll_ms / 1000)
            continue
        wait_ms = max(10, cfg.poll_ms // len(current))
        for s in current:
            t = tracks[id(s)]
            got = ctx.turn(t, wait_ms)
            if got is None:
                continue
            idle_since = time.monotonic()
            if got != "evaluated":
                return got
            if cfg.once or ctx.evaluations == cfg.max_evaluations:
                return 0
            if t.finished and cfg.exit_after_run and all(tracks[id(x)].finished for x in current):
                log.info("evaluated the final checkpoint (step %d); exiting (--exit-after-run)", t.last_step)
                return 0
            if t.finished:
                log.info("run %s finished at step %d; waiting for the next run on %s", t.run_name(t.run_id, t.named) or "(unnamed)",
                         t.last_step, s.endpoint)
    log.info("stopped by signal %d (%s) after %d evaluations", stop.signum, stop.name, ctx.evaluations)
    return 130 if stop.signum == signal.SIGINT else 0


class _Context:
    """One turn of the loop on one source: ask it for a newer checkpoint, score it, hand the result out."""

    def __init__(self, cfg, stop, model, judge, outputs, best, live, health):
        self.cfg, self.stop, self.model, self.judge, self.outputs = cfg, stop, model, judge, outputs
        self.best, self.live, self.health = best, live, health
        self.whoami = f"{socket.gethostname()}:{os.getpid()}"
        self.evaluations = 0

    def say_status(self, t):
        """Log how the source stands when that changes, and remind of a problem that lasts."""
        source, cfg = t.source, self.cfg
        if source.status != t.status:
            t.status = source.status
            t.ok = t.status.startswith(("connecting to", "connected to", "watching"))
            (log.info if t.ok or t.finished else log.warning)("%s", t.status)
            t.reminder.restart()
        elif not t.ok and not t.finished and (waited := t.reminder.due()) is not None:
            log.warning("still %s%s, for %.0fs; waiting (%s)", t.status[0].lower(), t.status[1:], waited,
                        f"giving up at --timeout {cfg.timeout:g}s" if cfg.timeout else "--timeout SECONDS to give up")

    def turn(self, t, wait_ms):
        """None (nothing new), "evaluated", or an exit status."""
        source, cfg = t.source, self.cfg
        behind = getattr(source, "trainer_step", None)
        if behind is not None and behind < t.last_step:
            # The trainer is behind what we evaluated: a new run, or one resumed from an older checkpoint.
            # after a finished run that is the next run starting: no problem to warn of
            (log.info if t.finished else log.warning)("%s is at step %d, before the last evaluated step %d: "
                                                      "following it", source.endpoint, behind, t.last_step)
            t.last_step, t.last_final = -1, False
        try:
            got = source.fetch_newer(t.last_step, wait_ms, seen_final=t.last_final)
        except wire.BadMessage as e:
            log.warning("rejected a message from %s%s: %s", source.endpoint,
                        "" if e.step is None else f" (step {e.step})", e)
            if e.step is not None and e.step >= t.last_step:     # skip that checkpoint, don't ask for it again
                t.last_final = e.step == t.last_step    # the same step served again can only be its final copy
                t.last_step = e.step
            self.stop.sleep(0.2)
            return None
        if got is None:
            return None
        header, data = got
        step = header["step"]
        try:
            ckpt = checkpoint.from_bytes(data, name=f"checkpoint of step {step}")
            if ckpt.step != step:
                raise CheckpointError(f"header says step {step}, the checkpoint's meta says {ckpt.step}")
        except CheckpointError as e:
            log.warning("rejected a checkpoint from %s: %s", source.endpoint, e)
            t.last_step, t.last_final = step, header["final"]
            return None
        final = bool(header["final"] or ckpt.meta.get("final"))
        t.last_step, t.last_final = step, final
        run_id = ckpt.meta.get("run_id") if isinstance(ckpt.meta.get("run_id"), str) else None
        named = ckpt.meta.get("run_name")
        named = named if isinstance(named, str) and 0 < len(named) <= 100 and named.isprintable() else None
        if t.run_id is not None and run_id != t.run_id:
            log.info("a new run on %s: %s (was %s)", source.endpoint, t.run_name(run_id, named) or "unnamed",
                     t.run_name(t.run_id, t.named))
        t.run_id, t.named, t.finished = run_id, named, final
        if cfg.delay and self.stop.sleep(cfg.delay):
            return None
        self.model.load_named(ckpt.params)
        try:
            figures, detail = self.judge.score(self.model, ckpt, f"the checkpoint of step {step}")
        except DataRefused as e:
            log.error("%s", one_line(e))
            return 1
        trainer_step = source.trainer_step_now()
        result = {"run_id": run_id, "run": t.run_name(run_id, named), "source": source.endpoint, "step": step, "epoch": int(ckpt.meta["epoch"]),
                  **figures,
                  # the test figures' names before val_/test_ prefixes: aliases kept for one release
                  "accuracy": figures["test_accuracy"], "loss": figures["test_loss"],
                  "lag_steps": max(0, (trainer_step or step) - step), "trainer_step": trainer_step,
                  "sha256": header["sha256"], "final": final, "time": round(time.time(), 3),
                  "evaluator": self.whoami, "server": header.get("server")}     # which trainer process served it
        val = (f"validation accuracy {100 * result['val_accuracy']:.2f}% loss {number(result['val_loss'])}, "
               if "val_accuracy" in result else "")
        print(f"step {step} epoch {epoch_text(ckpt.meta)}: {val}test accuracy {100 * result['test_accuracy']:.2f}% "
              f"loss {number(result['test_loss'])} ({result['n_test']} images, {result['eval_seconds']:.2f}s), "
              f"{result['lag_steps']} steps behind"
              + (", final" if final else ""), flush=True)
        full = dict(result, per_class=detail.per_class, confusion=detail.confusion.tolist(), worst=detail.worst)
        for o in self.outputs:                      # the report gets the analysis too; the link the figures
            o.send(full if o.full else result)
        if self.live is not None:                   # after the outputs: the history holds the result already
            self.live.on_evaluation(result, ckpt.params, detail, ckpt.meta.get("config"))
        try:
            if self.best and self.best.offer(result, data, ckpt.meta.get("config")):
                log.info("new best: step %d, validation %.2f%% (test %.2f%%), in %s", step,
                         100 * result["val_accuracy"], 100 * result["test_accuracy"], self.best.dir / "best.npz")
        except OSError as e:                        # a full or broken --best-dir: say so, keep evaluating
            log.error("could not keep the best checkpoint: %s", e)
        self.evaluations += 1
        if self.health is not None:
            self.health.evaluated(step)
        return "evaluated"


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


def epoch_text(meta):
    """The epoch as the trainer's lines say it: 'epoch 1/5' is the first epoch, in progress or just done."""
    epoch = int(meta["epoch"]) + (int(meta.get("pos", 0)) > 0)
    epochs = (meta.get("config") or {}).get("epochs")
    return f"{epoch}/{epochs}" if isinstance(epochs, int) else str(epoch)


