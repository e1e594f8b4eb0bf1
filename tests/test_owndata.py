"""A user's own IDX data (`--dataset idx --data-dir DIR`): structural checks, each a one-line error naming
the file; training, evaluation, checkpoints and resume on it at 1 and 2 ranks; data identity in the
checkpoint, refused by the evaluator and by --resume when it differs."""
import json
import subprocess
import sys

import numpy as np
import pytest

from lenet_dist.data import DataError
from lenet_dist.data.own import load_idx_dir
from lenet_dist.run import exitcodes

from tests import idxdata
from tests.idxdata import idx_bytes, write_dir
from tests.mpiutil import REPO, env, final_params, launch

TRAIN = ["--dataset", "idx", "--epochs", "1", "--batch-size", "20", "--lr", "0.05", "--no-progress",
         "--log-level", "WARNING", "--stall-timeout", "30"]


def load_error(tmp_path, **override):
    d = write_dir(tmp_path / "data", **override)
    with pytest.raises(DataError) as e:
        load_idx_dir(d)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_own_files_load_gz_or_raw_and_carry_their_identity(tmp_path):
    ds = load_idx_dir(write_dir(tmp_path / "d", gz=("train_images", "test_labels")))
    assert ds.train_images.shape == (600, 28, 28) and ds.test_labels.shape == (200,)
    ident = ds.identity()
    assert ident["name"] == "idx" and set(ident["sha256"]) == set(idxdata.NAMES)
    other = load_idx_dir(write_dir(tmp_path / "e", seed=5)).identity()
    assert other["sha256"]["train_images"] != ident["sha256"]["train_images"]


def test_missing_file(tmp_path):
    d = write_dir(tmp_path / "data")
    (d / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"data: no t10k-labels-idx1-ubyte \(looked for it with and without .gz\)"):
        load_idx_dir(d)


