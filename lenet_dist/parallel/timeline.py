"""--timeline FILE: every rank's phases over a window of steps, as Chrome trace events (Perfetto, chrome://tracing).

    each rank      (lane, name, start, end) of every phase of steps [first, last) of this start, its own clock
    window's end   one allgather_json (comm.py) of them; rank 0 writes the trace with files.atomic_write

Lanes (the trace's tid) of each rank (its pid, named "rank N"):
    compute        the main thread: step > [wait for turn,] data, forward (with the loss), backward, wait for sum,
                   update;
                   between steps: evaluation, replica check, checkpoint (content, write)
    sum ...        the gradient's sums, one lane per bucket and one for the tail (buckets.py), or "sum all"
                   for the fused allreduce: from the moment the reducer starts one to the moment it sees it
                   done (the reducer's interface, not inside MPI)

Nothing here touches the step itself: the trainer's, the model's and the reducer's hooks are wrapped
(instance attributes over the class's methods) only when --timeline is given, and only from the window's
first step to its last (before it, train_step alone is; after it, nothing); NoTimeline, the twin for a run
without the flag, wraps nothing, so such a run executes exactly the code it would without this module.
Timestamps: the ranks of rank 0's host share one clock (CLOCK_MONOTONIC); another host's ranks are aligned
at the window's first step, which the previous step's sum has synchronized. Figures: docs/performance.md.
Rank 0 also hands report_to's callable (the run's sinks.on_event) one compact row when the window closes:
{"event": "timeline", "step": B, "step_from": A, "step_to": B, "ranks": [{"rank": r, "phases": {name: s}}]},
each phase's seconds summed over the window (summarize), which the dashboard draws as bars per rank.
"""
from __future__ import annotations

import json
import logging
import time

from lenet_dist.comm import allgather_json
from lenet_dist.files import atomic_write
from lenet_dist.nn.model import PARAM_SPECS
from lenet_dist.parallel.buckets import layer_starts

log = logging.getLogger("lenet.timeline")

DEFAULT_STEPS = (50, 70)        # 20 steps after a warm-up of 50 (caches, MPI connections, scratch arrays)
COMPUTE, SUM_ALL = 0, 1         # lanes; buckets from 2, then the tail
_ABSENT = object()


def parse_steps(text):
    """'A:B' -> (A, B): steps A to B-1 of this start; ValueError naming the text otherwise."""
    a, sep, b = text.partition(":")
    try:
        first, last = int(a), int(b)
    except ValueError:
        first = last = -1
    if not sep or first < 0 or last <= first:
        raise ValueError(f"--timeline-steps must be A:B with 0 <= A < B (steps of this start), got {text!r}")
    return first, last


def timeline_for(path, steps=DEFAULT_STEPS):
    """The recorder for --timeline `path` (None: the twin that records nothing)."""
    return NoTimeline() if path is None else Timeline(path, steps)


class NoTimeline:
    """No --timeline: wraps nothing."""

    def attach(self, trainer):
        return self

    def watch(self, obj, method, name, first_arg=None):
        return self

    def report_to(self, on_row):
        return self


