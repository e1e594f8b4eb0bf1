"""Does a daemon evaluator's memory grow with the runs it has served? One lenet-evaluator (--http, --report,
the shipped subset) serves RUNS runs one after the other on one endpoint, each CHECKPOINTS checkpoints and a
final one, as a new trainer on the same port would publish them; the resident memory of the evaluator and of
its dashboard process is read from /proc after the first run and after the last. Prints one JSON object.
--epochs E (instead of --checkpoints): as many checkpoints as an E-epoch MNIST run publishes (one per epoch,
and one every --checkpoint-every steps), with its step rows (one every --log-every steps) served to the
evaluator's telemetry follower as a trainer's link serves them; each run's trainer stays until the evaluator
has kept all its rows.

    python bench/evaluator_runs_memory.py [--runs 20] [--checkpoints 10]
    python bench/evaluator_runs_memory.py --runs 20 --epochs 5      # 5-epoch runs: 5 checkpoints, 430 rows
"""
import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lenet_dist.checkpoints import format as checkpoint  # noqa: E402
from lenet_dist.evaluation.history import rows_path  # noqa: E402
from lenet_dist.nn.model import LeNet5, NUM_PARAMS  # noqa: E402
from lenet_dist.transport import TrainerLink  # noqa: E402

STEPS_PER_EPOCH = 860       # MNIST's 60,000 less the 5,000 held out for validation, at the default batch 64


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def kept_rows(report):
    """The step rows the evaluator has kept beside its report (history.rows_path), all runs'."""
    path = rows_path(report)
    lines = path.read_bytes().splitlines(keepends=True) if path.exists() else []
    return sum(line.endswith(b"\n") and b'"event": "step"' in line for line in lines)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--checkpoints", type=int, default=10)
    p.add_argument("--epochs", type=int, default=0, help="runs like an E-epoch run (0: --checkpoints, no rows)")
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    args = p.parse_args()
    steps = args.epochs * STEPS_PER_EPOCH
    if args.epochs:             # the steps an E-epoch run publishes at: every epoch's end, every K steps
        marks_at = sorted({e * STEPS_PER_EPOCH for e in range(1, args.epochs + 1)}
                          | set(range(args.checkpoint_every or steps + 1, steps + 1, args.checkpoint_every or 1)))
    else:
        marks_at = [10 * k for k in range(1, args.checkpoints + 1)]
    args.checkpoints = len(marks_at)
    tmp = Path(tempfile.mkdtemp(prefix="lenet-runs-memory-"))
    report = tmp / "eval.jsonl"
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    ev = subprocess.Popen([sys.executable, "-m", "workers.evaluator", "--subset", "--poll-ms", "100", "--connect",
                           endpoint, "--report", str(report), "--http", f"127.0.0.1:{port}", "--log-level", "WARNING"],
                          cwd=REPO, stdout=subprocess.DEVNULL)
    marks, rows, row_bytes = [], 0, 0
    try:
        for run in range(args.runs):
            with TrainerLink(endpoint) as link:
                done = 0
                for k, at in enumerate(marks_at, 1):
                    final = k == args.checkpoints
                    for step in range(done + 1, at + 1) if args.epochs else ():
                        if step % args.log_every == 0:      # a row as run/telemetry.py makes it
                            row = ({"event": "step", "step": step, "epoch": 1 + (step - 1) // STEPS_PER_EPOCH,
                                            "time": time.time(), "steps": args.log_every, "seconds": 0.3,
                                            "loss": 0.1, "acc": 0.97, "lr": 0.05, "images_per_s": 2000.0,
                                            "rank_images_per_s": [1000.0, 1000.0], "rank_compute_s": [0.2, 0.2],
                                            "rank_wait_s": [0.1, 0.1]})
                            link.telemetry(row)
                            rows += 1
                            row_bytes += len(json.dumps(row)) + 1
                    done = at
                    params = {n: v.copy() for n, v in LeNet5(seed=run * 100 + k).named_params().items()}
                    meta = {"step": at, "epoch": (at - 1) // STEPS_PER_EPOCH, "pos": 0, "final": final,
                            "config": {"seed": run}, "run_id": f"run-{run:03d}"}
                    link.publish(at, meta["epoch"], checkpoint.to_bytes(params, np.zeros(NUM_PARAMS, np.float32), meta),
                                 final=final)
                    want = run * args.checkpoints + k
                    deadline = time.monotonic() + 120
                    while (len(report.read_text().splitlines()) if report.exists() else 0) < want:
                        assert ev.poll() is None and time.monotonic() < deadline, "the evaluator stopped serving"
                        time.sleep(0.05)
                # the run's rows reach the evaluator (its follower asks twice a second) before its trainer goes
                while args.epochs and kept_rows(report) < rows:
                    assert ev.poll() is None and time.monotonic() < deadline, "the evaluator stopped taking rows"
                    time.sleep(0.2)
            if run in (0, args.runs - 1):
                kids = children(ev.pid)
                marks.append({"after_runs": run + 1, "evaluator_kib": rss_kib(ev.pid),
                              "dashboard_kib": sum(rss_kib(c) for c in kids)})
    finally:
        ev.send_signal(signal.SIGTERM)
        ev.wait(30)
    history_bytes = report.stat().st_size
    files_bytes = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())     # the report and what it keeps beside it
    print(json.dumps({"runs": args.runs, "checkpoints_per_run": args.checkpoints, "step_rows": rows, "step_rows_json_bytes": row_bytes,
                      "marks": marks,
                      "evaluator_growth_kib": marks[-1]["evaluator_kib"] - marks[0]["evaluator_kib"],
                      "dashboard_growth_kib": marks[-1]["dashboard_kib"] - marks[0]["dashboard_kib"],
                      "report_bytes": history_bytes, "history_files_bytes": files_bytes, "exit_code": ev.returncode}))
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
