"""The same LeNet-5 in PyTorch, measured as bench/bench_train.py measures ours, as one JSON line.

    python -m venv /work/torchenv && /work/torchenv/bin/pip install torch==2.13.0 numpy
    LENET_DATA_DIR=/path/to/mnist /work/torchenv/bin/python bench/torch_compare.py [--repeats 7] [--threads 1]

conv 6@5x5 pad 2, max 2x2, ReLU, conv 16@5x5, max 2x2, ReLU, fc 120, ReLU, fc 84, ReLU, fc 10 (NCHW,
float32), cross-entropy with the default recipe's label smoothing, torch.optim.SGD with its momentum,
Nesterov, weight decay and lr (TrainConfig's defaults). Batches are gathered, shifted and normalized by
bench/timing.py's Batches exactly as in our bench, then wrapped with torch.from_numpy (no copy). Inference
is no_grad over the test set at the same batch size as LeNet5.evaluate's default, computing the loss and
the accuracy too. torch is never a dependency of lenet-dist: without it this script says so and exits 0.
"""
from __future__ import annotations

import argparse
import inspect
import json
import resource
import statistics
import sys
import time
from pathlib import Path

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    print("torch_compare: torch is not installed; skipping (see the docstring for the venv recipe)")
    sys.exit(0)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # lenet_dist from this checkout

import numpy as np  # noqa: E402

from bench.timing import (Batches, load_data, measure_into, recipe, serve,  # noqa: E402  (the same data,
                          time_steps)                                         # recipe and timing as ours)
from lenet_dist.data import normalize  # noqa: E402
from lenet_dist.nn.model import LeNet5  # noqa: E402


class TorchLeNet5(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = torch.nn.Conv2d(6, 16, 5)
        self.fc1 = torch.nn.Linear(400, 120)
        self.fc2 = torch.nn.Linear(120, 84)
        self.fc3 = torch.nn.Linear(84, 10)

    def forward(self, x):                                   # x (B,1,28,28)
        x = F.relu(F.max_pool2d(self.conv1(x), 2))          # (B,6,14,14)
        x = F.relu(F.max_pool2d(self.conv2(x), 2))          # (B,16,5,5)
        x = torch.flatten(x, 1)                             # (B,400), (C,H,W) order
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)                                  # (B,10)


def train_throughput(ds, batch, repeats, images_per_rep, seed=0):
    cfg = recipe()
    torch.manual_seed(seed)
    model = TorchLeNet5()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                          weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(seed)
    n = len(ds.train_images)
    steps = max(1, images_per_rep // batch)
    batches = Batches(ds, cfg, batch)

    def step(idx):
        x, y = batches(idx)
        x, y = torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
        loss.backward()
        opt.step()

    return time_steps(step, rng, n, batch, steps, repeats)


def evaluate(model, images, labels, batch_size):
    total, correct = 0.0, 0
    buf = None
    with torch.no_grad():
        for lo in range(0, len(images), batch_size):
            u8 = images[lo:lo + batch_size]
            if buf is None or len(buf) != len(u8):
                buf = np.empty(u8.shape, np.float32)
            x = torch.from_numpy(normalize(u8, out=buf)).unsqueeze(1)
            y = torch.from_numpy(labels[lo:lo + batch_size].astype(np.int64))
            logits = model(x)
            total += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    return total / len(images), correct / len(images)


def eval_throughput(ds, repeats, batch_size):
    model = TorchLeNet5().eval()
    evaluate(model, ds.test_images[:1000], ds.test_labels[:1000], batch_size)
    secs, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        evaluate(model, ds.test_images, ds.test_labels, batch_size)
        secs.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(secs), statistics.median(cpu), secs


def main(argv=None):
    default_eval_batch = inspect.signature(LeNet5.evaluate).parameters["batch_size"].default
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--images", type=int, default=6400, help="training images per repetition")
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--eval-batch", type=int, default=default_eval_batch)
    ap.add_argument("--all", action="store_true", help="also print every repetition")
    ap.add_argument("--serve", action="store_true", help="time one repetition per batch size read from stdin "
                    "(bench/torch_interleaved.py)")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        ap.error("--repeats and --threads must be >= 1")
    torch.set_num_threads(args.threads)

    ds, kind = load_data()
    if args.serve:
        return serve(ds, train_throughput, args.images)
    out = {"bench": "torch", "torch": torch.__version__, "data": kind, "train_n": len(ds.train_images),
           "test_n": len(ds.test_images), "threads": args.threads, "repeats": args.repeats}
    measure_into(out, ds, args, train_throughput, eval_throughput)
    out["eval_batch"] = args.eval_batch
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
