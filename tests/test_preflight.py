"""`lenet-train --check` as a real process, alone and under `mpirun -n 2`: all passing with the shipped subset,
then each thing a launch can get wrong (data, checkpoint dir, keys, publish port, results address)."""
import re
import socket
import subprocess
import sys

import pytest

from lenet_dist.data import SUBSET_DIR
from lenet_dist.transport import generate_keys

from tests.mpiutil import REPO, env, launch, mpirun_cmd, python


def check(n, *argv, tmp_path, expect_rc, data_dir_env=""):
    """`lenet-train --check` under `mpirun -n n` (0: alone), with an empty MNIST cache; its stdout."""
    p = launch(n, ["--check", *argv], check=False, timeout=90,
               extra_env={"LENET_CACHE_DIR": tmp_path / "empty-cache", "LENET_DATA_DIR": data_dir_env})
    assert p.returncode == expect_rc, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p.stdout


def lines(out, status, name):
    """(rank, reason) of each `STATUS rank R on HOST  NAME: reason` line."""
    return [(int(m.group(1)), m.group(2)) for m in
            re.finditer(rf"^{status}\s+rank (\d+) on \S+\s+{name}: (.*)$", out, re.M)]


@pytest.fixture
def listener():
    """A port on loopback that is bound and accepts connections: an evaluator's --results-bind as far as a
    connect can tell, and a port that no trainer can bind."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s.getsockname()[1]
    s.close()


@pytest.fixture
def keys(tmp_path):
    d = tmp_path / "keys"
    generate_keys(d, "trainer")
    public, _ = generate_keys(d / "clients", "evaluator")
    (d / "authorized").mkdir()
    (d / "authorized" / public.name).write_bytes(public.read_bytes())
    return d


@pytest.mark.parametrize("n", [0, 2])
def test_everything_passes_on_every_rank(tmp_path, n, listener, keys):
    out = check(n, "--subset", "--checkpoint-dir", tmp_path / "run" / "ckpt", "--publish", "tcp://127.0.0.1:*",
                "--results", f"tcp://127.0.0.1:{listener}", "--curve-secret-key", keys / "trainer.key_secret",
                "--curve-authorized", keys / "authorized", tmp_path=tmp_path, expect_rc=0)
    ranks = max(n, 1)
    assert [r for r, _ in lines(out, "ok", "mpi")] == list(range(ranks))
    assert [r for r, _ in lines(out, "ok", "data")] == list(range(ranks))
    for name in ("checkpoint-dir", "keys", "publish", "results"):     # rank 0's duties, checked on rank 0
        assert [r for r, _ in lines(out, "ok", name)] == [0], out
    assert "FAIL" not in out
    assert f"all {2 * ranks + 4} checks passed" in out
    assert f"{ranks} rank(s) on 1 host(s)" in out
    assert not (tmp_path / "run").exists(), "the check left the checkpoint dir it created behind"


def test_alone_with_nothing_to_check_but_data(tmp_path):
    out = check(0, "--subset", tmp_path=tmp_path, expect_rc=0)
    assert "skip  rank 0 on" in out and "publish: no --publish" in out


def test_corrupt_and_missing_data_fail_naming_the_file(tmp_path):
    bad = tmp_path / "mnist"
    bad.mkdir()
    good = (SUBSET_DIR / "train-images-idx3-ubyte.gz").read_bytes()
    (bad / "train-images-idx3-ubyte.gz").write_bytes(good[:len(good) // 2])       # truncated
    out = check(0, "--data-dir", bad, "--no-download", tmp_path=tmp_path, expect_rc=1)
    [(rank, why)] = lines(out, "FAIL", "data")
    assert rank == 0 and str(bad / "train-images-idx3-ubyte.gz") in why and "corrupt gzip" in why, out
    assert "FAIL: 1 of 2 checks failed: data on rank 0" in out

    empty = tmp_path / "nothing"
    empty.mkdir()
    out = check(0, "--data-dir", empty, tmp_path=tmp_path, expect_rc=1)
    [(_, why)] = lines(out, "FAIL", "data")          # a folder named on the command line must hold the files
    assert f"{empty}: no train-images-idx3-ubyte" in why and "in the --data-dir given" in why, out
    assert "training would try to download" not in why

    out = check(0, tmp_path=tmp_path, expect_rc=1, data_dir_env=empty)   # $LENET_DATA_DIR: looked further
    [(_, why)] = lines(out, "FAIL", "data")
    assert "could not obtain MNIST" in why and "not found" in why and "download (disabled)" in why
    assert "lenet-data fetch" in why                 # no --no-download: training would download; say how first


@pytest.mark.usefixtures("mpi_flavour")
def test_data_missing_on_one_rank_names_that_rank(tmp_path):
    # MPMD launch: rank 0 uses the shipped subset, rank 1 looks in an empty folder, as a host without the files.
    empty = tmp_path / "nothing"
    empty.mkdir()
    trainer = [python(), "-m", "workers.trainer", "--check"]
    cmd = [*mpirun_cmd(1), *trainer, "--subset", ":", "-n", "1", *trainer, "--data-dir", str(empty)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=90, cwd=REPO,
                       env=env(LENET_CACHE_DIR=tmp_path / "empty-cache", LENET_DATA_DIR=""))
    assert p.returncode == 1, p.stdout + p.stderr
    assert [r for r, _ in lines(p.stdout, "ok", "data")] == [0]
    assert [r for r, _ in lines(p.stdout, "FAIL", "data")] == [1]
    assert re.search(r"FAIL: 1 of \d+ checks failed: data on rank 1 \(\S+\)$", p.stdout, re.M), p.stdout


@pytest.mark.parametrize("n", [0, 2])
def test_unwritable_checkpoint_dir(tmp_path, n):
    # Permissions do not stop root, so the directory cannot exist: a regular file sits on its path.
    (tmp_path / "afile").write_text("not a directory\n")
    out = check(n, "--subset", "--checkpoint-dir", tmp_path / "afile" / "ckpt", tmp_path=tmp_path, expect_rc=1)
    [(rank, why)] = lines(out, "FAIL", "checkpoint-dir")
    assert rank == 0 and "afile/ckpt: not writable: Not a directory" in why
    assert "checkpoint-dir on rank 0" in out


def test_bad_key_files(tmp_path, keys):
    garbage = tmp_path / "trainer.key_secret"
    garbage.write_text("this is not a key\n")
    out = check(0, "--subset", "--curve-secret-key", garbage, "--curve-authorized", keys / "authorized",
                tmp_path=tmp_path, expect_rc=1)
    [(_, why)] = lines(out, "FAIL", "keys")
    assert f"{garbage}: not a readable CurveZMQ key file" in why, out

    out = check(0, "--subset", "--curve-secret-key", keys / "trainer.key", "--curve-authorized", keys / "authorized",
                tmp_path=tmp_path, expect_rc=1)                  # the public half where the pair belongs
    [(_, why)] = lines(out, "FAIL", "keys")
    assert "holds no secret key" in why

    empty = tmp_path / "no-clients"
    empty.mkdir()
    out = check(0, "--subset", "--curve-secret-key", keys / "trainer.key_secret", "--curve-authorized", empty,
                tmp_path=tmp_path, expect_rc=1)
    [(_, why)] = lines(out, "FAIL", "keys")
    assert "no public keys (*.key) there" in why


@pytest.mark.parametrize("n", [0, 2])
def test_occupied_publish_port(tmp_path, n, listener):
    out = check(n, "--subset", "--publish", f"tcp://127.0.0.1:{listener}", tmp_path=tmp_path, expect_rc=1)
    [(rank, why)] = lines(out, "FAIL", "publish")
    assert rank == 0 and f"cannot bind tcp://127.0.0.1:{listener}" in why and "in use" in why, out


def test_unreachable_results_address(tmp_path):
    with socket.socket() as s:                       # a port that was free a moment ago: nobody listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = check(0, "--subset", "--results", f"tcp://127.0.0.1:{port}", tmp_path=tmp_path, expect_rc=1)
    [(_, why)] = lines(out, "FAIL", "results")
    assert "no TCP connection" in why and "Connection refused" in why and "--results-bind" in why


@pytest.mark.parametrize("where, loopback", [
    ("tcp://127.0.0.1:5555", True), ("tcp://[::1]:5555", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("127.0.0.2", True), ("ipc:///tmp/x", True),
    ("tcp://0.0.0.0:5555", False), ("tcp://*:5555", False), ("tcp://[::]:5555", False), ("::", False),
    ("10.1.2.3", False), ("tcp://192.168.1.1:5555", False), ("node7.example.org", False)])
def test_one_loopback_rule(where, loopback):
    from lenet_dist.transport.wire import is_loopback
    assert is_loopback(where) is loopback


def test_publish_off_loopback_without_keys_is_said(tmp_path):
    out = check(0, "--subset", "--publish", "tcp://0.0.0.0:*", tmp_path=tmp_path, expect_rc=0)
    [(_, why)] = lines(out, "ok", "publish")
    assert "not loopback and no CurveZMQ keys" in why, out
    out = check(0, "--subset", "--publish", "tcp://127.0.0.1:*", tmp_path=tmp_path, expect_rc=0)
    [(_, why)] = lines(out, "ok", "publish")
    assert "not loopback" not in why, out
