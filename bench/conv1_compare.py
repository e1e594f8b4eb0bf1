"""conv1 forward + backward: pool-major im2col (Conv2D) against the strip columns (StripConv2D), alone and
with a second copy of this benchmark on the other core (two ranks on two cores share the memory bus).

    python bench/conv1_compare.py [--batch 128] [--rounds 5] [--seconds 1.5]

Both layers get the same input and output gradient; every round times each for --seconds, alternating
A B B A so that drift in the machine's speed hits both alike. With --pair, a twin process runs the same
loop on the other core. Prints one JSON line: per layer the median ms per forward + backward, and the
strip / im2col time ratio, alone and paired. One BLAS thread.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from lenet_dist.nn.conv import Conv2D, StripConv2D  # noqa: E402


def measure(batch, rounds, seconds):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 28, 28, batch)).astype(np.float32)
    dout = rng.standard_normal((6, 2, 2, 14, 14, batch)).astype(np.float32)
    layers = {"im2col": Conv2D(1, 6, 5, padding=2, rng=rng, need_dx=False, pool_major=True),
              "strip": StripConv2D(1, 6, 5, padding=2, rng=rng)}
    times = {name: [] for name in layers}
    for r in range(rounds):
        order = list(layers) if r % 2 == 0 else list(reversed(layers))
        for name in order:
            layer, per = layers[name], []
            t_end = time.perf_counter() + seconds
            while time.perf_counter() < t_end:
                t = time.perf_counter()
                layer.forward(x)
                layer.backward(dout)
                per.append(time.perf_counter() - t)
            times[name].append(statistics.median(per))
    return {name: 1e3 * statistics.median(v) for name, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--twin", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.twin:
        print(json.dumps(measure(args.batch, args.rounds, args.seconds)))
        return
    alone = measure(args.batch, args.rounds, args.seconds)
    twin = subprocess.Popen([sys.executable, __file__, "--twin", "--batch", str(args.batch), "--rounds",
                             str(args.rounds), "--seconds", str(args.seconds)], stdout=subprocess.PIPE, text=True)
    paired = measure(args.batch, args.rounds, args.seconds)
    other = json.loads(twin.communicate()[0])
    out = {"batch": args.batch, "rounds": args.rounds,
           "alone_ms": {k: round(v, 3) for k, v in alone.items()},
           "paired_ms": {k: round(v, 3) for k, v in paired.items()},
           "paired_twin_ms": {k: round(v, 3) for k, v in other.items()},
           "strip_over_im2col_alone": round(alone["strip"] / alone["im2col"], 3),
           "strip_over_im2col_paired": round(statistics.mean([paired["strip"] / paired["im2col"],
                                                              other["strip"] / other["im2col"]]), 3)}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
