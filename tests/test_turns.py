"""Ranks that share a core take turns (lenet_dist/parallel/turns.py): the plan, and real `mpirun -n 4` jobs on
this machine's cores: the turns are taken, and they change no bit of the result."""
import json
import os
import re
import shlex
import shutil
import subprocess
import time

import numpy as np
import pytest

from lenet_dist.parallel.turns import pairwise_sum, parse_setting, plan, shm_room

from lenet_dist.checkpoints import format as checkpoint

from tests.mpiutil import REPO, env, final_params, launch, mpirun_cmd, python

BASE = ["--subset", "--epochs", "1", "--batch-size", "20", "--lr", "0.05", "--seed", "7", "--no-progress",
        "--log-level", "WARNING", "--stall-timeout", "20", "--val-size", "0"]


@pytest.mark.parametrize("local_size, cores, setting, turns_of_ranks", [
    (4, 2, None, [0, 0, 1, 1]),                 # 4 ranks on 2 cores: two turns of two
    (8, 2, None, [0, 0, 1, 1, 2, 2, 3, 3]),
    (3, 2, None, [0, 0, 0]),                    # not a multiple: the second turn would leave a core idle
    (2, 2, None, [0, 0]),                       # a core per rank: no turns
    (4, 2, 1, [0, 0, 0, 0]),                    # LENET_TURNS=off
    (3, 2, 2, [0, 0, 1]),                       # forced: turns of ceil(3 / 2) ranks
    (4, 8, 2, [0, 0, 1, 1]),                    # forced on a node with cores enough
    (4, 2, 3, [0, 0, 1, 1]),                    # 3 turns of 2 ranks would leave one empty: 2
    (2, 1, 9, [0, 1]),                          # never more turns than ranks
])
def test_plan(local_size, cores, setting, turns_of_ranks):
    got = [plan(r, local_size, cores, setting) for r in range(local_size)]
    assert [turn for _, turn, _ in got] == turns_of_ranks
    assert {n for n, _, _ in got} == {max(turns_of_ranks) + 1}
    assert {per for _, _, per in got} == {max(turns_of_ranks.count(t) for t in turns_of_ranks)}


@pytest.mark.parametrize("p, order", [
    (1, lambda g: g[0]),
    (2, lambda g: g[0] + g[1]),
    (3, lambda g: (g[0] + g[1]) + g[2]),
    (4, lambda g: (g[0] + g[1]) + (g[2] + g[3])),
    (5, lambda g: ((g[0] + g[1]) + g[2]) + (g[3] + g[4])),
    (6, lambda g: ((g[0] + g[1]) + (g[2] + g[3])) + (g[4] + g[5])),
    (8, lambda g: ((g[0] + g[1]) + (g[2] + g[3])) + ((g[4] + g[5]) + (g[6] + g[7]))),
])
def test_pairwise_sum_adds_in_recursive_doublings_order(p, order):
    """Values whose sums round differently in every order: only the named order gives these bits."""
    rng = np.random.default_rng(p)
    g = (rng.standard_normal((p, 4096)) * 10.0 ** rng.integers(-4, 4, (p, 4096))).astype(np.float32)
    out = np.empty(4096, np.float32)
    pairwise_sum(g, out=out)
    assert np.array_equal(out, order(g))
    if p >= 4:                      # (with 3 ranks the order is left to right)
        assert not np.array_equal(out, np.cumsum(g, axis=0, dtype=np.float32)[-1])


def test_setting():
    assert parse_setting(" Auto ") is parse_setting(None) is parse_setting("") is None   # the default: turns
    assert parse_setting("off") == parse_setting("none") == 1                           # when cores divide ranks
    assert parse_setting("2") == 2
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(ValueError, match=f"LENET_TURNS must be a number of turns .* got '{bad}'"):
            parse_setting(bad)


def test_shm_room_is_what_the_filesystem_has_left(tmp_path):
    st = os.statvfs(tmp_path)
    assert abs(shm_room(tmp_path) - st.f_bavail * st.f_frsize) < 1 << 24     # the test's own writes aside
    assert shm_room(tmp_path / "none") is None                               # nowhere to ask: no cap


def train(tmp_path, name, turns, *extra):
    """4 ranks; `turns`: LENET_TURNS, or None for "auto" on a node said to have 2 cores."""
    d = tmp_path / name
    how = {"LENET_NODE_CORES": "2", "LENET_TURNS": "auto"} if turns is None else {"LENET_TURNS": turns}
    p = launch(4, [*BASE, "--checkpoint-dir", d, *extra], extra_env=how, timeout=180, check="--fault" not in extra)
    return d, p


@pytest.mark.usefixtures("mpi_flavour")       # once under MPICH, once under Open MPI
def test_turns_change_no_bit(tmp_path):
    """4 ranks on 2 cores, turns forced on and forced off: identical."""
    on, p = train(tmp_path, "on", "2", "--log-level", "INFO")
    assert "2 turns of 2 rank(s) per node" in p.stderr
    off, p = train(tmp_path, "off", "off", "--log-level", "INFO")
    assert "turns" not in p.stderr.split("gradient sum:")[1].splitlines()[0]
    a, ma = final_params(on)
    b, mb = final_params(off)
    assert ma["step"] == mb["step"] == 100
    assert np.array_equal(a, b)


