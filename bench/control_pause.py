"""What a paused run costs (lenet-train --allow-control): `mpirun -n 2` on the shipped subset, paused and
continued over the real control path (a signed message on the --publish socket) in alternating blocks;
each block measures the busiest rank's CPU seconds per wall second while training, then while paused, and
the time from sending "pause" to its control row in --metrics. Medians over the blocks, and their ratio.

    python bench/control_pause.py [--blocks 3] [--seconds 5]
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lenet_dist.checkpoints import format as checkpoint  # noqa: E402
from lenet_dist.run.procs import local_ranks  # noqa: E402
from lenet_dist.transport import CheckpointClient  # noqa: E402
from lenet_dist.transport.control import Signer  # noqa: E402
from tests.mpiutil import env  # noqa: E402
from tests.test_e2e import free_port  # noqa: E402

KEY = b"the control secret of this measurement"


def cpu(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


def busiest(ranks, seconds):
    before, t = [cpu(r) for r in ranks], time.monotonic()
    time.sleep(seconds)
    return max((cpu(r) - b) / (time.monotonic() - t) for r, b in zip(ranks, before))


def main():
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("--blocks", type=int, default=3)
    a.add_argument("--seconds", type=float, default=5.0)
    args = a.parse_args()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "k").write_bytes(KEY)
        endpoint, metrics = f"tcp://127.0.0.1:{free_port()}", d / "m.jsonl"
        p = subprocess.Popen(["mpirun", "-n", "2", sys.executable, "-m", "workers.trainer", "--subset", "--batch-size",
                              "50", "--no-progress", "--epochs", "200", "--checkpoint-every", "5", "--publish", endpoint,
                              "--allow-control", "--control-key-file", "k", "--no-save", "--linger", "0",
                              "--metrics", str(metrics)], cwd=d, env=env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        client, got = CheckpointClient(endpoint), None
        while got is None:
            got = client.fetch_newer(-1, 1000)
        run_id, sign = checkpoint.from_bytes(got[1]).meta["run_id"], Signer(KEY).sign
        ranks = local_ranks(p.pid)

        def controls():
            return metrics.read_text().count('"event": "control"')
        train, paused, latency = [], [], []
        for _ in range(args.blocks):
            train.append(busiest(ranks, args.seconds))
            n, t0 = controls(), time.monotonic()
            client.send_control(sign("pause", None, run_id, "bench"))
            while controls() == n:
                time.sleep(0.01)
            latency.append(time.monotonic() - t0)
            time.sleep(0.5)
            paused.append(busiest(ranks, args.seconds))
            client.send_control(sign("resume", None, run_id, "bench"))
            time.sleep(1)
        client.send_control(sign("stop", None, run_id, "bench"))
        p.wait(120)
        client.close()
    print("training, CPU s per s of the busiest rank:", [round(v, 3) for v in train])
    print("paused,   CPU s per s of the busiest rank:", [round(v, 4) for v in paused])
    print(f"paused / training (medians): {statistics.median(paused) / statistics.median(train):.4f}")
    print(f"pause sent -> applied (its row in --metrics), s: {[round(v, 3) for v in latency]}, "
          f"median {statistics.median(latency):.3f}")


if __name__ == "__main__":
    main()
