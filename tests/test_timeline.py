"""--timeline: every rank's phases over a window of steps, as a Chrome trace (lenet_dist/parallel/timeline.py).
Real runs (`mpirun -n 2`, one process) write the file; the tests open it as Perfetto would: valid JSON in the
trace event format, every rank's phases in it, events on one lane ordered and never overlapping (the compute
lane nests, as a flame chart does), and the step itself unchanged by the recording."""
import collections
import json

import numpy as np
import pytest

from lenet_dist.comm import LocalComm
from lenet_dist.config import TrainConfig
from lenet_dist.parallel.autotune import AutoReducer
from lenet_dist.parallel.fixedpoint import FixedPointReducer
from lenet_dist.parallel.reducers import BucketedReducer, FusedReducer, HalfPrecisionReducer
from lenet_dist.parallel.step import DataParallelTrainer
from lenet_dist.parallel.timeline import timeline_for

from tests.mpiutil import launch
from tests.trained import data, one_blas_thread  # noqa: F401 (fixtures)

BASE = ["--subset", "--no-progress", "--log-level", "WARNING", "--stall-timeout", "30"]
STEP_PHASES = {"step", "data", "forward", "backward", "wait for sum", "update"}
EPS = 0.25          # microseconds: ts and dur are rounded to 0.1 us each


def check_trace(trace):
    """Raise AssertionError unless `trace` is a valid Chrome trace of ranks; -> {pid: Counter of names}."""
    assert isinstance(trace, dict) and isinstance(trace["traceEvents"], list)
    names, lanes, ranks = collections.defaultdict(collections.Counter), collections.defaultdict(list), {}
    for e in trace["traceEvents"]:
        assert e["ph"] in ("X", "M"), e
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int), e
        if e["ph"] == "M":
            if e["name"] == "process_name":
                ranks[e["pid"]] = e["args"]["name"]
            continue
        assert isinstance(e["name"], str) and e["name"], e
        assert isinstance(e["ts"], (int, float)) and isinstance(e["dur"], (int, float)), e
        assert e["dur"] >= 0, f"negative duration: {e}"
        names[e["pid"]][e["name"]] += 1
        lanes[e["pid"], e["tid"]].append(e)
    assert ranks == {pid: f"rank {pid}" for pid in names}, f"process names {ranks} for pids {sorted(names)}"
    for (pid, tid), events in lanes.items():
        assert [e["ts"] for e in events] == sorted(e["ts"] for e in events), f"rank {pid} lane {tid}: not in order"
        open_ = []                      # the compute lane nests; a comm lane's events follow one another
        for e in events:
            while open_ and open_[-1] <= e["ts"] + EPS:
                open_.pop()
            end = e["ts"] + e["dur"]
            if open_:
                assert tid == 0 and end <= open_[-1] + EPS, f"rank {pid} lane {tid}: {e} overlaps an event before it"
            open_.append(end)
    return names


def open_trace(path):
    return json.loads(path.read_text())


def steps_of(trace, pid=0):
    return [e["args"]["step"] for e in trace["traceEvents"]
            if e["ph"] == "X" and e["pid"] == pid and e["name"] == "step"]


# ------------------------------------------------------------------------------------------ real runs
def test_two_ranks_buckets_and_epoch_end(tmp_path, mpi_flavour):
    # 2,000 examples, batch 20, no held-out split: 100 steps an epoch; the window 95:105 holds the epoch's end
    f = tmp_path / "t.json"
    launch(2, [*BASE, "--epochs", "2", "--batch-size", "20", "--val-size", "0", "--bucket-kb", "64",
               "--checkpoint-dir", tmp_path / "ck", "--timeline", f, "--timeline-steps", "95:105"])
    trace = open_trace(f)
    names = check_trace(trace)
    assert sorted(names) == [0, 1]
    for rank in (0, 1):
        assert STEP_PHASES <= set(names[rank]), names[rank]
        assert names[rank]["step"] == 10 and steps_of(trace, rank) == list(range(95, 105))
        for phase in ("sum fc1..fc3", "sum conv1..conv2", "sum tail"):     # each bucket, each step
            assert names[rank][phase] == 10, (rank, phase, names[rank])
        assert names[rank]["evaluate test"] == names[rank]["evaluate val"] == 1
        assert names[rank]["checkpoint content"] == 1
    assert names[0]["checkpoint write"] == 1 and names[1]["checkpoint write"] == 0     # rank 0 writes
    assert trace["otherData"]["steps"] == [95, 104] and trace["otherData"]["ranks"] == 2


