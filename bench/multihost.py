"""Data-parallel training across hosts on shaped links: network namespaces play the hosts (tests/netns.py),
joined by veth links capped with tc tbf, mpirun (MPICH Hydra, tests/netns_agent.sh as ssh) across them.

    LENET_DATA_DIR=/path/to/mnist python bench/multihost.py                 # the full table (~15 min)
    python bench/multihost.py --short                                       # a quick pass (the test suite's)
    python bench/multihost.py --loopback --per-host 2                       # this machine: a core per rank, no links
    python bench/multihost.py --rates 100m --per-host 1 --variants fused,overlap-serial,overlap,overlap-c16-w3
    python bench/multihost.py --out runs/mh.jsonl && python bench/cost_model.py runs/mh.jsonl --plot docs/scaling.png

For every hosts x ranks-per-host, link rate and global batch, one mpirun runs the real DataParallelTrainer
once per variant (fused: --bucket-kb 0; overlap: the default buckets; fp16 / bf16: buckets in half
precision), interleaved in rounds (fused, overlap, fp16, fused, ...) so that the machine's load hits all
alike. Per variant, medians over the rounds:

    images_per_s     global batch * steps / wall time of the slowest rank
    comm_share       time blocked on the reduction (trainer.comm_seconds) / wall time, mean over ranks
    compute_ms       per step, the slowest rank's forward + backward in that step (the seconds every
                     rank puts in the step's tail), mean over the steps
    tx_kb_per_step   bytes rank 0's host sent on its link per step (its eth0 counter)

All namespace hosts share this machine's cores: each host is pinned to one core (host i to core i mod
cores), so 2 hosts x 1 rank is the only configuration with a core per rank; 2 ranks per host share their
host's core (and the trainer then waits politely, as on any oversubscribed node: comm.py). --calibrate
measures what bench/cost_model.py needs: compute per step with the same pinning and no communication at
all, and the latency of a tiny allreduce on each link. Every namespace and link is removed at the end, on
Ctrl-C and on SIGTERM too (namespaces left by a SIGKILLed run are removed by the next run).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

MARK = "MULTIHOST-RESULT "
TAG = "lmh"                        # namespace names: lmh<pid>-h1 ...; the pid tells a stale set from a live one
SUBNET = "10.79.0"
RATES = {"10g": 10e9, "1g": 1e9, "100m": 100e6}
VARIANTS = {"fused": {"bucket_kb": 0}, "overlap": {"bucket_kb": 64},     # bucketed on loopback too
            "fp16": {"bucket_kb": 64, "allreduce_dtype": "float16"}, "bf16": {"bucket_kb": 64, "allreduce_dtype": "bfloat16"},
            "auto": {"bucket_kb": -1}}                                 # the default: measured, then kept


def variant_config(name):
    """TrainConfig fields of a variant: a VARIANTS name or kbN (buckets of N KiB, float32), optionally
    followed by how the buckets travel (variant_lanes): fp16-serial, overlap-c16-w3. None if unknown."""
    base, *how = name.split("-")
    if variant_lanes(name) is None:
        return None
    if base in VARIANTS:
        return VARIANTS[base]
    if base.startswith("kb") and base[2:].isdigit():
        return {"bucket_kb": int(base[2:])}
    return None


def variant_lanes(name):
    """How a variant's buckets travel, from its suffixes: {} for the defaults (pipelined, back lane in chunks
    of buckets.CHUNK_KB_DEFAULT with WINDOW_DEFAULT under way); -serial: every bucket whole and at once,
    the whole update after the step (the bucketed path of 2026-11-29 and before); -cN: chunks of N KiB; -wN:
    N under way. None for an unknown suffix."""
    out = {}
    for part in name.split("-")[1:]:
        if part == "serial":
            out.update(pipelined=False)
        elif part[:1] in "cw" and part[1:].isdigit():
            out["chunk_kb" if part[0] == "c" else "window"] = int(part[1:])
        else:
            return None
    return out


# -------------------------------------------------------------------------------------------------- worker

def pin_by_rank(per_host):
    """Pin this rank to its host's core: host i (ranks i*per_host ...) on core i mod cores. Before MPI
    starts, so that comm.py sees the one core its host has."""
    from lenet_dist.launcher_env import launcher_rank
    rank = launcher_rank() or 0
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[(rank // per_host) % len(cores)]})
    os.environ.setdefault("LENET_NODE_CORES", "1")  # comm.py counts the node's cores, not the mask: say it


def load(args, comm):
    from bench.timing import load_data
    return load_data(args.data_dir, comm=comm, prog="multihost.py")[0]


def link_bytes():
    """(received, sent) bytes on this namespace host's eth0, or (0, 0) where there is none of ours."""
    try:
        return tuple(int(Path(f"/sys/class/net/eth0/statistics/{k}_bytes").read_text()) for k in ("rx", "tx"))
    except OSError:
        return 0, 0


