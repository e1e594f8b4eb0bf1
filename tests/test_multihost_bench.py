"""bench/multihost.py in its short mode: two namespace hosts on 1 Gbit/s links shaped with tc tbf, mpirun
across them with 1 and 2 ranks per host, the fused, bucketed and float16 variants. No timing is checked
(figures from a busy machine prove nothing): what is checked is that the ranks ran on two hosts, that the
step was pipelined where it should be (a core per rank), that the gradients crossed the shaped link (about 241 KiB per step each way in float32, half of it in float16), and
that every namespace is gone afterwards, also when the run is stopped by a signal. Skips only where network
namespaces or tc cannot be used, and says so."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.mpiutil import REPO, env, need_mpirun
from tests.netns import unavailable

BENCH = REPO / "bench" / "multihost.py"
GRAD_KIB = (61_706 + 5) * 4 / 1024            # the float32 gradient and a 2-rank tail, in KiB


@pytest.fixture
def can_shape():
    why = unavailable() or (None if shutil.which("tc") else "shaping links needs 'tc' (iproute2)")
    if why:
        pytest.skip(why)
    need_mpirun()


def ours(pid):
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in names.splitlines() if line.startswith(f"lmh{pid}-")]


def test_short_run_crosses_shaped_links_and_removes_its_namespaces(can_shape, tmp_path):
    out = tmp_path / "mh.jsonl"
    e = env()
    e.pop("LENET_DATA_DIR", None)                  # the shipped subset: the figures do not matter here
    p = subprocess.Popen([sys.executable, BENCH, "--short", "--out", out], env=e, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=REPO)
    stdout, stderr = p.communicate(timeout=300)
    if p.returncode == 3:
        pytest.skip(stderr.strip())
    assert p.returncode == 0, stderr
    assert not ours(p.pid)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    got = {(r["per_host"], r["variant"]): r for r in recs}
    assert set(got) == {(ph, v) for ph in (1, 2) for v in ("fused", "overlap", "fp16")}, got.keys()
    for (per_host, variant), r in got.items():
        assert r["hosts_seen"] == 2 and r["ranks"] == 2 * per_host and r["rate"] == "1g"
        assert r["images_per_s"] > 0 and 0 <= r["comm_share"] <= 1
        # the default step: pipelined across hosts with a core per rank, whole buckets with two ranks per core
        assert r["schedule"] == ("fused" if variant == "fused" else "pipelined" if per_host == 1 else "serial")
        # what rank 0's host sent per step: the gradient once (float32) or half of it (float16), plus headers.
        # The counter is read at the edges of 4 steps: a message still queued in the shaper at one edge is
        # counted in the next window, so +-15%.
        want = GRAD_KIB / 2 if variant == "fp16" else GRAD_KIB
        assert want * 0.85 <= r["tx_kb_per_step"] <= want * 1.15, (variant, r["tx_kb_per_step"])


def test_a_stopped_run_removes_every_namespace(can_shape, tmp_path):
    e = env()
    e.pop("LENET_DATA_DIR", None)
    p = subprocess.Popen([sys.executable, BENCH, "--rounds", "50", "--steps", "40", "--rates", "100m"], env=e,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while len(ours(p.pid)) < 3:                 # the switch and both hosts exist: the run is under way
            assert p.poll() is None, p.stderr.read()
            assert time.monotonic() < deadline, "no namespaces within 60 s"
            time.sleep(0.1)
        p.send_signal(signal.SIGTERM)
        _, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, stderr
    assert "namespaces removed" in stderr
    assert not ours(p.pid)
