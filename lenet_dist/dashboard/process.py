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

A frame is u32 length | u32 header length | JSON header | raw array bytes; the header names each array's
dtype (a short allow-list) and shape. No pickle: the child reads numbers and JSON only. The parent never
waits on the child: frames go through a bounded queue and a sender thread; when the queue is full (a
stalled child) telemetry frames are dropped, and a child that died is reported once and left alone.
"""
from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import platform
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("lenet.evaluator")

DTYPES = {"float32": np.float32, "float64": np.float64, "uint8": np.uint8, "int64": np.int64}
MAX_FRAME = 256 << 20
QUEUE = 64                      # frames waiting for the child (a checkpoint's is ~0.3 MB)
START_TIMEOUT_S = 60.0


class BadFrame(ValueError):
    pass


def encode(header, arrays=None):
    """One frame: `header` (JSON-ready dict) and named numpy arrays."""
    arrays = arrays or {}
    parts, specs = [], []
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        if a.dtype.name not in DTYPES:
            raise ValueError(f"array {name!r}: dtype {a.dtype} cannot travel to the dashboard")
        specs.append([name, a.dtype.name, list(a.shape)])
        parts.append(a.tobytes())
    head = json.dumps(dict(header, arrays=specs), allow_nan=False).encode()
    body = b"".join(parts)
    return struct.pack("<II", 4 + len(head) + len(body), len(head)) + head + body


def read(stream):
    """The next frame from a binary stream as (header, {name: array}); None at end of stream."""
    first = stream.read(8)
    if not first:
        return None
    if len(first) < 8:
        raise BadFrame("truncated frame header")
    total, n_head = struct.unpack("<II", first)
    if total > MAX_FRAME or n_head > total - 4:
        raise BadFrame(f"frame of {total} bytes with a {n_head}-byte header")
    rest = stream.read(total - 4)
    if len(rest) != total - 4:
        raise BadFrame("truncated frame")
    header = json.loads(rest[:n_head])
    arrays, at = {}, n_head
    for name, dtype, shape in header.pop("arrays", []):
        if dtype not in DTYPES or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise BadFrame(f"array {name!r}: dtype {dtype!r}, shape {shape!r}")
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
        if at + n > len(rest):
            raise BadFrame(f"array {name!r} runs past the frame")
        arrays[name] = np.frombuffer(rest, DTYPES[dtype], int(np.prod(shape, dtype=np.int64)), at).reshape(shape)
        at += n
    return header, arrays


# A predict is one image's forward pass: BLAS threads would only be woken (and spin) on the cores that
# training and evaluation use.
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


# ------------------------------------------------------------------------------------------- the parent
class DashboardProcess:
    """The evaluator's handle on the dashboard child: the same add_steps / add_evaluation as a LiveState."""

    def __init__(self, test_images, test_labels, host="127.0.0.1", port=0, token=None):
        from .app import listening_socket
        sock, self.url = listening_socket(host, port)          # a busy port fails here, in the evaluator
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [root] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])),
                   **{k: "1" for k in BLAS_THREAD_VARS})     # one image at a time: no BLAS threads to wake
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lenet_dist.dashboard.process", str(sock.fileno())],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=[sock.fileno()], env=env)
        finally:
            sock.close()                                        # the child holds its own copy
        self._queue = queue.Queue(QUEUE)
        self._dead = threading.Event()
        self.dropped = 0
        self._put(encode({"kind": "hello", "token": token},
                         {"images": test_images, "labels": np.asarray(test_labels, np.int64)}), wait=True)
        self._sender = threading.Thread(target=self._send, daemon=True, name="lenet-dashboard-feed")
        self._sender.start()
        self._wait_ready()

    def _wait_ready(self):
        """True once the child says it serves (reads its one "ready" line on a thread: never blocks long)."""
        got = []
        reader = threading.Thread(target=lambda: got.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(START_TIMEOUT_S)
        if got and got[0].strip() == b"ready":
            return True
        self._dead.set()
        self._queue.put(None)
        self.proc.kill()
        self.proc.wait(5)
        raise OSError(f"the dashboard process did not start (exit code {self.proc.returncode}; its error is above)")

    def add_steps(self, rows):
        try:
            self._put(encode({"kind": "steps", "rows": rows}))
        except ValueError as e:                     # not JSON (a non-finite number): not shown, not fatal
            log.warning("telemetry not sent to the dashboard: %s", e)

    def add_evaluation(self, result, params, detail, config=None):
        arrays = {f"param:{k}": np.asarray(v) for k, v in params.items()}
        try:
            frame = encode({"kind": "evaluation", "result": result, "analysis": _jsonable(detail.to_dict()),
                            "config": config}, arrays)
        except ValueError as e:
            log.warning("evaluation not sent to the dashboard: %s", e)
            return
        self._put(frame, wait=True)

    def _put(self, frame, wait=False):
        """Queue a frame for the child; telemetry is dropped rather than waited for when the child stalls,
        an evaluation waits up to a few seconds."""
        if self._dead.is_set():
            return
        try:
            self._queue.put(frame, timeout=5.0) if wait else self._queue.put_nowait(frame)
        except queue.Full:
            self.dropped += 1

    def _send(self):
        while True:
            frame = self._queue.get()
            if frame is None:
                break
            try:
                self.proc.stdin.write(frame)
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                self._dead.set()
                log.warning("the dashboard process exited (code %s); evaluation goes on without it",
                            self.proc.poll())
                break

    def close(self):
        if not self._dead.is_set():
            try:
                self._queue.put(None, timeout=5.0)
            except queue.Full:
                pass
            self._sender.join(10)
        try:
            self.proc.stdin.close()                             # EOF: the child ends its streams and exits
        except OSError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc.stdout.close()
        if self.dropped:
            log.info("the dashboard missed %d telemetry update(s) while it was busy", self.dropped)


def _jsonable(v):
    """numpy scalars and arrays inside a dict -> plain JSON values."""
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


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
    from ..analysis import Analysis
    from .app import DashboardServer
    from .state import LiveState
    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)               # Ctrl-C reaches the evaluator, which closes us
    sys.setswitchinterval(0.001)    # a request waits at most 1 ms (not 5) for the feed thread's interpreter lock
    short_slices()                  # before any thread starts: they inherit it
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s dashboard %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    stdin, stdout = sys.stdin.buffer, sys.stdout
    sock = socket.socket(fileno=int(argv[0]))
    hello = read(stdin)
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
    try:
        while (frame := read(stdin)) is not None:
            head, arrays = frame
            if head.get("kind") == "steps":
                state.add_steps(head["rows"])
            elif head.get("kind") == "evaluation":
                a = head["analysis"]
                detail = Analysis(a["loss"], a["accuracy"], np.asarray(a["confusion"], np.int64), a["worst"])
                params = {k[len("param:"):]: v for k, v in arrays.items() if k.startswith("param:")}
                state.add_evaluation(head["result"], params, detail, head.get("config"))
    except (BadFrame, ValueError, KeyError) as e:
        log.error("bad frame from the evaluator: %s", e)
    finally:
        t0 = time.monotonic()
        server.close()
        log.debug("closed in %.2f s", time.monotonic() - t0)


if __name__ == "__main__":
    main()
