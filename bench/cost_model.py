"""A cost model of data-parallel training across hosts, checked against bench/multihost.py's measurements
and drawn up to 64 hosts.

    python bench/multihost.py --calibrate --per-host 1 --rates 1g --batches 2,4,8,16,32,64,128,256,512 --out mh.jsonl
    python bench/multihost.py --calibrate --per-host 2 --rates 1g --out mh.jsonl
    python bench/multihost.py --out mh.jsonl
    python bench/cost_model.py mh.jsonl --plot docs/scaling.png        # needs matplotlib (the `plot` extra)
    python bench/cost_model.py bench/multihost-2026-11-28.jsonl        # the figures of docs/scaling.md

One step of H hosts x r ranks (p = H r), global batch B, link rate R, gradient n = 246,844 bytes:

    compute   C      the slowest rank's forward + backward on its shard B/p, measured with the same
                     placement (pinning) and no communication at all (--calibrate: "model"), or the
                     slowest rank's in each step of the measured run itself ("model*": the same
                     placement at the same moment, for a machine whose load moves between runs)
    allreduce T(v)   = 2 log2(p) a  +  max(V(v) - b, 0) / (R * 1448/1514)
                     MPICH reduces 247 KB with reduce-scatter + allgather (Rabenseifner): 2 log2 p rounds,
                     each rank sending 2 (p-1)/p of the buffer; with r ranks per host in blocks, the rounds
                     between hosts move V(v) = 2 v (H-1)/H bytes over each host's link each way (the
                     measured eth0 counters agree). a: one round's latency, from the median of a tiny
                     allreduce on the same links (--calibrate: log2 p rounds). TCP over Ethernet carries
                     1448 bytes of payload per 1514-byte frame. b: what the link lets through at once
                     after an idle spell: the shaped links of the benchmark are token buckets (tc tbf)
                     of 1 ms of traffic (at least 16 KiB: tests/netns.py), full again after 1 ms idle;
                     a transfer that starts after compute finds it full (the fused one, the fc bucket),
                     the conv bucket right behind it finds what refilled while the link was idle. A real
                     link has no bucket: the extrapolated curves use b = 0.
    fused     t = C + T(n)
    overlap   pipelined (the default since 2026-11-29 09cbfea): the step waits for the conv bucket and
              the tail only; fc1..fc3's sums may travel until the next forward reaches fc1
                t = max(C + T'(n_conv),  C (1 - f - g) + T(n_fc) + T(n_conv)) + log2(p) a
                     compute-bound (the link rests, the conv bucket finds the token bucket full: T') or
                     link-bound (the fc transfer's window is the compute after its start, C (f + g), and
                     the next step's, until fc1's forward)
              serial (every bucket waited for before the update; "schedule": "serial" in a record, and
              every record before 2026-11-29 09cbfea)
                t = C (1 - f) + max(C f, T(n_fc)) + T'(n_conv) + log2(p) a
                     (T': with the bucket refilled for the max(C f - T(n_fc), 0) the link was idle)
                     f: the share of the backward-inclusive compute that comes after fc1's gradient is
                     ready, g: the share before fc1's forward (both measured with --calibrate; g = 0.38
                     where a calibration predates it), n_fc = 236.4 KiB of fc1..fc3, n_conv = 10.1 KiB
    fp16      the same as overlap with half the bytes in the buckets, and the CPU half precision adds
              (--calibrate measures it alone: "half_ms"): the encoding inside backward (in C for the
              model; in a run's own compute already) and the float32 sums of the halves and the decoding
              in the waits (added for both)
    images/s = B / t

Extrapolated to H hosts, each host is one rank on a core of its own: C is the 2 x 1 calibration at the
shard B/H (the machine's two cores both busy, as on a cluster where every host computes at once), a the
2 x 1 round latency. A link rate "usefully feeds" H hosts while H hosts still give at least half of H times
one host's images/s (parallel efficiency >= 50%); the best H is where images/s peaks.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lenet_dist.nn.model import NUM_PARAMS                    # noqa: E402
from lenet_dist.parallel.buckets import plan                       # noqa: E402
from tests.netns import tbf_burst                          # noqa: E402

GOODPUT = 1448 / 1514
N_BYTES = 4 * NUM_PARAMS
FC_LO = plan(64)[0][0]
N_FC, N_CONV = 4 * (NUM_PARAMS - FC_LO), 4 * FC_LO
RATE_BITS = {"10g": 10e9, "1g": 1e9, "100m": 100e6}


def allreduce_s(v_bytes, hosts, ranks, rate_bits, a, bucket=0.0):
    """Seconds to sum v_bytes; `bucket`: bytes the link lets through at once (its token bucket's fill)."""
    rounds = 2 * math.log2(ranks) if ranks > 1 else 0
    cross = 2 * v_bytes * (hosts - 1) / hosts
    return rounds * a + max(cross - bucket, 0.0) * 8 / (rate_bits * GOODPUT)


G_DEFAULT = 0.38     # share of compute before fc1's forward, for calibrations that predate its measurement


HALF = {"fp16": "float16", "bf16": "bfloat16"}


def step_s(variant, compute_s, f, hosts, ranks, rate_bits, a, burst=0.0, g=G_DEFAULT, schedule="pipelined",
           half_s=0.0):
    """Seconds per step; `burst`: the link's token bucket in bytes (0: a real link); `schedule` of the
    buckets: pipelined | serial (see the module doc); `half_s`: the CPU half precision adds in the waits."""
    if ranks == 1:
        return compute_s
    if variant == "fused":
        return compute_s + allreduce_s(N_BYTES, hosts, ranks, rate_bits, a, burst)
    half = variant.split("-")[0] in HALF
    shrink = 0.5 if half else 1.0
    compute_s += half_s if half else 0.0
    if schedule == "pipelined":
        t_conv = allreduce_s(N_CONV * shrink, hosts, ranks, rate_bits, a)
        compute_bound = compute_s + allreduce_s(N_CONV * shrink, hosts, ranks, rate_bits, a, burst)
        link_bound = compute_s * (1 - f - g) + allreduce_s(N_FC * shrink, hosts, ranks, rate_bits, a) + t_conv
        return max(compute_bound, link_bound) + math.log2(ranks) * a
    t_fc = allreduce_s(N_FC * shrink, hosts, ranks, rate_bits, a, burst)
    idle = max(compute_s * f - t_fc, 0.0)                          # the link rests before the conv bucket
    refilled = min(burst, idle * rate_bits / 8)
    t_conv = allreduce_s(N_CONV * shrink, hosts, ranks, rate_bits, a, refilled)
    return compute_s * (1 - f) + max(compute_s * f, t_fc) + t_conv + math.log2(ranks) * a


def load(paths):
    calib, runs = {}, []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            r = json.loads(line)
            if r.get("calibration"):
                calib[(r["hosts"], r["per_host"])] = r          # the last calibration of a placement wins
            elif "variant" in r:
                runs.append(r)
    return calib, runs


def round_latency(c):
    """One round's latency from a tiny allreduce (recursive doubling: log2 p rounds)."""
    return 1e-3 * c["tiny_allreduce_ms"] / max(math.log2(c["ranks"]), 1)


def predict_run(r, calib, compute="calibrated"):
    """images/s the model predicts for a measured configuration; compute "calibrated" (the --calibrate
    run's) or "run" (the slowest rank's forward + backward measured in that run itself: the same
    placement at the same moment, so a machine whose load moves between runs does not move the model)."""
    c = calib.get((r["hosts"], r["per_host"]))
    if not c or str(r["batch"]) not in c["by_batch"]:
        return None
    cb = c["by_batch"][str(r["batch"])]
    compute_ms = cb["compute_ms"] if compute == "calibrated" else r["compute_ms"]
    half = c.get("half_ms", {}).get(HALF.get(r["variant"].split("-")[0]), {})
    if compute == "calibrated":
        compute_ms += half.get("encode", 0.0)
    t = step_s(r["variant"], 1e-3 * compute_ms, cb["after_fc_bucket"], r["hosts"], r["per_host"] *
               r["hosts"], r["rate_bits"], round_latency(c), tbf_burst(r["rate_bits"]),
               cb.get("before_fc_forward", G_DEFAULT), r.get("schedule", "serial"), 1e-3 * half.get("outside", 0.0))
    return r["batch"] / t


def curve(calib, batch, rate_bits, variant, max_hosts=64):
    """[(H, images/s)] for H = 1 .. max_hosts hosts of one rank each, from the 2 x 1 calibration."""
    c = calib[(2, 1)]
    shards = {v["shard"]: v for v in c["by_batch"].values()}
    out = []
    for h in range(1, max_hosts + 1):
        shard = batch / h
        lo = max((s for s in shards if s <= shard), default=min(shards))
        hi = min((s for s in shards if s >= shard), default=max(shards))
        w = 0 if hi == lo else (math.log(shard) - math.log(lo)) / (math.log(hi) - math.log(lo))
        per_ex = (1 - w) * shards[lo]["compute_ms"] / lo + w * shards[hi]["compute_ms"] / hi   # per example
        f, g = shards[hi]["after_fc_bucket"], shards[hi].get("before_fc_forward", G_DEFAULT)
        half = c.get("half_ms", {}).get(HALF.get(variant.split("-")[0]), {}) if h > 1 else {}
        t = step_s(variant, 1e-3 * (per_ex * shard + half.get("encode", 0.0)), f, h, h, rate_bits, round_latency(c),
                   g=g, half_s=1e-3 * half.get("outside", 0.0))
        out.append((h, batch / t))
    return out


def useful(points):
    """(largest H with efficiency >= 50%, H where images/s peaks)."""
    one = points[0][1]
    ok = [h for h, ips in points if ips >= 0.5 * h * one]
    return max(ok), max(points, key=lambda p: p[1])[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="JSONL files written by bench/multihost.py --out")
    ap.add_argument("--plot", help="write the model's curves and the measured points to this PNG")
    ap.add_argument("--variants", default="fused,overlap,fp16")
    args = ap.parse_args(argv)
    calib, runs = load(args.results)
    print("model: compute from the calibration | model*: compute measured in the run itself")
    print("hosts x ranks  rate  batch  variant   measured  model  error   model*  error*  comm share")
    worst = {}
    for r in sorted(runs, key=lambda r: (r["per_host"], -r["rate_bits"], r["batch"], r["variant"])):
        if r["variant"] not in args.variants.split(","):
            continue
        pred, pred_run = predict_run(r, calib), predict_run(r, calib, compute="run")
        if pred is None:
            continue
        err, err_run = pred / r["images_per_s"] - 1, pred_run / r["images_per_s"] - 1
        key = (r["variant"], r["per_host"])
        worst[key] = max(worst.get(key, 0.0), abs(err_run))
        print(f"{r['hosts']} x {r['per_host']}        {r['rate']:>5} {r['batch']:>6}  {r['variant']:<8} "
              f"{r['images_per_s']:>9.0f} {pred:>6.0f} {100 * err:>+6.1f}%  {pred_run:>6.0f} {100 * err_run:>+6.1f}%"
              f"  {100 * r['comm_share']:>5.1f}%")
    for (v, per_host), w in sorted(worst.items()):
        print(f"largest error* of {v} at {per_host} rank(s) per host: {100 * w:.1f}%")
    if (2, 1) not in calib:
        print("no 2 x 1 calibration: no curves (bench/multihost.py --calibrate --per-host 1)")
        return 0
    batches = sorted({int(b) for b in ("64", "256")})
    for batch in batches:
        for rate, bits in RATE_BITS.items():
            for v in args.variants.split(","):
                pts = curve(calib, batch, bits, v)
                h50, hbest = useful(pts)
                print(f"batch {batch:>3} {rate:>5} {v:<8} 1 host {pts[0][1]:>6.0f}/s, best {hbest:>2} hosts "
                      f"{max(p[1] for p in pts):>7.0f}/s, efficiency >= 50% up to {h50} hosts")
    if args.plot:
        draw(args.plot, calib, runs, batches, args.variants.split(","))
    return 0


def draw(path, calib, runs, batches, variants):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {"10g": "tab:blue", "1g": "tab:green", "100m": "tab:red"}
    styles = {"fused": "-", "overlap": "--", "fp16": ":", "bf16": "-."}
    marks = {"fused": "o", "overlap": "s", "fp16": "^", "bf16": "v"}
    fig, axes = plt.subplots(1, len(batches), figsize=(6.5 * len(batches), 5), sharey=True)
    for ax, batch in zip(axes if len(batches) > 1 else [axes], batches):
        for rate, bits in RATE_BITS.items():
            for v in variants:
                pts = curve(calib, batch, bits, v)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], styles.get(v, "-"), color=colors[rate],
                        label=f"{rate} {v} (model)")
                for r in runs:
                    if r["rate"] == rate and r["variant"] == v and r["batch"] == batch and r["per_host"] == 1:
                        ax.plot(r["hosts"], r["images_per_s"], marks.get(v, "o"), color=colors[rate],
                                markeredgecolor="black")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("hosts (one rank and one core each)")
        ax.set_title(f"global batch {batch}: model (lines) and measured 2 x 1 (markers)")
        ax.grid(True, which="both", alpha=0.3)
    (axes[0] if len(batches) > 1 else axes).set_ylabel("images/s")
    (axes[-1] if len(batches) > 1 else axes).legend(fontsize=7, ncol=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
