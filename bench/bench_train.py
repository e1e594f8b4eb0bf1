"""Training and inference throughput of the NumPy LeNet-5, as one JSON line.

    LENET_DATA_DIR=/path/to/mnist python bench/bench_train.py [--repeats 7] [--threads 1]

Training: images/s of forward + backward + SGD update on real MNIST batches, with the default recipe
(TrainConfig's momentum, Nesterov, weight decay, lr and random shifts: bench/timing.py), batches gathered,
shifted and normalized per step as the trainer does, at global batch 64 and 256. Inference:
model.evaluate on the whole test set. Every figure is the median of --repeats timed repetitions, after a
warm-up, with the BLAS limited to --threads threads. MNIST comes from $LENET_DATA_DIR or the cache (no
download); without it, the shipped 2,000/1,000-image subset. Peak RSS is the process's ru_maxrss, so it
includes the dataset. The `_cpu` figures divide by process CPU time instead of wall time: on a shared
machine they move less with other people's load (compare either kind only with the same kind).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402

from bench.timing import Batches, load_data, measure_into, recipe, serve, time_steps  # noqa: E402
from lenet_dist.nn.model import LeNet5  # noqa: E402
from lenet_dist.nn.optim import SGD  # noqa: E402


def train_throughput(ds, batch, repeats, images_per_rep, seed=0):
    """Median images/s of full SGD steps at `batch`, one repetition = about `images_per_rep` images."""
    cfg = recipe()
    model = LeNet5(seed=seed, label_smoothing=cfg.label_smoothing)
    opt = SGD(model.params, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(seed)
    n = len(ds.train_images)
    steps = max(1, images_per_rep // batch)
    batches, inv_b = Batches(ds, cfg, batch), np.float32(1.0 / batch)

    def step(idx):                      # as parallel/step.py: summed gradient, then / B, then the update
        model.loss_and_grad(*batches(idx), 1.0)
        model.grads *= inv_b
        opt.step(model.grads, cfg.lr)

    return time_steps(step, rng, n, batch, steps, repeats)


def eval_throughput(ds, repeats, batch_size):
    model = LeNet5(seed=0)
    kw = {} if batch_size is None else {"batch_size": batch_size}
    model.evaluate(ds.test_images[:1000], ds.test_labels[:1000], **kw)  # warm-up
    secs, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        model.evaluate(ds.test_images, ds.test_labels, **kw)
        secs.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(secs), statistics.median(cpu), secs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7, help="timed repetitions per figure (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads")
    ap.add_argument("--images", type=int, default=6400, help="training images per repetition")
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256], help="global batch sizes")
    ap.add_argument("--eval-batch", type=int, default=None, help="evaluate's batch size (default: its own)")
    ap.add_argument("--all", action="store_true", help="also print every repetition")
    ap.add_argument("--serve", action="store_true", help="time one repetition per batch size read from stdin "
                    "(bench/torch_interleaved.py)")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        ap.error("--repeats and --threads must be >= 1")

    ds, kind = load_data()
    if args.serve:
        with threadpool_limits(args.threads, "blas"):
            return serve(ds, train_throughput, args.images)
    out = {"bench": "numpy", "data": kind, "train_n": len(ds.train_images), "test_n": len(ds.test_images),
           "threads": args.threads, "repeats": args.repeats}
    with threadpool_limits(args.threads, "blas"):
        measure_into(out, ds, args, train_throughput, eval_throughput)
        blas = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
    out["numpy"] = np.__version__
    out["blas"] = ", ".join(f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')}" for i in blas)
    out["openblas_coretype"] = os.environ.get("OPENBLAS_CORETYPE")
    out["python"] = platform.python_version()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
