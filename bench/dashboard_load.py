"""Does a watched dashboard slow training or evaluation? `mpirun -n 2 lenet-train` with an evaluator
serving --http, with no browser attached ("quiet") and with 50 clients holding the live stream open while
one more client sends a drawn digit to /api/predict five times a second ("loaded"); runs interleaved
(quiet, loaded, quiet, loaded, ...).

    LENET_DATA_DIR=/path/to/mnist python bench/dashboard_load.py [--repeats 3] [--train-subset 20000]
    LENET_DATA_DIR=/path/to/mnist python bench/dashboard_load.py --interleave 6 --epochs 40

--interleave SECONDS: one long run instead, whose load is switched on and off every SECONDS (the streams
closed and reopened, the predicts paused); evaluations and step rows are compared between the loaded and
the quiet phases of the same run, which leaves out the run-to-run spread of whole runs (up to 30% here).

--runs 2: two trainers (--trainer-ranks ranks each) publish to one evaluator (--connect twice), as two runs
compared on one dashboard; each loaded phase opens the 50 pages as a browser loads one: the live stream,
then /api/state, /api/runs and /api/history of the two newest runs (the focused one and the one overlaid).
Training speed is both trainers' images/s together.

    LENET_DATA_DIR=/path/to/mnist python bench/dashboard_load.py --interleave 6 --runs 2 --rate 0

The 50 streams run in a process of their own at the lowest priority (SCHED_IDLE: they stand for browsers on
other machines; --no-nice: at normal priority); the predict client runs at normal priority in this one.
Per run: the trainer's images/s (its --metrics epoch rows), the evaluator's median seconds per evaluation
(its --report), the CPU seconds of the evaluator, its dashboard process and the streams' process, and under
load the predict latencies (p50, p99) and the events the 50 streams received.
Prints one JSON line per run and a summary line with medians and the loaded/quiet ratios. Without
MNIST it uses the shipped subset (then the runs are short and the figures rough).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote, urlsplit

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def digit_png():
    from PIL import Image
    from lenet_dist.data import load_subset
    big = np.kron(load_subset().test_images[0], np.ones((8, 8), np.uint8))
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG")
    return buf.getvalue()


class Streams:
    """The 50 live streams, in a process of their own at the lowest priority (SCHED_IDLE, else nice 19): they
    stand for browsers on other machines, so on this one they yield the cores to the trainer and the
    evaluator. A process, not a thread: a starved thread holding this interpreter's lock would stall the
    predict client too. It counts the events it received and prints the count when its stdin closes."""

    def __init__(self, url, streams, idle=True, pages=False):
        """pages: each stream opens as a page does, with its history requests (see streams_child)."""
        self.proc = subprocess.Popen([sys.executable, __file__, "--streams-child", url, str(streams),
                                     "--idle" if idle else "--no-idle", "--pages" if pages else "--streams"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.fetched = 0

    def switch(self, on):
        self.proc.stdin.write("on\n" if on else "off\n")
        self.proc.stdin.flush()

    def close(self):
        out, _ = self.proc.communicate(timeout=30)      # closes its stdin: the signal to stop
        events, self.fetched = (int(x) for x in (out.split() or ["0", "0"]))
        return events


def streams_child(url, n, idle, history=False):
    """Holds `n` live streams open. Lines on stdin switch them: "off" closes them all, "on" opens `n` again
    (they start open); stdin's end stops the child, which then prints the events it received."""
    if idle:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except (AttributeError, OSError):
            os.nice(19)
    events, commands, fetched = [0], [], [0]
    lock = threading.Lock()

    def read_commands():
        for line in sys.stdin:
            with lock:
                commands.append(line.strip())
        with lock:
            commands.append("stop")
    threading.Thread(target=read_commands, daemon=True).start()

    where = urlsplit(url)
    marker = b"\ndata: "

    async def stream():
        """One live stream on a raw connection, counting the events in what arrives (a browser elsewhere
        costs this machine nothing: the stand-in should cost it little; httpx's line parsing took 0.6 CPU-s
        a run)."""
        try:
            reader, writer = await asyncio.open_connection(where.hostname, where.port)
            writer.write(f"GET /api/stream HTTP/1.1\r\nHost: {where.netloc}\r\n"
                         f"Accept: text/event-stream\r\n\r\n".encode())
            tail = b""
            try:
                while chunk := await reader.read(1 << 16):
                    got = tail + chunk
                    events[0] += got.count(marker)     # none lies wholly in `tail`, shorter than the marker
                    tail = got[-(len(marker) - 1):]
            finally:
                writer.close()
        except (OSError, asyncio.CancelledError):      # the evaluator exits after the final checkpoint
            pass

    async def get(path):
        """One request on a connection of its own, read to its end: the body's length in bytes, and the
        body when it is small (the run list)."""
        reader, writer = await asyncio.open_connection(where.hostname, where.port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {where.netloc}\r\nConnection: close\r\n\r\n".encode())
            got = await reader.read()
        finally:
            writer.close()
        body = got.partition(b"\r\n\r\n")[2]
        fetched[0] += len(body)
        return body

    async def page():
        """A page as a browser loads it: its live stream, then the state, the runs and the history of the
        two newest runs (the one focused and the one overlaid)."""
        live = asyncio.create_task(stream())
        try:
            try:
                runs = json.loads(await get("/api/runs")).get("runs") or []
                await get("/api/state")
                keys = [r.get("key") or r.get("run_id") for r in runs][-2:]
                for key in keys or [None]:
                    await get("/api/history" + (f"?run={quote(str(key))}" if key else ""))
            except (OSError, ValueError):       # the evaluator is gone: the stream ends too
                pass
            await live
        finally:                                # closed ("off"): the stream goes with the page
            live.cancel()

    async def main():
        opened = page if history else stream
        tasks = [asyncio.create_task(opened()) for _ in range(n)]
        while True:
            await asyncio.sleep(0.05)
            with lock:
                todo, commands[:] = list(commands), []
            for c in todo:
                if c in ("off", "stop"):
                    for t in tasks:
                        t.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                    tasks = []
                elif c == "on" and not tasks:
                    tasks = [asyncio.create_task(opened()) for _ in range(n)]
            if "stop" in todo:
                break
    asyncio.run(main())
    print(events[0], fetched[0], flush=True)


class Predicts:
    """A drawn digit sent to /api/predict `rate` times a second from a thread of this process, at normal
    priority: its latencies are the server's, not a starved client's. The client is plain http.client on
    one kept-alive connection: it stands for a browser on another machine, and its own work should not be
    what is measured (httpx took ~4 ms of CPU per request here, stretched 2-3x on the busy cores)."""

    def __init__(self, url, rate):
        self.url, self.rate = url, rate
        self.latencies, self.errors, self.handler_ms = [], 0, []
        self.sent = []                                  # (time.time() at the send, latency s) of each 200
        self._stop, self.running = threading.Event(), threading.Event()
        self.running.set()                              # clear() pauses the requests, set() resumes them
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()

    def _main(self):
        import http.client
        body = digit_png()
        where = urlsplit(self.url)
        conn = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
        while not self._stop.is_set():
            if not self.running.is_set():
                self.running.wait(0.1)
                continue
            t0, wall = time.perf_counter(), time.time()
            try:
                conn.request("POST", "/api/predict", body=body, headers={"Content-Type": "image/png"})
                r = conn.getresponse()
                r.read()
            except (OSError, http.client.HTTPException):    # the server closed an idle connection (a pause
                conn.close()                                # past its keep-alive), or the evaluator ended
                self._stop.wait(0.2)
                conn = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
                continue
            if r.status == 200:
                self.latencies.append(time.perf_counter() - t0)
                self.sent.append((wall, self.latencies[-1]))
                timing = r.getheader("server-timing", "")
                if "dur=" in timing:
                    self.handler_ms.append(float(timing.split("dur=")[1]))
            elif r.status != 409:                           # 409: no checkpoint yet
                self.errors += 1
            self._stop.wait(max(0.0, 1 / self.rate - (time.perf_counter() - t0)))
        conn.close()

    def close(self):
        self._stop.set()
        self.running.set()
        self._thread.join(10)


def wait_http(url, timeout=60):
    import httpx
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url + "/api/state", timeout=2)
            return
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit(f"no dashboard at {url}")


