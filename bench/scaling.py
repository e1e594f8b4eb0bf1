"""Data-parallel scaling on this machine: images/s at 1, 2, 4 MPI ranks, the allreduce's share, peak RSS.

    LENET_DATA_DIR=/path/to/mnist python bench/scaling.py [--repeats 5] [--steps 80] [--ranks 1,2,4]
    python bench/scaling.py --env MPIR_CVAR_CH4_PROGRESS_THROTTLE=1        # extra environment for mpirun
    python bench/scaling.py --variant raw:@raw --variant lib:               # compare MPICH settings, interleaved
    python bench/scaling.py --variant equal: --variant balance:@balance      # equal shards against --balance
    python bench/scaling.py --ranks 2 --straggler 1 --variant equal: --variant balance:@balance   # rank 1 3x slow

The launcher runs `mpirun -n N python bench/scaling.py --worker ...` for every rank count, repeat and
variant, interleaved (repeat 1: every variant and N, then repeat 2, ...), so a change in the machine's load
hits all configurations alike. Each worker builds the real DataParallelTrainer (global batch 256, one BLAS
thread per rank) on full MNIST ($LENET_DATA_DIR or the cache, never a download; the shipped subset with a
warning otherwise), runs --warmup steps, then times --steps steps. Per configuration one JSON line:

    images_per_s        global batch * steps / wall time (the slowest rank's)
    images_per_cpu_s    global batch * steps / CPU seconds of all ranks together: what the work costs,
                        whatever share of a busy machine the job got (a sleeping rank costs nothing)
    allreduce_share     time the step is blocked on its reduction (trainer.comm_seconds: the fused
                        allreduce, or the wait for the buckets) / wall time: the reduction *and* the wait
                        for the slowest peer ("allreduce+wait share of step time"), mean and max over ranks
    peak_rss_mb         ru_maxrss, max over the ranks (with the full training and test set loaded)

then one summary line: medians over the repeats, and the ratios the issue asks for (2 ranks / 1 rank,
4 ranks / 2 ranks), each as the ratio of the medians, the median of the per-repeat ratios (the goal's
figure: a round's -n 4 beside its own -n 2) and every round's ratio (`per_round`).

4 ranks on 2 cores take turns by default (lenet_dist/parallel/turns.py); against competing, and against
turns whose ranks keep their own scratch:
    python bench/scaling.py --ranks 2,4 --variant turns: --variant free:LENET_TURNS=off [--batch 64]
    python bench/scaling.py --ranks 4 --variant shared: --variant own:LENET_TURNS_SCRATCH=own

A variant is NAME:KEY=VALUE,KEY=VALUE. By default a worker opens MPI as lenet-train does (MPIComm(),
whose MPICH defaults apply); `@raw` in a variant opens it without the oversubscribed node's naps and
settings, i.e. plain MPICH plus whatever the variant and --env set; `@balance` trains with --balance
(shards sized by each rank's measured speed, lenet_dist/parallel/balance.py); `@fused` trains with --bucket-kb 0 (one allreduce after
backward instead of the default buckets); every record has `rank_shares` and `rank_compute_ms` (each rank's compute time per step) over the timed steps.
--straggler R makes rank R compute 3x slower (as `--fault R:0:slow` does in lenet-train).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

MARK = "SCALING-RESULT "        # the worker's result line on rank 0's stdout


# -------------------------------------------------------------------------------------------------- worker

def worker(args):
    from threadpoolctl import threadpool_limits

    from lenet_dist.comm import MPIComm
    from lenet_dist.config import TrainConfig
    from lenet_dist.parallel.reducers import Straggler
    from lenet_dist.parallel.step import DataParallelTrainer
    import numpy as np
    from bench.timing import TimedReducer, load_data

    class RawComm(MPIComm):
        """Plain MPI: no naps, no library settings for an oversubscribed node (@raw)."""
        def _waiting_politely(self):
            return None, {}

    comm = RawComm() if args.raw else MPIComm()
    ds, source = load_data(args.data_dir, comm=comm, prog="scaling.py",
                           note=" (2,000 images): figures are NOT comparable (set LENET_DATA_DIR)")

    total = args.warmup + args.steps
    cfg = TrainConfig(batch_size=args.batch, epochs=max(1, -(-total * args.batch // len(ds.train_images)) + 1),
                      balance=args.balance, bucket_kb=0 if args.fused else TrainConfig.bucket_kb)
    with threadpool_limits(limits=1, user_api="blas"):
        trainer = DataParallelTrainer(cfg, comm, ds)
        if comm.rank == args.straggler:
            trainer.reducer = Straggler(trainer.reducer, 3.0)
        trainer.reducer = timed = TimedReducer(trainer.reducer)

        for _ in range(args.warmup):
            trainer.train_step()
        comm.barrier()
        timed.comm_seconds = 0.0
        trainer.examples_by_rank[:] = 0
        trainer.seconds_by_rank[:] = 0
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            trainer.train_step()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0

    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0          # KiB on Linux
    mine = np.array([wall, timed.comm_seconds, rss_mb, cpu], np.float64)
    every = comm.allgather(mine)                                                   # (size, 4)
    if comm.rank == 0:
        wall_max = float(every[:, 0].max())
        shares = every[:, 1] / every[:, 0]
        print(MARK + json.dumps({
            "ranks": comm.size, "images_per_s": round(args.batch * args.steps / wall_max, 1),
            "step_ms": round(1e3 * wall_max / args.steps, 2),
            "images_per_cpu_s": round(args.batch * args.steps / float(every[:, 3].sum()), 1),
            "allreduce_share": round(float(shares.mean()), 4), "allreduce_share_max": round(float(shares.max()), 4),
            "allreduce_ms_per_step": round(1e3 * float(every[:, 1].mean()) / args.steps, 3),
            "peak_rss_mb": round(float(every[:, 2].max()), 1),
            "peak_rss_mb_per_rank": [round(float(v), 1) for v in every[:, 2]],
            "data": source, "train_images": len(ds.train_images),
            "rank_shares": [round(float(v), 4) for v in trainer.examples_by_rank / (args.batch * args.steps)],
            "rank_compute_ms": [round(1e3 * float(v) / args.steps, 2) for v in trainer.seconds_by_rank]}),
            flush=True)


# ------------------------------------------------------------------------------------------------ launcher

VARIANT_FLAGS = ("raw", "balance", "fused")   # @raw, @balance, @fused: worker flags --raw, --balance, --fused


def parse_variant(text):
    """NAME[:KEY=VALUE,...,@raw,@balance] -> (name, env dict, tuple of flags)."""
    name, _, spec = text.partition(":")
    if not name:
        raise argparse.ArgumentTypeError(f"variant {text!r}: expected NAME:KEY=VALUE,...")
    env, flags = {}, []
    for item in filter(None, spec.split(",")):
        if item.startswith("@"):
            if item[1:] not in VARIANT_FLAGS:
                raise argparse.ArgumentTypeError(f"variant {text!r}: unknown {item!r} "
                                                 f"(known: {', '.join('@' + f for f in VARIANT_FLAGS)})")
            flags.append(item[1:])
            continue
        k, eq, v = item.partition("=")
        if not eq or not k:
            raise argparse.ArgumentTypeError(f"variant {text!r}: {item!r} is not KEY=VALUE")
        env[k] = v
    return name, env, tuple(flags)


def parse_env(text):
    k, eq, v = text.partition("=")
    if not eq or not k:
        raise argparse.ArgumentTypeError(f"--env {text!r}: expected KEY=VALUE")
    return k, v


def run_one(args, n, env_extra, flags):
    cmd = ["mpirun", "-n", str(n), sys.executable, str(Path(__file__).resolve()), "--worker",
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    cmd += [f"--{f}" for f in flags]
    if args.straggler >= 0:
        cmd += ["--straggler", str(args.straggler)]
    env = dict(os.environ, **env_extra)
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    sys.stderr.write(p.stderr)
    for line in p.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    return {"error": f"exit code {p.returncode}, no result line", "stdout_tail": p.stdout[-500:]}


def ratio(a, b):
    return round(a / b, 3) if a and b else None


def launcher(args):
    variants = args.variant or [("default", {}, ())]
    ranks = [int(r) for r in args.ranks.split(",")]
    extra = dict(args.env)
    results = {(v[0], n): [] for v in variants for n in ranks}     # name, ranks -> [record per repeat]
    load_before = os.getloadavg()
    started = time.time()
    for rep in range(args.repeats):
        order = [(v, n) for v in variants for n in ranks]
        if rep % 2:
            order.reverse()                                          # A B ... B A: no position bias
        for (name, env, flags), n in order:
            rec = run_one(args, n, {**extra, **env}, flags)
            rec.update(variant=name, repeat=rep, env={**extra, **env}, flags=list(flags), load1=os.getloadavg()[0])
            print(json.dumps(rec), flush=True)
            results[(name, n)].append(rec)

    summary = {"summary": True, "git_commit": _git_commit(), "git_modified": _git_modified(), "machine": platform.machine(),
               "cpus": os.cpu_count(), "global_batch": args.batch, "steps": args.steps, "warmup": args.warmup,
               "repeats": args.repeats, "env": extra, "seconds": round(time.time() - started, 1),
               "loadavg_before": [round(x, 2) for x in load_before],
               "loadavg_after": [round(x, 2) for x in os.getloadavg()], "variants": {}}
    for name, env, flags in variants:
        med, paired = {}, {}
        for n in ranks:
            ok = [r for r in results[(name, n)] if "error" not in r]
            if not ok:
                continue
            med[n] = {"images_per_s": round(statistics.median(r["images_per_s"] for r in ok), 1),
                      "images_per_cpu_s": round(statistics.median(r["images_per_cpu_s"] for r in ok), 1),
                      "images_per_s_range": [min(r["images_per_s"] for r in ok), max(r["images_per_s"] for r in ok)],
                      "allreduce_share": round(statistics.median(r["allreduce_share"] for r in ok), 4),
                      "peak_rss_mb": max(r["peak_rss_mb"] for r in ok), "runs": len(ok)}
        for a, b in ((2, 1), (4, 2), (3, 2)):
            per = [ratio(x["images_per_s"], y["images_per_s"])
                   for x, y in zip(results.get((name, a), []), results.get((name, b), []))
                   if "error" not in x and "error" not in y]
            if per:
                paired[f"{a}/{b}"] = {"ratio_of_medians": ratio(med[a]["images_per_s"], med[b]["images_per_s"]),
                                      "median_paired": round(statistics.median(per), 3), "per_round": per,
                                      "cpu_median_paired": round(statistics.median(
                                          ratio(x["images_per_cpu_s"], y["images_per_cpu_s"])
                                          for x, y in zip(results[(name, a)], results[(name, b)])
                                          if "error" not in x and "error" not in y), 3)}
        summary["variants"][name] = {"env": {**extra, **env}, "flags": list(flags), "by_ranks": med, "ratios": paired}
    # every variant against the first one, rank count by rank count (e.g. tuned vs plain MPICH at -n 4)
    base = variants[0][0]
    for name, _, _ in variants[1:]:
        vs = {}
        for n in ranks:
            per = [ratio(x["images_per_s"], y["images_per_s"])
                   for x, y in zip(results[(name, n)], results[(base, n)]) if "error" not in x and "error" not in y]
            if per:
                vs[str(n)] = round(statistics.median(per), 3)
        summary["variants"][name][f"vs_{base}_median_paired"] = vs
    targets = {}
    for name in summary["variants"]:
        r = summary["variants"][name]["ratios"]
        targets[name] = {"2/1>=1.85": r.get("2/1", {}).get("ratio_of_medians", 0) >= 1.85 if "2/1" in r else None,
                         "4/2>=0.9": r.get("4/2", {}).get("median_paired", 0) >= 0.9 if "4/2" in r else None}
    summary["targets_met"] = targets
    print(json.dumps(summary), flush=True)
    return 0


def _git_commit():
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _git_modified():
    """Tracked files with uncommitted changes: the figures describe the work tree, not just the commit."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                             capture_output=True, text=True, timeout=10).stdout
        return [line[3:] for line in out.splitlines()]
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="1,2,4", help="comma-separated rank counts")
    p.add_argument("--repeats", type=int, default=5, help="runs per configuration; figures are medians")
    p.add_argument("--steps", type=int, default=80, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    p.add_argument("--batch", type=int, default=256, help="global batch size")
    p.add_argument("--data-dir", help="MNIST folder (default: $LENET_DATA_DIR, then the cache)")
    p.add_argument("--env", type=parse_env, action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for mpirun (repeatable), e.g. an MPIR_CVAR_ setting")
    p.add_argument("--variant", type=parse_variant, action="append", metavar="NAME:KEY=VALUE,...",
                   help="a named set of extra environment (repeatable; '@raw' = without comm.py's MPICH "
                        "defaults, '@balance' = lenet-train --balance); the variants run interleaved")
    p.add_argument("--straggler", type=int, default=-1, metavar="RANK",
                   help="this rank computes 3x slower (a rehearsed straggler; -1: none)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per mpirun")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--balance", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--fused", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.steps < 1 or args.warmup < 0 or args.batch < 1:
        p.error("--repeats and --steps must be >= 1, --warmup >= 0, --batch >= 1")
    return worker(args) if args.worker else launcher(args)


if __name__ == "__main__":
    sys.exit(main())
