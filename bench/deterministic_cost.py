"""What --deterministic costs: training throughput of the fixed-point mode against the float mode.

    LENET_DATA_DIR=/path/to/mnist python bench/deterministic_cost.py [--repeats 5] [--steps 60]

One process, one BLAS thread, the real DataParallelTrainer; modes interleaved within each repeat. Prints one
JSON line per mode with the median images/s and its ratio to the float mode at the same batch size.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from threadpoolctl import threadpool_limits

from lenet_dist.comm import LocalComm
from lenet_dist.config import TrainConfig
from lenet_dist.data import load_mnist, load_subset
from lenet_dist.parallel.step import DataParallelTrainer


def throughput(ds, cfg, steps, warmup=5):
    t = DataParallelTrainer(cfg, LocalComm(), ds)
    for _ in range(warmup):
        t.train_step()
    t0 = time.perf_counter()
    seen = sum(t.train_step()[0] for _ in range(steps))
    return seen / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batches", default="64,256")
    p.add_argument("--micro", default="16,64", help="micro-batch sizes to try in deterministic mode")
    args = p.parse_args()
    ds = load_mnist(download=False, log=lambda m: None) if os.environ.get("LENET_DATA_DIR") else load_subset()
    modes = [("float", None)] + [(f"deterministic-m{m}", int(m)) for m in args.micro.split(",")]
    with threadpool_limits(1, "blas"):
        for batch in map(int, args.batches.split(",")):
            runs = {name: [] for name, _ in modes}
            for _ in range(args.repeats):
                for name, m in modes:
                    cfg = TrainConfig(batch_size=batch, deterministic=m is not None, micro_batch=m or 16)
                    runs[name].append(throughput(ds, cfg, args.steps))
            base = statistics.median(runs["float"])
            for name, v in runs.items():
                med = statistics.median(v)
                print(json.dumps({"bench": "deterministic_cost", "batch": batch, "mode": name,
                                  "images_per_s": round(med, 1), "ratio_to_float": round(med / base, 3)}),
                      flush=True)


if __name__ == "__main__":
    main()