class Timeline:
    """This rank's recorder for --timeline: attach() it to the trainer; rank 0 writes the file."""

    def __init__(self, path, steps=DEFAULT_STEPS, clock=time.perf_counter):
        self.path, self.steps, self.clock = path, steps, clock
        self.on = False                 # inside the window: the wrappers record
        self.events = []                # (lane, name, t0, t1, args)
        self.lanes = ["compute", "sum all"]
        self.mark = 0.0                 # where this piece's data phase began (step start, or the last backward's end)
        self.started = {}               # comm lane -> when its bucket under way was started
        self.written = None             # the path, once written (rank 0)
        self._watches = []              # (obj, method, name, first_arg): wrapped when the window opens
        self._undo = []                 # (obj, attribute, its own value before, or _ABSENT)
        self.report = None              # rank 0: called with the window's summary row (summarize)

    def add(self, lane, name, t0, t1, args=None):
        if self.on:
            self.events.append((lane, name, t0, t1, args))

    # ------------------------------------------------------------------------------------- the wrappers
    def attach(self, trainer):
        """Wrap `trainer` (a DataParallelTrainer, after any restore) for the window counted from its step."""
        self.trainer, self.comm = trainer, trainer.comm
        start, remaining = trainer.step, trainer.total_steps - trainer.step
        first, last = self.steps
        if last > remaining:            # a shorter run: the window's length, as late as the run allows
            first, last = max(0, remaining - (last - first)), remaining
        self.window = (start + first, start + last)        # absolute step numbers
        self.watch(trainer, "evaluate", "evaluate", "test")
        self.watch(trainer, "check_synced", "replica check")
        self.watch(trainer, "checkpoint_content", "checkpoint content")
        self._wrap_step(trainer)
        return self

    def report_to(self, on_row):
        """Rank 0 calls on_row(summary row) when the window closes (the run's sinks.on_event)."""
        self.report = on_row
        return self

    def watch(self, obj, method, name, first_arg=None):
        """Record every call of obj.method inside the window as an event on the compute lane: `name`, and
        the call's first argument when `first_arg` names its default (evaluate test | val)."""
        self._watches.append((obj, method, name, first_arg))
        if self.on:
            self._watch(obj, method, name, first_arg)
        return self

    def detach(self):
        """Put back every hook wrapped: the trainer runs its plain code again."""
        for obj, attr, old in reversed(self._undo):
            if old is _ABSENT:
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)
        self._undo = []

    def _replace(self, obj, attr, new):
        self._undo.append((obj, attr, vars(obj).get(attr, _ABSENT)))
        setattr(obj, attr, new)

    def _install(self):
        """The window opens: wrap the model's, the reducer's and the watched hooks."""
        self._wrap_model(self.trainer.model)
        self._wrap_reducer(self.trainer)
        for watched in self._watches:
            self._watch(*watched)

    def _watch(self, obj, method, name, first_arg):
        inner, clock, add = getattr(obj, method), self.clock, self.add

        def timed(*a, **k):
            t = clock()
            try:
                return inner(*a, **k)
            finally:
                add(COMPUTE, name if first_arg is None else f"{name} {a[0] if a else first_arg}", t, clock())
        self._replace(obj, method, timed)

    def _wrap_step(self, trainer):
        inner, clock, first, last = trainer.train_step, self.clock, *self.window

        def train_step(stop_request=False):
            step = trainer.step
            if step == first:
                self._install()
                self.on, self.origin = True, clock()
            t = self.mark = clock()
            result = inner(stop_request)
            self.add(COMPUTE, "step", t, clock(), {"step": step})
            if self.on and (step == last - 1 or result.stop):     # stop: every rank, after the same step
                self._write(step)
                self.detach()
            return result
        self._replace(trainer, "train_step", train_step)

    def _wrap_model(self, model):
        forward, backward, clock, add = model.forward, model.backward, self.clock, self.add
        reducer_of = lambda: self.trainer.reducer                 # noqa: E731 (a Straggler may wrap it later)
        started = [0.0]

        def timed_forward(x, train=False, before=None):
            if not (train and self.on):
                return forward(x, train, before)
            t = started[0] = clock()
            add(COMPUTE, "data", self.mark, t)
            if before is not None:
                before = self._timed_before(before, reducer_of())
            return forward(x, train, before)

        def timed_backward(d, ready=None):
            t = clock()
            add(COMPUTE, "forward", started[0], t)
            backward(d, ready)
            self.mark = clock()
            add(COMPUTE, "backward", t, self.mark)
        self._replace(model, "forward", timed_forward)
        self._replace(model, "backward", timed_backward)

    def _timed_before(self, before, reducer):
        """Pipelined: forward's hook; the calls that waited for the last step's owed sums are recorded."""
        clock = self.clock

        def timed(offset):
            t, waited = clock(), reducer.waited
            before(offset)
            if reducer.waited != waited:
                self.add(COMPUTE, "wait for sum (owed)", t, clock())
        return timed

    def _wrap_reducer(self, trainer):
        reducer, clock, add = trainer.reducer, self.clock, self.add
        total, update = _method(reducer, "sum"), _method(reducer, "update")

        def timed_sum(stop, seconds):
            t = clock()
            stats = total(stop, seconds)
            t1 = clock()
            add(COMPUTE, "wait for sum", t, t1)
            if getattr(trainer.reducer, "engine", None) is None:   # the fused allreduce: the wait is the sum
                add(SUM_ALL, "sum all", t, t1)
            return stats

        def timed_update(apply):
            def timed_apply(part):
                t = clock()
                apply(part)
                add(COMPUTE, "update", t, clock(), {"params": [part.start, part.stop]})
            return update(timed_apply)
        self._replace(reducer, "sum", timed_sum)
        self._replace(reducer, "update", timed_update)
        for engine in _engines(reducer):
            self._wrap_engine(engine)
        for turns in (r for r in _reducers(reducer) if hasattr(type(r), "wait_turn")):
            self._wrap_turn(turns)

    def _wrap_turn(self, turns):
        """Ranks in turns (turns.py): the sleep until this rank's turn, not counted as the step's data."""
        wait, clock = turns.wait_turn, self.clock

        def timed_wait():
            t = clock()
            wait()
            self.mark = clock()
            self.add(COMPUTE, "wait for turn", t, self.mark)
        self._replace(turns, "wait_turn", timed_wait)

    def _wrap_engine(self, engine):
        """Each bucket's collectives (and the tail's) report when they start and when they are seen done."""
        lanes = []
        for lo, hi in engine.buckets:
            name = "sum " + _layers(lo, hi)
            if name not in self.lanes:
                self.lanes.append(name)
            lanes.append(self.lanes.index(name))
        if "sum tail" not in self.lanes:
            self.lanes.append("sum tail")
        send = engine._send

        def timed_send(i):
            ops = send(i)
            if not self.on:
                return ops
            n = len(ops)
            return [_TimedOp(op, self, lanes[i], k == 0, k == n - 1) for k, op in enumerate(ops)]
        self._replace(engine, "_send", timed_send)
        self._replace(engine, "_tail", _TimedOp(engine._tail, self, self.lanes.index("sum tail"), True, True))

    # ------------------------------------------------------------------------------------ the trace
    def _write(self, last_step):
        """Every rank, after the window's last step: gather the events; rank 0 writes the trace."""
        self.on = False
        comm = self.comm
        mine = {"host": comm.processor_name(), "origin": self.origin, "lanes": self.lanes,
                "events": [(lane, name, t0, t1, args) for lane, name, t0, t1, args in self.events]}
        self.events = []
        ranks = allgather_json(comm, mine)                                      # [dist]
        if comm.rank != 0:
            return
        steps = (self.window[0], last_step)
        if self.report is not None:     # steps counted as the step rows count them: done, 1 after the first
            self.report(summarize(ranks, self.window[0] + 1, last_step + 1))
        trace = to_chrome_trace(ranks, steps, self.trainer.reducer.description)
        try:
            self.written = atomic_write(self.path, json.dumps(trace).encode())
        except OSError as e:            # an output, not the run: say so and train on
            log.warning("timeline not written: %s", e.strerror or e)
            return
        log.info("timeline of steps %d-%d of %d rank(s) written to %s (open it in https://ui.perfetto.dev or "
                 "chrome://tracing)", *steps, comm.size, self.path)


