"""lenet-plot writes a PNG from real JSONL rows and refuses bad input with one line; the evaluator's
TensorBoard writer leaves event files whose scalars and confusion image read back as written."""
import json

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("tensorboardX")
from PIL import Image  # noqa: E402

from lenet_dist.evaluation.analysis import Analysis  # noqa: E402
from lenet_dist.evaluation.tensorboard import confusion_image, EvaluatorBoard, filters_image  # noqa: E402
from workers import plot  # noqa: E402

from tests import tbevents  # noqa: E402


def write_jsonl(path, rows, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def metrics_rows():
    rows = []
    for s in range(10, 110, 10):
        rows.append({"event": "step", "step": s, "epoch": s // 50, "loss": 2.0 / s, "acc": 1 - 1.0 / s,
                     "lr": 0.1, "images_per_s": 900.0 + s, "rank_images_per_s": [450.0, 450.0 + s]})
        if s % 50 == 0:
            rows.append({"event": "epoch", "epoch": s // 50, "step": s, "train_loss": 1.0 / s, "train_acc": 0.9,
                         "test_loss": 1.5 / s, "test_acc": 0.92, "images_per_s": 950.0, "lr": 0.1})
    return rows


def test_plot_writes_a_png(tmp_path, capsys):
    m, r, out = tmp_path / "m.jsonl", tmp_path / "r.jsonl", tmp_path / "curves.png"
    write_jsonl(m, metrics_rows(), tail='{"event": "step", "st')        # a file still being written
    write_jsonl(r, [{"step": 20, "accuracy": 0.5, "loss": 1.2}, {"step": 60, "accuracy": 0.8, "loss": 0.6}])
    assert plot.main([str(m), str(r), "-o", str(out), "--title", "test run"]) == 0
    im = Image.open(out)
    assert im.format == "PNG" and im.size[0] > 600 and im.size[1] > 400
    assert len(np.unique(np.asarray(im.convert("L")))) > 20                 # something was drawn
    assert f"{m}:13: not a JSON object; skipped" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (None, "No such file"),
    ("", "nothing to plot"),
    ('{"event": "other"}\n', "nothing to plot"),
])
def test_plot_refuses_bad_input_with_one_line(tmp_path, capsys, content, message):
    m = tmp_path / "m.jsonl"
    if content is not None:
        m.write_text(content)
    assert plot.main([str(m), "-o", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lenet-plot: error:") and message in err[0]
    assert not (tmp_path / "x.png").exists()


def test_plot_usage_errors(tmp_path):
    with pytest.raises(SystemExit) as e:
        plot.main([str(tmp_path / "m.jsonl"), "-o", str(tmp_path / "x.jpg")])
    assert e.value.code == 2


def test_evaluator_board_reads_back(tmp_path):
    board = EvaluatorBoard(tmp_path)
    confusion = np.diag(np.full(10, 9)) + np.eye(10, k=1, dtype=int)       # one mistake per class (but 9)
    detail = Analysis(0.25, 0.9, confusion)
    for step, acc in ((10, 0.8), (20, 0.9)):
        board.add_evaluation({"step": step, "test_accuracy": acc, "test_loss": 1.0 / step, "val_accuracy": acc - 0.1,
                              "val_loss": 2.0 / step, "lag_steps": 3, "eval_seconds": 0.5}, detail)
    board.close()
    got = tbevents.scalars(tmp_path / "evaluator")
    assert got["eval/test_accuracy"] == [(10, pytest.approx(0.8)), (20, pytest.approx(0.9))]
    assert got["eval/val_accuracy"] == [(10, pytest.approx(0.7)), (20, pytest.approx(0.8))]
    assert got["eval/val_loss"][1] == (20, pytest.approx(0.1))
    assert got["eval/test_loss"][1] == (20, pytest.approx(0.05)) and got["eval/lag_steps"][0] == (10, 3)
    assert got["eval/class_accuracy/9"][0] == (10, 1.0) and got["eval/class_accuracy/0"][0][1] == pytest.approx(0.9)
    im = tbevents.image(tmp_path / "evaluator", "eval/confusion")
    assert (im == confusion_image(confusion).transpose(1, 2, 0)).all()


def test_images_are_what_they_show():
    c = np.zeros((10, 10), int)
    c[3, 3], c[3, 5] = 5, 5
    im = confusion_image(c, cell=4)                                         # (3, 40, 40)
    assert im.shape == (3, 40, 40)
    assert (im[:, 13:16, 1:4] == 255).all()                                 # an empty cell is white
    assert im[2, 14, 14] > im[0, 14, 14] and im[0, 14, 22] > im[2, 14, 22]  # diagonal blue, mistake red
    w = np.zeros((6, 1, 5, 5))
    w[2, 0, 1, 1] = -1.0
    f = filters_image(w, scale=2, gap=1)
    assert f.shape == (1, 10, 66) and f[0, 2, 2 * 11 + 2] == 0.0 and f[0, 0, 0] == 0.5


def test_evaluator_board_keeps_each_run_in_a_folder_of_its_own(tmp_path):
    board = EvaluatorBoard(tmp_path)
    detail = Analysis(0.25, 0.9, np.diag(np.full(10, 9)))
    for run, step, acc in (("lr-0.1", 10, 0.8), ("lr-0.05", 10, 0.6), ("lr-0.1", 20, 0.9), ("../up", 5, 0.5)):
        board.add_evaluation({"run": run, "step": step, "test_accuracy": acc, "test_loss": 0.1}, detail)
    board.close()
    assert tbevents.scalars(tmp_path / "evaluator" / "lr-0.1")["eval/test_accuracy"] == [
        (10, pytest.approx(0.8)), (20, pytest.approx(0.9))]
    assert tbevents.scalars(tmp_path / "evaluator" / "lr-0.05")["eval/test_accuracy"] == [(10, pytest.approx(0.6))]
    assert tbevents.scalars(tmp_path / "evaluator")["eval/test_accuracy"] == [(5, pytest.approx(0.5))]  # no escape
    assert not (tmp_path / "up").exists()
