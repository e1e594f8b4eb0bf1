"""lenet-plot overlays several runs, each from its metrics and report files, with a legend entry per run and
series, writes PNG, SVG or PDF, and refuses a file it cannot place in one line."""
import json

import pytest

pytest.importorskip("matplotlib")
from workers import plot  # noqa: E402


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_files(tmp_path, name, lr, acc0):
    d = tmp_path / name
    d.mkdir()
    m = [{"event": "step", "step": s, "epoch": s // 50, "loss": 1.0 / s, "acc": acc0 + s / 1000, "lr": lr,
          "images_per_s": 900.0} for s in range(10, 110, 10)]
    m += [{"event": "epoch", "epoch": e, "step": 50 * (e + 1), "val_acc": acc0 + 0.01 * e, "val_loss": 0.1,
           "test_acc": acc0 + 0.011 * e, "test_loss": 0.09, "lr": lr} for e in range(2)]
    r = [{"step": s, "val_accuracy": acc0 + s / 2000, "val_loss": 0.2, "test_accuracy": acc0 + s / 1900,
          "test_loss": 0.19} for s in (30, 60, 90)]
    return write_jsonl(d / "metrics.jsonl", m), write_jsonl(d / "eval.jsonl", r)


def test_runs_are_grouped_by_file_kind_and_labelled(tmp_path):
    a_m, a_r = run_files(tmp_path, "a", 0.05, 0.90)
    b_m, _ = run_files(tmp_path, "b", 0.1, 0.95)
    runs = plot.group_runs([a_m, a_r, b_m], [], print)
    assert [(r.label, len(r.metrics), len(r.report)) for r in runs] == [("a", 12, 3), ("b", 12, 0)]
    runs = plot.group_runs([a_r], ["alone"], print)                  # a report without metrics is a run
    assert [(r.label, len(r.metrics), len(r.report)) for r in runs] == [("alone", 0, 3)]
    with pytest.raises(ValueError, match="2 --label for 1 run"):
        plot.group_runs([a_m, a_r], ["x", "y"], print)


def test_two_runs_overlaid_with_every_series_in_the_legend(tmp_path, monkeypatch):
    import matplotlib.figure
    a_m, a_r = run_files(tmp_path, "a", 0.05, 0.90)
    b_m, b_r = run_files(tmp_path, "b", 0.1, 0.95)
    seen = {}
    real = matplotlib.figure.Figure.savefig

    def keep_labels(fig, *a, **k):                  # read the legends of the figure actually written
        seen["labels"] = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
        seen["ylim"] = fig.axes[1].get_ylim()
        return real(fig, *a, **k)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep_labels)
    out = tmp_path / "cmp.svg"
    assert plot.main([str(a_m), str(a_r), str(b_m), str(b_r), "--label", "lr 0.05", "--label", "lr 0.1",
                      "-o", str(out)]) == 0
    for run in ("lr 0.05", "lr 0.1"):
        for series in ("train", "val (epoch)", "test (epoch)", "val (evaluator)", "test (evaluator)"):
            assert f"{run}: {series}" in seen["labels"]
    assert "lr 0.1" in seen["labels"]                                        # the learning-rate panel
    lo, hi = seen["ylim"]
    assert 0.85 < lo < 0.95 and hi <= 1.0                                    # zoomed to the data, not 0-1
    assert out.read_text().lstrip().startswith("<?xml") and "<svg" in out.read_text()


def test_pdf_output(tmp_path):
    a_m, a_r = run_files(tmp_path, "a", 0.05, 0.90)
    out = tmp_path / "c.pdf"
    assert plot.main([str(a_m), str(a_r), "-o", str(out)]) == 0
    assert out.read_bytes().startswith(b"%PDF")


def test_a_file_of_neither_kind_is_refused_in_one_line(tmp_path, capsys):
    a_m, _ = run_files(tmp_path, "a", 0.05, 0.90)
    other = write_jsonl(tmp_path / "other.jsonl", [{"hello": 1}])
    assert plot.main([str(a_m), str(other), "-o", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neither a --metrics file" in err[0] and str(other) in err[0]
    assert not (tmp_path / "x.png").exists()
