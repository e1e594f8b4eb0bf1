"""A --timeline trace as a picture: one band of bars per rank (its compute lane, then each of its sums).

    python bench/timeline_plot.py TRACE.json [--steps A:B] [-o docs/timeline.png]

--steps: only steps A to B-1 of the window (their time span; default: the whole window). Steps are outlined
on the compute lane and numbered; phases are coloured; each sum lane shows when the reducer started a sum
and when it saw it done.
"""
from __future__ import annotations

import argparse
import json
import sys

COLOURS = {"data": "#8c8c8c", "forward": "#4c72b0", "backward": "#dd8452", "wait for sum": "#c44e52",
           "wait for sum (owed)": "#c44e52", "update": "#55a868", "evaluate test": "#8172b3",
           "evaluate val": "#8172b3", "replica check": "#937860", "checkpoint content": "#da8bc3",
           "checkpoint write": "#da8bc3"}
SUM_COLOUR = "#64b5cd"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace")
    p.add_argument("--steps", help="A:B, steps of the window to show")
    p.add_argument("-o", "--out", default="timeline.png")
    args = p.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    with open(args.trace) as f:
        trace = json.load(f)
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    lanes = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    steps = [e for e in events if e["name"] == "step"]
    if args.steps:
        a, b = (int(v) for v in args.steps.split(":"))
        shown = [e for e in steps if a <= e["args"]["step"] < b]
        if not shown:
            sys.exit(f"timeline_plot: no step {a}..{b - 1} in {args.trace}")
    else:
        shown = steps
    lo = min(e["ts"] for e in shown)
    hi = max(e["ts"] + e["dur"] for e in shown)
    events = [e for e in events if e["ts"] < hi and e["ts"] + e["dur"] > lo]

    rows = sorted(lanes)                                        # (rank, lane), compute lane first
    y = {key: len(rows) - 1 - i for i, key in enumerate(rows)}
    fig, ax = plt.subplots(figsize=(12, 0.45 * len(rows) + 1.6))
    ms = lambda t: (t - lo) / 1e3                               # noqa: E731
    for e in events:
        row = y[e["pid"], e["tid"]]
        x0, w = ms(max(e["ts"], lo)), (min(e["ts"] + e["dur"], hi) - max(e["ts"], lo)) / 1e3
        if e["name"] == "step":
            ax.broken_barh([(x0, w)], (row - 0.42, 0.84), facecolors="none", edgecolors="black", linewidth=0.6)
            if e["pid"] == 0 and e in shown:
                ax.text(x0 + w / 2, row + 0.5, f"step {e['args']['step']}", ha="center", va="bottom", fontsize=7)
        elif e["tid"]:
            ax.broken_barh([(x0, w)], (row - 0.3, 0.6), facecolors=SUM_COLOUR)
        else:
            ax.broken_barh([(x0, w)], (row - 0.35, 0.7), facecolors=COLOURS.get(e["name"], "#cccccc"))
    ax.set_yticks([y[k] for k in rows], [f"rank {pid}: {lanes[pid, tid]}" for pid, tid in rows], fontsize=8)
    ax.set_xlim(0, (hi - lo) / 1e3)
    ax.set_ylim(-0.7, len(rows) - 0.1)
    ax.set_xlabel("ms")
    named = [n for n in COLOURS if any(e["name"] == n for e in events)]
    handles = [Patch(color=COLOURS[n], label=n) for n in dict.fromkeys(named)]
    if any(e["tid"] for e in events):
        handles.append(Patch(color=SUM_COLOUR, label="sum under way (started .. seen done)"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=4,
              fontsize=8, frameon=False)
    other = trace.get("otherData", {})
    ax.set_title(f"lenet-train --timeline: {other.get('ranks', '?')} rank(s), {other.get('reduction', '')}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
