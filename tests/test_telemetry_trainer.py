"""lenet-train's --log-every rows and --tensorboard files from a real `mpirun -n 2` run, read back: step rows
beside the epoch rows in --metrics, agreeing with them, and TensorBoard scalars, histograms and filters."""
import json

import numpy as np
import pytest

pytest.importorskip("tensorboardX")

from lenet_dist.evaluation.tensorboard import filters_image  # noqa: E402

from tests import tbevents  # noqa: E402
from tests.mpiutil import final_params, launch  # noqa: E402

RUN = ["--subset", "--val-size", "0", "--epochs", "2", "--batch-size", "50", "--no-progress"]  # 40 steps an epoch


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_step_rows_and_tensorboard_from_an_mpi_run(tmp_path):
    m, tb, ck = tmp_path / "m.jsonl", tmp_path / "tb", tmp_path / "ck"
    launch(2, [*RUN, "--metrics", m, "--log-every", "8", "--tensorboard", tb, "--checkpoint-dir", ck])
    got = rows(m)
    steps = [r for r in got if r["event"] == "step"]
    epochs = [r for r in got if r["event"] == "epoch"]
    assert [r["step"] for r in steps] == list(range(8, 81, 8)) and len(epochs) == 2
    assert [r["event"] for r in got].index("epoch") == 5               # each epoch row after its step rows
    for e in epochs:                                                    # 5 rows of 8 steps x 50 examples each
        mine = [r for r in steps if e["step"] - 40 < r["step"] <= e["step"]]
        assert np.mean([r["loss"] for r in mine]) == pytest.approx(e["train_loss"], rel=1e-9)
        assert np.mean([r["acc"] for r in mine]) == pytest.approx(e["train_acc"], rel=1e-9)
    for r in steps:
        assert r["steps"] == 8 and r["images_per_s"] == pytest.approx(400 / r["seconds"], rel=0.01)
        assert len(r["rank_compute_s"]) == len(r["rank_wait_s"]) == len(r["rank_images_per_s"]) == 2
        assert sum(r["rank_images_per_s"]) == pytest.approx(r["images_per_s"], rel=0.01)
        assert all(0 <= w <= r["seconds"] for w in r["rank_wait_s"])
    assert steps[0]["config"]["batch_size"] == 50 and "config" not in steps[1]

    s = tbevents.scalars(tb / "trainer")
    assert [st for st, _ in s["train/loss"]] == [r["step"] for r in steps]
    assert [v for _, v in s["train/loss"]] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    assert [v for _, v in s["epoch/test_acc"]] == pytest.approx([e["test_acc"] for e in epochs], rel=1e-6)
    kinds = tbevents.kinds(tb / "trainer")
    for name in ("conv1.weight", "fc3.bias"):
        assert kinds[f"weights/{name}"] == {"histo"} and kinds[f"gradients/{name}"] == {"histo"}
    params, _ = final_params(ck)
    shown = tbevents.image(tb / "trainer", "conv1/filters")
    expect = np.rint(filters_image(params[:150].reshape(6, 1, 5, 5))[0] * 255)
    shown = shown[..., 0] if shown.ndim == 3 else shown                 # grey, stored as one channel or three
    assert shown.shape == expect.shape and np.abs(shown.astype(float) - expect).max() <= 1


def test_log_every_zero_writes_epoch_rows_only(tmp_path):
    m = tmp_path / "m.jsonl"
    launch(0, [*RUN, "--epochs", "1", "--metrics", m, "--log-every", "0"], cwd=tmp_path)
    assert [r["event"] for r in rows(m)] == ["epoch", "end"]


@pytest.mark.parametrize("argv, message", [(["--log-every", "-1"], "--log-every must be >= 0")])
def test_bad_log_every_is_a_usage_error(argv, message):
    p = launch(0, [*RUN, *argv], check=False)
    assert p.returncode == 2 and message in p.stderr
