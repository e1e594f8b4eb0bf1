"""lenet-plot: a training run's curves as a PNG, from the trainer's --metrics JSONL and, optionally, the
evaluator's --report JSONL.

    lenet-plot metrics.jsonl -o curves.png
    lenet-plot metrics.jsonl eval.jsonl -o curves.png --title "mpirun -n 2, 5 epochs"

Four panels: loss and accuracy (training per --log-every window, test per epoch and per evaluated
checkpoint), the learning rate, and images/s (total and per rank). A line that is not a JSON object (a
file still being written ends in half a line) is skipped with a warning. Needs matplotlib (the `plot` extra).
Exit status: 0, 1 when a file cannot be read or holds nothing to plot, 2 on a usage error.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="lenet-plot", description=__doc__.split("\n\n")[0])
    p.add_argument("metrics", type=Path, help="lenet-train --metrics file (JSON lines)")
    p.add_argument("report", type=Path, nargs="?", help="lenet-evaluator --report file (JSON lines)")
    p.add_argument("-o", "--output", type=Path, required=True, help="the PNG to write")
    p.add_argument("--title", default=None, help="a title over the panels")
    p.add_argument("--dpi", type=int, default=80, help="resolution (80: a ~1 MP image of a few tens of KB)")
    args = p.parse_args(argv)
    if not 20 <= args.dpi <= 600:
        p.error(f"--dpi must be in [20, 600], got {args.dpi}")
    if args.output.suffix.lower() != ".png":
        p.error(f"--output {args.output}: expected a .png file name")
    return args


def read_jsonl(path, warn):
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            if not isinstance(obj, dict):
                warn(f"{path}:{n}: not a JSON object; skipped")
                continue
            rows.append(obj)
    return rows


def _xy(rows, x, y):
    pts = [(r[x], r[y]) for r in rows if isinstance(r.get(x), (int, float)) and isinstance(r.get(y), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(metrics, report, output, title=None, dpi=80):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in metrics if r.get("event") == "step"]
    epochs = [r for r in metrics if r.get("event") == "epoch"]
    evals = sorted((r for r in report if "accuracy" in r and "step" in r), key=lambda r: r["step"])
    if not (steps or epochs or evals):
        raise ValueError("nothing to plot: no step or epoch rows, no evaluations")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), dpi=dpi)
    (ax_loss, ax_acc), (ax_lr, ax_speed) = axes
    for ax, train_key, epoch_train, epoch_test, eval_key, label in (
            (ax_loss, "loss", "train_loss", "test_loss", "loss", "loss"),
            (ax_acc, "acc", "train_acc", "test_acc", "accuracy", "accuracy")):
        ax.plot(*_xy(steps, "step", train_key), lw=1, color="#2a6fdb", alpha=0.8, label="train (window)")
        ax.plot(*_xy(epochs, "step", epoch_train), "s-", ms=4, color="#1d3f7a", label="train (epoch)")
        ax.plot(*_xy(epochs, "step", epoch_test), "o-", ms=5, color="#e0653a", label="test (epoch end)")
        ax.plot(*_xy(evals, "step", eval_key), ".", ms=6, color="#1e9e6a", label="evaluator")
        ax.set_ylabel(label)
    ax_loss.set_yscale("log")
    shown = [y for line in ax_acc.get_lines() for y in line.get_ydata()]
    if shown:                               # the first steps' low accuracy would squash the rest
        ax_acc.set_ylim(max(0.0, sorted(shown)[len(shown) // 20] - 0.02), 1.0)
    ax_lr.plot(*_xy(steps or epochs, "step", "lr"), color="#7a3fbf")
    ax_lr.set_ylabel("learning rate")
    ax_speed.plot(*_xy(steps or epochs, "step", "images_per_s"), color="#333", label="total")
    ranks = max((len(r.get("rank_images_per_s") or []) for r in steps), default=0)
    for k in range(ranks):
        xs = [r["step"] for r in steps if len(r.get("rank_images_per_s") or []) > k]
        ys = [r["rank_images_per_s"][k] for r in steps if len(r.get("rank_images_per_s") or []) > k]
        ax_speed.plot(xs, ys, lw=1, label=f"rank {k}")
    ax_speed.set_ylabel("images/s")
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(output, dpi=dpi)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)

    def warn(msg):
        print(f"lenet-plot: warning: {msg}", file=sys.stderr)
    try:
        metrics = read_jsonl(args.metrics, warn)
        report = read_jsonl(args.report, warn) if args.report else []
        plot(metrics, report, args.output, args.title, args.dpi)
    except ImportError as e:
        print(f"lenet-plot: error: {e.name or e} is missing: pip install 'lenet-dist[plot]'", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"lenet-plot: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
