"""lenet-launch and lenet-train name the same checkpoint: the launcher's announced restart point is the step
the trainer resumes from, also when the folder's newest file is corrupt or does not fit the data."""
import re
import time

import pytest

from lenet_dist.checkpoints import format as checkpoint

from tests.test_launch import TRAIN, Launch


def plant(ckpt, kind):
    """A newer file than any the run wrote: a corrupt one, or a whole one whose position does not fit."""
    step, path = checkpoint.list_checkpoints(ckpt)[0]
    c = checkpoint.load_file(path)
    target = ckpt / checkpoint.file_name(1300)
    if kind == "corrupt":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        meta = dict(c.meta, step=1300, epoch=0, pos=1300)          # meta is outside the content hash
        target.write_bytes(checkpoint.to_bytes(c.params, c.velocity, meta))
    return step


@pytest.mark.parametrize("kind", ["corrupt", "does-not-fit"])
def test_the_launchers_restart_point_is_the_trainers(tmp_path, kind):
    job = Launch(tmp_path, ["-n", 2, "--max-restarts", 1, "--backoff", 3], [*TRAIN, "--fault", "1:12:exit"])
    job.wait_for("mpirun exited with code")                         # during the 3 s back-off
    newest = plant(job.ckpt, kind)
    job.finish()
    announced = re.search(r"restart 1 on 2 rank\(s\) from (ckpt-\d+\.npz) \(step (\d+)\)", job.text)
    resumed = re.search(r"resumed from \S*/(ckpt-\d+\.npz) at step (\d+)/", job.text)
    assert announced and resumed, job.text
    assert announced.groups() == resumed.groups() == (checkpoint.file_name(newest), str(newest)), job.text
    assert [r["resume_step"] for r in job.rows("restart")] == [newest]
