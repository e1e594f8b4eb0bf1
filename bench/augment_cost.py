"""What the default recipe's augmentation costs a training step, measured in one process, interleaved.

Two trainers on the same data in one process (LocalComm, one BLAS thread): the reference recipe (by
default the one before shifts were on: `--augment-shift 0 --weight-decay 5e-4`) and TrainConfig's
defaults. They take turns, a block of --steps steps each, --blocks times (A, B, A, B ...); each block's
time per step is taken by the wall clock and by this process's CPU clock, and the summary is the median of
the per-pair ratios (defaults / reference). Alternating blocks share the machine's load, so the ratio holds
on a busy machine where whole runs one after another do not; the CPU clock moves less with the load still.

    LENET_DATA_DIR=/work/shared/data/mnist python bench/augment_cost.py
    python bench/augment_cost.py --blocks 12 --steps 100 --reference-shift 0 --reference-weight-decay 5e-4
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.timing import load_data  # noqa: E402
from lenet_dist.comm import LocalComm  # noqa: E402
from lenet_dist.config import TrainConfig  # noqa: E402
from lenet_dist.parallel.step import DataParallelTrainer  # noqa: E402


def block(trainer, steps):
    """(wall, CPU) seconds per step over `steps` steps."""
    w, c = time.perf_counter(), time.process_time()
    for _ in range(steps):
        trainer.train_step()
    return (time.perf_counter() - w) / steps, (time.process_time() - c) / steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=8, help="blocks of each recipe, alternating (default 8)")
    p.add_argument("--steps", type=int, default=100, help="steps a block (default 100)")
    p.add_argument("--reference-shift", type=int, default=0)
    p.add_argument("--reference-weight-decay", type=float, default=5e-4)
    p.add_argument("--data-dir", default=os.environ.get("LENET_DATA_DIR"), help="the four IDX files")
    a = p.parse_args(argv)
    if a.blocks < 1 or a.steps < 1:
        p.error("--blocks and --steps must be >= 1")
    ds, which = load_data(a.data_dir, prog="augment_cost")
    default = TrainConfig(epochs=1000)                  # never reaches the end of its schedule here
    reference = default.replace(augment_shift=a.reference_shift, weight_decay=a.reference_weight_decay)
    trainers = {"reference": DataParallelTrainer(reference, LocalComm(), ds),
                "default": DataParallelTrainer(default, LocalComm(), ds)}
    for t in trainers.values():
        block(t, 20)                                    # warm the caches and scratch buffers
    print(f"reference: augment_shift {reference.augment_shift}, weight_decay {reference.weight_decay}; "
          f"default: augment_shift {default.augment_shift}, weight_decay {default.weight_decay}; "
          f"batch {default.batch_size}, {which}, {a.blocks} blocks of {a.steps} steps each, alternating", flush=True)
    ratios = {"wall": [], "CPU": []}
    for i in range(a.blocks):
        order = ("reference", "default") if i % 2 == 0 else ("default", "reference")
        got = {name: block(trainers[name], a.steps) for name in order}
        for k, what in enumerate(ratios):
            ratios[what].append(got["default"][k] / got["reference"][k])
        print(f"block {i}: reference {1e3 * got['reference'][0]:.2f} ms/step (CPU {1e3 * got['reference'][1]:.2f}), "
              f"default {1e3 * got['default'][0]:.2f} ms/step (CPU {1e3 * got['default'][1]:.2f})", flush=True)
    for what, r in ratios.items():
        print(f"{what} time per step, default/reference: median {statistics.median(r):.3f} "
              f"(range {min(r):.3f}-{max(r):.3f} over {len(r)} pairs)")


if __name__ == "__main__":
    main()
