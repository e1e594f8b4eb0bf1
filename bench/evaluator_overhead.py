"""Does an attached evaluator slow training? Trainer throughput with the evaluator absent, attached, slow
and stopped (SIGSTOP), as ratios to a trainer that does not publish at all.

    LENET_DATA_DIR=/path/to/mnist python bench/evaluator_overhead.py [--repeats 3] [--train-subset 20000]

Configurations run interleaved (A B C D E, A B C D E, ...) so that a noisy neighbour hurts all alike.
The trainer runs one rank with one BLAS thread; the evaluator one process with one thread. Prints one JSON
line per run and a summary line with the medians and ratios. Uses the shipped subset when MNIST is absent.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = ["no-publish", "publish-no-evaluator", "evaluator", "slow-evaluator", "stopped-evaluator"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(config, args, data_flags, tmp):
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    metrics = tmp / f"{config}-{time.monotonic_ns()}.jsonl"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    trainer = [sys.executable, "-m", "workers.trainer", *data_flags, "--epochs", str(args.epochs),
               "--batch-size", "64", "--threads", "1", "--no-progress", "--log-level", "WARNING",
               "--metrics", str(metrics), "--linger", "0"]
    if config != "no-publish":
        trainer += ["--publish", endpoint, "--checkpoint-every", str(args.checkpoint_every)]
    evaluator = None
    if config in ("evaluator", "slow-evaluator", "stopped-evaluator"):
        cmd = [sys.executable, "-m", "workers.evaluator", "--connect", endpoint,
               *(["--subset"] if "--subset" in data_flags else ["--no-download"]),
               "--log-level", "WARNING", "--threads", "1", "--exit-after-run"]
        if config == "slow-evaluator":
            cmd += ["--delay", "2"]
        evaluator = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    try:
        t = subprocess.Popen(trainer, env=env, stdout=subprocess.DEVNULL)
        if config == "stopped-evaluator":
            time.sleep(3)                      # let it connect and start fetching, then freeze it
            evaluator.send_signal(signal.SIGSTOP)
        if t.wait(timeout=1800) != 0:
            raise SystemExit(f"{config}: trainer exited {t.returncode}")
    finally:
        if evaluator is not None:
            evaluator.send_signal(signal.SIGCONT)
            evaluator.terminate()
            evaluator.wait(10)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows = [r for r in rows if r.get("event") == "epoch"]
    seen = sum(r["images_per_s"] * r["seconds"] for r in rows)
    return seen / sum(r["seconds"] for r in rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-subset", type=int, default=20000)
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between published checkpoints")
    p.add_argument("--configs", default=",".join(CONFIGS))
    args = p.parse_args()
    configs = args.configs.split(",")
    have_mnist = bool(os.environ.get("LENET_DATA_DIR"))
    data_flags = (["--train-subset", str(args.train_subset), "--no-download"] if have_mnist else ["--subset"])
    results = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for c in configs:
                ips = run_once(c, args, data_flags, Path(tmp))
                results[c].append(ips)
                print(json.dumps({"config": c, "repeat": r, "train_images_per_s": round(ips, 1)}), flush=True)
    med = {c: statistics.median(v) for c, v in results.items()}
    base = med.get("no-publish")
    summary = {"bench": "evaluator_overhead", "data": "mnist" if have_mnist else "subset",
               "median_images_per_s": {c: round(v, 1) for c, v in med.items()}}
    if base:
        summary["ratio_to_no_publish"] = {c: round(v / base, 3) for c, v in med.items()}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
