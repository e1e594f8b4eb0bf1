"""What 2 ranks over 1 can reach on this machine with no communication at all: the ceiling for bench/scaling.py.

    python bench/pair_ceiling.py [--batch 256] [--rounds 6] [--seconds 3]

Each round runs, one after the other: one process training LeNet-5 (forward, backward, SGD step; random
data, one BLAS thread) on batches of --batch for --seconds, then two such processes at once, each on batches
of --batch/2, as two data-parallel ranks would be but without any allreduce. Per round it prints images/s
of each and two ratios to the single process:

    sum_over_solo       (a + b) / solo: what two independent halves deliver together
    2min_over_solo      2 * min(a, b) / solo: what equal shards deliver when every step waits for the slower
                        one (an upper bound: a real synchronized step waits for the slower rank step by
                        step, not on average)

then the medians over the rounds as one JSON line. On a machine whose two cores run at different speeds
(a shared VM: other tenants on the host), 2min_over_solo stays below 2 however good the trainer is.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def work(batch, seconds):
    """Images/s of training steps on random data for `seconds` (median step time, after a warm-up)."""
    import numpy as np

    from lenet_dist.config import TrainConfig
    from lenet_dist.nn.model import LeNet5
    from lenet_dist.nn.optim import SGD

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, batch)
    model = LeNet5(seed=0)
    cfg = TrainConfig()                 # the default recipe's optimizer
    opt = SGD(model.params, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)

    def step():
        model.loss_and_grad(x, y, scale=1.0)
        model.grads *= np.float32(1.0 / batch)
        opt.step(model.grads, 0.01)

    for _ in range(3):
        step()
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def spawn(batch, seconds):
    return subprocess.Popen([sys.executable, __file__, "--worker", "--batch", str(batch), "--seconds", str(seconds)],
                            stdout=subprocess.PIPE, text=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256, help="the one process's batch; each of the two gets half")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.batch < 2 or args.rounds < 1 or args.seconds <= 0:
        ap.error("need --batch >= 2, --rounds >= 1, --seconds > 0")
    if args.worker:
        print(work(args.batch, args.seconds), flush=True)
        return
    rounds = []
    for r in range(args.rounds):
        solo = float(spawn(args.batch, args.seconds).communicate()[0])
        pair = [spawn(args.batch // 2, args.seconds) for _ in range(2)]
        a, b = sorted(float(p.communicate()[0]) for p in pair)
        rec = {"round": r, "solo": round(solo), "pair": [round(a), round(b)],
               "sum_over_solo": round((a + b) / solo, 3), "2min_over_solo": round(2 * a / solo, 3)}
        print(json.dumps(rec), flush=True)
        rounds.append(rec)
    print(json.dumps({"summary": True, "batch": args.batch, "rounds": args.rounds, "cpus": os.cpu_count(),
                      "median_sum_over_solo": statistics.median(r["sum_over_solo"] for r in rounds),
                      "median_2min_over_solo": statistics.median(r["2min_over_solo"] for r in rounds),
                      "median_solo": statistics.median(r["solo"] for r in rounds)}), flush=True)


if __name__ == "__main__":
    main()
