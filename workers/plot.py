"""lenet-plot: the curves of one run or several overlaid, as PNG, SVG or PDF, from the trainer's --metrics
JSONL and, optionally, the evaluator's --report JSONL of each run.

    lenet-plot runs/a/metrics.jsonl -o curves.png
    lenet-plot runs/a/metrics.jsonl runs/a/eval.jsonl -o curves.svg --title "mpirun -n 2, 5 epochs"
    lenet-plot a/metrics.jsonl a/eval.jsonl b/metrics.jsonl b/eval.jsonl --label "lr 0.05" --label "lr 0.1" -o cmp.pdf

Each file is recognised by its rows: a metrics file (rows with "event") starts a run; an evaluator report
(rows with "step" and accuracy figures, no "event") belongs to the metrics file before it, or is a run of
its own when it comes first. Labels go to the runs in order (default: the run's folder name). A file that is
neither is an error, never silently drawn as an empty legend entry.

Four panels: loss (log scale) and accuracy (the axis zoomed to the data): training per --log-every window,
validation and test per epoch, and the evaluator's validation and test figures per checkpoint; the learning
rate; images/s (total, and per rank when one run is drawn). A line that is not a JSON object (a file still
being written ends in half a line) is skipped with a warning. Needs matplotlib (the `plot` extra).
Exit status: 0, 1 when a file cannot be read or holds nothing to plot, 2 on a usage error.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lenet_dist.files import open_regular

FORMATS = (".png", ".svg", ".pdf")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="lenet-plot", description=__doc__.split("\n\n")[0])
    p.add_argument("files", type=Path, nargs="+", metavar="FILE",
                   help="lenet-train --metrics files, each optionally followed by its lenet-evaluator --report file")
    p.add_argument("-o", "--output", type=Path, required=True, help="the image to write: .png, .svg or .pdf")
    p.add_argument("--label", action="append", default=[], help="a run's name in the legend, once per run, in order")
    p.add_argument("--title", default=None, help="a title over the panels")
    p.add_argument("--dpi", type=int, default=80, help="resolution (80: a ~1 MP image of a few tens of KB)")
    args = p.parse_args(argv)
    if not 20 <= args.dpi <= 600:
        p.error(f"--dpi must be in [20, 600], got {args.dpi}")
    if args.output.suffix.lower() not in FORMATS:
        p.error(f"--output {args.output}: expected a file name ending in {', '.join(FORMATS)}")
    return args


@dataclass
class Run:
    """One run's rows: the trainer's metrics (step and epoch rows) and the evaluator's results."""
    label: str
    metrics: list = field(default_factory=list)
    report: list = field(default_factory=list)


def kind_of(rows):
    """"metrics", "report" or None, from what the rows hold."""
    if any("event" in r for r in rows):
        return "metrics"
    if any("step" in r and any(k in r for k in ("test_accuracy", "accuracy", "val_accuracy")) for r in rows):
        return "report"
    return None


def group_runs(files, labels, warn):
    """[Run] from the files in command-line order (see the module doc). ValueError naming a file that is
    neither kind, a second report for one run, or labels that do not match the runs."""
    runs = []
    for path in files:
        rows = read_jsonl(path, warn)
        kind = kind_of(rows)
        if kind is None:
            raise ValueError(f"{path}: neither a --metrics file (rows with \"event\") nor an evaluator "
                             f"--report (rows with \"step\" and accuracy figures)" if rows else f"{path}: nothing to plot")
        if kind == "metrics" or not runs or runs[-1].report:
            runs.append(Run(label=path.resolve().parent.name or path.stem))
        if kind == "metrics":
            runs[-1].metrics = rows
        else:
            runs[-1].report = rows
    if labels:
        if len(labels) != len(runs):
            raise ValueError(f"{len(labels)} --label for {len(runs)} run(s): give one per run, in order")
        for run, label in zip(runs, labels):
            run.label = label
    elif len({r.label for r in runs}) < len(runs):
        for i, run in enumerate(runs):
            run.label = f"{run.label} ({i + 1})"
    return runs


def read_jsonl(path, warn):
    rows = []
    with open_regular(path) as f:
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


def _xy(rows, x, *ys):
    """Points (row[x], row[y]) of the rows holding a number under x and under the first of `ys` present."""
    xs, vs = [], []
    for r in rows:
        y = next((r[k] for k in ys if k in r), None)
        if isinstance(r.get(x), (int, float)) and isinstance(y, (int, float)) and not isinstance(y, bool):
            xs.append(r[x])
            vs.append(y)
    return xs, vs


# (series, rows to take, keys, line style): one colour per run, one style per series
SERIES = (("train", "steps", {"loss": ("loss",), "acc": ("acc",)}, dict(lw=1, alpha=0.55)),
          ("val (epoch)", "epochs", {"loss": ("val_loss",), "acc": ("val_acc", "val_accuracy")}, dict(ls="--", marker="s", ms=4)),
          ("test (epoch)", "epochs", {"loss": ("test_loss",), "acc": ("test_acc", "test_accuracy")}, dict(marker="o", ms=4)),
          ("val (evaluator)", "evals", {"loss": ("val_loss",), "acc": ("val_accuracy",)}, dict(ls=":", marker="^", ms=4)),
          ("test (evaluator)", "evals", {"loss": ("test_loss", "loss"), "acc": ("test_accuracy", "accuracy")},
           dict(ls="none", marker=".", ms=6)))


def plot(runs, output, title=None, dpi=80):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), dpi=dpi)
    (ax_loss, ax_acc), (ax_lr, ax_speed) = axes
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = 0
    for i, run in enumerate(runs):
        rows = {"steps": [r for r in run.metrics if r.get("event") == "step"],
                "epochs": [r for r in run.metrics if r.get("event") == "epoch"],
                "evals": sorted((r for r in run.report if "step" in r and "event" not in r), key=lambda r: r["step"])}
        colour = colours[i % len(colours)]
        name = f"{run.label}: " if len(runs) > 1 else ""
        for series, source, keys, style in SERIES:
            for ax, what in ((ax_loss, "loss"), (ax_acc, "acc")):
                xs, ys = _xy(rows[source], "step", *keys[what])
                if xs:
                    ax.plot(xs, ys, color=colour, label=name + series, **style)
                    drawn += 1
        speed_rows = rows["steps"] or rows["epochs"]
        ax_lr.plot(*_xy(speed_rows, "step", "lr"), color=colour, label=run.label)
        ax_speed.plot(*_xy(speed_rows, "step", "images_per_s"), color=colour, label=name + "total")
        if len(runs) == 1:
            n = max((len(r.get("rank_images_per_s") or []) for r in rows["steps"]), default=0)
            for k in range(n):
                pts = [(r["step"], r["rank_images_per_s"][k]) for r in rows["steps"]
                       if len(r.get("rank_images_per_s") or []) > k]
                ax_speed.plot([p[0] for p in pts], [p[1] for p in pts], lw=1, label=f"rank {k}")
    if not drawn:
        plt.close(fig)
        raise ValueError("nothing to plot: no step or epoch rows, no evaluations")
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    ax_acc.set_ylabel("accuracy")
    shown = sorted(y for line in ax_acc.get_lines() for y in line.get_ydata())
    if shown:                               # the first steps' low accuracy would squash the rest
        ax_acc.set_ylim(max(0.0, shown[len(shown) // 20] - 0.02), min(1.0, shown[-1] + 0.005))
    ax_lr.set_ylabel("learning rate")
    ax_speed.set_ylabel("images/s")
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
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
        plot(group_runs(args.files, args.label, warn), args.output, args.title, args.dpi)
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