def worker(args):
    pin_by_rank(args.per_host)
    import numpy as np
    from threadpoolctl import threadpool_limits

    from lenet_dist.comm import MPIComm
    from lenet_dist.config import TrainConfig
    from lenet_dist.parallel.buckets import BUCKET_KB_DEFAULT
    from lenet_dist.parallel.placement import reducer_for
    from lenet_dist.parallel.reducers import BucketedReducer, HalfPrecisionReducer
    from lenet_dist.parallel.step import DataParallelTrainer
    from bench.timing import TimedReducer

    comm = MPIComm()
    ds = load(args, comm)
    total = args.rounds * args.steps + args.warmup
    epochs = max(1, -(-total * args.batch // len(ds.train_images)) + 1)
    names = args.variants.split(",")
    out = {n: {"images_per_s": [], "comm_share": [], "settle_share": [], "compute_ms": [], "tx_kb_per_step": []}
           for n in names}
    with threadpool_limits(limits=1, user_api="blas"):
        def trainer(n):
            cfg, lanes = TrainConfig(batch_size=args.batch, epochs=epochs, **variant_config(n)), variant_lanes(n)
            reducer = reducer_for(cfg, comm)
            if lanes:                       # the buckets' own lanes, as the variant's suffixes say
                kb, lanes = getattr(reducer, "bucket_kb", BUCKET_KB_DEFAULT), {"pipelined": reducer.pipelined, **lanes}
                reducer = BucketedReducer(comm, kb, **lanes) if cfg.allreduce_dtype == "float32" \
                    else HalfPrecisionReducer(comm, kb, cfg.allreduce_dtype, **lanes)
            t = DataParallelTrainer(cfg, comm, ds, reducer=reducer)
            t.reducer = TimedReducer(t.reducer)
            return t
        trainers = {n: trainer(n) for n in names}
        for n, t in trainers.items():
            for _ in range(args.warmup):
                t.train_step()
        for _ in range(args.rounds):
            for n, t in trainers.items():
                comm.barrier()
                t.reducer.comm_seconds, t.reducer.settle_seconds, t.seconds_by_rank[:] = 0.0, 0.0, 0.0
                rx0, tx0 = link_bytes()
                slowest = 0.0
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    t.train_step()
                    slowest += float(t.step_compute_seconds.max())      # every rank's, summed with the step
                t.settle()                                          # the last step's owed update
                wall = time.perf_counter() - t0
                rx1, tx1 = link_bytes()
                every = comm.allgather(np.array([wall, t.reducer.comm_seconds, t.reducer.settle_seconds], np.float64))
                r = out[n]
                r["images_per_s"].append(args.batch * args.steps / float(every[:, 0].max()))
                r["comm_share"].append(float((every[:, 1] / every[:, 0]).mean()))
                r["settle_share"].append(float((every[:, 2] / every[:, 0]).mean()))
                r["compute_ms"].append(1e3 * slowest / args.steps)
                r["tx_kb_per_step"].append((tx1 - tx0) / 1024 / args.steps)
    names = comm.allgather(np.frombuffer(comm.processor_name().encode()[:64].ljust(64), np.uint8))
    hosts = {bytes(row) for row in names}                   # the hosts the ranks really ran on
    if comm.rank == 0:
        for n, r in out.items():
            t = trainers[n]
            schedule = "pipelined" if t.reducer.pipelined else "serial" if t.reducer.path == "buckets" else "fused"
            if t.reducer.chooser:                           # what the measured default kept after its trial
                schedule = f"auto:{t.reducer.path if t.reducer.chooser.decided else 'undecided'}"
            rec = {"variant": n, "schedule": schedule, "ranks": comm.size, "hosts_seen": len(hosts), "batch": args.batch,
                   "rounds": args.rounds, "steps": args.steps, "data_images": len(ds.train_images)}
            for k, v in r.items():
                rec[k] = round(statistics.median(v), 4 if k.endswith("share") else 2)
                rec[k + "_all"] = [round(x, 4 if k.endswith("share") else 1) for x in v]
            print(MARK + json.dumps(rec), flush=True)
    return 0


def calibrate_worker(args):
    """Compute only: every rank runs forward + backward on its shard of each global batch, no allreduce;
    per step, the slowest rank's time (everyone waits for everyone, as in training). Then the latency of
    an 8-byte allreduce. Pinned like the real run."""
    pin_by_rank(args.per_host)
    import numpy as np
    from threadpoolctl import threadpool_limits

    from lenet_dist.comm import MPIComm
    from lenet_dist.nn.model import LeNet5
    from lenet_dist.data import normalize
    from lenet_dist.parallel.buckets import plan

    comm = MPIComm()
    ds = load(args, comm)
    model = LeNet5(seed=0)
    rng = np.random.default_rng(comm.rank)
    fc_start = plan(64)[0][0]                                # where the first bucket (fc1..fc3) begins
    res = {}
    with threadpool_limits(limits=1, user_api="blas"):
        for batch in [int(b) for b in args.calibrate_batches.split(",")]:
            shard = max(1, batch // comm.size)
            steps, fracs, befores = [], [], []
            for i in range(args.warmup + args.rounds * args.steps * max(1, 32 // shard)):   # small: more
                idx = rng.integers(0, len(ds.train_images), shard)
                x, y = normalize(ds.train_images[idx]), ds.train_labels[idx].astype(np.intp)
                comm.wait_for_all() if comm.nap is not None else comm.barrier()
                t0 = time.perf_counter()
                marks = {}
                model.loss_and_grad(x, y, 1.0, ready=lambda off: marks.setdefault(off, time.perf_counter()),
                                    before=lambda off: marks.setdefault(-1, time.perf_counter()) if off == fc_start
                                    else None)
                t1 = time.perf_counter()
                mine = np.array([t1 - t0, (t1 - marks[fc_start]) / (t1 - t0), (marks[-1] - t0) / (t1 - t0)])
                every = comm.allgather(mine)
                if i >= args.warmup:
                    steps.append(float(every[:, 0].max()))
                    fracs.append(float(every[:, 1].mean()))
                    befores.append(float(every[:, 2].mean()))
            res[str(batch)] = {"compute_ms": round(1e3 * statistics.median(steps), 3),
                               "after_fc_bucket": round(statistics.median(fracs), 3),
                               "before_fc_forward": round(statistics.median(befores), 3), "shard": shard}
        half = half_costs(comm.size)
        tiny, lat = np.zeros(2, np.float32), []
        for i in range(200):
            comm.barrier()
            t0 = time.perf_counter()
            comm.comm.Allreduce(comm.MPI.IN_PLACE, tiny)
            lat.append(time.perf_counter() - t0)
    if comm.rank == 0:
        print(MARK + json.dumps({"calibration": True, "ranks": comm.size, "by_batch": res, "half_ms": half,
                                 "tiny_allreduce_ms": round(1e3 * statistics.median(lat[20:]), 4)}), flush=True)
    return 0


def half_costs(ranks):
    """Per step, the CPU that half precision adds, in ms, by dtype: "encode" (inside backward, so in a run's
    compute_ms) and "outside" (a rank's share of the float32 sums of the halves, and the decode: in the
    waits). Measured alone on this rank, on a gradient-like vector."""
    import numpy as np
    from lenet_dist.parallel import halfprec
    from lenet_dist.parallel.compressed import HalfSum
    from lenet_dist.nn.model import NUM_PARAMS
    rng = np.random.default_rng(0)
    g = (rng.standard_normal(NUM_PARAMS) * 10.0 ** rng.uniform(-7, -2, NUM_PARAMS)).astype(np.float32)
    out = {}
    for dtype in halfprec.DTYPES[1:]:
        h, res, back = np.zeros(NUM_PARAMS, halfprec.STORAGE[dtype]), np.zeros_like(g), np.empty_like(g)
        scale = halfprec.agreed_scale(float(np.abs(g).max()), dtype)
        c = -(-NUM_PARAMS // ranks)
        recv = np.zeros((ranks, c), np.uint16)
        enc, outside = [], []
        for _ in range(50):
            t0 = time.perf_counter()
            halfprec.encode(g.copy(), res, scale, dtype, out=h)
            t1 = time.perf_counter()
            HalfSum.sum_halves(recv, dtype)
            halfprec.all_finite(h, dtype)
            halfprec.decode(h, scale, dtype, out=back)
            t2 = time.perf_counter()
            enc.append(t1 - t0)
            outside.append(t2 - t1)
        out[dtype] = {"encode": round(1e3 * statistics.median(enc), 3), "outside": round(1e3 * statistics.median(outside), 3)}
    return out


# ------------------------------------------------------------------------------------------------ launcher

class Interrupted(Exception):
    pass


@contextlib.contextmanager
def cleanup_on_signals():
    """SIGTERM and SIGINT end the run through the `finally` blocks that remove namespaces."""
    def stop(signum, frame):
        raise Interrupted(f"signal {signum}")
    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def remove_stale_namespaces(log):
    """Namespaces of an earlier run that was killed outright (its pid is gone): ours to remove."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
    for line in names:
        name = line.split(" ")[0]
        if not name.startswith(TAG) or "-" not in name:
            continue
        pid = name[len(TAG):].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            log(f"removed stale namespace {name}")


def mpirun_line(args, n, per_host, hosts_list, extra):
    cmd = ["mpirun"]
    if hosts_list:
        from tests.netns import AGENT
        cmd += ["-launcher", "ssh", "-launcher-exec", str(AGENT),
                "-hosts", ",".join(f"{h}:{per_host}" for h in hosts_list)]
    cmd += ["-n", str(n), sys.executable, str(Path(__file__).resolve()), "--per-host", str(per_host),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--rounds", str(args.rounds)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    return cmd + extra


def run_mpirun(args, cmd, hosts, env):
    """Start mpirun (on the first host when there are hosts); its result lines."""
    kw = dict(env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p = hosts.popen(next(iter(hosts.ns)), cmd, cwd=ROOT, **kw) if hosts else subprocess.Popen(cmd, cwd=ROOT, **kw)
    try:
        out, err = p.communicate(timeout=args.timeout)
    except BaseException:
        p.kill()
        p.communicate()
        raise
    recs = [json.loads(line[len(MARK):]) for line in out.splitlines() if line.startswith(MARK)]
    if p.returncode or not recs:
        raise RuntimeError(f"{' '.join(cmd[:12])} ... exited {p.returncode}:\n{err[-2000:]}")
    return recs


def launcher(args):
    from tests.netns import Hosts, unavailable
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **dict(args.env))
    sink = open(args.out, "a") if args.out else None

    def emit(rec):
        rec.update(env=dict(args.env), load1=round(os.getloadavg()[0], 2), time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        line = json.dumps(rec)
        print(line, flush=True)
        if sink:
            sink.write(line + "\n")
            sink.flush()

    if args.loopback:
        for per_host in [int(r) for r in args.per_host.split(",")]:
            for batch in args.batches.split(","):
                for rec in run_mpirun(args, mpirun_line(args, per_host, 1, None,     # a core per rank
                                                        ["--worker", "--batch", batch, "--variants", args.variants]),
                                      None, env):
                    emit(dict(rec, hosts=1, per_host=per_host, rate="loopback"))
        return 0
    why = unavailable() or (None if subprocess.run(["which", "tc"], capture_output=True).returncode == 0
                            else "shaping links needs 'tc' (iproute2)")
    if why:
        log(f"multihost.py: cannot make namespace hosts here: {why}")
        return 3
    remove_stale_namespaces(log)
    env.update(HYDRA_IFACE="eth0", UCX_TLS="tcp,self", UCX_NET_DEVICES="eth0")
    with cleanup_on_signals():
        for n_hosts in [int(h) for h in args.hosts.split(",")]:
            addresses = {f"h{i}": f"{SUBNET}.{i}" for i in range(1, n_hosts + 1)}
            hosts = Hosts(f"{TAG}{os.getpid()}", addresses, mtu=args.mtu)
            try:
                hosts.create()
                env["LENET_NETNS_HOSTS"] = hosts.agent_map()
                for per_host in [int(r) for r in args.per_host.split(",")]:
                    n = n_hosts * per_host
                    for rate in args.rates.split(","):
                        for h in addresses:
                            hosts.shape(h, RATES[rate])
                        base = dict(hosts=n_hosts, per_host=per_host, rate=rate, rate_bits=RATES[rate], mtu=args.mtu)
                        if args.calibrate:
                            cmd = mpirun_line(args, n, per_host, list(addresses.values()),
                                              ["--calibrate-worker", "--calibrate-batches", args.batches])
                            for rec in run_mpirun(args, cmd, hosts, env):
                                emit(dict(rec, **base))
                            continue
                        for batch in args.batches.split(","):
                            cmd = mpirun_line(args, n, per_host, list(addresses.values()),
                                              ["--worker", "--batch", batch, "--variants", args.variants])
                            for rec in run_mpirun(args, cmd, hosts, env):
                                if rec["hosts_seen"] != n_hosts:
                                    raise RuntimeError(f"ranks ran on {rec['hosts_seen']} hosts, not {n_hosts}")
                                emit(dict(rec, **base))
            finally:
                hosts.destroy()
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hosts", default="2", help="comma-separated host counts")
    p.add_argument("--per-host", default="1,2", help="comma-separated ranks per host")
    p.add_argument("--rates", default="10g,1g,100m", help=f"link rates: {', '.join(RATES)}")
    p.add_argument("--batches", default="64,256", help="global batch sizes")
    p.add_argument("--variants", default="fused,overlap,fp16",
                   help=f"of {', '.join(VARIANTS)}, or kbN (buckets of N KiB); a suffix -serial (buckets "
                        f"whole, update after the step), -cN (back chunks of N KiB), -wN (N under way)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per round and variant")
    p.add_argument("--rounds", type=int, default=5, help="rounds of every variant; figures are medians")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--short", action="store_true", help="a quick pass: 2 rounds of 4 steps, 1 Gbit/s, batch 64")
    p.add_argument("--loopback", action="store_true", help="plain mpirun on this machine, no namespaces")
    p.add_argument("--calibrate", action="store_true", help="compute and latency for bench/cost_model.py")
    p.add_argument("--data-dir", help="MNIST folder (default: $LENET_DATA_DIR, then the cache)")
    p.add_argument("--env", type=lambda t: tuple(t.split("=", 1)), action="append", default=[],
                   metavar="KEY=VALUE", help="extra environment for every rank (repeatable)")
    p.add_argument("--mtu", type=int, default=9000,
                   help="the links' MTU (1500 charged each host ~7 ms of softirq per step at 100 Mbit/s: "
                        "docs/scaling.md)")
    p.add_argument("--out", help="also append every result line to this JSONL file")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per mpirun")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--calibrate-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--calibrate-batches", default="64,256", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=64, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.short:
        args.rounds, args.steps, args.warmup, args.rates, args.batches = 2, 4, 1, "1g", "64"
    if args.worker or args.calibrate_worker:
        args.per_host = int(args.per_host)
        return worker(args) if args.worker else calibrate_worker(args)
    unknown = [r for r in args.rates.split(",") if r not in RATES] + \
        [v for v in args.variants.split(",") if variant_config(v) is None]
    if unknown:
        p.error(f"unknown rate or variant: {', '.join(unknown)}")
    try:
        return launcher(args)
    except Interrupted as e:
        print(f"multihost.py: stopped by {e}; namespaces removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
