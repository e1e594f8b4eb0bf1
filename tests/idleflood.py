"""A trainer under a flood of idle TCP connections, for the test (short) and bench/idle_connections.py (long).

mpirun -n RANKS lenet-train --publish ... at `ulimit -n NOFILE` (soft and hard); as soon as it serves, N
connections to its port that never say a word; then a real lenet-evaluator. Afterwards: did training finish,
were all checkpoints written, was the evaluator served (up to the final checkpoint)?
"""
import json
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.mpiutil import MPIRUN, env  # noqa: E402

STEPS_PER_EPOCH = 20            # the shipped subset (2,000 examples) in batches of 100
EVERY = 5


def own_limit(n):
    """Raise this process's soft open-files limit so that it can hold n connections; False if it cannot."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = n + 200
    if hard != resource.RLIM_INFINITY and hard < need:
        return False
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    return True


def open_idle(port, n, rcvbuf=None):
    """n connections that never speak: non-blocking connects (the kernel queues what is not yet accepted);
    `rcvbuf`: a small receive buffer for connections that never read either."""
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except (BlockingIOError, InterruptedError):
            pass
        socks.append(s)
    return socks


class _Lines:
    """Collects a pipe's lines in a thread; wait_for() waits for a pattern."""

    def __init__(self, pipe):
        self.lines, self._cond = [], threading.Condition()
        self._t = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._t.start()

    def _read(self, pipe):
        for line in pipe:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()

    def wait_for(self, text, timeout):
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 0.5))

    def text(self):
        self._t.join(5)
        return "".join(self.lines)


def run(tmp, *, n_idle, epochs, ranks=2, nofile=1024, timeout=600, extra=()):
    """One trainer + flood + evaluator; a dict of what happened."""
    tmp = Path(tmp)
    ckpt, report = tmp / "ckpt", tmp / "eval.jsonl"
    if not own_limit(n_idle):
        raise RuntimeError(f"this process cannot hold {n_idle} connections (hard open-files limit)")

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    cmd = [MPIRUN, "-n", str(ranks), sys.executable, "-m", "workers.trainer", "--subset", "--batch-size", "100",
           "--val-size", "0", "--epochs", str(epochs), "--checkpoint-dir", str(ckpt),
           "--checkpoint-every", str(EVERY), "--keep", "1000",
           "--publish", "tcp://127.0.0.1:0", "--linger", "120", "--no-progress", "--stall-timeout", "120",
           "--log-level", "INFO", *extra]
    t0 = time.monotonic()
    tr = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          preexec_fn=limit)
    err = _Lines(tr.stderr)
    out = _Lines(tr.stdout)
    socks, ev = [], None
    try:
        line = err.wait_for("serving checkpoints on tcp://", 120)
        if line is None:
            tr.kill()
            raise RuntimeError(f"the trainer never served:\n{err.text()}")
        port = int(line.rsplit(":", 1)[1].split(",")[0].split()[0])
        t_flood, flood_wall = time.monotonic(), time.time()
        if n_idle:
            socks = open_idle(port, n_idle)
        flood_s = time.monotonic() - t_flood
        ev = subprocess.Popen([sys.executable, "-m", "workers.evaluator", "--connect", f"tcp://127.0.0.1:{port}",
                               "--subset", "--report", str(report), "--timeout", "300", "--exit-after-run"],
                              cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        tr_rc = tr.wait(timeout)
        train_s = time.monotonic() - t0
        try:                                        # it exits after the final checkpoint, if it got it
            _, ev_err = ev.communicate(timeout=60 if tr_rc == 0 else 5)
        except subprocess.TimeoutExpired:
            ev.kill()
            _, ev_err = ev.communicate()
    finally:
        for s in socks:
            s.close()
        for p in (tr, ev):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    rows = [json.loads(x) for x in report.read_text().splitlines()] if report.exists() else []
    steps = sorted(int(p.name[5:14]) for p in ckpt.glob("ckpt-*.npz")) if ckpt.is_dir() else []
    total = epochs * STEPS_PER_EPOCH
    first_eval = min((r["time"] for r in rows), default=None)
    return {"n_idle": n_idle, "nofile": nofile, "ranks": ranks, "trainer_rc": tr_rc, "evaluator_rc": ev.returncode,
            "seconds": round(train_s, 2), "flood_open_s": round(flood_s, 3),
            "checkpoints": len(steps), "checkpoints_expected": total // EVERY,
            "all_checkpoints": steps == list(range(EVERY, total + 1, EVERY)),
            "evaluations": len(rows), "final_evaluated": bool(rows and rows[-1]["final"] and rows[-1]["step"] == total),
            "first_eval_after_s": None if first_eval is None else round(first_eval - flood_wall, 2),
            "emfile_lines": sum("Too many open files" in x for x in err.lines),
            "stderr": err.text(), "stdout": out.text(), "evaluator_stderr": ev_err}
