"""The dashboard in a process of its own, fed by the evaluator through a pipe.

Why a process: in the evaluator's own interpreter the web server and the evaluation take turns on one
interpreter lock, so fifty live streams slowed evaluation by a quarter and a predict waited behind
evaluation for up to 150 ms (bench/dashboard_load.py). In a child of its own the server answers from
its own interpreter, and a fault in it cannot stop evaluation.

    parent (the evaluator)                         child: python -m lenet_dist.dashboard.process FD
    DashboardProcess(images, labels, host, port)   binds nothing (FD is the parent's listening socket),
      .add_steps(rows)           --- frames --->   keeps a LiveState, serves it with DashboardServer
      .add_evaluation(...)          on stdin       ("ready" on stdout once it serves)
      .close()                   --- EOF ----->    ends its streams and exits

A frame (frames.py) is a JSON header and raw arrays of a few dtypes: the child reads no pickle. The parent never
waits on the child: frames go through a bounded queue and a sender thread; when the queue is full (a
stalled child) frames are dropped. A child that died is restarted with back-off on the same socket and
given back what it had (the parent keeps the step rows, the evaluations' figures, the newest and best model).
The child runs in a process group of its own, so a Ctrl-C at the terminal reaches only the evaluator.
"""
from __future__ import annotations

import collections
import ctypes
import gc
import json
import logging
import os
import platform
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from lenet_dist import selection
from lenet_dist.dashboard import frames
from lenet_dist.rowstore import RowStore

log = logging.getLogger("lenet.evaluator")

QUEUE = 64                      # frames waiting for the child (a checkpoint's is ~0.3 MB)
START_TIMEOUT_S = 60.0


# A predict is one image's forward pass: BLAS threads would only be woken (and spin) on the cores that
# training and evaluation use.
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


# ------------------------------------------------------------------------------------------- the parent
RESTART_FIRST_S, RESTART_LONGEST_S = 1.0, 60.0     # back-off between restarts of a child that died
HEALTHY_S = 60.0                                    # a child that ran this long restarts at the first delay
KEEP_RESULTS = 5000                                 # evaluations replayed to a restarted child
KEEP_ROWS = 5000                                    # step rows replayed to a restarted child


