"""The rules that exist once (lenet_dist/files.py, stopsignal.py, selection.py), tested where they live."""
import os
import signal
import threading
import time

import pytest

from lenet_dist import files, selection
from lenet_dist.stopsignal import signal_name, StopSignal


# ------------------------------------------------------------------------------------------- best

def test_best_is_chosen_on_validation_not_test():
    a = {"step": 100, "val_accuracy": 0.98, "val_loss": 0.07, "test_accuracy": 0.995}
    b = {"step": 200, "val_accuracy": 0.99, "val_loss": 0.09, "test_accuracy": 0.97}
    assert selection.best_of([a, b]) is b
    assert selection.best_of([b, a]) is b


def test_ties_go_to_lower_loss_then_later_step():
    a = {"step": 100, "val_accuracy": 0.99, "val_loss": 0.05}
    b = {"step": 200, "val_accuracy": 0.99, "val_loss": 0.06}
    c = {"step": 300, "val_accuracy": 0.99, "val_loss": 0.05}
    assert selection.best_of([a, b]) is a
    assert selection.best_of([a, b, c]) is c
    assert selection.best_of([c, a]) is c
    assert not selection.is_better(a, c) and selection.is_better(c, a)


def test_records_without_validation_never_beat_ones_with_it():
    v = {"step": 10, "val_accuracy": 0.5}
    n = {"step": 99, "test_accuracy": 1.0}
    assert selection.best_of([v, n]) is v
    later = {"step": 100}
    assert selection.best_of([n, later]) is later           # without validation: the last one
    assert selection.best_of([]) is None
    assert selection.best_of([{"step": 5, "val_accuracy": float("nan")}, {"step": 4, "val_accuracy": 0.1}])["step"] == 4


def test_trainer_rows_are_read_by_their_names():
    assert selection.is_better({"step": 2, "val_acc": 0.9, "val_loss": 0.3},
                               {"step": 1, "val_accuracy": 0.8, "val_loss": 0.1})


# ------------------------------------------------------------------------------------------- files

def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path):
    p = tmp_path / "x.json"
    files.atomic_write(p, b"one")
    files.atomic_write(p, b"two")
    assert p.read_bytes() == b"two"
    assert sorted(os.listdir(tmp_path)) == ["x.json"]
    assert (p.stat().st_mode & 0o777) == 0o644


def test_atomic_write_failure_names_the_path(tmp_path):
    with pytest.raises(OSError, match="cannot write .*nope"):
        files.atomic_write(tmp_path / "missing" / "nope", b"x")


def test_one_temp_name_rule_for_the_writers_the_sweep_and_the_fresh_folder_check(tmp_path):
    from lenet_dist.checkpoints import folder as ckptdir
    from lenet_dist.checkpoints import resume
    for name in ("ckpt-next", "ckpt-000000300.npz", "last.npz", "best.json"):
        tmp = files.temp_name(tmp_path / name).name
        assert files.is_temp(tmp) and ckptdir.is_own_temp(tmp)
    assert not files.is_temp("ckpt-000000300.npz") and not files.is_temp(".hidden")
    (tmp_path / files.temp_name(tmp_path / "last.npz").name).write_bytes(b"left by a crash")
    (tmp_path / files.temp_name(tmp_path / "notes.txt").name).write_bytes(b"not the folder's")
    assert resume.folder_is_fresh(tmp_path)                      # temp files are not a run
    assert ckptdir.sweep_temps(tmp_path, warn=lambda m: None) == [files.temp_name(tmp_path / "last.npz").name]


def test_write_and_rename_closes_the_descriptor_and_removes_the_temp_on_failure(tmp_path):
    tmp = files.temp_name(tmp_path / "gone" / "x")
    (tmp_path / "gone").mkdir()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT)
    with pytest.raises(OSError):
        files.write_and_rename(fd, tmp, tmp_path / "no-such-folder" / "x", b"data")
    assert not tmp.exists()
    with pytest.raises(OSError):
        os.fstat(fd)                                             # closed


def test_fifo_is_refused_at_once_for_reading_and_appending(tmp_path):
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    t = time.monotonic()
    for mode in ("r", "a", "w"):
        with pytest.raises(files.NotRegularFile, match="not a regular file .a FIFO"):
            files.open_regular(fifo, mode)
    with pytest.raises(OSError, match="FIFO"):
        files.read_regular(fifo, 100)
    with pytest.raises(ValueError, match="FIFO"):
        files.check_writable_path(fifo)
    assert time.monotonic() - t < 2


def test_open_regular_appends_and_truncates_only_regular_files(tmp_path):
    p = tmp_path / "m.jsonl"
    with files.open_regular(p, "a") as f:
        f.write("a\n")
    with files.open_regular(p, "a") as f:
        f.write("b\n")
    assert p.read_text() == "a\nb\n"
    with files.open_regular(p, "w") as f:
        f.write("c\n")
    assert p.read_text() == "c\n"
    assert files.read_regular(p, 10) == b"c\n"
    with pytest.raises(OSError, match="more than the 1 allowed"):
        files.read_regular(p, 1)
    with pytest.raises(files.NotRegularFile, match="a folder"):
        files.open_regular(tmp_path, "r")
    files.check_writable_path(tmp_path / "new")             # absent: fine


# ------------------------------------------------------------------------------------------- stop

def test_repeated_sigterm_keeps_asking_for_a_graceful_stop():
    """Slurm at a time limit: SIGTERM, SIGCONT, SIGTERM. The second SIGTERM must not escalate."""
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        stop = StopSignal()
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGCONT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM and stop.count == 2 and bool(stop)
        os.kill(os.getpid(), signal.SIGUSR1)                 # still graceful, the first signal is kept
        assert stop.signum == signal.SIGTERM and stop.name == "SIGTERM"
        stop2 = StopSignal()
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):               # Ctrl-C twice: now
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def test_once_settled_further_stop_signals_are_ignored():
    """A launcher whose exit status is decided must not be killed by a late SIGTERM while it shuts down."""
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        stop = StopSignal()
        stop.settled()
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in old)
        os.kill(os.getpid(), signal.SIGTERM)                 # ignored: the test process lives on
        assert stop.signum == 0
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def test_sleep_returns_early_on_a_request():
    stop = StopSignal(install=False)
    threading.Timer(0.1, stop.request).start()
    t = time.monotonic()
    assert stop.sleep(30) is True
    assert time.monotonic() - t < 10
    assert signal_name(signal.SIGUSR1) == "SIGUSR1" and signal_name(999) == "signal 999"
