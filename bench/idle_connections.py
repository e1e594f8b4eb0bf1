"""Idle connections against a training job: `mpirun -n 2 lenet-train --publish` at `ulimit -n 1024` (soft and
hard) while it trains and writes a checkpoint every 5 steps; as soon as it serves, N TCP connections to its
port that never speak, then a real lenet-evaluator. Runs with and without the flood, interleaved.

    python bench/idle_connections.py [--idle 5000] [--epochs 10] [--repeats 3] [--nofile 1024]

Prints one JSON line per run and a summary: did every run finish (exit 0), write every checkpoint and get
its final checkpoint evaluated; training time with the flood over without (medians); how long after the
flood began the evaluator got its first checkpoint. Uses the shipped subset (2,000 examples, batch 100).
This process must be allowed --idle + 200 open files (its hard limit).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import idleflood  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--idle", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--nofile", type=int, default=1024)
    args = ap.parse_args()
    runs = {0: [], args.idle: []}
    for _ in range(args.repeats):
        for n in (0, args.idle):
            with tempfile.TemporaryDirectory() as tmp:
                r = idleflood.run(tmp, n_idle=n, epochs=args.epochs, nofile=args.nofile)
            r = {k: v for k, v in r.items() if k not in ("stderr", "stdout", "evaluator_stderr")}
            r["load_avg_1m"] = round(os.getloadavg()[0], 2)
            print(json.dumps(r), flush=True)
            runs[n].append(r)
    flood, calm = runs[args.idle], runs[0]
    ok = all(r["trainer_rc"] == 0 and r["all_checkpoints"] and r["final_evaluated"] for r in flood + calm)
    med = lambda rs, k: statistics.median(r[k] for r in rs if r[k] is not None)  # noqa: E731
    print(json.dumps({"summary": True, "idle": args.idle, "nofile": args.nofile, "repeats": args.repeats,
                      "all_finished_all_checkpoints_final_evaluated": ok,
                      "seconds_calm": med(calm, "seconds"), "seconds_flood": med(flood, "seconds"),
                      "flood_over_calm": round(med(flood, "seconds") / med(calm, "seconds"), 3),
                      "first_eval_after_s_calm": med(calm, "first_eval_after_s"),
                      "first_eval_after_s_flood": med(flood, "first_eval_after_s"),
                      "checkpoints_per_run": flood[0]["checkpoints_expected"]}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