def test_two_ranks_default_window_moves_into_a_short_run(tmp_path, mpi_flavour):
    # 1,834 training examples at batch 64: 29 steps, fewer than the default window 50:70: the last 20 are kept
    f = tmp_path / "t.json"
    launch(2, [*BASE, "--epochs", "1", "--batch-size", "64", "--timeline", f], cwd=tmp_path)
    trace = open_trace(f)
    names = check_trace(trace)
    for rank in (0, 1):
        assert STEP_PHASES <= set(names[rank]) and names[rank]["sum all"] == 20, names[rank]
        assert steps_of(trace, rank) == list(range(9, 29))


def test_a_signal_inside_the_window_writes_the_steps_made(tmp_path):
    # SIGTERM on rank 0 before step 10: every rank stops after step 10, the window 5:60 ends there
    f = tmp_path / "t.json"
    p = launch(2, [*BASE, "--epochs", "1", "--batch-size", "20", "--val-size", "0", "--checkpoint-dir", tmp_path / "ck",
                   "--timeline", f, "--timeline-steps", "5:60", "--fault", "0:10:term"], check=False)
    assert "stopped by signal 15 at step 11" in p.stderr, p.stderr
    trace = open_trace(f)
    check_trace(trace)
    assert steps_of(trace, 0) == steps_of(trace, 1) == list(range(5, 11))
    assert trace["otherData"]["steps"] == [5, 10]


def test_one_process(tmp_path):
    f = tmp_path / "t.json"
    launch(0, [*BASE, "--epochs", "1", "--batch-size", "32", "--timeline", f, "--timeline-steps", "3:8"],
           cwd=tmp_path)
    trace = open_trace(f)
    names = check_trace(trace)
    assert list(names) == [0] and STEP_PHASES <= set(names[0])
    assert steps_of(trace) == [3, 4, 5, 6, 7]


@pytest.mark.parametrize("flags, says", [
    (["--timeline-steps", "7:3"], "--timeline-steps must be A:B"),
    (["--timeline-steps", "x"], "--timeline-steps must be A:B"),
    (["--timeline", "/no/such/folder/t.json"], "no folder /no/such/folder"),
    (["--timeline", "/tmp"], "not a regular file"),
])
def test_bad_flags_are_one_line(flags, says):
    p = launch(0, [*BASE, *flags], check=False)
    assert p.returncode == 2 and says in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


# ------------------------------------------------------------------------------------------ in process
REDUCERS = {      # every way of summing, in one process (LocalComm: the collectives are the identity)
    "fused": lambda comm: None,
    "buckets, pipelined": lambda comm: BucketedReducer(comm, 64, pipelined=True),
    "float16": lambda comm: HalfPrecisionReducer(comm, 64, "float16"),
    "fixed point, buckets": lambda comm: FixedPointReducer(BucketedReducer(comm, 64), 10),
    "measured": lambda comm: AutoReducer(FusedReducer(comm), BucketedReducer(comm, 64)),
}


def trainer(data, pipelined=False, reducer=None):
    cfg = TrainConfig(epochs=1, batch_size=50, val_size=0, train_subset=1000)
    comm = LocalComm()
    make = REDUCERS["buckets, pipelined" if pipelined else reducer or "fused"]
    return DataParallelTrainer(cfg, comm, data, reducer=make(comm))


