"""The evaluator's loop: fetch the newest checkpoint from a source (the trainer's socket or a folder),
check it, score it, print one line and hand the result to the outputs, until the final checkpoint, a
limit, or a stop signal. The process (workers/evaluator.py) parses the flags and wires the parts.

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

from .. import checkpoint, wire
from ..checkpoint import CheckpointError
from ..run.text import number, one_line
from .scoring import DataRefused

log = logging.getLogger("lenet.evaluator")


@dataclass(frozen=True)
class LoopConfig:
    once: bool = False              # evaluate the newest checkpoint, then return
    max_evaluations: int = 0        # return after this many (0: no limit)
    timeout: float = 0.0            # return 3 after this many seconds without a new checkpoint (0: never)
    poll_ms: int = 500              # how long one request waits for a new checkpoint
    delay: float = 0.0              # artificial slowness before each evaluation (tests, rehearsals)


@dataclass
class Output:
    """Where each result goes besides stdout: send(result); full: with the analysis (a report file)."""
    send: Callable[[dict], object]
    full: bool = False


def run_loop(cfg, stop, source, model, judge, outputs, best=None, live=None, health=None):
    """Evaluate what `source` serves until the final checkpoint, cfg's limits, or `stop` (a StopSignal); the
    exit status: 0 done or stopped by SIGTERM, 130 by SIGINT, 1 for a checkpoint of other data, 3 on timeout.
    `health` (health.Health): told each turn of the loop and each evaluation."""
    whoami = f"{socket.gethostname()}:{os.getpid()}"
    last_step, last_final, evaluations, status = -1, False, 0, None
    idle_since = time.monotonic()
    reminder = Reminder()
    while not stop:
        if health is not None:
            health.beat()
        if source.status != status:
            status = source.status
            ok = status.startswith(("connecting to", "connected to", "watching"))
            (log.info if ok else log.warning)("%s", status)
            reminder.restart()
        elif not ok and (waited := reminder.due()) is not None:
            log.warning("still %s%s, for %.0fs; waiting (%s)", status[0].lower(), status[1:], waited,
                        f"giving up at --timeout {cfg.timeout:g}s" if cfg.timeout else "--timeout SECONDS to give up")
        behind = getattr(source, "trainer_step", None)
        if behind is not None and behind < last_step:
            # The trainer is behind what we evaluated: a new run, or one resumed from an older checkpoint.
            log.warning("the trainer is at step %d, before the last evaluated step %d: following it", behind,
                        last_step)
            last_step, last_final = -1, False
        if cfg.timeout and time.monotonic() - idle_since > cfg.timeout:
            log.error("no new checkpoint from %s in %.1f s; giving up", source.endpoint, cfg.timeout)
            return 3
        try:
            got = source.fetch_newer(last_step, cfg.poll_ms, seen_final=last_final)
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
        if cfg.delay and stop.sleep(cfg.delay):
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
        print(f"step {step} epoch {epoch_text(ckpt.meta)}: {val}test accuracy {100 * result['accuracy']:.2f}% "
              f"loss {number(result['loss'])} ({result['n_test']} images, {result['eval_seconds']:.2f}s), "
              f"{result['lag_steps']} steps behind"
              + (", final" if final else ""), flush=True)
        if live is not None:
            live.on_evaluation(result, ckpt.params, detail, ckpt.meta.get("config"))
        full = dict(result, per_class=detail.per_class, confusion=detail.confusion.tolist(), worst=detail.worst)
        for o in outputs:                           # the report gets the analysis too; the link the figures
            o.send(full if o.full else result)
        try:
            if best and best.offer(result, data, ckpt.meta.get("config")):
                log.info("new best: step %d, validation %.2f%% (test %.2f%%), in %s", step,
                         100 * result["val_accuracy"], 100 * result["accuracy"], best.dir / "best.npz")
        except OSError as e:                        # a full or broken --best-dir: say so, keep evaluating
            log.error("could not keep the best checkpoint: %s", e)
        evaluations += 1
        if health is not None:
            health.evaluated(step)
        idle_since = time.monotonic()
        if final:
            log.info("evaluated the final checkpoint (step %d); exiting", step)
            return 0
        if cfg.once or evaluations == cfg.max_evaluations:
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


def epoch_text(meta):
    """The epoch as the trainer's lines say it: 'epoch 1/5' is the first epoch, in progress or just done."""
    epoch = int(meta["epoch"]) + (int(meta.get("pos", 0)) > 0)
    epochs = (meta.get("config") or {}).get("epochs")
    return f"{epoch}/{epochs}" if isinstance(epochs, int) else str(epoch)


