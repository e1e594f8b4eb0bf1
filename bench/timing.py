"""What bench_train.py and torch_compare.py share, so that both measure the same way: the data and the
timing loop. Needs numpy and lenet_dist only (torch_compare runs in a venv without threadpoolctl)."""
from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np

from lenet_dist.config import TrainConfig
from lenet_dist.data import DataError, load_mnist, load_subset, normalize, sampler


def load_data(data_dir=None, *, comm=None, prog=None, note=""):
    """(data set, "mnist" or "subset"): full MNIST from `data_dir` (None: LENET_DATA_DIR, then the cache)
    when it is on disk already (never downloads), else the shipped subset, said by rank 0 of `comm` as a
    WARNING naming `prog` (and `note`) when `prog` is given."""
    try:
        return load_mnist(data_dir, download=False, log=None), "mnist"
    except DataError as e:
        if prog and (comm is None or comm.rank == 0):
            print(f"{prog}: WARNING: full MNIST not found ({e}); using the shipped subset{note}",
                  file=sys.stderr, flush=True)
        return load_subset(), "subset"


def recipe():
    """The training recipe both benches time: TrainConfig's defaults, whatever they are today."""
    return TrainConfig()


class Batches:
    """`batches(idx) -> (float32 images (B,28,28), int64 labels)` as the trainer's step makes them
    (parallel/step.py): gathered, shifted by `sampler` when the recipe augments, normalized into one reused
    buffer. Each call is the next step of an epoch, so the shifts differ from step to step."""

    def __init__(self, ds, cfg, batch):
        self.images, self.labels, self.cfg = ds.train_images, ds.train_labels.astype(np.int64), cfg
        self.buf, self.pos = np.empty((batch, 28, 28), np.float32), 0

    def __call__(self, idx):
        u8, m = self.images[idx], self.cfg.augment_shift
        if m:
            shifts = sampler.random_shifts(self.cfg.seed, 0, self.pos, len(idx), m)
            u8 = sampler.shift_images(u8, shifts, m)
        self.pos += 1
        return normalize(u8, out=self.buf[:len(idx)]), self.labels[idx]


def serve(ds, train_throughput, images, out=sys.stdout):
    """Answer one batch size a line on stdin with one timed repetition at it, as one JSON line: what
    bench/torch_interleaved.py asks of bench_train.py and torch_compare.py in turn."""
    for line in sys.stdin:
        batch = int(line)
        med, cpu, _ = train_throughput(ds, batch, 1, images)
        print(json.dumps({"batch": batch, "img_s": round(med, 1), "img_s_cpu": round(cpu, 1)}), file=out,
              flush=True)


def time_steps(step, rng, n, batch, steps, repeats):
    """(median images/s, median images per CPU second, every rate) of `step(indices)`, after a warm-up.
    bench_train.py and torch_compare.py both time with it."""
    def batches(k):
        return [rng.integers(0, n, batch) for _ in range(k)]  # indices drawn up front, outside the timing

    for idx in batches(max(3, steps // 5)):                    # warm-up: workspaces, caches, page faults
        step(idx)
    rates, cpu_rates = [], []
    for _ in range(repeats):
        todo = batches(steps)
        t0, c0 = time.perf_counter(), time.process_time()
        for idx in todo:
            step(idx)
        rates.append(steps * batch / (time.perf_counter() - t0))
        cpu_rates.append(steps * batch / (time.process_time() - c0))
    return statistics.median(rates), statistics.median(cpu_rates), rates


def measure_into(out, ds, args, train_throughput, eval_throughput):
    """Fill `out` with the figures both benches print: train_img_s_b<B> (and _cpu, _all) for every batch in
    args.batches, then infer_img_s, infer_s, infer_img_s_cpu (and infer_s_all). The two callables are the
    bench's own: train_throughput(ds, batch, repeats, images) and eval_throughput(ds, repeats, eval_batch)."""
    for b in args.batches:
        med, cpu_med, rates = train_throughput(ds, b, args.repeats, args.images)
        out[f"train_img_s_b{b}"] = round(med, 1)
        out[f"train_img_s_b{b}_cpu"] = round(cpu_med, 1)
        if args.all:
            out[f"train_img_s_b{b}_all"] = [round(r, 1) for r in rates]
    sec, cpu_sec, secs = eval_throughput(ds, args.repeats, args.eval_batch)
    out["infer_img_s"] = round(len(ds.test_images) / sec, 1)
    out["infer_s"] = round(sec, 4)
    out["infer_img_s_cpu"] = round(len(ds.test_images) / cpu_sec, 1)
    if args.all:
        out["infer_s_all"] = [round(s, 4) for s in secs]
    return out



class TimedReducer:
    """Wraps a trainer's reducer (lenet_dist/parallel/reducers.py) to time it: `comm_seconds`, what this
    rank spent blocked on the sums (the collectives, settle() and the forward's waits for an owed update);
    `settle_seconds`, the part spent waiting for owed updates (pipelined). The caller resets both."""

    def __init__(self, reducer):
        self.reducer, self.comm_seconds, self.settle_seconds = reducer, 0.0, 0.0

    def __getattr__(self, name):
        return getattr(self.reducer, name)

    def sum(self, stop, seconds):
        t = time.perf_counter()
        out = self.reducer.sum(stop, seconds)
        self.comm_seconds += time.perf_counter() - t + self.reducer.waited
        self.settle_seconds += self.reducer.waited
        return out

    def settle(self):
        t = time.perf_counter()
        self.reducer.settle()
        waited = time.perf_counter() - t
        self.comm_seconds += waited
        self.settle_seconds += waited
