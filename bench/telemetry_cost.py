"""What --log-every costs the trainer: the telemetry sink's own time per step, and training steps with and
without it (the row going to a --metrics file and to a live TrainerLink, as with --publish), in one process.

    LENET_DATA_DIR=/path/to/mnist python bench/telemetry_cost.py [--every 10] [--blocks 10] [--steps 200]

Blocks of steps alternate (off, on, off, on, ...) so that a noisy neighbour hurts both alike. Prints one
JSON line: the sink's microseconds per step, the median step time of each configuration and their
ratio. One BLAS thread, batch 64, the configuration lenet-train uses by default.
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lenet_dist.comm import LocalComm  # noqa: E402
from lenet_dist.config import TrainConfig  # noqa: E402
from lenet_dist.data import load_mnist, load_subset  # noqa: E402
from lenet_dist.parallel.step import DataParallelTrainer  # noqa: E402
from lenet_dist.run.sinks import MetricsSink, RunInfo, StepState  # noqa: E402
from lenet_dist.run.telemetry import TelemetrySink  # noqa: E402
from lenet_dist.transport import TrainerLink  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--blocks", type=int, default=10, help="blocks per configuration")
    p.add_argument("--steps", type=int, default=200, help="steps per block")
    args = p.parse_args()
    from threadpoolctl import threadpool_limits
    data = load_mnist(os.environ["LENET_DATA_DIR"], download=False) if os.environ.get("LENET_DATA_DIR") else load_subset()
    cfg = TrainConfig(epochs=1000, batch_size=64)
    with tempfile.TemporaryDirectory() as tmp, threadpool_limits(limits=1, user_api="blas"), \
            TrainerLink("tcp://127.0.0.1:*") as link:
        trainer = DataParallelTrainer(cfg, LocalComm(), data)
        metrics = MetricsSink(Path(tmp) / "m.jsonl")
        sink = TelemetrySink(args.every, [metrics.write, link.telemetry], rank_examples=lambda: trainer.examples_by_rank)
        sink.on_start(RunInfo(total_steps=trainer.total_steps, start_step=0, steps_per_epoch=trainer.steps_per_epoch,
                              epochs=cfg.epochs, ranks=1, batch_size=cfg.batch_size, config=cfg.to_dict()))
        state = StepState()
        state.begin_epoch(0, time.perf_counter())
        per_step = {"off": [], "on": []}
        sink_seconds, sink_calls = 0.0, 0
        for _ in range(2):                                  # warm-up
            trainer.train_step()
        for block in range(2 * args.blocks):
            mode = "on" if block % 2 else "off"
            t0 = time.perf_counter()
            for _ in range(args.steps):
                B, loss, correct, _, lr = trainer.train_step()
                if mode == "on":
                    s0 = time.perf_counter()
                    state.add(trainer.step, B, loss, correct, lr, trainer.step_compute_seconds, s0)
                    sink.on_step(state)
                    sink_seconds += time.perf_counter() - s0
                    sink_calls += 1
            per_step[mode].append((time.perf_counter() - t0) / args.steps)
        metrics.close()
    off, on = statistics.median(per_step["off"]), statistics.median(per_step["on"])
    print(json.dumps({"every": args.every, "sink_us_per_step": round(1e6 * sink_seconds / sink_calls, 2),
                      "sink_share_of_step": round(sink_seconds / sink_calls / off, 5),
                      "step_ms_off": round(1e3 * off, 3), "step_ms_on": round(1e3 * on, 3),
                      "ratio_on_off": round(on / off, 4),
                      "block_spread_off": round(float(np.std(per_step["off"]) / off), 4),
                      "data": "mnist" if os.environ.get("LENET_DATA_DIR") else "subset",
                      "load_average": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
