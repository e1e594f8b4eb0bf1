"""lenet-evaluator and hostile files: a junk file named like the newest checkpoint, a FIFO or a truncated
newest file with --once, and FIFOs where it reads or writes (--report, --best-dir): it skips what does not
load (saying so once), falls back to the newest valid checkpoint, and refuses what is not a regular file in
one line at once; nothing blocks it past SIGTERM."""
import os
import signal
import threading
import time

from lenet_dist.checkpoints import format as checkpoint
from lenet_dist.files import atomic_write

from tests.fakes import make_ckpt
from tests.test_evaluator import Evaluator


def test_a_junk_newest_file_does_not_stop_watching(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "ckpt-999999999.npz").write_bytes(os.urandom(5000))
    ev = Evaluator(tmp_path, "--watch", d, "--poll-ms", "100")
    try:
        for step in (10, 20, 30):                   # real checkpoints arriving after the junk
            atomic_write(d / checkpoint.file_name(step), make_ckpt(step, seed=step))
            deadline = time.monotonic() + 30
            while step not in [r["step"] for r in ev.lines()]:
                assert ev.proc.poll() is None and time.monotonic() < deadline, ev.stderr
                time.sleep(0.1)
        assert [r["step"] for r in ev.lines()] == [10, 20, 30]
        assert all(r["lag_steps"] == 0 for r in ev.lines())    # a name is not a step the trainer reached
    finally:
        ev.proc.send_signal(signal.SIGTERM)
        rc, _ = ev.finish()
    assert rc == 0 and ev.stderr.count("ckpt-999999999.npz") == 1, ev.stderr     # said once
    assert "Traceback" not in ev.stderr


def _newest_broken(tmp_path, kind):
    d = tmp_path / "ckpt"
    d.mkdir()
    atomic_write(d / checkpoint.file_name(10), make_ckpt(10))
    newest = d / checkpoint.file_name(20)
    if kind == "fifo":
        os.mkfifo(newest)
    else:
        newest.write_bytes(make_ckpt(20)[:50_000])
    return d


def test_once_falls_back_from_a_fifo_or_truncated_newest_file(tmp_path):
    for kind in ("fifo", "truncated"):
        (tmp_path / kind).mkdir()
        ev = Evaluator(tmp_path / kind, "--watch", _newest_broken(tmp_path / kind, kind), "--once")
        rc, out = ev.finish(timeout=30)
        assert rc == 0 and [r["step"] for r in ev.lines()] == [10], (kind, ev.stderr)
        assert "skipping checkpoint" in ev.stderr and "Traceback" not in ev.stderr


def test_a_fifo_for_the_report_is_refused_at_start_in_one_line(tmp_path):
    fifo = tmp_path / "r.fifo"
    os.mkfifo(fifo)
    ev = Evaluator(tmp_path, "--watch", tmp_path, "--report", fifo)   # the later --report wins
    rc, _ = ev.finish(timeout=20)
    lines = ev.stderr.strip().splitlines()
    assert rc == 2 and "--report" in lines[-1] and "not a regular file (a FIFO)" in lines[-1], ev.stderr


def test_a_fifo_in_the_best_dir_never_blocks_it(tmp_path):
    best = tmp_path / "best"
    best.mkdir()
    os.mkfifo(best / "best.json")
    ev = Evaluator(tmp_path, "--watch", tmp_path, "--best-dir", best)
    rc, _ = ev.finish(timeout=20)
    lines = ev.stderr.strip().splitlines()
    assert rc == 2 and "--best-dir" in lines[-1] and "not a regular file (a FIFO)" in lines[-1], ev.stderr


def test_a_fifo_appearing_in_the_best_dir_later_is_replaced_not_read(tmp_path):
    """Made after the start-up check: reading it would block; it is refused in one line and replaced."""
    from lenet_dist.data import load_subset
    from lenet_dist.data.identity import data_record
    split = data_record(load_subset().identity(), 2000, 200, seed=0)
    d, best = tmp_path / "ckpt", tmp_path / "best"
    d.mkdir()
    best.mkdir()
    ev = Evaluator(tmp_path, "--watch", d, "--best-dir", best, "--poll-ms", "100")
    try:
        ev.wait_for("watching")
        os.mkfifo(best / "best.json")
        atomic_write(d / checkpoint.file_name(10), make_ckpt(10, data=split))
        deadline = time.monotonic() + 30
        while not (best / "best.json").is_file():
            assert ev.proc.poll() is None and time.monotonic() < deadline, ev.stderr
            time.sleep(0.1)
    finally:
        threading.Timer(10, lambda: ev.proc.poll() is None and ev.proc.kill()).start()
        ev.proc.send_signal(signal.SIGTERM)
        rc, _ = ev.finish()
    assert rc == 0, ev.stderr
