"""The dashboard's HTTP server under the four attacks of tests/test_dashboard_attacks.py, for three servers:
ours (uvicorn's httptools protocol with lenet_dist/dashboard/guard.py's limits), uvicorn with its own
options at their tightest (h11 with h11_max_incomplete_event_size, limit_concurrency, timeout_keep_alive,
a backlog), and uvicorn as it comes. Each serves the same app over a LiveState holding 30 evaluations, in a
process of its own at `ulimit -n 1024`, the attack from another process; one JSON line per (server, attack):
a legitimate client's latencies (a new connection every 25 ms, failures counted), the server's RSS before,
at most and 3 s after.

    python bench/dashboard_attacks.py                      # all three servers, all four attacks
    python bench/dashboard_attacks.py --servers guarded --seconds 20
"""
import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SERVERS = ("guarded", "uvicorn-options", "uvicorn-default")


def serve(kind, port):
    """The server process: a LiveState with 30 evaluations and telemetry, served by `kind` on `port`."""
    import uvicorn

    from lenet_dist.evaluation import analysis
    from lenet_dist.dashboard.app import DashboardServer, build_app, listening_socket
    from lenet_dist.dashboard.state import LiveState
    from lenet_dist.data import load_subset
    from lenet_dist.nn.model import LeNet5
    data = load_subset()
    state = LiveState(data.test_images, data.test_labels)
    for step in range(1, 31):
        m = LeNet5(seed=step)
        detail = analysis.analyse(m, data.test_images, data.test_labels)
        state.add_steps([{"event": "step", "step": 10 * step + i, "loss": 1.0, "lr": 0.1} for i in range(10)])
        state.add_evaluation({"step": 10 * step, "epoch": 0, "accuracy": detail.accuracy, "loss": detail.loss,
                              "val_accuracy": detail.accuracy, "val_loss": detail.loss}, m.named_params(), detail)
    sock, _ = listening_socket("127.0.0.1", port)
    if kind == "guarded":
        server = DashboardServer(state, sock=sock)
        server.wait_started()
        print("ready", flush=True)
        threading.Event().wait()
    options = dict(http="h11", h11_max_incomplete_event_size=16 << 10, limit_concurrency=900,
                   timeout_keep_alive=5, backlog=128) if kind == "uvicorn-options" else {}
    config = uvicorn.Config(build_app(state), log_level="warning", access_log=False, **options)
    server = uvicorn.Server(config)
    threading.Thread(target=lambda: (time.sleep(2), print("ready", flush=True)), daemon=True).start()
    server.run(sockets=[sock])


def measure(kind, attack, seconds):
    import numpy as np

    from tests.test_dashboard_attacks import ATTACKER
    from tests.test_e2e import free_port
    port = free_port()

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--port", str(port)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limit)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        url = f"http://127.0.0.1:{port}/api/state"

        def rss():
            for line in open(f"/proc/{proc.pid}/status"):
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        import httpx
        client = httpx.Client(timeout=2, limits=httpx.Limits(max_keepalive_connections=0))
        base, peak, times, failed = rss(), 0.0, [], 0
        attacker = subprocess.Popen([sys.executable, "-c", ATTACKER, attack, str(port)], cwd=REPO,
                                    stdin=subprocess.PIPE)     # its own process: its threads do not slow the probe
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                client.get(url).raise_for_status()
                times.append(1e3 * (time.perf_counter() - t0))
            except httpx.HTTPError:
                failed += 1
            peak = max(peak, rss())
            time.sleep(0.025)
        attacker.stdin.close()
        attacker.wait(30)
        time.sleep(3)
        after = rss()
        errors = proc.stderr  # read below, after the process ends
    finally:
        proc.kill()
        proc.wait()
    log = errors.read()
    pct = (lambda q: round(float(np.percentile(times, q)), 1)) if times else (lambda q: None)
    return {"server": kind, "attack": attack, "seconds": seconds, "probes": len(times) + failed, "failed": failed,
            "p50_ms": pct(50), "p99_ms": pct(99), "max_ms": round(max(times), 1) if times else None,
            "rss_mb_before": round(base), "rss_mb_max": round(peak), "rss_mb_after": round(after),
            "tracebacks": log.count("Traceback"), "log_lines": len(log.splitlines())}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS)
    p.add_argument("--attacks", nargs="+", default=["streams", "half-open", "endless-header", "big-headers"])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    for kind in args.servers:
        for attack in args.attacks:
            print(json.dumps(measure(kind, attack, args.seconds)), flush=True)


if __name__ == "__main__":
    main()
