"""What a user sees: plain progress lines when stderr is not a terminal (as under mpirun), a bar that never
swallows the epoch line on a terminal, epoch lines `epoch 1/2` in percent, the end-of-run summary and end
row, the last/best entries of the checkpoint folder, and a stop by signal that says what it saved, the
exact command that resumes, and the same signal and exit status on every rank."""
import io
import json
import re
import shlex
import signal

import pytest

from lenet_dist import selection
from lenet_dist.checkpoints import folder as ckptdir, format as checkpoint
from lenet_dist.evaluation.loop import epoch_text as _epoch_text, Reminder
from lenet_dist.nn.model import LeNet5
from lenet_dist.run.outcome import Tally
from lenet_dist.run.progress import ProgressSink, summary_lines
from lenet_dist.run.sinks import RunInfo, StepState

from tests.mpiutil import launch

SMALL = ["--subset", "--train-subset", "640", "--batch-size", "64", "--seed", "3"]     # 10 steps per epoch
# (of the 640, 53 are held out for validation: 587 trained on)


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_without_a_terminal_progress_lines_epoch_lines_summary_and_pointers(tmp_path):
    ck, m = tmp_path / "ck", tmp_path / "m.jsonl"
    p = launch(0, [*SMALL, "--epochs", "2", "--progress-every", "0", "--checkpoint-dir", ck, "--keep", "1",
                   "--metrics", m])
    # stderr is a pipe: a plain line per step here (--progress-every 0), no bar, no carriage returns
    lines = re.findall(r"step (\d+)/20 \(epoch (\d)/2\): loss \d+\.\d{4}, [\d,]+ images/s, ETA \S+", p.stderr)
    assert [int(s) for s, _ in lines] == list(range(1, 21)), p.stderr
    assert [int(e) for _, e in lines] == [1] * 10 + [2] * 10
    assert "\r" not in p.stderr + p.stdout
    epochs = [r for r in rows(m) if r["event"] == "epoch"]
    out = p.stdout.splitlines()
    for r in epochs:                                     # percent on screen, fractions in the JSON
        line = next(x for x in out if x.startswith(f"epoch {r['epoch']}/2 step {r['step']}/20: lr "))
        assert f"test loss {r['test_loss']:.4f} acc {100 * r['test_acc']:.2f}% |" in line, line
        assert f"train loss {r['train_loss']:.4f} acc {100 * r['train_acc']:.2f}% |" in line, line
        assert 0 < r["test_acc"] < 1
    end = rows(m)[-1]
    assert end["event"] == "end" and end["outcome"] == "finished" and end["step"] == 20 and end["images"] == 2 * 587
    assert end["test_acc"] == epochs[-1]["test_acc"]
    chosen = selection.best_of(epochs)          # chosen on validation (ties: lower loss, then the later step)
    assert end["best_test_acc"] == chosen["test_acc"] and end["best_epoch"] == chosen["epoch"]
    i = out.index(next(x for x in out if x.startswith("finished 2 epochs (20 steps) in ")))
    summary = "\n".join(out[i:])
    assert f"test accuracy {100 * end['test_acc']:.2f}% after epoch 2" in summary, summary
    assert f"last: {ck / 'last.npz'}" in summary and f"metrics: {m}" in summary
    assert f"evaluate: lenet-evaluator --watch {ck} --once --subset" in summary
    # last.npz is the newest checkpoint; best.npz the best epoch's, still there with --keep 1
    assert checkpoint.load_file(ck / "last.npz").step == 20
    assert json.loads((ck / "last.json").read_text())["file"] == "ckpt-000000020.npz"
    best = json.loads((ck / "best.json").read_text())
    assert best["test_acc"] == end["best_test_acc"] and checkpoint.load_file(ck / "best.npz").step == best["step"]
    assert [s for s, _ in checkpoint.list_checkpoints(ck)] == [20]       # the pointers are not checkpoints


def test_no_progress_keeps_epoch_lines_and_summary(tmp_path):
    p = launch(0, [*SMALL, "--epochs", "1", "--no-progress", "--progress-every", "0"], cwd=tmp_path)
    assert "step 1/10" not in p.stderr
    assert "epoch 1/1 step 10/10" in p.stdout and "finished 1 epochs (10 steps)" in p.stdout


