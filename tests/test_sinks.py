"""The trainer's outputs are sinks: the loop calls on_start / on_step / on_epoch / on_end / close on each,
with figures that add up to the epoch record; the fan-out closes every sink even when one fails."""
import json

import numpy as np
import pytest

from lenet_dist.run.sinks import MetricsSink, RunInfo, Sink, Sinks, StepState
from workers import trainer as trainer_mod


class Recorder(Sink):
    def __init__(self):
        self.calls, self.steps, self.epochs = [], [], []

    def on_start(self, info):
        self.calls.append("start")
        self.info = info

    def on_step(self, s):
        self.steps.append((s.step, s.epoch, s.batch, s.loss_sum, s.correct, s.lr, s.step_seconds,
                           np.array(s.compute_seconds), s.epoch_seen))

    def on_epoch(self, record):
        self.calls.append("epoch")
        self.epochs.append(record)

    def on_end(self, summary):
        self.calls.append("end")
        self.summary = summary

    def close(self):
        self.calls.append("close")


def test_the_loop_feeds_every_sink_with_figures_that_add_up(tmp_path, monkeypatch, capsys):
    rec = Recorder()
    real = trainer_mod._sinks
    monkeypatch.setattr(trainer_mod, "_sinks", lambda *a: Sinks([real(*a), rec]))
    metrics = tmp_path / "m.jsonl"
    code = trainer_mod.main(["--subset", "--train-subset", "300", "--val-size", "0",
                             "--batch-size", "64", "--epochs", "2",
                             "--no-progress", "--schedule", "cosine", "--metrics", str(metrics)])
    assert code == 0
    assert rec.calls == ["start", "epoch", "epoch", "end", "close"]
    assert rec.info.total_steps == 10 and rec.info.start_step == 0 and rec.info.steps_per_epoch == 5
    assert [s[0] for s in rec.steps] == list(range(1, 11))
    assert [s[1] for s in rec.steps] == [0] * 5 + [1] * 5
    assert sum(s[2] for s in rec.steps[:5]) == 300 and rec.steps[4][8] == 300
    lrs = [s[5] for s in rec.steps]
    assert lrs[0] > lrs[-1] > 0                                        # the cosine schedule, step by step
    assert all(s[6] > 0 and s[7].shape == (1,) and s[7][0] > 0 for s in rec.steps)
    for e, first in zip(rec.epochs, (0, 5)):
        steps = rec.steps[first:first + 5]
        assert e["train_loss"] == pytest.approx(sum(s[3] for s in steps) / 300, rel=1e-12)
        assert e["train_acc"] == sum(s[4] for s in steps) / 300
    assert rec.summary["step"] == 10
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r for r in rows if r["event"] == "epoch"] == rec.epochs           # the JSONL sink saw the same
    out = capsys.readouterr().out.splitlines()
    assert len([line for line in out if line.startswith("epoch ")]) == 2       # and the progress sink printed


class Failing(Sink):
    def close(self):
        raise OSError("disk gone")


def test_fan_out_closes_every_sink_then_reports_the_failure():
    a, b = Recorder(), Recorder()
    sinks = Sinks([a, Failing(), b])
    sinks.on_start(RunInfo(total_steps=1, start_step=0, steps_per_epoch=1, epochs=1, ranks=1, batch_size=1))
    sinks.on_step(StepState())
    with pytest.raises(OSError, match="disk gone"):
        sinks.close()
    assert a.calls[-1] == "close" and b.calls[-1] == "close" and len(a.steps) == len(b.steps) == 1


def test_metrics_sink_appends_flushed_lines(tmp_path):
    path = tmp_path / "sub" / "m.jsonl"
    s = MetricsSink(path)
    s.on_epoch({"event": "epoch", "epoch": 1})
    assert json.loads(path.read_text()) == {"event": "epoch", "epoch": 1}   # flushed before close
    s.close()
    s = MetricsSink(path)
    s.on_epoch({"event": "epoch", "epoch": 2})
    s.close()
    assert len(path.read_text().splitlines()) == 2
