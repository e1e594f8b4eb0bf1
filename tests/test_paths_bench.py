"""bench/paths_interleaved.py in a short run on the shipped subset: it alternates the paths inside one MPI
job and prints one JSON line with a figure for each (the figures themselves are not asserted: timing)."""
import json
import subprocess
import sys

from tests.mpiutil import REPO, env


def test_the_paths_benchmark_runs_every_path_in_one_job():
    p = subprocess.run([sys.executable, "bench/paths_interleaved.py", "--blocks", "8", "--block-steps", "2",
                        "--warmup", "2", "--batch", "32", "--late", "--ifused"],
                       capture_output=True, text=True, timeout=180, cwd=REPO, env=env(LENET_DATA_DIR=""))
    assert p.returncode == 0, p.stderr[-2000:]
    row = json.loads(p.stdout.strip().splitlines()[-1])
    assert row["ranks"] == 2 and row["blocks"] == 8 and row["pipelined"] is False
    for k in ("fused_ms", "buckets_ms", "late_ms", "ifused_ms"):
        assert row[k] > 0, k
    assert len(row["paired_quartiles"]) == 3