def cpu_seconds(pid):
    """User + system CPU seconds of a live process (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dashboard_child(pid):
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat, cmd = (d / "stat").read_text(), (d / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"lenet_dist.dashboard.process" in cmd:
                return int(d.name)
    return None


class CpuSampler:
    """The CPU seconds of some processes, sampled twice a second up to their end (the last sample stays)."""

    def __init__(self, pids, since_now=()):
        """`since_now`: names whose seconds count from here (a process that was running before)."""
        self.pids, self.seconds = {k: v for k, v in pids.items() if v}, {}
        self.base = {k: cpu_seconds(self.pids[k]) or 0.0 for k in since_now if k in self.pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.5):
            for name, pid in self.pids.items():
                got = cpu_seconds(pid)
                if got is not None:
                    self.seconds[name] = round(got - self.base.get(name, 0.0), 2)

    def close(self):
        self._stop.set()
        self._thread.join(5)
        return self.seconds


def commands(args, data_flags, tmp):
    """The trainers' (--runs) and the evaluator's command lines, their environment, the dashboard's URL, the
    trainers' --metrics files and the evaluator's --report file."""
    endpoints, port = [f"tcp://127.0.0.1:{free_port()}" for _ in range(args.runs)], free_port()
    url = f"http://127.0.0.1:{port}"
    stamp = time.monotonic_ns()
    metrics, report = [tmp / f"m-{stamp}-{i}.jsonl" for i in range(args.runs)], tmp / f"r-{stamp}.jsonl"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    mpirun = shutil.which("mpirun")
    trainers = [[*(["nice", "-n", str(args.trainer_nice)] if args.trainer_nice else []),
                 mpirun, "-n", str(args.trainer_ranks), sys.executable, "-m", "workers.trainer", *data_flags,
                 "--epochs", str(args.epochs), "--batch-size", "128", "--no-progress", "--log-level", "WARNING",
                 "--metrics", str(m), "--publish", endpoint, "--checkpoint-every", str(args.checkpoint_every),
                 "--linger", "10", "--no-save", "--seed", str(i)]
                for i, (m, endpoint) in enumerate(zip(metrics, endpoints))]
    evaluator = [sys.executable, "-m", "workers.evaluator", *(x for e in endpoints for x in ("--connect", e)),
                 "--report", str(report), *(["--subset"] if "--subset" in data_flags else ["--no-download"]),
                 "--log-level", "WARNING", "--http", f"127.0.0.1:{port}",
                 *(["--exit-after-run"] if args.runs == 1 else [])]
    return trainers, evaluator, env, url, metrics, report


def run_once(loaded, args, data_flags, tmp):
    trainers, evaluator, env, url, metrics, report = commands(args, data_flags, tmp)
    ev = subprocess.Popen(evaluator, env=env, stdout=subprocess.DEVNULL)
    streams = predicts = sampler = None
    events = 0
    try:
        wait_http(url)
        if loaded:
            streams = Streams(url, args.clients, idle=not args.no_nice) if args.clients else None
            predicts = Predicts(url, args.rate) if args.rate > 0 else None
        sampler = CpuSampler({"evaluator": ev.pid, "dashboard": dashboard_child(ev.pid),
                              "streams": streams.proc.pid if streams else None,
                              "clients": os.getpid() if predicts else None}, since_now=["clients"])
        ts = [subprocess.Popen(t, env=env, stdout=subprocess.DEVNULL) for t in trainers]
        if any(t.wait(timeout=3600) != 0 for t in ts):
            raise SystemExit(f"trainer exited {[t.returncode for t in ts]}")
        if args.runs == 1:
            ev.wait(timeout=60)
    finally:
        cpu = sampler.close() if sampler is not None else {}
        if predicts is not None:
            predicts.close()
        if streams is not None:
            events = streams.close()
        if ev.poll() is None:
            ev.terminate()
            ev.wait(10)
    epochs = [json.loads(x) for m in metrics for x in m.read_text().splitlines() if '"epoch"' in x]
    epochs = [e for e in epochs if e.get("event") == "epoch"]
    evals = [json.loads(x) for x in report.read_text().splitlines()]
    out = {"config": "loaded" if loaded else "quiet",
           "images_per_s": round(sum(e["images_per_s"] * e["seconds"] for e in epochs) / sum(e["seconds"] for e in epochs), 1),
           "eval_seconds": round(statistics.median(e["eval_seconds"] for e in evals), 4), "evaluations": len(evals),
           "cpu_seconds": cpu}
    if predicts is not None:
        lat = sorted(predicts.latencies)
        out.update(predicts=len(lat), predict_p50_ms=round(1000 * lat[len(lat) // 2], 2) if lat else None,
                   predict_p99_ms=round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2) if lat else None,
                   stream_events=events, errors=predicts.errors, _latencies=lat,
                   handler_p50_ms=round(statistics.median(predicts.handler_ms), 2) if predicts.handler_ms else None,
                   handler_p99_ms=round(sorted(predicts.handler_ms)[int(0.99 * (len(predicts.handler_ms) - 1))], 2)
                   if predicts.handler_ms else None)
    return out

def run_interleaved(args, data_flags, tmp):
    """One long run whose load is switched on and off every `args.interleave` seconds (quiet first): the
    50 streams close and reopen, the predicts pause and resume. Each evaluation and each step row is put
    in the phase it lies in wholly, leaving out its first `args.settle` seconds; ratios compare the loaded
    phases with the quiet ones of the same run (so the run-to-run spread of whole runs drops out)."""
    trainers, evaluator, env, url, metrics, report = commands(args, data_flags, tmp)
    ev = subprocess.Popen(evaluator, env=env, stdout=subprocess.DEVNULL)
    streams = predicts = None
    ts = []
    phases, events = [], 0                  # phases: [start, end, loaded, {name: cpu seconds in it}]
    try:
        wait_http(url)
        streams = Streams(url, args.clients, idle=not args.no_nice, pages=args.runs > 1) if args.clients else None
        predicts = Predicts(url, args.rate) if args.rate > 0 else None
        switch(streams, predicts, False)
        pids = {"evaluator": ev.pid, "dashboard": dashboard_child(ev.pid),
                "streams": streams.proc.pid if streams else None}
        pids = {k: v for k, v in pids.items() if v}
        ts = [subprocess.Popen(t, env=env, stdout=subprocess.DEVNULL) for t in trainers]

        def training():                     # every trainer still trains: the phases compare like with like
            return all(t.poll() is None for t in ts)
        while training() and not (report.exists() and report.stat().st_size):    # the first evaluation
            time.sleep(0.1)
        loaded = False
        while training():
            cpu0 = {k: cpu_seconds(v) for k, v in pids.items()}
            phases.append([time.time(), None, loaded, {}])
            deadline = time.monotonic() + args.interleave
            while training() and time.monotonic() < deadline:
                time.sleep(0.05)
            phases[-1][1] = time.time()
            phases[-1][3] = {k: round(cpu_seconds(v) - cpu0[k], 3) for k, v in pids.items()
                             if cpu0[k] is not None and cpu_seconds(v) is not None}
            loaded = not loaded
            switch(streams, predicts, loaded)
        if any(t.wait(timeout=3600) != 0 for t in ts):
            raise SystemExit(f"trainer exited {[t.returncode for t in ts]}")
        if args.runs == 1:
            ev.wait(timeout=60)
    finally:
        if predicts is not None:
            predicts.close()
        if streams is not None:
            events = streams.close()
        for proc in (*ts, ev):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(10)
    steps = [json.loads(x) for m in metrics for x in m.read_text().splitlines() if '"event": "step"' in x]
    evals = [json.loads(x) for x in report.read_text().splitlines()]

    def phase_of(start, end):
        for i, (a, b, _, _) in enumerate(phases):
            if a + args.settle <= start and end <= b:
                return i
        return None
    per = [{"loaded": ld, "eval_s": [], "images": 0.0, "seconds": 0.0, "cpu": cpu, "wall": b - a}
           for a, b, ld, cpu in phases]
    for e in evals:
        i = phase_of(e["time"] - e["eval_seconds"], e["time"])
        if i is not None:
            per[i]["eval_s"].append(e["eval_seconds"])
    for r in steps:
        i = phase_of(r["time"] - r["seconds"], r["time"])
        if i is not None:
            per[i]["images"] += r["images_per_s"] * r["seconds"]
            per[i]["seconds"] += r["seconds"]
    lat = sorted(x for w, x in predicts.sent if phase_of(w, w) is not None) if predicts else []
    out = summarize_phases(per, lat, events)
    out["history_bytes_fetched"] = streams.fetched if streams is not None else 0
    out["evaluations_made"] = len(evals)          # all of them, in a phase or not
    out["eval_seconds_all"] = round(statistics.median(e["eval_seconds"] for e in evals), 3) if evals else None
    out["phases_span_seconds"] = round(phases[-1][1] - phases[0][0], 1) if phases else 0
    return out


def switch(streams, predicts, on):
    if streams is not None:
        streams.switch(on)
    if predicts is not None:
        (predicts.running.set if on else predicts.running.clear)()


def summarize_phases(per, latencies, events):
    """Ratios loaded / quiet: pooled over all phases, and per pair of a quiet phase and the loaded one
    after it (their median and range)."""
    def pooled(loaded):
        ph = [q for q in per if q["loaded"] == loaded]
        ev = [x for q in ph for x in q["eval_s"]]
        return {"eval_seconds": statistics.median(ev) if ev else None, "evaluations": len(ev),
                "images_per_s": sum(q["images"] for q in ph) / max(sum(q["seconds"] for q in ph), 1e-9),
                "phases": len(ph), "wall_seconds": round(sum(q["wall"] for q in ph), 2),
                "cpu_seconds": {k: round(sum(q["cpu"].get(k, 0.0) for q in ph), 2)
                                for k in {k for q in ph for k in q["cpu"]}},
                # the share of a core each process had: CPU accounting, not timing, so it is precise
                "cores": {k: round(sum(q["cpu"].get(k, 0.0) for q in ph) / max(sum(q["wall"] for q in ph), 1e-9), 4)
                          for k in {k for q in ph for k in q["cpu"]}}}
    quiet, loaded = pooled(False), pooled(True)
    pairs = [(per[i], per[i + 1]) for i in range(0, len(per) - 1, 2)]
    eval_pairs = [statistics.median(b["eval_s"]) / statistics.median(a["eval_s"])
                  for a, b in pairs if a["eval_s"] and b["eval_s"]]
    train_pairs = [(b["images"] / b["seconds"]) / (a["images"] / a["seconds"])
                   for a, b in pairs if a["seconds"] and b["seconds"]]

    def spread(xs):
        return {"median": round(statistics.median(xs), 4), "min": round(min(xs), 3), "max": round(max(xs), 3),
                "n": len(xs)} if xs else None
    out = {"quiet": quiet, "loaded": loaded,
           "eval_ratio": round(loaded["eval_seconds"] / quiet["eval_seconds"], 4)
           if quiet["eval_seconds"] and loaded["eval_seconds"] else None,
           "trainer_ratio": round(loaded["images_per_s"] / quiet["images_per_s"], 4) if quiet["images_per_s"] else None,
           "evaluator_core_ratio": round(loaded["cores"]["evaluator"] / quiet["cores"]["evaluator"], 4)
           if quiet["cores"].get("evaluator") and loaded["cores"].get("evaluator") else None,
           "eval_ratio_pairs": spread(eval_pairs), "trainer_ratio_pairs": spread(train_pairs),
           "stream_events": events, "predicts": len(latencies), "_latencies": latencies}
    if latencies:
        out.update(predict_p50_ms=round(1000 * latencies[len(latencies) // 2], 2),
                   predict_p99_ms=round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 2))
    for c in ("quiet", "loaded"):
        out[c]["eval_seconds"] = round(out[c]["eval_seconds"], 4) if out[c]["eval_seconds"] else None
        out[c]["images_per_s"] = round(out[c]["images_per_s"], 1)
    return out


def main():
    if sys.argv[1:2] == ["--streams-child"]:
        return streams_child(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "--idle", sys.argv[5] == "--pages")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-subset", type=int, default=60000)
    p.add_argument("--checkpoint-every", type=int, default=20)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--rate", type=float, default=5.0, help="predict requests per second")
    p.add_argument("--no-nice", action="store_true", help="run the clients at normal priority")
    p.add_argument("--trainer-nice", type=int, default=0, help="run the trainer under nice -n N (quiet and loaded)")
    p.add_argument("--interleave", type=float, default=0.0, metavar="SECONDS",
                   help="one long run, the load switched on and off every SECONDS (see run_interleaved)")
    p.add_argument("--settle", type=float, default=1.0, metavar="SECONDS",
                   help="--interleave: the first SECONDS of every phase are left out")
    p.add_argument("--runs", type=int, default=1, choices=[1, 2],
                   help="trainers publishing to the one evaluator (2: the pages load both runs' history)")
    p.add_argument("--trainer-ranks", type=int, default=2, help="mpirun -n of each trainer")
    args = p.parse_args()
    have_mnist = bool(os.environ.get("LENET_DATA_DIR"))
    data_flags = ["--no-download", "--train-subset", str(args.train_subset)] if have_mnist else ["--subset"]
    if not have_mnist:
        args.epochs = max(args.epochs, 20)
    if args.interleave:
        runs = []
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.repeats):
                r = run_interleaved(args, data_flags, Path(tmp))
                r["load_average"] = round(os.getloadavg()[0], 2)
                print(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}), flush=True)
                runs.append(r)
        pooled = sorted(x for r in runs for x in r.pop("_latencies"))
        print(json.dumps({"summary": "interleaved", "command": shlex.join([sys.executable, *sys.argv]),
                          "trainers": args.runs, "pages": args.clients, "runs": len(runs),
                          "eval_ratio_blocks_median": [(r["eval_ratio_pairs"] or {}).get("median") for r in runs],
                          "trainer_ratio_blocks_median": [(r["trainer_ratio_pairs"] or {}).get("median")
                                                          for r in runs],
                          "eval_ratio": [r["eval_ratio"] for r in runs],
                          "evaluator_core_ratio": [r["evaluator_core_ratio"] for r in runs],
                          "trainer_ratio": [r["trainer_ratio"] for r in runs], "predicts": len(pooled),
                          "pooled_predict_p50_ms": round(1000 * pooled[len(pooled) // 2], 2) if pooled else None,
                          "pooled_predict_p99_ms": round(1000 * pooled[min(len(pooled) - 1, int(0.99 * len(pooled)))], 2)
                          if pooled else None}), flush=True)
        return
    runs = {"quiet": [], "loaded": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for loaded in (False, True):
                r = run_once(loaded, args, data_flags, Path(tmp))
                r["load_average"] = round(os.getloadavg()[0], 2)
                print(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}), flush=True)
                runs[r["config"]].append(r)
    med = {c: {k: statistics.median(r[k] for r in rs) for k in ("images_per_s", "eval_seconds")} for c, rs in runs.items()}
    p99 = max((r["predict_p99_ms"] for r in runs["loaded"] if r.get("predict_p99_ms") is not None), default=None)
    pairs = list(zip(runs["quiet"], runs["loaded"]))           # run next to each other: ratios per pair too
    pooled = sorted(x for r in runs["loaded"] for x in r.pop("_latencies", []))
    print(json.dumps({"summary": med,
                      "trainer_ratio": round(med["loaded"]["images_per_s"] / med["quiet"]["images_per_s"], 4),
                      "eval_ratio": round(med["loaded"]["eval_seconds"] / med["quiet"]["eval_seconds"], 4),
                      "eval_ratio_pairs": [round(lo["eval_seconds"] / q["eval_seconds"], 3) for q, lo in pairs],
                      "trainer_ratio_pairs": [round(lo["images_per_s"] / q["images_per_s"], 3) for q, lo in pairs],
                      "worst_predict_p99_ms": p99, "clients": args.clients, "predict_rate": args.rate,
                      "predicts": len(pooled),
                      "pooled_predict_p99_ms": round(1000 * pooled[min(len(pooled) - 1, int(0.99 * len(pooled)))], 2)
                      if pooled else None}))


if __name__ == "__main__":
    main()
