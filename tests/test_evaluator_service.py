"""lenet-evaluator as an operated service: --log-format json (one JSON object per line, ISO 8601 times with
their zone), and BLAS threads that follow the CPUs it is given (its affinity mask, its cgroup's CPU quota)
unless --threads says otherwise. Real processes under taskset; cgroup files laid out as the kernel does."""
import json
import shutil
import subprocess
import sys
from datetime import datetime

import pytest

from lenet_dist import cpus
from lenet_dist.transport import TrainerLink

from tests.mpiutil import env
from tests.test_evaluator_daemon import run_ckpt


def evaluate_one(tmp_path, *args, prefix=()):
    """An evaluator that scores one final checkpoint and exits; its stderr."""
    with TrainerLink("tcp://127.0.0.1:*") as link:
        link.publish(10, 0, run_ckpt(10, "run-json", final=True), final=True)
        p = subprocess.run([*prefix, sys.executable, "-m", "workers.evaluator", "--subset", "--exit-after-run",
                            "--connect", link.endpoint, "--report", str(tmp_path / "r.jsonl"), *args],
                           capture_output=True, text=True, env=env(), timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stderr


def test_json_logs_have_iso_times_with_their_zone(tmp_path):
    lines = evaluate_one(tmp_path, "--log-format", "json").splitlines()
    rows = [json.loads(line) for line in lines]               # every line is one JSON object
    assert len(rows) >= 3 and {r["process"] for r in rows} == {"evaluator"}
    for r in rows:
        t = datetime.fromisoformat(r["time"])
        assert t.tzinfo is not None and "T" in r["time"], r
        assert r["level"] in ("INFO", "WARNING") and r["logger"].startswith("lenet")
    assert any("exiting (--exit-after-run)" in r["message"] for r in rows)


@pytest.mark.skipif(not shutil.which("taskset"), reason="no taskset")
def test_blas_threads_follow_the_affinity_mask_unless_set(tmp_path):
    err = evaluate_one(tmp_path, prefix=("taskset", "-c", "0"))
    assert "1 BLAS thread (1 CPU in its affinity mask" in err, err
    err = evaluate_one(tmp_path, "--threads", "3", prefix=("taskset", "-c", "0"))
    assert "3 BLAS threads (--threads)" in err, err


def cgroup_fs(tmp_path, proc_lines, files):
    tmp_path.mkdir()
    (tmp_path / "proc").write_text("".join(line + "\n" for line in proc_lines))
    for rel, text in files.items():
        (tmp_path / "fs" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / rel).write_text(text + "\n")
    return tmp_path / "proc", tmp_path / "fs"


def test_cgroup_quota_v2_and_v1(tmp_path):
    # v2: the tightest limit along the path binds (a parent's 1.5 CPUs over a child's 4)
    proc, root = cgroup_fs(tmp_path / "v2", ["0::/system.slice/lenet.service"], {
        "cgroup.controllers": "cpu", "cpu.max": "max 100000", "system.slice/cpu.max": "150000 100000",
        "system.slice/lenet.service/cpu.max": "400000 100000"})
    assert cpus.cgroup_quota(proc, root) == 1.5
    # v2 without a quota anywhere
    proc, root = cgroup_fs(tmp_path / "none", ["0::/a"], {"cgroup.controllers": "cpu", "a/cpu.max": "max 100000"})
    assert cpus.cgroup_quota(proc, root) is None
    # v1: the cpu controller's CFS quota (-1: none)
    proc, root = cgroup_fs(tmp_path / "v1", ["4:memory:/x", "1:cpu,cpuacct:/docker/abc", "0::/"], {
        "cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000",
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000"})
    assert cpus.cgroup_quota(proc, root) == 0.5
    n, why = cpus.available(proc, root)
    assert n == 1 and "a cgroup CPU quota of 0.5 CPUs" in why     # never fewer than one thread
    assert cpus.cgroup_quota(tmp_path / "missing", root) is None
