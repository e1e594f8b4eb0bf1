"""The fused allreduce against the buckets, measured inside one MPI job: blocks of steps on each path in
turn (fused, buckets, fused, ...), as `--bucket-kb -1` does for its decision, but for as many blocks as
asked. Comparing blocks of the same job leaves out what separates two jobs on a shared machine (where
a job lands, what else runs then), which moved whole-job figures by 10% and more here.

    LENET_DATA_DIR=/path/to/mnist python bench/paths_interleaved.py [--ranks 2] [--batch 64] [--blocks 60]
    python bench/paths_interleaved.py --env MPIR_CVAR_IALLREDUCE_INTRA_ALGORITHM=sched_naive

The launcher runs `mpirun -n RANKS python bench/paths_interleaved.py --worker ...`; the worker builds the
real DataParallelTrainer (one BLAS thread per rank, full MNIST from $LENET_DATA_DIR or the cache; the
shipped subset otherwise), runs --warmup steps on the buckets, then the blocks. A block's time runs from
its first step to its last step's end (owed update settled), the slowest rank's. Prints one JSON line:
median milliseconds per step on each path, buckets / fused as the ratio of the medians and as the median
of the ratios of neighbouring blocks (with their range), and the trainer's schedule (pipelined or not).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def worker(args):
    import numpy as np

    from threadpoolctl import threadpool_limits

    from lenet_dist.comm import get_comm
    from lenet_dist.config import TrainConfig
    from lenet_dist.parallel.placement import reducer_for
    from lenet_dist.parallel.reducers import BucketedReducer, FusedReducer
    from lenet_dist.parallel.step import DataParallelTrainer

    from bench.timing import load_data

    comm = get_comm()
    ds, _ = load_data(args.data_dir, comm=comm, prog="paths_interleaved.py")
    cfg = TrainConfig(batch_size=args.batch, epochs=1000, bucket_kb=args.bucket_kb, seed=1)
    limits = threadpool_limits(limits=1, user_api="blas")       # noqa: F841 - one BLAS thread per rank
    buckets = reducer_for(cfg, comm)                            # the run's buckets, pipelined or not
    assert isinstance(buckets, BucketedReducer), "needs 2 or more ranks and --bucket-kb > 0"
    t = DataParallelTrainer(cfg, comm, ds, reducer=buckets)
    reducers = {"fused": FusedReducer(comm), "buckets": buckets, "late": buckets,
                "ifused": FusedReducer(comm, nonblocking=True)}   # ifused: the default's sum on one node
    for r in reducers.values():
        if r is not buckets:
            r.bind(t.model.grad_buffer, buckets.tail)
    loss_and_grad = t.model.loss_and_grad

    def late(x, y, scale=1.0, ready=None, before=None):
        """Backward without starting buckets: all of them leave after it (finish())."""
        return loss_and_grad(x, y, scale=scale, ready=None, before=before)
    paths = ("fused", "buckets") + (("late",) if args.late else ()) + (("ifused",) if args.ifused else ())
    for _ in range(args.warmup):
        t.train_step()
    t.settle()
    seconds = {p: [] for p in paths}
    for b in range(args.blocks):
        path = paths[b % len(paths)]
        t.settle()
        t.reducer = reducers[path]
        t.model.loss_and_grad = late if path == "late" else loss_and_grad
        comm.barrier()
        t0 = time.perf_counter()
        for _ in range(args.block_steps):
            t.train_step()
        t.settle()
        took = np.array([time.perf_counter() - t0])
        took = comm.allgather(took).max()                      # the slowest rank's
        seconds[path].append(float(took) / args.block_steps)
    if comm.rank != 0:
        return
    f, k = seconds["fused"], seconds["buckets"]
    pairs = [kb / fu for fu, kb in zip(f, k)]                  # neighbouring blocks: fused, then buckets
    extra = {}
    if args.late:
        lt = seconds["late"]
        extra = {"late_ms": round(1e3 * statistics.median(lt), 3),
                 "late_vs_fused": round(statistics.median(lt) / statistics.median(f), 4),
                 "late_paired": round(statistics.median(la / fu for fu, la in zip(f, lt)), 4)}
    if args.ifused:
        ifu = seconds["ifused"]
        extra.update(ifused_ms=round(1e3 * statistics.median(ifu), 3),
                     ifused_vs_fused=round(statistics.median(ifu) / statistics.median(f), 4),
                     ifused_paired=round(statistics.median(x / fu for fu, x in zip(f, ifu)), 4))
    print(json.dumps({
        "ranks": comm.size, "batch": args.batch, "bucket_kb": args.bucket_kb, "pipelined": buckets.pipelined,
        "blocks": args.blocks, "block_steps": args.block_steps,
        "fused_ms": round(1e3 * statistics.median(f), 3), "buckets_ms": round(1e3 * statistics.median(k), 3),
        "buckets_vs_fused": round(statistics.median(k) / statistics.median(f), 4),
        "paired": round(statistics.median(pairs), 4),
        "paired_quartiles": [round(q, 4) for q in statistics.quantiles(pairs, n=4)], **extra,
        "env": {k: v for k, v in os.environ.items() if k.startswith(("MPIR_CVAR", "LENET_"))},
        "load1": round(os.getloadavg()[0], 2)}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--batch", type=int, default=64, help="global batch size")
    p.add_argument("--bucket-kb", type=int, default=64)
    p.add_argument("--blocks", type=int, default=60, help="blocks in all, half on each path")
    p.add_argument("--block-steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--late", action="store_true",
                   help="a third path: the buckets all started after backward (no overlap)")
    p.add_argument("--ifused", action="store_true",
                   help="a fourth path: the fused sum as one non-blocking allreduce, waited for at once")
    p.add_argument("--data-dir", help="MNIST folder (default: $LENET_DATA_DIR, then the cache)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment for mpirun")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    env = dict(os.environ, **dict(e.split("=", 1) for e in args.env))
    cmd = [shutil.which("mpirun") or "mpirun", "-n", str(args.ranks), sys.executable, __file__, "--worker",
           *sys.argv[1:]]
    return subprocess.run(cmd, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
