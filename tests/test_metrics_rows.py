"""--metrics under lenet-launch: the trainer's rows and the launcher's through one writer (run/metrics.py),
and exactly one "end" row however the launch ends: the trainer's when it wrote one, else the launcher's."""
import os
import signal

import pytest

from lenet_dist.run import metrics

from tests.test_launch import TRAIN, Launch


def ends(job):
    return [r for r in job.rows() if r["event"] == "end"]


def test_a_launch_that_gives_up_has_one_end_row(tmp_path):
    job = Launch(tmp_path, ["-n", 2, "--max-restarts", 1], [*TRAIN, "--epochs", "1", "--fault", "1:12:exit"])
    job.finish()
    [end] = ends(job)                                       # gave up: the launcher's, the trainer could not
    assert end["outcome"] == "gave up", job.rows()


def test_finished_and_stopped_launches_have_one_end_row(tmp_path):
    (tmp_path / "a").mkdir()
    job = Launch(tmp_path / "a", ["-n", 2], [*TRAIN, "--epochs", "1"])
    assert job.finish() == 0, job.text
    [end] = ends(job)
    assert end["outcome"] == "finished" and end["restarts"] == 0 and "test_acc" in end
    (tmp_path / "b").mkdir()
    job = Launch(tmp_path / "b", ["-n", 2], [*TRAIN, "--epochs", "50"])
    job.wait_for("the first of this start")
    job.wait_for_checkpoint(10)
    job.proc.send_signal(signal.SIGTERM)
    job.finish()
    [end] = ends(job)
    assert end["outcome"] == "stopped" and end["signal"] == signal.SIGTERM


def test_a_metrics_path_that_is_a_fifo_is_one_line(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OSError, match="not a regular file"):
        metrics.append(tmp_path / "fifo", {"event": "x"})
