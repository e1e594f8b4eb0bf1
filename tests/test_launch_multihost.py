"""lenet-launch across two namespace hosts (tests/netns.py), one of which is cut off mid-run: with
--min-ranks 1 the job restarts on the host that still answers and finishes there, on one rank, with the same
global batch. Needs root and iproute2; skips otherwise."""
import json
import os
import subprocess
import sys
import time

import pytest

from lenet_dist.checkpoints import format as checkpoint

from tests.mpiutil import REPO, env, need_mpirun
from tests.netns import AGENT, hosts_or_skip

HOSTS = {"h1": "10.78.0.1", "h2": "10.78.0.2"}     # private, and only ever inside our namespaces


@pytest.fixture
def hosts():
    need_mpirun()
    with hosts_or_skip(f"lnch{os.getpid()}", HOSTS) as h:
        yield h


def newest_step(ckpt):
    found = checkpoint.list_checkpoints(ckpt)
    return found[0][0] if found else 0


def test_a_lost_host_is_left_out_and_the_run_finishes_on_the_other(hosts, tmp_path):
    e = env(LENET_NETNS_HOSTS=hosts.agent_map(), HYDRA_IFACE="eth0", UCX_TLS="tcp,self", UCX_NET_DEVICES="eth0",
            OMP_NUM_THREADS=1, OPENBLAS_NUM_THREADS=1)
    (tmp_path / "hosts").write_text(f"{HOSTS['h1']}:1\n{HOSTS['h2']}:1\n")
    ckpt, metrics, log = tmp_path / "ckpt", tmp_path / "metrics.jsonl", tmp_path / "launch.log"
    argv = [sys.executable, "-m", "workers.launch", "-n", "2", "--min-ranks", "1", "--hostfile", tmp_path / "hosts",
            "--mpirun-args", f"-launcher ssh -launcher-exec {AGENT}", "--exit-grace", "5", "--probe-timeout", "5",
            "--backoff", "0.5", "--", "--subset", "--val-size", "0", "--epochs", "3", "--batch-size", "50", "--checkpoint-dir", ckpt,
            "--checkpoint-every", "5", "--stall-timeout", "5", "--metrics", metrics, "--no-progress"]
    with open(log, "w") as out:
        launch = hosts.popen("h1", argv, cwd=REPO, env=e, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while newest_step(ckpt) < 20:           # the event: a few checkpoints made on two ranks
                assert launch.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            hosts.link_down("h2")
            launch.wait(timeout=150)
        finally:
            if launch.poll() is None:
                launch.kill()
                launch.wait()
    text = log.read_text()
    print(text[-3000:])
    assert launch.returncode == 0, text
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    restarts = [r for r in rows if r["event"] == "restart"]
    epochs = [r for r in rows if r["event"] == "epoch"]
    assert len(restarts) >= 1 and restarts[-1]["ranks"] == 1 and restarts[-1]["asked_ranks"] == 2, rows
    assert f"hosts not answering: {HOSTS['h2']}: continuing on 1 rank(s)" in text, text
    assert epochs[-1]["step"] == 120 and epochs[-1]["ranks"] == 1, epochs
    assert rows[-1]["event"] == "end" and rows[-1]["outcome"] == "finished", rows