def test_best_pointer_outlives_pruning(tmp_path):
    m = LeNet5(seed=0)
    meta = lambda step: {"step": step, "epoch": 0, "pos": step, "config": {}, "final": False}   # noqa: E731
    first, _ = ckptdir.save(tmp_path, m.named_params(), m.params * 0, meta(1), keep=1)
    checkpoint.set_pointer(tmp_path, "best", first, {"step": 1})
    second, _ = ckptdir.save(tmp_path, m.named_params(), m.params * 0, meta(2), keep=1)
    checkpoint.set_pointer(tmp_path, "last", second, {"step": 2})
    assert not first.exists()                                            # pruned...
    assert checkpoint.load_file(tmp_path / "best.npz").step == 1         # ...and best.npz still holds it
    assert checkpoint.load_file(tmp_path / "last.npz").step == 2
    assert json.loads((tmp_path / "best.json").read_text()) == {"file": first.name, "step": 1}
    assert not list(tmp_path.glob(".*tmp"))


class Terminal(io.StringIO):
    """stdout and stderr on one terminal: what the user's screen shows is each line after its last \\r."""

    def isatty(self):
        return True

    def screen(self):
        return [line.rsplit("\r", 1)[-1].rstrip() for line in self.getvalue().split("\n")]


def test_on_a_terminal_the_epoch_line_starts_its_own_line():
    term = Terminal()
    sink = ProgressSink(out=term, err=term)
    sink.on_start(RunInfo(total_steps=20, start_step=0, steps_per_epoch=10, epochs=2, ranks=1, batch_size=64))
    s = StepState()
    s.begin_epoch(0, 0.0)
    for k in range(1, 11):
        s.add(k, 64, 100.0, 30, 0.05, None, k * 0.1)
        sink.on_step(s)
    assert "loss=1.5625" in term.getvalue()                             # the bar was drawn
    r = {"epoch": 1, "step": 10, "lr": 0.05, "train_loss": 1.5625, "train_acc": 0.47, "test_loss": 1.2,
         "test_acc": 0.6, "images_per_s": 640.0, "ranks": 1, "seconds": 1.0}
    sink.on_epoch(r)
    sink.close()
    assert any(x.startswith("epoch 1/2 step 10/20: lr 0.05 | train loss 1.5625 acc 47.00% | test loss 1.2000 "
                            "acc 60.00% |") for x in term.screen()), term.getvalue()


def test_summary_of_a_stop_without_a_checkpoint_dir_says_nothing_was_saved():
    s = {"outcome": "stopped", "signal_name": "SIGTERM", "step": 6, "total_steps": 96, "epoch": 1, "epochs": 3,
         "ranks": 1, "wall_seconds": 1.0, "images_per_s": 100.0, "published": "tcp://127.0.0.1:5555",
         "note": "nothing was saved on disk (no --checkpoint-dir), so this run cannot be resumed"}
    text = "\n".join(summary_lines(s))
    assert "stopped by SIGTERM at step 6/96 (epoch 1/3)" in text
    assert "published on tcp://127.0.0.1:5555 (step 6, in memory only)" in text and "cannot be resumed" in text
    assert "resume:" not in text


def test_sigterm_without_checkpoint_dir_says_nothing_was_saved(tmp_path):
    p = launch(0, [*SMALL, "--epochs", "2", "--no-progress", "--no-save", "--fault", "0:3:term"], check=False)
    assert p.returncode == 128 + signal.SIGTERM, p.stderr
    assert ("stopped by signal 15 at step 4 (SIGTERM); nothing saved (no --checkpoint-dir, no --publish); "
            "exit status 143") in p.stderr
    assert "checkpoint written" not in p.stderr and "cannot be resumed" in p.stdout and "resume:" not in p.stdout


