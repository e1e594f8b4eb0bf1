"""The training step of this checkout against an older commit's, in one job: blocks of steps of each in turn.

For a refactoring that must not cost speed. Two separate jobs on a shared machine differ by more than the
2% to be seen (where a job lands, what else runs then); blocks of the same job alternating old, new, new,
old, ... share all of that. Both trainers get the same data, config (by placement unless --bucket-kb) and BLAS
thread; the older commit's package is imported first from a worktree, renamed, then this checkout's.

    git worktree add --detach /tmp/old 4222fd7
    python bench/commits_interleaved.py --old /tmp/old [--ranks 2] [--batch 64] [--blocks 40] [--bucket-kb 64]

Prints one JSON line: median ms per step of each, and new / old as the median over neighbouring pairs of
blocks (with quartiles); each block's time is the slowest rank's, owed updates settled.
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


def import_old(tree):
    """The older commit's trainer and communicator, imported as `lenet_dist` from `tree` and then removed
    from sys.modules, so that this checkout's package imports afresh (the old modules keep their names)."""
    sys.path.insert(0, str(tree))
    import lenet_dist.comm
    import lenet_dist.train
    assert Path(lenet_dist.train.__file__).resolve().is_relative_to(Path(tree).resolve()), lenet_dist.train.__file__
    old = lenet_dist.train.DataParallelTrainer, lenet_dist.comm.get_comm
    for name in [n for n in sys.modules if n == "lenet_dist" or n.startswith("lenet_dist.")]:
        del sys.modules[name]
    sys.path.remove(str(tree))
    return old


def worker(args):
    old_trainer, old_get_comm = import_old(args.old)
    sys.path.insert(0, str(ROOT))
    import numpy as np
    from threadpoolctl import threadpool_limits

    from lenet_dist.comm import get_comm
    from lenet_dist.config import TrainConfig
    from lenet_dist.parallel.step import DataParallelTrainer

    from bench.timing import load_data

    comm = get_comm()
    old_comm = old_get_comm()
    ds, _ = load_data(args.data_dir, comm=comm, prog="commits_interleaved.py")
    cfg = TrainConfig(batch_size=args.batch, epochs=1000, seed=1, bucket_kb=args.bucket_kb,
                      allreduce_dtype=args.allreduce_dtype)
    limits = threadpool_limits(limits=1, user_api="blas")       # noqa: F841 - one BLAS thread per rank
    trainers = {"old": old_trainer(cfg, old_comm, ds), "new": DataParallelTrainer(cfg, comm, ds)}
    for t in trainers.values():
        for _ in range(args.warmup):
            t.train_step()
        t.settle()
    seconds = {k: [] for k in trainers}
    for b in range(args.blocks):
        name = ("old", "new", "new", "old")[b % 4]               # each pair of blocks: both orders in turn
        t = trainers[name]
        comm.barrier()
        t0 = time.perf_counter()
        for _ in range(args.block_steps):
            t.train_step()
        t.settle()
        took = comm.allgather(np.array([time.perf_counter() - t0])).max()
        seconds[name].append(float(took) / args.block_steps)
    if comm.rank != 0:
        return 0
    old, new = seconds["old"], seconds["new"]
    ratios = [n / o for o, n in zip(old, new)]
    print(json.dumps({
        "ranks": comm.size, "batch": args.batch, "blocks": args.blocks, "block_steps": args.block_steps,
        "old_ms": round(1e3 * statistics.median(old), 3), "new_ms": round(1e3 * statistics.median(new), 3),
        "new_vs_old": round(statistics.median(ratios), 4),
        "quartiles": [round(q, 4) for q in statistics.quantiles(ratios, n=4)],
        "reduction": trainers["new"].reducer.name, "load1": round(os.getloadavg()[0], 2)}), flush=True)
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", required=True, type=Path, help="a worktree of the older commit")
    p.add_argument("--ranks", type=int, default=1, help="1: one process, no mpirun")
    p.add_argument("--batch", type=int, default=64, help="global batch size")
    p.add_argument("--bucket-kb", type=int, help="as lenet-train's (default: by placement)")
    p.add_argument("--allreduce-dtype", default="float32", help="as lenet-train's")
    p.add_argument("--blocks", type=int, default=40, help="blocks in all, half for each commit")
    p.add_argument("--block-steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--data-dir", help="MNIST folder (default: $LENET_DATA_DIR, then the cache)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if not (args.old / "lenet_dist" / "train.py").is_file():
        p.error(f"--old {args.old}: no lenet_dist/train.py there (a worktree of the older commit?)")
    if args.worker or args.ranks == 1:
        return worker(args)
    cmd = [shutil.which("mpirun") or "mpirun", "-n", str(args.ranks), sys.executable, __file__, "--worker",
           *sys.argv[1:]]
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())
