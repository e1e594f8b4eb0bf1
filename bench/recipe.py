"""Accuracy and wall time of a training recipe over several seeds.

Runs `lenet-train` once per seed with the given training flags (on --ranks processes under mpirun when
> 1), reads the end row of each run's --metrics file, and prints one line per seed and a summary: the
median test accuracy of the model chosen on validation (the figure the README quotes), its spread, the
last epoch's test accuracy and the median wall time. With --against, each seed first runs the reference
flags and the candidate back to back (the order alternating from seed to seed, so that a load that
comes or goes favours neither), and the summary adds the candidate/reference ratio of each pair, of wall
time and of CPU time (every process of the run, user + system): on a shared machine only such paired
ratios are worth comparing, not raw seconds, and CPU time moves less with the load than wall time. A run
ended by --early-stop counts as done: its line and the summary say how many epochs it ran.

    python bench/recipe.py --seeds 0,1,2 -- --augment-shift 1
    python bench/recipe.py --ranks 2 --seeds 0,1,2 --against "" -- --augment-shift 1
    python bench/recipe.py --ranks 2 --seeds 0,1,2 -- --epochs 30 --augment-shift 2
    python bench/recipe.py --ranks 2 --against "--epochs 30 --augment-shift 2" -- --epochs 30 --augment-shift 2 --early-stop 5

Training flags go after `--`; the data comes from --data-dir (default $LENET_DATA_DIR). One BLAS thread
per process (--threads 0 is one). Accuracy does not depend on the machine's load; wall time does.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_once(flags, seed, ranks, data_dir, mpirun, trainer):
    """One training run; returns its end row (test_acc, best_test_acc, best_epoch, wall_seconds, ...)."""
    with tempfile.TemporaryDirectory(prefix="recipe-") as tmp:
        metrics = Path(tmp) / "metrics.jsonl"
        cmd = [trainer, *flags, "--seed", str(seed), "--metrics", str(metrics), "--threads", "0",
               "--no-progress", "--log-level", "WARNING", "--log-every", "0"]
        if data_dir:
            cmd += ["--data-dir", data_dir, "--no-download"]
        if ranks > 1:
            cmd = [mpirun, "-n", str(ranks), *cmd]
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            sys.exit(f"exit status {proc.returncode}: {shlex.join(cmd)}\n{proc.stderr[-2000:]}")
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    end = [r for r in rows if r.get("event") == "end"]
    if not end or not (end[-1].get("outcome") == "finished" or end[-1].get("outcome", "").startswith("early stop")):
        sys.exit(f"no finished or early-stopped end row in the metrics of: {shlex.join(cmd)}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return dict(end[-1], cpu_seconds=cpu)


def describe(label, seed, end):
    return (f"{label:9s} seed {seed}: test {100 * end['best_test_acc']:.2f}% (validation's pick, epoch "
            f"{end['best_epoch']}) | last epoch {100 * end['test_acc']:.2f}% | wall {end['wall_seconds']:.1f}s "
            f"(training {end['train_seconds']:.1f}s, CPU {end['cpu_seconds']:.1f}s) | {end['epoch']}/{end['epochs']} epochs"
            + (f" ({end['outcome']})" if end["outcome"] != "finished" else ""))


def summary(label, ends):
    best = [100 * e["best_test_acc"] for e in ends]
    last = [100 * e["test_acc"] for e in ends]
    wall = [e["wall_seconds"] for e in ends]
    epochs = [e["epoch"] for e in ends]
    return (f"{label:9s} median test {statistics.median(best):.2f}% (validation's pick; range "
            f"{min(best):.2f}-{max(best):.2f}, spread {max(best) - min(best):.2f}) | last epoch median "
            f"{statistics.median(last):.2f}% | median wall {statistics.median(wall):.1f}s | epochs run "
            f"{', '.join(map(str, epochs))} over {len(ends)} seeds")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    p.add_argument("--ranks", type=int, default=1, help="processes per run; > 1 runs under mpirun")
    p.add_argument("--against", default=None, metavar="FLAGS",
                   help='reference flags run before the candidate for each seed ("" = the defaults)')
    p.add_argument("--data-dir", default=os.environ.get("LENET_DATA_DIR"), help="the four IDX files")
    p.add_argument("--mpirun", default="mpirun")
    p.add_argument("--trainer", default="lenet-train")
    a = p.parse_args(own)
    seeds = [int(s) for s in a.seeds.split(",")]
    if a.ranks < 1:
        p.error(f"--ranks must be >= 1, got {a.ranks}")
    runs = [("candidate", flags)] if a.against is None else [("reference", shlex.split(a.against)),
                                                             ("candidate", flags)]
    for label, f in runs:
        print(f"{label}: {a.ranks} rank(s): lenet-train {shlex.join(f)}", flush=True)
    ends = {label: [] for label, _ in runs}
    for i, seed in enumerate(seeds):
        for label, f in (runs if i % 2 == 0 else runs[::-1]):
            ends[label].append(run_once(f, seed, a.ranks, a.data_dir, a.mpirun, a.trainer))
            print(describe(label, seed, ends[label][-1]), flush=True)
    for label, _ in runs:
        print(summary(label, ends[label]))
    if a.against is not None:
        for what, key in (("wall", "wall_seconds"), ("CPU", "cpu_seconds")):
            ratios = [c[key] / r[key] for r, c in zip(ends["reference"], ends["candidate"])]
            print(f"{what} time candidate/reference, paired back to back: {', '.join(f'{x:.3f}' for x in ratios)}"
                  f" (median {statistics.median(ratios):.3f})")


if __name__ == "__main__":
    main()