def test_ranks_of_one_place_share_their_scratch_and_change_no_bit(tmp_path):
    """A global batch of 22: shards of 6, 6, 5 and 5, and a last batch of 10, so the two ranks that compute in
    one arena (0 and 2, 1 and 3) write it in shapes of their own; the result is still the bits of no turns."""
    on, p = train(tmp_path, "on", "2", "--batch-size", "22", "--log-level", "INFO")
    assert "in turns: node ranks 0 and 2 compute in one" in p.stderr
    off, _ = train(tmp_path, "off", "off", "--batch-size", "22")
    assert np.array_equal(final_params(on)[0], final_params(off)[0])


def test_bad_scratch_setting_is_a_one_line_error():
    p = launch(2, [*BASE, "--no-save"], extra_env={"LENET_TURNS_SCRATCH": "theirs"}, timeout=60, check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "LENET_TURNS_SCRATCH must be 'shared' (the default) or 'own', got 'theirs'" in p.stderr


def test_turns_change_no_bit_in_deterministic_mode(tmp_path):
    det = ["--deterministic", "--micro-batch", "4", "--bucket-kb", "0"]
    on, _ = train(tmp_path, "on", "2", *det)
    off, _ = train(tmp_path, "off", "off", *det)
    assert np.array_equal(final_params(on)[0], final_params(off)[0])


def compute_spans(trace):
    """{step: {rank: (first forward's start, last backward's end)}} from a --timeline trace."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and e["tid"] == 0]
    spans = {}
    for s in (e for e in events if e["name"] == "step"):
        lo, hi = s["ts"], s["ts"] + s["dur"]
        mine = [e for e in events if e["pid"] == s["pid"] and e["name"] in ("forward", "backward")
                and lo <= e["ts"] <= hi]
        spans.setdefault(s["args"]["step"], {})[s["pid"]] = (min(e["ts"] for e in mine),
                                                             max(e["ts"] + e["dur"] for e in mine))
    return spans


@pytest.mark.usefixtures("mpi_flavour")
def test_ranks_compute_in_turns(tmp_path):
    """LENET_TURNS=auto, 4 ranks on 2 cores: in every step of the window, ranks 2 and 3 start computing only
    once ranks 0 and 1 are done."""
    _, p = train(tmp_path, "t", None, "--timeline", tmp_path / "t.json", "--timeline-steps", "20:40")
    spans = compute_spans(json.loads((tmp_path / "t.json").read_text()))
    assert len(spans) == 20 and all(len(ranks) == 4 for ranks in spans.values())
    for step, ranks in spans.items():
        first_done = max(ranks[r][1] for r in (0, 1))
        assert min(ranks[r][0] for r in (2, 3)) >= first_done, (step, ranks)


def test_bad_turns_setting_is_a_one_line_error(tmp_path):
    p = launch(4, [*BASE, "--no-save"], extra_env={"LENET_TURNS": "many"}, timeout=60, check=False)
    assert p.returncode != 0
    assert "LENET_TURNS must be a number of turns (1 or more), 'auto' or 'off', got 'many'" in p.stderr
    assert "Traceback" not in p.stderr


def test_kill_and_resume_in_turns_is_bit_identical(tmp_path):
    """Rank 2 (second turn: it owes each step's update until its next turn) dies between checkpoints; the
    resumed run ends bit-identical to the uninterrupted one."""
    full, _ = train(tmp_path, "full", "2", "--checkpoint-every", "10")
    crash, p = train(tmp_path, "crash", "2", "--checkpoint-every", "10", "--fault", "2:45:exit")
    assert p.returncode != 0
    assert checkpoint.list_checkpoints(crash)[0][0] == 40
    train(tmp_path, "crash", "2", "--checkpoint-every", "10", "--resume")
    a, ma = final_params(full)
    b, mb = final_params(crash)
    assert ma["step"] == mb["step"] == 100
    assert np.array_equal(a, b)


@pytest.mark.parametrize("fault", ["3:5:hang", "0:5:hang", "1:5:exit"])
def test_a_rank_lost_in_turns_ends_the_job(tmp_path, fault):
    """A rank that hangs or dies while its peers sleep on their doorbells: the job still ends (the stall
    guard, or the launcher), in bounded time."""
    t0 = time.monotonic()
    _, p = train(tmp_path, "lost", "2", "--fault", fault, "--stall-timeout", "3")
    assert p.returncode != 0
    assert time.monotonic() - t0 < 60, p.stderr
    if fault.endswith("hang"):
        assert "no training step finished in 3s after step 5" in p.stderr, p.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root to mount a small /dev/shm")
def test_a_small_dev_shm_caps_the_arena_instead_of_a_bus_error(tmp_path):
    """A container's /dev/shm is often 64 MB. Shards of 256 ask for ~75 MB of arena per place; in a 48 MB
    /dev/shm (a private mount of this test's own) the arena takes what is left instead, and the run ends
    normally. (Without the cap, MPICH's window is touched past the filesystem's end: SIGBUS.)"""
    cmd = [*mpirun_cmd(4), python(), "-m", "workers.trainer", "--subset", "--epochs", "1", "--batch-size", "1024",
           "--no-save", "--no-progress", "--log-level", "INFO"]
    script = f"mount -t tmpfs -o size=48m tmpfs /dev/shm && exec {shlex.join(cmd)}"
    p = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=120,
                       cwd=REPO, env=env(LENET_TURNS="auto", LENET_NODE_CORES="2"))
    assert p.returncode == 0, p.stderr[-3000:]
    mib = float(re.search(r"node ranks 0 and 2 compute in one ([\d.]+) MiB of scratch", p.stderr).group(1))
    assert 0 < mib < 48 / 2 / 2
