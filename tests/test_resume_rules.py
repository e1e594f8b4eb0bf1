"""--resume continues THIS run or stops with one line saying why: it never starts a new run, never writes into
a folder of another run or other data, never overwrites a file it did not write. Each case runs the real
trainer and checks that every file in the folder is byte-identical afterwards. --resume auto: continue, or
start when the folder is empty or absent, refuse anything else."""
import io
import json

import numpy as np
import pytest

from lenet_dist.checkpoints import format as checkpoint, resume
from lenet_dist.errors import ResumeError

from tests import idxdata
from tests.mpiutil import launch

# 600 examples in batches of 100 (50 held out): 6 steps per epoch, a checkpoint every 3
BASE = ["--train-subset", "600", "--batch-size", "100", "--checkpoint-every", "3", "--no-progress",
       "--keep", "10", "--epochs", "2"]
RUN = ["--subset", *BASE]


def snapshot(d):
    """Every file under d, by relative path, with its bytes (None: d does not exist)."""
    if not d.exists():
        return None
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def refused(d, *flags, n=0, says=(), base=RUN):
    """Resume into d with flags: it must fail with one error line (returned), d unchanged to the byte."""
    before = snapshot(d)
    p = launch(n, [*base, "--checkpoint-dir", d, *flags], check=False)
    after = snapshot(d)
    assert p.returncode != 0, p.stdout + p.stderr
    errors = [line for line in p.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr
    assert after == before, f"files changed: {sorted(set(after or {}) ^ set(before or {}))}\n{p.stderr}"
    for text in says:
        assert text in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-epoch run (checkpoints at steps 3, 6, 9, 12) to copy per test."""
    d = tmp_path_factory.mktemp("trained") / "ckpt"
    launch(0, [*RUN, "--checkpoint-dir", d])
    return d


def copy(src, dst):
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.is_file():
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


def rewrite(path, *, meta=None, velocity=None):
    """The checkpoint at path with its meta edited by hand (outside the content hash) or with another velocity
    (then hashed again, as a writer with a bug would)."""
    with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    m = json.loads(arrays["meta"].tobytes())
    if velocity is not None:
        params = {n: arrays[n] for n, _ in checkpoint.PARAM_SPECS}
        path.write_bytes(checkpoint.to_bytes(params, velocity(arrays["optim.velocity"]), m))
        return
    meta(m)
    arrays["meta"] = np.frombuffer(json.dumps(m).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())


def steps(d):
    return [s for s, _ in checkpoint.list_checkpoints(d)]


def test_data_of_another_size_is_refused_naming_the_data(tmp_path, trained):
    d = copy(trained, tmp_path / "ckpt")
    own = idxdata.write_dir(tmp_path / "idx", n_train=900, n_test=100)
    line = refused(d, "--resume", "--dataset", "idx", "--data-dir", own, says=("other data", "ResumeError"),
                   base=BASE)
    assert "does not fit" not in line


@pytest.mark.parametrize("what", ["mistyped", "empty"])
def test_a_mistyped_or_empty_folder_is_refused(tmp_path, what):
    d = tmp_path / "ckpt"
    if what == "empty":
        d.mkdir()
    refused(d, "--resume", says=("--resume", "does not exist" if what == "mistyped" else "holds no checkpoint"))
    assert d.exists() == (what == "empty")


def test_every_checkpoint_corrupt_is_refused(tmp_path, trained):
    d = copy(trained, tmp_path / "ckpt")
    for _, p in checkpoint.list_checkpoints(d):
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))
    refused(d, "--resume", says=("none of the 4 checkpoint(s)",))


@pytest.mark.parametrize("bad", [lambda v: np.full_like(v, np.nan), lambda v: v + np.float32(3e38)],
                         ids=["nan", "absurd"])
def test_a_velocity_with_nan_or_absurd_values_is_invalid(tmp_path, trained, bad):
    d = copy(trained, tmp_path / "ckpt")
    for _, p in checkpoint.list_checkpoints(d):
        rewrite(p, velocity=bad)
        with pytest.raises(checkpoint.CheckpointError, match="optim.velocity holds"):
            checkpoint.load_file(p)
    refused(d, "--resume", says=("none of the 4 checkpoint(s)", "optim.velocity"))


@pytest.mark.parametrize("edit", [lambda m: m.update(data=5), lambda m: m.update(allreduce={"scale": ["x"]}),
                                  lambda m: m.update(allreduce={"scale": [0.0]}), lambda m: m.update(ranks="2")],
                         ids=["data-5", "string-scale", "zero-scale", "string-ranks"])
def test_hand_edited_meta_falls_back_to_an_older_checkpoint(tmp_path, trained, edit):
    d = copy(trained, tmp_path / "ckpt")
    for s, p in checkpoint.list_checkpoints(d):
        if s == 12:
            rewrite(p, meta=edit)
    got = resume.newest_usable(d, 600, warn=lambda m: None)
    assert got[1].step == 9
    (d / "last.npz").unlink()                        # the finished run would have nothing left to train
    p = launch(0, [*RUN, "--checkpoint-dir", d, "--resume", "--epochs", "3", "--override", "epochs"], check=False)
    assert p.returncode == 0 and "skipping checkpoint" in p.stderr and "resumed from" in p.stderr, p.stderr
    assert "ckpt-000000009.npz at step 9/18" in p.stderr


def test_a_finished_run_resumed_says_it_is_finished(tmp_path, trained):
    d = copy(trained, tmp_path / "ckpt")
    before = snapshot(d)
    p = launch(0, [*RUN, "--checkpoint-dir", d, "--resume"])
    assert "has already finished: step 12/12, 2 of 2 epochs" in p.stdout, p.stdout
    assert "epoch 3/2" not in p.stdout + p.stderr and snapshot(d) == before


def test_resume_auto_starts_in_an_empty_or_absent_folder_continues_a_run_and_refuses_the_rest(tmp_path, trained):
    absent = tmp_path / "absent"
    p = launch(0, [*RUN, "--checkpoint-dir", absent, "--resume", "auto", "--epochs", "1"])
    assert steps(absent) == [6, 3] and "starting one" in p.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    launch(0, [*RUN, "--checkpoint-dir", empty, "--resume", "auto", "--epochs", "1"])
    assert steps(empty) == [6, 3]
    # a retry with the same flags continues the same run (here: one that stopped at step 6 of 12)
    d = copy(absent, tmp_path / "retried")
    p = launch(0, [*RUN, "--checkpoint-dir", d, "--resume", "auto", "--epochs", "2", "--override", "epochs"])
    assert "resumed from" in p.stderr and "at step 6/12" in p.stderr and steps(d)[0] == 12
    runs = {checkpoint.load_file(path).meta["run_id"] for _, path in checkpoint.list_checkpoints(d)}
    assert len(runs) == 1
    # anything else is refused, unchanged: other data, every checkpoint corrupt
    other = copy(trained, tmp_path / "other")
    refused(other, "--resume", "auto", "--dataset", "idx", "--data-dir",
            idxdata.write_dir(tmp_path / "idx", n_train=900, n_test=100), says=("other data",), base=BASE)
    for _, path in checkpoint.list_checkpoints(other):
        path.write_bytes(b"not a checkpoint")
    refused(other, "--resume", "auto", says=("none of the 4",))


def test_under_mpirun_a_refused_resume_is_one_line(tmp_path):
    refused(tmp_path / "nowhere", "--resume", n=2, says=("does not exist",))


def test_the_velocity_bound_is_a_plain_constant():
    assert checkpoint.MAX_ABS == 1e6