def test_a_signal_on_one_rank_stops_every_rank_alike_and_the_printed_command_resumes(tmp_path):
    ck = tmp_path / "ck"
    p = launch(2, [*SMALL, "--epochs", "2", "--no-progress", "--checkpoint-dir", ck, "--fault", "1:5:term"],
               check=False)
    assert p.returncode == 143, p.stderr
    for rank in (0, 1):                  # rank 0 got no signal itself: it stops because rank 1 asked
        assert re.search(rf"rank {rank}/2 WARNING stopped by signal 15 at step 6 \(SIGTERM\); .*exit status 143",
                         p.stderr), p.stderr
    assert f"checkpoint {ck / 'ckpt-000000006.npz'} written" in p.stderr
    command = next(x for x in p.stdout.splitlines() if x.strip().startswith("resume: ")).split("resume: ", 1)[1]
    argv = shlex.split(command)
    assert argv[:4] == ["mpirun", "-n", "2", "lenet-train"] and argv[-1] == "--resume"
    q = launch(2, argv[4:])
    assert "resumed from" in q.stderr and "at step 6/20" in q.stderr
    assert "finished 2 epochs (20 steps)" in q.stdout


def test_evaluator_epochs_are_the_trainers_and_its_warning_comes_back_ever_more_slowly():
    assert _epoch_text({"epoch": 0, "pos": 10, "config": {"epochs": 5}}) == "1/5"      # inside epoch 1
    assert _epoch_text({"epoch": 1, "pos": 0, "config": {"epochs": 5}}) == "1/5"       # at its end
    assert _epoch_text({"epoch": 1, "pos": 3, "config": {"epochs": 5}}) == "2/5"
    now = [0.0]
    r = Reminder(first=10, longest=40, clock=lambda: now[0])
    due = []
    for t in range(0, 200):
        now[0] = float(t)
        if (w := r.due()) is not None:
            due.append(w)
    assert due == [10, 30, 70, 110, 150, 190]
    r.restart()
    assert r.due() is None


def help_entries(text):
    """{invocation: its help text} from argparse's --help output."""
    entries, current = {}, None
    for line in text.splitlines():
        if re.match(r"^  -", line):
            invocation, _, help_ = line.strip().partition("  ")
            current = invocation
            entries[current] = help_.strip()
        elif current and line.startswith("    "):
            entries[current] = (entries[current] + " " + line.strip()).strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize("prog", ["workers.trainer", "workers.evaluator", "workers.export"])
def test_help_gives_every_flag_a_text_and_each_default_once(prog):
    entries = help_entries(launch(0, ["--help"], module=prog).stdout)
    assert len(entries) > (1 if prog == "workers.export" else 15)
    for flag, text in entries.items():
        assert text and not text.startswith("(default"), f"{flag}: no help text"
        assert text.count("default") <= 1 and "(default: None)" not in text, (flag, text)
    if prog == "workers.trainer":
        assert "(0: all of them)" in entries["--train-subset TRAIN_SUBSET"]
        assert "train 3 epochs" in entries["--test-mode"] and "removed" in entries["--test-mode"]


def test_a_resumed_run_keeps_its_own_best_but_not_another_runs(tmp_path):
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"file": "ckpt-000000020.npz", "step": 20, "epoch": 2, "val_acc": 0.9,
                                "test_acc": 0.9, "run_id": "abc"}))
    mine, other = Tally(best, "abc"), Tally(best, "xyz")
    record = {"epoch": 3, "step": 30, "val_acc": 0.85, "test_acc": 0.95}   # better on test: that never counts
    assert not mine.add_epoch(record) and mine.best_epoch == 2           # 0.85 does not beat its 0.90
    assert other.add_epoch(record) and other.best_epoch == 3             # another run's best does not count


def test_after_start_over_the_summary_names_only_this_runs_pointers(tmp_path):
    ck = tmp_path / "ck"
    launch(0, [*SMALL, "--epochs", "1", "--no-progress", "--checkpoint-dir", ck])
    assert (ck / "best.npz").exists()
    p = launch(0, [*SMALL, "--epochs", "2", "--no-progress", "--checkpoint-dir", ck, "--start-over",
                   "--fault", "0:3:term"], check=False)
    assert p.returncode == 143, p.stderr
    assert f"last: {ck / 'last.npz'}" in p.stdout and "best:" not in p.stdout
    assert not (ck / "best.npz").exists() and list(ck.glob("superseded-*/best.npz"))   # the old run's, moved aside
    assert checkpoint.load_file(ck / "last.npz").step == 4