@pytest.mark.parametrize("reducer", REDUCERS)
def test_recording_changes_nothing_in_the_step(data, tmp_path, reducer):
    # pipelined: the owed update runs inside the next forward, through the timeline's wrappers
    plain, timed = trainer(data, reducer=reducer), trainer(data, reducer=reducer)
    tl = timeline_for(tmp_path / "t.json", (2, 7)).attach(timed)
    for _ in range(10):
        a, b = plain.train_step(), timed.train_step()
        assert a == b
    plain.settle(), timed.settle()
    assert np.array_equal(plain.model.params, timed.model.params)
    assert tl.written == tmp_path / "t.json"
    names = check_trace(open_trace(tl.written))[0]
    assert STEP_PHASES <= set(names) and names["step"] == 5, names
    if reducer == "buckets, pipelined":
        assert names["wait for sum (owed)"] >= 4 and names["sum fc1..fc3"] == 5, names
    elif reducer in ("fused", "measured"):          # the measured path tries buckets first
        assert names["sum all" if reducer == "fused" else "sum tail"] == 5, names
    else:
        assert names["sum fc1..fc3"] == names["sum conv1..conv2"] == names["sum tail"] == 5, names


def wrapped(t):
    """Which of the trainer's, model's and reducer's hooks are wrapped (instance attributes over methods)."""
    hooks = {name for obj, names in ((t, ("train_step", "evaluate")), (t.model, ("forward", "backward")),
                                     (t.reducer, ("sum", "update")), (t.reducer.engine, ("_send",)))
             for name in names if name in vars(obj)}
    return hooks | ({"_tail"} if type(t.reducer.engine._tail).__name__ == "_TimedOp" else set())


def test_hooks_are_wrapped_for_the_window_only(data, tmp_path):
    off, on = trainer(data, pipelined=True), trainer(data, pipelined=True)
    timeline_for(None).attach(off)
    tail = on.reducer.engine._tail
    timeline_for(tmp_path / "t.json", (2, 4)).attach(on)
    everything = {"train_step", "evaluate", "forward", "backward", "sum", "update", "_send", "_tail"}
    for step in range(6):
        assert wrapped(off) == set()                                # off: the plain code, always
        # the window opens in step 2's call and closes at the end of step 3's
        assert wrapped(on) == ({"train_step"} if step <= 2 else everything if step == 3 else set()), step
        on.evaluate("val")                                          # recorded only inside the window
        off.train_step(), on.train_step()
    assert on.reducer.engine._tail is tail                          # put back as it was
    assert check_trace(open_trace(tmp_path / "t.json"))[0]["evaluate val"] == 1


def test_the_checker_catches_what_perfetto_would_misdraw():
    def trace(*events):
        meta = [{"name": "process_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": "rank 0"}}]
        return {"traceEvents": meta + [dict(name=n, ph="X", pid=0, tid=tid, ts=ts, dur=d) for n, tid, ts, d in events]}
    check_trace(trace(("step", 0, 0, 10), ("data", 0, 0, 2), ("forward", 0, 2, 3), ("sum", 1, 1, 4), ("sum", 1, 5, 1)))
    for bad in (trace(("step", 0, 0, 10), ("data", 0, 5, 10)),       # a child outlives its parent
                trace(("sum", 1, 0, 4), ("sum", 1, 2, 4)),           # two sums of one lane at once
                trace(("sum", 1, 3, 1), ("sum", 1, 0, 1)),           # out of order
                trace(("data", 0, 0, -1))):                          # negative
        with pytest.raises(AssertionError):
            check_trace(bad)
    with pytest.raises(AssertionError):                              # a rank without its name
        check_trace({"traceEvents": [dict(name="x", ph="X", pid=1, tid=0, ts=0, dur=1)]})