class _TimedOp:
    """One collective of a bucket (buckets.Lane calls start, test, wait): the first reports the bucket's
    start, the last the moment it is seen done."""
    __slots__ = ("op", "tl", "lane", "first", "last")

    def __init__(self, op, tl, lane, first, last):
        self.op, self.tl, self.lane, self.first, self.last = op, tl, lane, first, last

    def start(self):
        if self.first:
            self.tl.started[self.lane] = self.tl.clock()
        self.op.start()

    def test(self):
        done = self.op.test()
        if done and self.last:
            self._done()
        return done

    def wait(self):
        self.op.wait()
        if self.last:
            self._done()

    def _done(self):
        t0 = self.tl.started.pop(self.lane, None)
        if t0 is not None:
            self.tl.add(self.lane, self.tl.lanes[self.lane], t0, self.tl.clock())


def _method(obj, name):
    """obj.name as its class defines it, or as obj.__getattr__ finds it at each call (autotune's AutoReducer
    hands its calls to the reducer active at the time)."""
    if hasattr(type(obj), name):
        return getattr(obj, name)
    return lambda *a: obj.__getattr__(name)(*a)


def _reducers(reducer):
    """The reducer and every reducer under it (fixed point, autotune and Straggler wrap others)."""
    yield reducer
    for attr in ("inner", "fused", "buckets", "reducer"):
        child = vars(reducer).get(attr)
        if child is not None and hasattr(child, "sum"):
            yield from _reducers(child)


