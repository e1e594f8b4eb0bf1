"""What a restart by lenet-launch costs, and what losing a host costs.

    python bench/restarts.py kills [--kills 4] [--ranks 2] [--checkpoint-every 20] [--full]
    python bench/restarts.py lost-host [--epochs 2] [--full]        # needs root (network namespaces)

kills: one `lenet-launch -n 2` run; after each start, at a random step, rank 1 gets SIGKILL. For every
kill it prints the seconds from the kill to mpirun's exit (detection), to the restart (after the back-off),
and to the first step of the new start: the time lost per restart, not counting the steps since the last
checkpoint, which are then redone (their number is the step at the kill minus resumed_at_step); then the
medians as one JSON line. Kills come seconds apart, so the back-off doubles (a crash loop to lenet-launch):
without_backoff_s is the time lost less the back-off.

lost-host: two namespace hosts (tests/netns.py), one rank each. An uninterrupted 2-rank run, then the same
run with h2's link cut halfway (--min-ranks 1: it finishes on h1 alone); prints both final test accuracies.
--full uses real MNIST from $LENET_DATA_DIR (default: the subset shipped in the package).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lenet_dist.checkpoints import format as checkpoint  # noqa: E402
from lenet_dist.launcher_env import RANK_VARS  # noqa: E402
from lenet_dist.run.procs import local_ranks  # noqa: E402


class Run:
    """A lenet-launch process whose output lines are stamped with their arrival time."""

    def __init__(self, argv, env):
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines, self.cond = [], threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append((time.monotonic(), line))
                self.cond.notify_all()

    def when(self, pattern, after=0.0, timeout=600):
        """Arrival time of the first line matching `pattern` that came after `after`."""
        rx = re.compile(pattern)
        with self.cond:
            found = lambda: next(((t, m) for t, l in self.lines if t >= after and (m := rx.search(l))), None)  # noqa: E731
            self.cond.wait_for(lambda: found() or self.proc.poll() is not None, timeout)
            hit = found()
        if not hit:
            raise SystemExit(f"no line matching {pattern!r}:\n" + "".join(l for _, l in self.lines[-40:]))
        return hit


def data_flags(full):
    return ["--data-dir", os.environ["LENET_DATA_DIR"]] if full else ["--subset"]


def child_env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def newest(ckpt):
    found = checkpoint.list_checkpoints(ckpt)
    return found[0][0] if found else 0


def kills(a):
    tmp = Path(tempfile.mkdtemp(prefix="bench-restarts-"))
    ckpt = tmp / "ckpt"
    argv = [sys.executable, "-m", "workers.launch", "-n", str(a.ranks), "--max-restarts", str(a.kills),
            "--backoff", str(a.backoff), "--", *data_flags(a.full), "--epochs", str(a.epochs),
            "--checkpoint-dir", str(ckpt), "--checkpoint-every", str(a.checkpoint_every), "--no-progress"]
    run = Run(argv, child_env())
    rng, rows, after = random.Random(a.seed), [], 0.0
    for k in range(a.kills):
        after, _ = run.when(r"the first of this start", after=after)
        target = newest(ckpt) + a.checkpoint_every * rng.randint(1, 3)
        while newest(ckpt) < target:                # a random step: past a checkpoint ...
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 1) * a.step_seconds * a.checkpoint_every)   # ... and some way to the next
        pid = next(p for p in local_ranks(run.proc.pid)
                   if re.search(rb"(^|\0)(%s)=1\0" % "|".join(RANK_VARS).encode(), Path(f"/proc/{p}/environ").read_bytes()))
        killed_at, saved = time.monotonic(), newest(ckpt)
        os.kill(pid, signal.SIGKILL)
        exited, m = run.when(r"mpirun exited with code .* in ([0-9.]+) s:", after=killed_at)
        backoff = float(m.group(1))
        restarted, _ = run.when(r"lenet-launch INFO restart \d+", after=killed_at)
        first, m = run.when(r"step (\d+) done, the first of this start", after=killed_at)
        row = {"kill": k + 1, "detect_s": round(exited - killed_at, 2), "restart_s": round(restarted - killed_at, 2),
               "first_step_s": round(first - killed_at, 2), "backoff_s": backoff,
               "without_backoff_s": round(first - killed_at - backoff, 2), "resumed_at_step": int(m.group(1)) - 1,
               "checkpoint_at_kill": saved}
        print(json.dumps(row), flush=True)
        rows.append(row)
        after = first
    code = run.proc.wait()
    summary = {k: round(statistics.median(r[k] for r in rows), 2)
               for k in ("detect_s", "restart_s", "first_step_s", "without_backoff_s")}
    print(json.dumps({"median": summary, "kills": len(rows), "exit": code,
                      "load_avg": os.getloadavg()[0]}))


def lost_host(a):
    sys.path.insert(0, str(ROOT / "tests"))
    from netns import AGENT, Hosts, unavailable
    why = unavailable()
    if why:
        raise SystemExit(f"lost-host: {why}")
    addrs = {"h1": "10.79.0.1", "h2": "10.79.0.2"}
    results = {}
    with Hosts.made(f"bnch{os.getpid()}", addrs) as hosts:
        env = dict(child_env(), LENET_NETNS_HOSTS=hosts.agent_map(), HYDRA_IFACE="eth0", UCX_TLS="tcp,self",
                   UCX_NET_DEVICES="eth0")
        for name in ("uninterrupted", "h2 lost"):
            tmp = Path(tempfile.mkdtemp(prefix="bench-lost-host-"))
            (tmp / "hosts").write_text(f"{addrs['h1']}:1\n{addrs['h2']}:1\n")
            ckpt, metrics = tmp / "ckpt", tmp / "metrics.jsonl"
            argv = [sys.executable, "-m", "workers.launch", "-n", "2", "--min-ranks", "1", "--hostfile",
                    tmp / "hosts", "--mpirun-args", f"-launcher ssh -launcher-exec {AGENT}", "--exit-grace", "5",
                    "--probe-timeout", "10", "--", *data_flags(a.full), "--epochs", str(a.epochs),
                    "--checkpoint-dir", ckpt, "--checkpoint-every", str(a.checkpoint_every),
                    "--stall-timeout", "10", "--metrics", metrics, "--no-progress"]
            t0 = time.monotonic()
            proc = hosts.popen("h1", argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "log", "w"))
            if name == "h2 lost":
                total = None
                while total is None or newest(ckpt) < total // 2:
                    assert proc.poll() is None, (tmp / "log").read_text()
                    if total is None and (m := re.search(r"(\d+) steps per epoch", (tmp / "log").read_text())):
                        total = int(m.group(1)) * a.epochs
                    time.sleep(0.05)
                hosts.link_down("h2")
            code = proc.wait(timeout=3600)
            rows = [json.loads(line) for line in metrics.read_text().splitlines()]
            last = [r for r in rows if r["event"] == "epoch"][-1]
            results[name] = {"exit": code, "test_acc": last["test_acc"], "ranks_at_end": last["ranks"],
                             "restarts": sum(r["event"] == "restart" for r in rows),
                             "seconds": round(time.monotonic() - t0, 1)}
            print(name, json.dumps(results[name]), flush=True)
    diff = 100 * (results["h2 lost"]["test_acc"] - results["uninterrupted"]["test_acc"])
    print(json.dumps({"accuracy_difference_points": round(diff, 3), "epochs": a.epochs,
                      "data": "MNIST" if a.full else "subset", "load_avg": os.getloadavg()[0]}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["kills", "lost-host"])
    p.add_argument("--kills", type=int, default=4)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--epochs", type=int, default=None, help="default: 20 (kills), 2 (lost-host)")
    p.add_argument("--checkpoint-every", type=int, default=20)
    p.add_argument("--step-seconds", type=float, default=0.02, help="a guess of one step's time, to place kills")
    p.add_argument("--backoff", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--full", action="store_true", help="real MNIST from $LENET_DATA_DIR")
    a = p.parse_args()
    if a.epochs is None:
        a.epochs = 20 if a.mode == "kills" else 2
    (kills if a.mode == "kills" else lost_host)(a)


if __name__ == "__main__":
    main()
