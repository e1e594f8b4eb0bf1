"""What rank 0 shows on screen: progress while it trains, one line per epoch, a summary at the end.

    progress (stderr): a tqdm bar when stderr is a terminal; otherwise (under mpirun stderr is a pipe) a
                       plain line every few seconds:
                       step 140/1565 (epoch 1/5): loss 0.4213, 2,310 images/s, ETA 1m07s
    epoch line (stdout): epoch 1/5 step 313/1565: lr 0.0488 | train loss 0.4916 acc 85.12% | test loss ...
    summary (stdout):  what the run reached, how fast, where its files are, the command to go on

Accuracies are percentages on screen everywhere; the JSON keeps fractions.
"""
from __future__ import annotations

import logging
import sys
import time

from lenet_dist.run.sinks import Sink
from lenet_dist.run.text import number

log = logging.getLogger("lenet.trainer")


def duration(seconds):
    """1h02m, 3m07s, 41.2s."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


def percent(fraction):
    return f"{number(fraction, '.2f', 100)}%"


def epoch_line(r, epochs, total_steps):
    """The on-screen line for one epoch record (the dict --metrics writes)."""
    ev = r.get("evaluator")
    ev_text = f" | evaluator: step {ev.get('step')} acc {percent(ev.get('accuracy'))}" if ev else ""
    return (f"epoch {r['epoch']}/{epochs} step {r['step']}/{total_steps}: lr {r['lr']:.4g} | "
            f"train loss {number(r['train_loss'])} acc {percent(r['train_acc'])} | "
            + (f"val loss {number(r['val_loss'])} acc {percent(r['val_acc'])} | " if "val_acc" in r else "")
            + f"test loss {number(r['test_loss'])} acc {percent(r['test_acc'])} | "
            f"{r['images_per_s']:,.0f} images/s on {r['ranks']} rank(s), {r['seconds']:.1f}s{ev_text}")


def summary_lines(s):
    """The end-of-run summary (the dict the trainer passes to on_end) as lines for the screen."""
    lines = []
    where = f"at step {s['step']}/{s['total_steps']} (epoch {s['epoch']}/{s['epochs']})"
    speed = (f"{s['images_per_s']:,.0f} images/s on {s['ranks']} rank(s)" if s.get("images_per_s")
             else f"{s['ranks']} rank(s)")
    if s["outcome"] == "stopped":
        lines.append(f"stopped by {s['signal_name']} {where} after {duration(s['wall_seconds'])}, {speed}")
    elif s["outcome"] != "finished":            # a steering decision ended it: its one line
        lines.append(f"{s['outcome']}; ended {where} after {duration(s['wall_seconds'])}, {speed}")
    else:
        lines.append(f"finished {s['epochs']} epochs ({s['step']} steps) in {duration(s['wall_seconds'])}, {speed}")
    if s.get("test_acc") is not None:
        best = (f", {percent(s['best_test_acc'])} after epoch {s['best_epoch']} (best by validation)"
                if s.get("best_epoch") not in (None, s.get("last_epoch")) else "")
        lines.append(f"  test accuracy {percent(s['test_acc'])} after epoch {s['last_epoch']}{best}")
    ev = s.get("evaluator")
    if ev:
        lines.append(f"  evaluator: {percent(ev['accuracy'])} at step {ev['step']}"
                     + (f", best {percent(ev['best_accuracy'])} at step {ev['best_step']}"
                        if ev.get("best_step") not in (None, ev["step"]) else ""))
    if s.get("checkpoint"):
        lines.append(f"  checkpoint: {s['checkpoint']}")
    elif s.get("checkpoint_dir"):
        lines.append(f"  checkpoints: {s['checkpoint_dir']} (none written)")
    if s.get("best") or s.get("last"):          # the model to use: the best by validation, else the last
        lines.append(f"  model: {s.get('best') or s.get('last')}")
    if s.get("last"):
        best = f"   best: {s['best']} (epoch {s['best_epoch']})" if s.get("best") else ""
        lines.append(f"  last: {s['last']}{best}")
    if s.get("published"):
        lines.append(f"  published on {s['published']} (step {s['step']}, in memory only)"
                     if not s.get("checkpoint") else f"  also published on {s['published']}")
    if s.get("metrics"):
        lines.append(f"  metrics: {s['metrics']}")
    if s.get("note"):
        lines.append(f"  {s['note']}")
    for label in ("resume", "evaluate", "export"):
        if s.get(f"{label}_command"):
            lines.append(f"  {label}: {s[f'{label}_command']}")
    return lines


class ProgressSink(Sink):
    """Rank 0's screen. `enabled` False (--no-progress) keeps the epoch lines and the summary but shows no
    progress; `every`: seconds between plain progress lines. out/err: the streams (tests pass their own)."""

    def __init__(self, enabled=True, every=5.0, out=None, err=None):
        self.enabled, self.every = enabled, every
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.bar = None

    def on_start(self, info):
        self.info = info
        self.t_start = self.t_last = time.perf_counter()
        self.step_start = info.start_step
        self.images = self.images_last = 0          # examples trained since this start / at the last line
        if self.enabled and self.err.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=info.total_steps, initial=info.start_step, unit="step", dynamic_ncols=True,
                            leave=False, file=self.err)

    def on_step(self, s):
        self.images += s.batch
        if self.bar is not None:
            self.bar.n = s.step
            if s.step % 10 == 0:
                self.bar.set_postfix(loss=f"{s.epoch_loss_sum / max(s.epoch_seen, 1):.4f}", refresh=False)
                self.bar.refresh()
        elif self.enabled and s.time - self.t_last >= self.every:
            self._line(s)

    def _line(self, s):
        """step 140/1565 (epoch 1/5): loss 0.4213, 2,310 images/s, ETA 1m07s (loss: the epoch so far;
        speed: since the last line; ETA: at the pace since this start, evaluations included)."""
        info = self.info
        rate = (self.images - self.images_last) / max(s.time - self.t_last, 1e-9)
        eta = (s.time - self.t_start) / max(s.step - self.step_start, 1) * (info.total_steps - s.step)
        log.info("step %d/%d (epoch %d/%d): loss %s, %s images/s, ETA %s", s.step, info.total_steps,
                 s.epoch + 1, info.epochs, number(s.epoch_loss_sum / max(s.epoch_seen, 1)), f"{rate:,.0f}",
                 duration(eta))
        self.t_last, self.images_last = s.time, self.images

    def _print(self, line):
        if self.bar is not None:        # the bar and the line share a terminal: clear the bar first
            self.bar.clear()
            self.err.flush()
        print(line, file=self.out, flush=True)
        if self.bar is not None:
            self.bar.refresh()

    def on_epoch(self, r):
        self._print(epoch_line(r, self.info.epochs, self.info.total_steps))
        self.t_last, self.images_last = time.perf_counter(), self.images     # speed: training only

    def on_end(self, summary):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        for line in summary_lines(summary):
            self._print(line)

    def close(self):
        if self.bar is not None:
            self.bar.close()