def _engines(reducer):
    """The bucket engines under a reducer."""
    for r in _reducers(reducer):
        if vars(r).get("engine") is not None:
            yield vars(r)["engine"]


def _layers(lo, hi):
    """'fc1..fc3': the layers whose gradients are flat [lo, hi)."""
    names = [PARAM_SPECS[2 * k][0].split(".")[0] for k, s in enumerate(layer_starts()) if lo <= s < hi]
    return names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"


PHASES = {"data": "data", "forward": "forward", "backward": "backward", "wait for sum": "wait",
          "wait for sum (owed)": "wait", "wait for turn": "wait", "update": "update"}      # compute-lane event -> summary phase


def summarize(ranks, step_from, step_to):
    """Every rank's gathered events -> the window's row: per rank, the seconds of each phase summed (data,
    forward, backward, wait, update; "sum": the gradient's sums on their own lanes, overlapping the others;
    "other": evaluation, replica check, checkpoint; "step": the steps' wall time)."""
    out = []
    for rank, r in enumerate(ranks):
        phases = dict.fromkeys(("data", "forward", "backward", "wait", "update", "sum", "other", "step"), 0.0)
        for lane, name, t0, t1, _ in r["events"]:
            key = "sum" if lane else PHASES.get(name, "step" if name == "step" else "other")
            phases[key] += max(0.0, t1 - t0)
        out.append({"rank": rank, "phases": {k: round(v, 6) for k, v in phases.items()}})
    return {"event": "timeline", "step": step_to, "step_from": step_from, "step_to": step_to, "ranks": out}


def to_chrome_trace(ranks, steps, reduction):
    """Every rank's gathered events -> the Chrome trace event format: "X" events, ts and dur in microseconds,
    pid the rank, tid the lane, with process and thread names."""
    host0, origin0 = ranks[0]["host"], ranks[0]["origin"]
    out = []
    for rank, r in enumerate(ranks):
        origin = origin0 if r["host"] == host0 else r["origin"]
        out.append({"name": "process_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": f"rank {rank}"}})
        out.append({"name": "process_sort_index", "ph": "M", "pid": rank, "tid": 0, "args": {"sort_index": rank}})
        used = sorted({e[0] for e in r["events"]})
        for tid in used:
            out.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": r["lanes"][tid]}})
            out.append({"name": "thread_sort_index", "ph": "M", "pid": rank, "tid": tid, "args": {"sort_index": tid}})
        for lane, name, t0, t1, args in sorted(r["events"], key=lambda e: (e[2], -e[3])):
            ts = round((t0 - origin) * 1e6, 1)
            event = {"name": name, "cat": "comm" if lane else "compute", "ph": "X", "pid": rank, "tid": lane,
                     "ts": ts, "dur": max(0.0, round((t1 - origin) * 1e6, 1) - ts)}
            if args:
                event["args"] = args
            out.append(event)
    return {"traceEvents": out, "displayTimeUnit": "ms",
            "otherData": {"steps": list(steps), "ranks": len(ranks), "reduction": reduction,
                          "clock": "ranks on rank 0's host: one clock; others aligned at the window's start"}}