class DashboardProcess:
    """The evaluator's handle on the dashboard child: the same add_steps / add_evaluation as a LiveState.
    It supervises the child: one that dies is restarted with back-off on the same listening socket and
    given what it had (the step rows, the evaluations, the newest and the best model). The evaluator never
    waits on it: every frame goes through a bounded queue and is dropped when a stalled child lets it fill."""

    def __init__(self, test_images, test_labels, host="127.0.0.1", port=0, token=None):
        from lenet_dist.dashboard.app import listening_socket
        self._sock, self.url = listening_socket(host, port)    # a busy port fails here, in the evaluator
        self._hello = frames.encode({"kind": "hello", "token": token},
                             {"images": test_images, "labels": np.asarray(test_labels, np.int64)})
        self._rows = RowStore(KEEP_ROWS)                    # as compact JSON bytes
        self._results = collections.deque(maxlen=KEEP_RESULTS)
        self._newest = self._best = None                    # (result, frame) of the newest and the best
        self._run = self._runs = None                       # the run shown (its summary), the runs' list frame
        self._lock = threading.Lock()                       # the replay above vs the supervisor's restart
        self._closing = threading.Event()
        self.dropped = self.restarts = 0
        self.on_control = None                              # called with each control request of the page
        self._control = None                                # the newest control status frame
        try:
            self._spawn([self._hello])
            if not self._wait_ready(START_TIMEOUT_S):
                self._kill()
                raise OSError(f"the dashboard process did not start (exit code {self.proc.returncode}; "
                              f"its error is above)")
        except BaseException:
            self._sock.close()
            raise
        self._supervisor = threading.Thread(target=self._supervise, daemon=True, name="lenet-dashboard-supervisor")
        self._supervisor.start()

    # --------------------------------------------------------------------------------- what the child gets
    def add_steps(self, rows):
        try:
            frame = frames.encode({"kind": "steps", "rows": rows})
        except ValueError as e:                     # not JSON (a non-finite number): not shown, not fatal
            log.warning("telemetry not sent to the dashboard: %s", e)
            return
        with self._lock:
            self._rows.extend(rows)
            self._put(frame)

    def add_evaluation(self, result, params, detail, config=None, replayed=False):
        """replayed: the result is in the shown run's history already; only its model and analysis are new."""
        arrays = {f"param:{k}": np.asarray(v) for k, v in params.items()}
        try:
            frame = frames.encode({"kind": "evaluation", "result": result, "analysis": frames.jsonable(detail.to_dict()),
                            "config": config}, arrays)
        except ValueError as e:
            log.warning("evaluation not sent to the dashboard: %s", e)
            return
        with self._lock:
            if not replayed:
                self._results.append(result)
            self._newest = (result, frame)
            if selection.is_better(result, self._best and self._best[0]):
                self._best = (result, frame)
            self._put(frames.replayed(frame) if replayed else frame)

    def start_run(self, run, results, keep_steps=False):
        """Show another run (`run`: its summary; `results`: its history, oldest first): the child drops the
        shown run's series (the step rows too, unless keep_steps) and models and takes these."""
        frame = frames.encode({"kind": "run", "run": run, "results": list(results), "keep_steps": keep_steps})
        with self._lock:
            if not keep_steps:
                self._rows.clear()
            self._results = collections.deque(results, maxlen=KEEP_RESULTS)
            self._newest = self._best = None
            self._run = run
            self._put(frame)

    def set_runs(self, runs):
        frame = frames.encode({"kind": "runs", "runs": runs})
        with self._lock:
            self._runs = frame
            self._put(frame)

    def control_status(self, status):
        """The page's live-control panel: whether it may act, and how its last action went (dashboard/control.py)."""
        frame = frames.encode({"kind": "control", "status": status})
        with self._lock:
            self._control = frame
            self._put(frame)

    def _read_requests(self, proc):
        """After "ready", each line the child writes is a control request of the page, for on_control."""
        try:
            for line in proc.stdout:
                try:
                    req = json.loads(line)
                except ValueError:
                    continue
                if isinstance(req, dict) and req.get("kind") == "control" and self.on_control is not None:
                    self.on_control(req)
        except (OSError, ValueError):           # the supervisor closed the pipe of a child that died
            pass

    def _replay(self):
        """The frames that give a new child what the dead one had."""
        out = [self._hello] + ([self._control] if self._control is not None else [])
        if self._runs is not None:
            out.append(self._runs)
        if self._run is not None:                   # the shown run, with its history so far
            out.append(frames.encode({"kind": "run", "run": self._run, "results": list(self._results), "keep_steps": True}))
        rows = list(self._rows)
        for i in range(0, len(rows), 1000):
            out.append(frames.encode({"kind": "steps", "rows": rows[i:i + 1000]}))
        if self._results and self._run is None:
            out.append(frames.encode({"kind": "results", "results": list(self._results)}))
        for kept in (self._best, self._newest):         # the newest last: it is what the page shows
            if kept is not None:
                out.append(frames.replayed(kept[1]))
        return out

    # ------------------------------------------------------------------------------------------ the child
    def _spawn(self, frames):
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [root] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])),
                   **{k: "1" for k in BLAS_THREAD_VARS})     # one image at a time: no BLAS threads to wake
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lenet_dist.dashboard.process", str(self._sock.fileno())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=[self._sock.fileno()], env=env,
            process_group=0)        # its own group: a Ctrl-C at the terminal reaches the evaluator, which closes it
        self.started_at = time.monotonic()
        self._queue = queue.Queue(QUEUE + len(frames))
        for f in frames:
            self._queue.put_nowait(f)
        self._dead = threading.Event()
        self._sender = threading.Thread(target=self._send, args=(self.proc, self._queue, self._dead), daemon=True,
                                        name="lenet-dashboard-feed")
        self._sender.start()

    def _wait_ready(self, timeout):
        """True once the child says it serves (reads its one "ready" line on a thread: never blocks long)."""
        got, proc = [], self.proc
        reader = threading.Thread(target=lambda: got.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if bool(got) and got[0].strip() == b"ready":
            threading.Thread(target=self._read_requests, args=(proc,), daemon=True,
                             name="lenet-dashboard-requests").start()
            return True
        return False

    def _kill(self):
        self._dead.set()
        self.proc.kill()
        self.proc.wait(5)
        self.proc.stdout.close()

    def _put(self, frame):
        """Queue a frame for the child, or drop it (counted) when the child does not keep up."""
        if self._dead.is_set():
            return
        try:
            self._queue.put_nowait(frame)
        except queue.Full:
            self.dropped += 1

    @staticmethod
    def _send(proc, queued, dead):
        while True:
            frame = queued.get()
            if frame is None:
                break
            try:
                proc.stdin.write(frame)
                proc.stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                dead.set()
                break

    def _supervise(self):
        delay = RESTART_FIRST_S
        while not self._closing.wait(0.2):
            if self.proc.poll() is None and not self._dead.is_set():
                continue
            self._dead.set()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:       # its pipe broke but it lives on: end it
                self.proc.kill()
                self.proc.wait(5)
            if self._closing.is_set():
                break
            if time.monotonic() - self.started_at > HEALTHY_S:
                delay = RESTART_FIRST_S
            log.warning("the dashboard process exited (code %s); evaluation goes on without it", self.proc.returncode)
            log.warning("restarting the dashboard process in %.0f s", delay)
            if self._closing.wait(delay):
                break
            delay = min(2 * delay, RESTART_LONGEST_S)
            self.proc.stdout.close()
            with self._lock:
                self._spawn(self._replay())
            if self._wait_ready(START_TIMEOUT_S):
                self.restarts += 1
                log.info("the dashboard process serves again on %s (restart %d)", self.url, self.restarts)
            else:
                self._kill()

    def close(self):
        self._closing.set()
        self._supervisor.join(10)
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._sender.join(2)                        # a stalled child does not hold the evaluator's exit
        try:
            self.proc.stdin.close()                 # EOF: the child ends its streams and exits
        except (OSError, ValueError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc.stdout.close()
        self._sock.close()
        if self.dropped:
            log.info("the dashboard missed %d update(s) while it was busy", self.dropped)


# -------------------------------------------------------------------------------------------- the child
SLICE_NS = 100_000          # the scheduler slice the child asks for: the shortest Linux allows (0.1 ms)
_SCHED_ATTR_CALLS = {"x86_64": (314, 315), "aarch64": (274, 275)}     # sched_setattr, sched_getattr


class _SchedAttr(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("policy", ctypes.c_uint32), ("flags", ctypes.c_uint64),
                ("nice", ctypes.c_int32), ("priority", ctypes.c_uint32), ("runtime", ctypes.c_uint64),
                ("deadline", ctypes.c_uint64), ("period", ctypes.c_uint64)]


def short_slices(ns=SLICE_NS):
    """Ask Linux (6.12 and later) to run this process in short slices: same weight, same share of the
    CPU, but a task with a short slice has an early deadline, so when a request wakes it on a core that
    training and evaluation keep busy it runs at once instead of after the running task's slice. Its
    threads made later inherit it. True if the kernel took it; anything else (another OS, an older
    kernel, a policy other than the normal one) leaves the process as it was."""
    calls = _SCHED_ATTR_CALLS.get(platform.machine())
    if sys.platform != "linux" or calls is None:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        attr = _SchedAttr()
        if libc.syscall(calls[1], 0, ctypes.byref(attr), ctypes.sizeof(attr), 0) != 0 or attr.policy != 0:
            return False
        attr.size, attr.runtime = ctypes.sizeof(attr), ns     # the nice value stays what it is
        return libc.syscall(calls[0], 0, ctypes.byref(attr), 0) == 0
    except (OSError, AttributeError):
        return False


def main(argv=None):
    from lenet_dist.evaluation.analysis import Analysis
    from lenet_dist.dashboard import control
    from lenet_dist.dashboard.app import DashboardServer
    from lenet_dist.dashboard.state import LiveState
    argv = sys.argv[1:] if argv is None else argv
    sys.setswitchinterval(0.001)    # a request waits at most 1 ms (not 5) for the feed thread's interpreter lock
    short_slices()                  # before any thread starts: they inherit it
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s dashboard %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    stdin, stdout = sys.stdin.buffer, sys.stdout
    sock = socket.socket(fileno=int(argv[0]))
    hello = frames.read(stdin)
    if hello is None or hello[0].get("kind") != "hello":
        raise SystemExit("lenet_dist.dashboard.process: expected a hello frame on stdin")
    head, arrays = hello
    state = LiveState(arrays["images"], arrays["labels"])
    token = head.get("token")
    server = DashboardServer(state, token=token, sock=sock)
    if not server.wait_started():
        raise SystemExit("lenet_dist.dashboard.process: uvicorn did not start")
    # Everything made so far (the modules of uvicorn, Starlette, NumPy, PIL: ~40k objects) lives as long as
    # the process: out of the collector's sight, a full collection takes 0.3 ms instead of 8-20 ms, which
    # had stalled every thread (a predict waiting on it was the 99th percentile).
    gc.collect()
    gc.freeze()
    stdout.write("ready\n")
    stdout.flush()
    control.channel.attach(stdout)          # from now on stdout carries the page's control requests
    try:
        while (frame := frames.read(stdin)) is not None:
            head, arrays = frame
            if head.get("kind") == "steps":
                state.add_steps(head["rows"])
            elif head.get("kind") == "results":
                state.restore_evaluations(head["results"])
            elif head.get("kind") == "run":
                state.start_run(head["run"], head["results"], bool(head.get("keep_steps")))
            elif head.get("kind") == "runs":
                state.set_runs(head["runs"])
            elif head.get("kind") == "control":
                control.channel.update(head["status"])
            elif head.get("kind") == "evaluation":
                a = head["analysis"]
                detail = Analysis(a["loss"], a["accuracy"], np.asarray(a["confusion"], np.int64), a["worst"])
                params = {k[len("param:"):]: v for k, v in arrays.items() if k.startswith("param:")}
                state.add_evaluation(head["result"], params, detail, head.get("config"),
                                     replayed=bool(head.get("replayed")))
    except (frames.BadFrame, ValueError, KeyError) as e:
        log.error("bad frame from the evaluator: %s", e)
    finally:
        t0 = time.monotonic()
        server.close()
        log.debug("closed in %.2f s", time.monotonic() - t0)


if __name__ == "__main__":
    main()
