"""Two processes per core taking turns, their scratch in one arena or each its own, in one job.

    python bench/turn_scratch.py [--shard 64] [--steps 400] [--block 10] [--jobs 3]

What `mpirun -n 4` on 2 cores does in turns (lenet_dist/parallel/turns.py), without MPI: four processes,
two per core, each computing `LeNet5.loss_and_grad` on its shard and then handing the core to the other
process of its pair (a pipe; the kernel runs the woken process on the core the waker leaves). Every
`--block` steps the pairs switch between their Workspaces in one layers.ScratchArena (as the trainer's
ranks of one place do) and each in its own buffers, so both ways of working see the same machine. One
BLAS thread per process.

Per job, one JSON line: the median CPU time of one step (the thread's CPU clock, whatever else the machine
runs) and the median images/s per core, for the arena and for own scratch, and their ratio; then, over the
jobs, the range of each.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import time
from pathlib import Path

os.environ["OPENBLAS_NUM_THREADS"] = "1"            # before NumPy loads OpenBLAS: forked workers inherit it
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from lenet_dist.nn.layers import ScratchArena  # noqa: E402
from lenet_dist.nn.model import LeNet5  # noqa: E402

ARENA_BYTES = 1 << 27


def worker(seed, shard, steps, block, take, give, mem, report):
    """One process of a pair: `steps` steps, each after the pair's other process hands over (`take`)."""
    rng = np.random.default_rng(seed)
    model = LeNet5(seed=0)
    arena = ScratchArena(np.frombuffer(mem, np.uint8))
    for ws in model.workspaces():
        ws.arena = arena
    x = rng.standard_normal((shard, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, shard)
    cpu = {"arena": [], "own": []}
    blocks = {"arena": [], "own": []}
    began = time.perf_counter()
    for i in range(steps):
        way = "arena" if (i // block) % 2 == 0 else "own"
        os.read(take, 1)
        arena.active = way == "arena"
        t = time.thread_time()
        model.loss_and_grad(x, y, 1.0 / shard)
        cpu[way].append(time.thread_time() - t)
        arena.active = False
        os.write(give, b".")
        if i % block == block - 1:
            now = time.perf_counter()
            if i >= 2 * block:                          # the first block of each way warms up
                blocks[way].append(now - began)
            began = now
    out = {"cpu": {k: v[block:] for k, v in cpu.items()}, "blocks": blocks}
    os.write(report, (json.dumps(out) + "\n").encode())


def one_job(shard, steps, block):
    read_report, report = os.pipe()
    pids = []
    for core in range(2):
        mem = mmap.mmap(-1, ARENA_BYTES, flags=mmap.MAP_SHARED)         # the pair's arena
        a_to_b, b_to_a = os.pipe(), os.pipe()
        os.write(b_to_a[1], b".")                                       # the first process starts
        for seed, (take, give) in enumerate(((b_to_a[0], a_to_b[1]), (a_to_b[0], b_to_a[1]))):
            pid = os.fork()
            if pid == 0:
                try:
                    worker(2 * core + seed, shard, steps, block, take, give, mem, report)
                finally:
                    os._exit(0)
            pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    os.close(report)
    data = b""
    while chunk := os.read(read_report, 1 << 20):
        data += chunk
    records = [json.loads(line) for line in data.decode().splitlines() if line]
    if len(records) != 4:
        raise SystemExit(f"turn_scratch: {4 - len(records)} worker(s) failed")
    out = {"shard": shard, "steps": steps, "block": block}
    for way in ("arena", "own"):
        out[f"{way}_cpu_ms"] = round(float(np.median(np.concatenate([r["cpu"][way] for r in records]))) * 1e3, 3)
        # a block: each process of the core's pair computes `block` steps of `shard` examples
        per_core = [2 * shard * block / s for r in records for s in r["blocks"][way]]
        out[f"{way}_images_per_s_per_core"] = round(float(np.median(per_core)))
    out["cpu_own_over_arena"] = round(out["own_cpu_ms"] / out["arena_cpu_ms"], 3)
    out["speed_arena_over_own"] = round(out["arena_images_per_s_per_core"] / out["own_images_per_s_per_core"], 3)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shard", type=int, default=64, help="examples per process and step (default: 64)")
    ap.add_argument("--steps", type=int, default=400, help="steps per process and job (default: 400)")
    ap.add_argument("--block", type=int, default=10, help="steps between switches (default: 10)")
    ap.add_argument("--jobs", type=int, default=3, help="jobs, one after the other (default: 3)")
    args = ap.parse_args(argv)
    if args.steps < 6 * args.block:
        ap.error("--steps must be at least 6 blocks")
    jobs = []
    for _ in range(args.jobs):
        jobs.append(one_job(args.shard, args.steps, args.block))
        print(json.dumps(jobs[-1]), flush=True)
    summary = {"summary": True, "shard": args.shard, "jobs": len(jobs)}
    for key in ("arena_cpu_ms", "own_cpu_ms", "speed_arena_over_own", "cpu_own_over_arena"):
        summary[key + "_range"] = [min(j[key] for j in jobs), max(j[key] for j in jobs)]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
