"""`lenet-train --test-mode`: the whole system in under half a minute, for a new user and for CI.

Trains 3 epochs on the subset shipped in the package (2,000 training, 1,000 test images) in this process,
publishing a checkpoint every 10 steps over ZeroMQ on loopback, while a real `lenet-evaluator` process pulls
them and reports; then prints both sides' final figures, which must agree. Its temporary folder (the
report, and the metrics unless --metrics names a file) is removed at the end; kept, and named, on a failure.
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from lenet_dist.comm import LocalComm
from lenet_dist.run.process import blas_threads, setup_logging


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_test_mode(flags, run):
    """`run(flags, comm)` is lenet-train's loop (workers/trainer.py hands it over: no import cycle)."""
    comm = LocalComm()
    args = flags.args
    setup_logging(comm, args.log_level)
    endpoint = args.publish or f"tcp://127.0.0.1:{_free_port()}"
    tmp = Path(tempfile.mkdtemp(prefix="lenet-test-mode-"))
    report = tmp / "evaluator.jsonl"
    metrics = args.metrics or tmp / "metrics.jsonl"
    args = argparse.Namespace(**{**vars(args), "subset": True, "publish": endpoint, "metrics": metrics,
                                 "checkpoint_every": args.checkpoint_every or 10})
    flags = replace(flags, args=args, config=flags.config.replace(epochs=3, batch_size=64),
                    facts=replace(flags.facts, metrics=metrics, test_mode=True))
    print(f"test mode: trainer publishing on {endpoint}; a lenet-evaluator process reports back; scratch folder "
          f"{tmp} (removed when the test passes)", flush=True)
    ok = False
    try:
        ok = _run_both(flags, run, comm, endpoint, report)
    finally:
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"test mode: files kept in {tmp}", flush=True)
    return 0 if ok else 1


def _run_both(flags, run, comm, endpoint, report):
    evaluator = subprocess.Popen([sys.executable, "-m", "workers.evaluator", "--connect", endpoint, "--subset",
                                  "--report", str(report), "--log-level", "WARNING", "--timeout", "120",
                                  "--exit-after-run"])
    t0 = time.monotonic()
    try:
        with blas_threads(flags.threads):
            code = run(flags, comm)
        evaluator_code = evaluator.wait(timeout=120)
    finally:
        if evaluator.poll() is None:
            evaluator.kill()
    rows = [json.loads(x) for x in Path(flags.facts.metrics).read_text().splitlines()]
    trainer_final = [r for r in rows if r["event"] == "epoch"][-1]
    lines = [json.loads(x) for x in report.read_text().splitlines()] if report.exists() else []
    final = [r for r in lines if r.get("step") == trainer_final["step"]]
    print(f"test mode: trainer  step {trainer_final['step']}: test accuracy {100 * trainer_final['test_acc']:.2f}%, "
          f"loss {trainer_final['test_loss']:.4f}")
    if final:
        print(f"test mode: evaluator step {final[-1]['step']}: test accuracy {100 * final[-1]['test_accuracy']:.2f}%, "
              f"loss {final[-1]['test_loss']:.4f} ({len(lines)} evaluations, lag {final[-1]['lag_steps']} steps)")
    ok = code == 0 and evaluator_code == 0 and final and abs(final[-1]["test_accuracy"] - trainer_final["test_acc"]) < 1e-9
    print(f"test mode: {'OK' if ok else 'FAILED'} in {time.monotonic() - t0:.1f}s", flush=True)
    return bool(ok)
