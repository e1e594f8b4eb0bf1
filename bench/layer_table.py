"""bench/step_phases.py --layers: where one process's training step goes, layer by layer, against the sgemm peak.

Each layer's forward and backward are wrapped (instance attributes) with a timer, and numpy.matmul with
one that adds the GEMM's time and executed FLOPs to the layer running it, for the measured steps only.
The peak is the best of several 1024^3 products, at the start and every ten steps.
Useful FLOPs are the model's own multiply-adds (x2): what a direct convolution would do; executed ones
count what the GEMMs did (conv2's band zeros, the bias rows). Times are this process's CPU time, medians
over the steps.
"""
from __future__ import annotations

import statistics
import time
from collections import defaultdict

import numpy as np

# CPU time, not wall time: on a shared machine a step preempted for a few milliseconds would otherwise
# charge them to whichever layer was running.
clock = time.process_time


def sgemm_peak(n=1024, repeats=7):
    """GFLOP/s of the best of `repeats` float32 n^3 products on one thread (the caller limits BLAS)."""
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    out = np.empty_like(a)
    np.matmul(a, a, out=out)
    best = min(_timed(lambda: np.matmul(a, a, out=out)) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def _timed(fn):
    t = clock()
    fn()
    return clock() - t


def useful_flops(B):
    """The LeNet-5 step's own FLOPs per batch of B, by (layer, pass)."""
    conv1, conv2 = 2 * 6 * 25 * 28 * 28 * B, 2 * 16 * 150 * 10 * 10 * B
    fc = {"fc1": 2 * 120 * 400 * B, "fc2": 2 * 84 * 120 * B, "fc3": 2 * 10 * 84 * B}
    out = {("conv1", "fwd"): conv1, ("conv1", "bwd"): conv1,          # no input gradient for conv1
           ("conv2", "fwd"): conv2, ("conv2", "bwd"): 2 * conv2}
    for name, f in fc.items():
        out[(name, "fwd")], out[(name, "bwd")] = f, 2 * f
    return out


class Recorder:
    """Per step: seconds of each (layer, pass) and the GEMM seconds and FLOPs inside them."""

    def __init__(self):
        self.current, self.on = None, False
        self.steps = []
        self._step()

    def _step(self):
        self.secs, self.gemm, self.flops = defaultdict(float), defaultdict(float), defaultdict(float)

    def end_step(self):
        if self.on:
            self.steps.append((dict(self.secs), dict(self.gemm), dict(self.flops)))
        self._step()

    def wrap(self, obj, method, key):
        fn = getattr(obj, method)

        def call(*a, **kw):
            outer, self.current = self.current, key
            t = clock()
            try:
                return fn(*a, **kw)
            finally:
                self.secs[key] += clock() - t
                self.current = outer
        setattr(obj, method, call)

    def matmul(self, real):
        def call(a, b, *rest, **kw):
            t = clock()
            out = real(a, b, *rest, **kw)
            if self.current is not None:
                self.gemm[self.current] += clock() - t
                m = a.shape[0] if a.ndim == 2 else 1
                n = b.shape[1] if b.ndim == 2 else 1
                self.flops[self.current] += 2 * m * n * a.shape[-1]
            return out
        return call


def _names(model):
    """Layer index -> a name for the table: conv1, pool1+relu, conv2, ..., relu after fc1 as fc1.relu."""
    named = {id(model.conv1): "conv1", id(model.conv2): "conv2", id(model.fc1): "fc1", id(model.fc2): "fc2",
             id(model.fc3): "fc3"}
    names, pools, last = {}, 0, None
    for i, layer in enumerate(model.layers):
        kind = type(layer).__name__
        if id(layer) in named:
            names[i] = last = named[id(layer)]
        elif kind == "MaxPool2D":
            pools += 1
            names[i] = f"pool{pools}" + ("+relu" if layer.relu else "")
        else:
            names[i] = f"{last}.{kind.lower()}" if last else kind.lower()
    return names


def main(args):
    from threadpoolctl import threadpool_limits

    from bench.timing import Batches, load_data, recipe
    from lenet_dist.nn.model import LeNet5
    from lenet_dist.nn.optim import SGD

    ds, kind = load_data(args.data_dir, prog="step_phases.py")
    cfg, B = recipe(), args.batch
    rec = Recorder()
    with threadpool_limits(limits=1, user_api="blas"):
        peak = sgemm_peak()
        model = LeNet5(seed=cfg.seed)
        opt = SGD(model.params, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
        names = _names(model)
        for i, layer in enumerate(model.layers):
            rec.wrap(layer, "forward", (names[i], "fwd"))
            rec.wrap(layer, "backward", (names[i], "bwd"))
        rec.wrap(model.loss, "forward", ("loss", "fwd"))
        rec.wrap(model.loss, "backward", ("loss", "bwd"))
        batches = Batches(ds, cfg, B)
        rng, inv_b = np.random.default_rng(0), np.float32(1.0 / B)
        real_matmul, totals = np.matmul, []
        np.matmul = rec.matmul(real_matmul)
        try:
            for s in range(args.warmup + args.steps):
                rec.on = s >= args.warmup
                if s % 10 == 0:             # the peak again now and then: a busy machine lowers both alike
                    np.matmul = real_matmul
                    peak = max(peak, sgemm_peak(repeats=1))
                    np.matmul = rec.matmul(real_matmul)
                idx = rng.integers(0, len(ds.train_images), B)
                t0 = clock()
                x, y = batches(idx)
                t1 = clock()
                model.loss_and_grad(x, y, 1.0)
                t2 = clock()
                model.grads *= inv_b
                opt.step(model.grads, cfg.lr)
                t3 = clock()
                rec.secs[("batch", "data")] += t1 - t0
                rec.secs[("update", "sgd")] += t3 - t2
                rec.end_step()
                if rec.on:
                    totals.append(t3 - t0)
        finally:
            np.matmul = real_matmul
    print_table(rec.steps, totals, useful_flops(B), peak, B, kind, args.steps)
    return 0


def print_table(steps, totals, useful, peak, B, kind, n):
    keys = list(steps[0][0])
    med = {k: statistics.median(s[0].get(k, 0.0) for s in steps) for k in keys}
    gemm = {k: statistics.median(s[1].get(k, 0.0) for s in steps) for k in keys}
    flops = {k: statistics.median(s[2].get(k, 0.0) for s in steps) for k in keys}
    step = statistics.median(totals)
    print(f"batch {B}, {kind}, one BLAS thread, CPU time, median of {n} steps: step {step * 1e3:.3f} ms "
          f"({B / step:,.0f} images/s); sgemm peak {peak:.1f} GFLOP/s (1024^3, best of 7)")
    print()
    print("| layer | pass | ms | share of step | GEMM ms | non-GEMM ms | useful GFLOP/s | share of peak "
          "| GEMM GFLOP/s (executed) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k in keys:
        u = useful.get(k)
        rate = u / med[k] / 1e9 if u and med[k] else None
        grate = flops[k] / gemm[k] / 1e9 if gemm.get(k) else None
        print(f"| {k[0]} | {k[1]} | {med[k] * 1e3:.3f} | {med[k] / step:.1%} | "
              f"{gemm[k] * 1e3:.3f} | {(med[k] - gemm[k]) * 1e3:.3f} | "
              f"{'' if rate is None else f'{rate:.1f}'} | {'' if rate is None else f'{rate / peak:.1%}'} | "
              f"{'' if grate is None else f'{grate:.1f}'} |")
    timed = sum(med.values())
    total_useful = sum(useful.values())
    print(f"| rest of the step | | {(step - timed) * 1e3:.3f} | {(step - timed) / step:.1%} | | | | | |")
    print(f"| **step** | | {step * 1e3:.3f} | 100% | {sum(gemm.values()) * 1e3:.3f} | "
          f"{(step - sum(gemm.values())) * 1e3:.3f} | {total_useful / step / 1e9:.1f} | "
          f"{total_useful / step / 1e9 / peak:.1%} | |")
