"""What --timeline costs a training step: steps of a trainer recording its timeline against steps of plain
trainers (as a run without the flag, which wraps nothing), in one job.

    python bench/timeline_cost.py [--rounds 10] [--steps 100] [--batch 64] [--bucket-kb N]
    mpirun -n 2 python bench/timeline_cost.py ...

One trainer (per rank) runs blocks of steps in three ways: "off" and "off2" plain, "on" with a timeline
attached for the block and recording every step (detached after it: the plain code again). Each round
runs one block of each, in an order that rotates from round to round (the same on every rank), so a busy
neighbour hurts all alike. Prints one JSON
line from rank 0: the median block time per step of each, wall clock and this thread's CPU time (which a
busy neighbour moves less), on/off (the cost while on) and off2/off (what two identical trainers differ
by here: the noise floor), and the milliseconds of the one write at a
window's end (20 steps gathered to rank 0, JSON, atomic write). And, below that noise floor, the CPU
time one recorded event adds (a call through a recording wrapper less the plain call) times the events of
a step, as a share of the CPU time of a step off. One BLAS thread; the subset
(LENET_DATA_DIR=/path/to/mnist: MNIST).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lenet_dist.comm import get_comm  # noqa: E402
from lenet_dist.config import TrainConfig  # noqa: E402
from lenet_dist.data import load_mnist, load_subset  # noqa: E402
from lenet_dist.parallel.step import DataParallelTrainer  # noqa: E402
from lenet_dist.parallel.timeline import timeline_for  # noqa: E402

CONFIGS = ("off", "on", "off2")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=100, help="steps per block")
    p.add_argument("--batch", type=int, default=64, help="global batch")
    p.add_argument("--bucket-kb", type=int, default=None, help="as lenet-train's (default: by placement)")
    args = p.parse_args()
    from threadpoolctl import threadpool_limits
    comm = get_comm()
    mnist = os.environ.get("LENET_DATA_DIR")
    data = load_mnist(mnist, download=False) if mnist else load_subset()
    cfg = TrainConfig(epochs=10000, batch_size=args.batch, bucket_kb=args.bucket_kb)
    with tempfile.TemporaryDirectory() as tmp, threadpool_limits(limits=1, user_api="blas"):
        path = Path(tmp) / "t.json"
        t = DataParallelTrainer(cfg, comm, data)
        for _ in range(20):                                         # warm-up
            t.train_step()
        per_step = {c: [] for c in CONFIGS}             # wall clock
        cpu_per_step = {c: [] for c in CONFIGS}         # this thread's CPU time: what a busy neighbour moves less
        for rnd in range(args.rounds):
            for c in CONFIGS[rnd % 3:] + CONFIGS[:rnd % 3]:
                tl = timeline_for(path, (0, 10 ** 9)).attach(t) if c == "on" else None
                comm.barrier()
                t0, c0 = time.perf_counter(), time.thread_time()
                for _ in range(args.steps):
                    t.train_step()
                t.settle()
                per_step[c].append((time.perf_counter() - t0) / args.steps)
                cpu_per_step[c].append((time.thread_time() - c0) / args.steps)
                if tl:
                    events = len(tl.events)
                    tl.detach()
        tl = timeline_for(path, (0, 10 ** 9)).attach(t)              # a window's events, then its end
        for _ in range(20):
            t.train_step()
        comm.barrier()
        t0 = time.perf_counter()
        tl._write(t.step - 1)
        write_ms = 1e3 * (time.perf_counter() - t0)
        tl.detach()
        event_us = _event_cost_us(Path(tmp) / "u.json")
    if comm.rank == 0:
        med = {c: statistics.median(v) for c, v in per_step.items()}
        cpu = {c: statistics.median(v) for c, v in cpu_per_step.items()}
        paired = [on / off for on, off in zip(per_step["on"], per_step["off"])]
        print(json.dumps({"ranks": comm.size, "batch": args.batch, "reduction": t.reducer.description,
                          "step_ms": {c: round(1e3 * v, 3) for c, v in med.items()},
                          "ratio_on_off": round(med["on"] / med["off"], 4),
                          "ratio_on_off_paired_median": round(statistics.median(paired), 4),
                          "ratio_off2_off": round(med["off2"] / med["off"], 4),
                          "cpu_step_ms": {c: round(1e3 * v, 3) for c, v in cpu.items()},
                          "cpu_ratio_on_off": round(cpu["on"] / cpu["off"], 4),
                          "cpu_ratio_off2_off": round(cpu["off2"] / cpu["off"], 4),
                          "events_per_step": round(events / args.steps, 1),
                          "recording_us_per_event": round(event_us, 3),
                          "recording_share_of_cpu_step": round(event_us * 1e-6 * events / args.steps / cpu["off"], 5),
                          "window_write_ms": round(write_ms, 1),
                          "rounds": args.rounds, "steps_per_block": args.steps,
                          "data": "mnist" if os.environ.get("LENET_DATA_DIR") else "subset",
                          "load_average": round(os.getloadavg()[0], 2)}))


def _event_cost_us(path, n=200_000):
    """CPU microseconds one recorded event adds: a call through a recording wrapper less the plain call (the
    ratios above cannot see below the noise floor; events per step times this can)."""
    class Target:
        def call(self, x=None):
            return x
    plain, wrapped = Target(), Target()
    tl = timeline_for(path)
    tl.on = True                                        # an open window: watch() wraps at once
    tl.watch(wrapped, "call", "event")
    best = {}
    for name, obj in (("plain", plain), ("wrapped", wrapped)) * 3:
        tl.events.clear()
        c0 = time.thread_time()
        for _ in range(n):
            obj.call()
        best[name] = min(best.get(name, 1e9), (time.thread_time() - c0) / n)
    return 1e6 * (best["wrapped"] - best["plain"])


if __name__ == "__main__":
    main()
