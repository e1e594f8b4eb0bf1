"""Ours against PyTorch, one-thread training throughput, interleaved in one job, as one JSON line.

    LENET_DATA_DIR=/path/to/mnist python bench/torch_interleaved.py [--rounds 6] [--batches 64 256]
        [--torch-python /work/torchenv/bin/python]

Two warm processes, bench/bench_train.py --serve (this Python) and bench/torch_compare.py --serve (the
torch venv's), each asked in turn for one timed repetition at each batch size, ours first in odd rounds
and PyTorch first in even ones (A B, B A, ...), so that a change of load falls on both. Both train the
default recipe (TrainConfig: momentum, Nesterov, weight decay, lr, random shifts, label smoothing) on the
same batches. Per round and batch: the ratio ours / PyTorch of images/s (wall) and of images per CPU
second; the line holds every round's ratios and their medians (`ratio_b64`, `ratio_b64_cpu`, ...).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_TORCH = "/work/torchenv/bin/python"


class Server:
    """One bench process in --serve mode: ask(batch) -> its JSON answer."""

    def __init__(self, name, argv):
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.name = name
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=HERE.parent)

    def ask(self, batch):
        self.proc.stdin.write(f"{batch}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} exited (status {self.proc.wait()}) without an answer")
        return json.loads(line)

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--images", type=int, default=6400, help="training images per repetition")
    ap.add_argument("--torch-python", default=DEFAULT_TORCH, help="a Python that has torch 2.13")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.images < 1 or min(args.batches) < 1:
        ap.error("--rounds, --images and every batch must be >= 1")
    if not Path(args.torch_python).is_file():
        print(f"torch_interleaved: no Python at {args.torch_python} (see bench/torch_compare.py's docstring)")
        return 2
    common = ["--serve", "--threads", "1", "--images", str(args.images)]
    ours = Server("bench_train.py", [sys.executable, str(HERE / "bench_train.py"), *common])
    theirs = Server("torch_compare.py", [args.torch_python, str(HERE / "torch_compare.py"), *common])
    rows = {b: [] for b in args.batches}
    try:
        for r in range(args.rounds):
            for b in args.batches:
                pair = (ours, theirs) if r % 2 == 0 else (theirs, ours)
                got = {s.name: s.ask(b) for s in pair}
                rows[b].append((got[ours.name], got[theirs.name]))
    finally:
        ours.close()
        theirs.close()
    from bench.timing import recipe
    cfg = recipe()
    out = {"bench": "torch_interleaved", "rounds": args.rounds, "images": args.images,
           "recipe": {k: getattr(cfg, k) for k in ("lr", "momentum", "nesterov", "weight_decay", "augment_shift",
                                                      "label_smoothing")}}
    for b, pairs in rows.items():
        wall = [o["img_s"] / t["img_s"] for o, t in pairs]
        cpu = [o["img_s_cpu"] / t["img_s_cpu"] for o, t in pairs]
        out[f"ours_b{b}"] = round(statistics.median(o["img_s"] for o, _ in pairs), 1)
        out[f"torch_b{b}"] = round(statistics.median(t["img_s"] for _, t in pairs), 1)
        out[f"ratio_b{b}"] = round(statistics.median(wall), 3)
        out[f"ratio_b{b}_cpu"] = round(statistics.median(cpu), 3)
        out[f"ratio_b{b}_all"] = [round(x, 3) for x in wall]
        out[f"ratio_b{b}_cpu_all"] = [round(x, 3) for x in cpu]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    sys.exit(main())
