"""Where one data-parallel step goes, rank by rank: compute, waiting for the others, the allreduce itself.

    LENET_DATA_DIR=/path/to/mnist mpirun -n 4 python bench/step_phases.py [--steps 200] [--batch 256]

Every rank runs the real DataParallelTrainer (one BLAS thread) and stamps each step with CLOCK_MONOTONIC,
which all processes on one machine share: step start, end of its forward + backward, the moment every
rank has arrived (comm's arrival barrier done; with a core per rank, where there is no barrier, the
allreduce's start), allreduce done, step end. Rank 0 gathers the stamps and prints medians over the steps:

    step                     end to end, rank 0
    compute per rank         start -> end of forward + backward
    last compute -> arrived  how long after the slowest rank finished computing everyone knew it
    arrived -> allreduce     the collective alone, per rank and for the last one out
    allreduce -> step end    the SGD update (and anything else after the reduction)

With more ranks than cores the starts differ by milliseconds anyway (two ranks share a core), so what
matters is the step time and where the gaps are, not the spread of the starts.

    LENET_DATA_DIR=/path/to/mnist python bench/step_phases.py --layers [--batch 64] [--steps 200]

`--layers`: one process, no MPI, one BLAS thread, the default recipe's step (bench/timing.py): a table of
each layer's forward and backward (median ms per step; the GEMMs inside it; the model's useful GFLOP/s
and their share of the sgemm peak measured first on a 1024^3 product), the rest of the step (batch
gathering and shifts, the update, the loss), and the step's total share of the peak.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

PHASES = ("start", "computed", "arrived", "reduced", "end")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--data-dir", help="MNIST folder (default: $LENET_DATA_DIR, then the cache)")
    ap.add_argument("--layers", action="store_true", help="one process: the per-layer table (see above)")
    args = ap.parse_args(argv)
    if args.steps < 2 or args.warmup < 0 or args.batch < 1:
        ap.error("need --steps >= 2, --warmup >= 0, --batch >= 1")
    if args.layers:
        from bench.layer_table import main as layer_table
        return layer_table(args)

    from threadpoolctl import threadpool_limits

    from lenet_dist.comm import MPIComm
    from lenet_dist.config import TrainConfig
    from bench.timing import load_data
    from lenet_dist.parallel.step import DataParallelTrainer

    comm = MPIComm()
    ds, _ = load_data(args.data_dir, comm=comm, prog="step_phases.py")
    stamps = {k: [] for k in PHASES}
    total = args.warmup + args.steps
    # the fused allreduce (--bucket-kb 0): its phases are what the stamps split; buckets overlap them
    cfg = TrainConfig(batch_size=args.batch, epochs=max(1, -(-total * args.batch // len(ds.train_images)) + 1),
                      bucket_kb=0)
    with threadpool_limits(limits=1, user_api="blas"):
        trainer = DataParallelTrainer(cfg, comm, ds)
        model_step, wait_for_all, allreduce_ = trainer.model.loss_and_grad, comm.wait_for_all, comm.allreduce_

        def stamped(fn, phase):                # the real call, then a stamp
            def call(*a, **kw):
                out = fn(*a, **kw)
                stamps[phase].append(time.monotonic())
                return out
            return call

        # comm.allreduce_ calls self.wait_for_all(), so the instance attribute splits it at the barrier
        trainer.model.loss_and_grad = stamped(model_step, "computed")
        comm.wait_for_all = stamped(wait_for_all, "arrived")
        comm.allreduce_ = stamped(allreduce_, "reduced")
        for _ in range(args.warmup):
            trainer.train_step()
        for v in stamps.values():
            v.clear()
        comm.barrier()
        for _ in range(args.steps):
            stamps["start"].append(time.monotonic())
            trainer.train_step()
            stamps["end"].append(time.monotonic())

    every = comm.allgather(np.array([stamps[k] for k in PHASES]))       # (ranks, phases, steps)
    if comm.rank:
        return 0
    start, comp, arrived, red, end = (every[:, i, :] for i in range(len(PHASES)))

    def ms(v):
        return round(1e3 * float(np.median(v)), 2)

    print(f"{comm.size} ranks, global batch {args.batch}, {args.steps} steps, medians in ms")
    print(f"  step                      {ms(np.diff(end[0]))}")
    print(f"  compute per rank          {[ms(comp[r] - start[r]) for r in range(comm.size)]}")
    print(f"  last compute -> arrived   {ms(arrived.max(0) - comp.max(0))}")
    print(f"  arrived -> allreduce      per rank {[ms(red[r] - arrived[r]) for r in range(comm.size)]}, "
          f"last one out {ms(red.max(0) - arrived.max(0))}")
    print(f"  allreduce -> step end     {[ms(end[r] - red[r]) for r in range(comm.size)]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
