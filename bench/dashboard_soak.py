"""Does the dashboard's memory stay flat under load for a long run? A trainer publishes checkpoints for
--minutes (default 30) to an evaluator serving --http, while 50 clients hold the live stream open (as
browsers would, from another process at the lowest priority); the dashboard process's resident memory
(and the evaluator's) is sampled every --every seconds.

    LENET_DATA_DIR=/path/to/mnist python bench/dashboard_soak.py [--minutes 30] [--clients 50] \\
        [--csv soak.csv] [--png docs/dashboard-soak.png]

Prints one line per sample and a summary: the baseline after --warmup minutes, the median and maximum after
it, and the growth per 10 minutes over the samples after warm-up (a least-squares slope), for each process.
A dashboard process restarted by the evaluator's supervision is followed (its pid is looked up each time).
Without MNIST it uses the shipped subset (then the trainer cycles through many short epochs).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dashboard_load import REPO, Streams, dashboard_child, free_port, wait_http  # noqa: E402


def rss_mb(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def slope_per_10min(ts, ys):
    if len(ts) < 3:
        return float("nan")
    return float(np.polyfit(np.asarray(ts) / 600.0, np.asarray(ys), 1)[0])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--warmup", type=float, default=3.0, help="minutes left out of the baseline and slope")
    p.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--csv", type=Path, default=None)
    p.add_argument("--png", type=Path, default=None)
    args = p.parse_args()

    data_dir = os.environ.get("LENET_DATA_DIR")
    data_flags = ["--data-dir", data_dir] if data_dir else ["--subset"]
    tmp = Path(tempfile.mkdtemp(prefix="lenet-soak-"))
    endpoint, port = f"tcp://127.0.0.1:{free_port()}", free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    evaluator = [sys.executable, "-m", "workers.evaluator", "--connect", endpoint, "--report", str(tmp / "r.jsonl"),
                 *(["--subset"] if not data_dir else ["--data-dir", data_dir, "--no-download"]),
                 "--log-level", "WARNING", "--http", f"127.0.0.1:{port}"]
    launcher = ["mpirun", "-n", str(args.ranks)] if args.ranks > 1 else []
    trainer = ["nice", "-n", "5", *launcher, sys.executable, "-m", "workers.trainer", *data_flags,
               "--epochs", "1000", "--no-progress", "--log-level", "WARNING", "--metrics", str(tmp / "m.jsonl"),
               "--publish", endpoint, "--checkpoint-every", str(args.checkpoint_every), "--log-every", "20"]
    ev = subprocess.Popen(evaluator, env=env, stdout=subprocess.DEVNULL)
    samples = []                                      # (seconds, dashboard MB, evaluator MB)
    streams = tr = None
    try:
        wait_http(url)
        tr = subprocess.Popen(trainer, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        streams = Streams(url, args.clients) if args.clients else None
        t0 = time.monotonic()
        out = open(args.csv, "w") if args.csv else None
        if out:
            out.write("seconds,dashboard_mb,evaluator_mb\n")
        while (t := time.monotonic() - t0) < 60 * args.minutes:
            if tr.poll() is not None:
                raise SystemExit(f"the trainer exited early ({tr.returncode})")
            child = dashboard_child(ev.pid)
            row = (round(t, 1), rss_mb(child) if child else None, rss_mb(ev.pid))
            samples.append(row)
            print(f"{row[0]:8.1f} s  dashboard {row[1] or float('nan'):7.1f} MB  evaluator {row[2] or float('nan'):7.1f} MB",
                  flush=True)
            if out:
                out.write(",".join("" if v is None else str(v) for v in row) + "\n")
                out.flush()
            time.sleep(args.every)
    finally:
        if streams is not None:
            streams.close()
        for proc in (tr, ev):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    after = [s for s in samples if s[0] >= 60 * args.warmup]
    for k, name in ((1, "dashboard"), (2, "evaluator")):
        pts = [(s[0], s[k]) for s in after if s[k] is not None]
        if not pts:
            continue
        ys = [y for _, y in pts]
        print(f"{name}: baseline {ys[0]:.1f} MB after {args.warmup:g} min, median {np.median(ys):.1f}, "
              f"max {max(ys):.1f}, growth {slope_per_10min([t for t, _ in pts], ys):+.2f} MB per 10 min "
              f"over {len(ys)} samples ({(pts[-1][0] - pts[0][0]) / 60:.1f} min)")
    if args.png and samples:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 3.2), dpi=90)
        for k, name in ((1, "dashboard process"), (2, "evaluator")):
            pts = [(s[0] / 60, s[k]) for s in samples if s[k] is not None]
            ax.plot([a for a, _ in pts], [b for _, b in pts], label=name)
        ax.axvline(args.warmup, color="#999", ls=":", lw=1)
        ax.set_xlabel("minutes")
        ax.set_ylabel("resident memory (MB)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"{args.clients} live streams, checkpoints every {args.checkpoint_every} steps", fontsize=9)
        fig.tight_layout()
        fig.savefig(args.png)


if __name__ == "__main__":
    main()