def test_not_a_folder(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        load_idx_dir(tmp_path / "nowhere")


def test_labels_where_images_belong(tmp_path):
    msg = load_error(tmp_path, train_images=idx_bytes(np.zeros(600, np.uint8)))
    assert "train-images-idx3-ubyte.gz: IDX magic 0x00000801, 1 dimensions (600); images need 0x00000803" in msg


def test_images_that_are_not_28x28(tmp_path):
    msg = load_error(tmp_path, test_images=idx_bytes(np.zeros((200, 32, 32), np.uint8)))
    assert msg.endswith("t10k-images-idx3-ubyte: images are 32x32, but LeNet-5 here takes 28x28: "
                        "resize or pad them to 28x28")


def test_colour_images(tmp_path):
    msg = load_error(tmp_path, test_images=idx_bytes(np.zeros((200, 28, 28, 3), np.uint8)))
    assert "IDX magic 0x00000804, 4 dimensions (200x28x28x3) (colour or multi-channel images?)" in msg


def test_images_where_labels_belong(tmp_path):
    msg = load_error(tmp_path, train_labels=idx_bytes(np.zeros((600, 28, 28), np.uint8)))
    assert "train-labels-idx1-ubyte: IDX magic 0x00000803, 3 dimensions (600x28x28); labels need 0x00000801" in msg


def test_counts_that_do_not_match(tmp_path):
    msg = load_error(tmp_path, train_labels=idx_bytes(np.zeros(599, np.uint8)))
    assert "train-labels-idx1-ubyte: 599 labels for the 600 images of train-images-idx3-ubyte.gz; " \
           "the counts must match" in msg


def test_labels_out_of_range(tmp_path):
    labels = np.zeros(200, np.uint8)
    labels[17] = 10
    msg = load_error(tmp_path, test_labels=idx_bytes(labels))
    assert msg.endswith("t10k-labels-idx1-ubyte: label 10 at index 17; labels must be class numbers 0..9")


def test_wrong_element_type(tmp_path):
    msg = load_error(tmp_path, test_labels=idx_bytes(np.zeros(200, np.uint8), type_code=0x0D))
    assert "t10k-labels-idx1-ubyte: unsupported IDX element type 0x0d (only 0x08, unsigned byte)" in msg


def test_not_idx_at_all(tmp_path):
    msg = load_error(tmp_path, test_labels=b"label,image\n3,foo.png\n")
    assert "t10k-labels-idx1-ubyte: not an IDX file: magic bytes 0x6c616265" in msg


def test_truncated(tmp_path):
    msg = load_error(tmp_path, test_images=idx_bytes(np.zeros((200, 28, 28), np.uint8))[:-100])
    assert "t10k-images-idx3-ubyte: truncated: header says 200x28x28 = 156800 bytes of data, file has 156700" in msg


def test_empty_image_file(tmp_path):
    msg = load_error(tmp_path, test_images=idx_bytes(np.zeros((0, 28, 28), np.uint8)),
                     test_labels=idx_bytes(np.zeros(0, np.uint8)))
    assert "t10k-images-idx3-ubyte: holds no images" in msg


# ------------------------------------------------------------------------------------------ processes

def trainer(n, tmp_path, data, name, *extra, check=True):
    d = tmp_path / name
    p = launch(n, [*TRAIN, "--data-dir", data, "--checkpoint-dir", d, "--metrics", d / "m.jsonl", *extra],
               check=check, timeout=180)
    return d, p


def evaluator(*args):
    return subprocess.run([sys.executable, "-m", "workers.evaluator", *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env=env())


def one_error_line(p, marker="lenet-train: "):
    errors = [line for line in p.stderr.splitlines() if marker in line and ("error" in line or "ERROR" in line)]
    assert errors and "Traceback" not in p.stderr, p.stderr
    return errors[0]


def test_a_bad_own_file_stops_the_trainer_in_one_line(tmp_path):
    data = write_dir(tmp_path / "data", test_images=idx_bytes(np.zeros((200, 32, 32), np.uint8)))
    _, p = trainer(0, tmp_path, data, "run", check=False)
    assert p.returncode == exitcodes.BAD_DATA
    assert "DataError: " in one_error_line(p) and "images are 32x32" in one_error_line(p)


@pytest.mark.parametrize("n", [0, 2])
def test_train_evaluate_and_resume_on_own_data(tmp_path, n):
    data = write_dir(tmp_path / "data")                       # 600 training images: 50 held out, 28 steps
    d, _ = trainer(n, tmp_path, data, "run", "--epochs", "2", "--checkpoint-every", "10")
    records = [r for r in map(json.loads, (d / "m.jsonl").read_text().splitlines()) if r["event"] == "epoch"]
    assert records[-1]["step"] == 56 and records[-1]["val_acc"] > 0.9 and records[-1]["test_acc"] > 0.9
    params, meta = final_params(d)
    assert meta["data"]["name"] == "idx" and meta["data"]["split"]["val_size"] == 50
    assert meta["data"]["sha256"] == load_idx_dir(data).identity()["sha256"]
    # a separate evaluator on the same folder rebuilds the split and agrees with the trainer
    p = evaluator("--watch", d, "--dataset", "idx", "--data-dir", data, "--once", "--report", tmp_path / "r.jsonl")
    assert p.returncode == 0, p.stderr
    [result] = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert result["val_accuracy"] == records[-1]["val_acc"] and result["accuracy"] == records[-1]["test_acc"]
    assert result["n_val"] == 50 and result["n_test"] == 200
    # killed after step 20 and resumed: the same parameters as the uninterrupted run
    k, p = trainer(n, tmp_path, data, "killed", "--epochs", "2", "--checkpoint-every", "10",
                   "--fault", "0:21:exit", check=False)
    assert p.returncode != 0
    trainer(n, tmp_path, data, "killed", "--epochs", "2", "--checkpoint-every", "10", "--resume")
    np.testing.assert_array_equal(final_params(k)[0], params)


@pytest.mark.parametrize("n", [0, 2])
def test_resume_on_other_data_is_refused(tmp_path, n):
    data, other = write_dir(tmp_path / "data"), write_dir(tmp_path / "other", seed=9)
    trainer(n, tmp_path, data, "run")
    d, p = trainer(n, tmp_path, other, "run", "--resume", check=False)
    assert p.returncode != 0
    line = one_error_line(p)
    assert "ResumeError: " in line and "was trained on other data: 4 of 4 files differ" in line
    assert "or use a new --checkpoint-dir" in line


def test_resume_with_another_validation_split_is_refused(tmp_path):
    data = write_dir(tmp_path / "data")
    trainer(0, tmp_path, data, "run")
    _, p = trainer(0, tmp_path, data, "run", "--resume", "--val-size", "100", check=False)
    assert p.returncode != 0
    line = one_error_line(p)
    assert "ResumeError: " in line and "--val-size 100 (saved: -1)" in line
    _, p = trainer(0, tmp_path, data, "run", "--resume", "--val-size", "100", "--override", "val-size", check=False)
    assert p.returncode != 0                          # not even on purpose: the examples trained on would change
    line = one_error_line(p)
    assert "ResumeError: " in line and "held-out split" in line


def test_evaluator_refuses_a_checkpoint_of_other_data(tmp_path):
    data, other = write_dir(tmp_path / "data"), write_dir(tmp_path / "other", kind="random")
    d, _ = trainer(0, tmp_path, data, "run")
    p = evaluator("--watch", d, "--dataset", "idx", "--data-dir", other, "--once")
    assert p.returncode == 1
    line = one_error_line(p, "evaluator ERROR")
    assert "DataRefused: the checkpoint of step 28 was trained on other data: 4 of 4 files differ" in line
    assert "start the evaluator with the trainer's --dataset and --data-dir" in line
    # the shipped MNIST subset is other data too
    p = evaluator("--watch", d, "--subset", "--once")
    assert p.returncode == 1 and "'idx'" in one_error_line(p, "evaluator ERROR")


def test_idx_needs_a_data_dir(tmp_path):
    p = launch(0, ["--dataset", "idx", "--no-progress"], check=False, timeout=60)
    assert p.returncode == exitcodes.BAD_DATA
    line = one_error_line(p)
    assert "--dataset idx needs --data-dir DIR" in line and "lenet-data fetch" in line and "--test-mode" in line
