"""Validation that steers real runs (issue 25): early stop with and without a lenet-evaluator process, the
plateau schedule resumed bit for bit after a SIGTERM stop (on another rank count), and a run that cannot
learn saying so. Real `mpirun -n 2`, real ZeroMQ on 127.0.0.1, the shipped subset."""
import json

import numpy as np

from lenet_dist.checkpoints import resume
from lenet_dist.run import exitcodes

from tests.mpiutil import final_params, launch
from tests.test_e2e import finish, free_port, start_evaluator, wait_serving

# 2,000 subset examples, 166 held out for validation: 1,834 / batch 50 = 37 steps an epoch
SMALL = ["--subset", "--batch-size", "50", "--no-progress", "--log-level", "INFO", "--stall-timeout", "30"]
SPE = 37


def rows(path, event=None):
    out = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in out if event is None or r.get("event") == event]


def test_early_stop_from_the_trainers_own_validation_under_mpirun(tmp_path):
    d = tmp_path / "ck"
    # no improvement can beat the first epoch's by 0.5: the second evaluation ends the run
    p = launch(2, [*SMALL, "--epochs", "6", "--early-stop", "1", "--min-delta", "0.5", "--checkpoint-dir", d,
                   "--metrics", tmp_path / "m.jsonl"])
    assert "watched for the trainer's own validation at each epoch's end" in p.stderr
    why = f"early stop: no improvement in val_accuracy for 1 evaluation since step {SPE}"
    end = rows(tmp_path / "m.jsonl", "end")
    assert len(end) == 1 and end[0]["outcome"] == why and end[0]["step"] == 2 * SPE
    assert len(rows(tmp_path / "m.jsonl", "epoch")) == 2
    assert p.stdout.count(why) == 1 and p.stderr.count(why) == 1          # the summary and rank 0's log line
    params, meta = final_params(d)
    assert meta["step"] == 2 * SPE and meta["final"] and meta["steering"]["ended"] == why
    best = json.loads((d / "best.json").read_text())
    assert best["step"] in (SPE, 2 * SPE) and (d / "best.npz").exists()   # selection's choice of the two
    # resumed (a requeue), the run has ended: nothing to train, exit 0
    p = launch(2, [*SMALL, "--epochs", "6", "--early-stop", "1", "--min-delta", "0.5", "--checkpoint-dir", d,
                   "--resume"])
    assert f"has already ended at step {2 * SPE}: {why}" in p.stdout
    assert np.array_equal(final_params(d)[0], params)


def test_early_stop_from_the_evaluators_verdicts(tmp_path):
    endpoint, report, d = f"tcp://127.0.0.1:{free_port()}", tmp_path / "eval.jsonl", tmp_path / "ck"
    ev = start_evaluator(endpoint, report)
    wait_serving(ev)
    p = launch(2, [*SMALL, "--epochs", "20", "--early-stop", "2", "--min-delta", "0.5", "--checkpoint-every", "10",
                   "--publish", endpoint, "--linger", "20", "--checkpoint-dir", d, "--metrics", tmp_path / "m.jsonl"],
               timeout=240)
    assert "watched for the evaluator's verdicts (--publish)" in p.stderr
    end = rows(tmp_path / "m.jsonl", "end")[0]
    assert end["outcome"].startswith("early stop: no improvement in val_accuracy for 2 evaluations since step ")
    assert end["step"] < 20 * SPE
    verdicts = rows(report)
    since = int(end["outcome"].rsplit(" ", 1)[1])
    judged = [v["step"] for v in verdicts if v["step"] > since and v["step"] < end["step"]]
    assert since in [v["step"] for v in verdicts] and len(judged) >= 2      # the verdicts it stopped on
    _, meta = final_params(d)
    assert meta["step"] == end["step"] and meta["final"] and meta["steering"]["ended"] == end["outcome"]
    code, _, err = finish(ev, timeout=60)
    assert code == 0, err                    # the final checkpoint went out and was judged: the evaluator ends
    assert rows(report)[-1]["step"] == end["step"] and rows(report)[-1]["final"]


PLATEAU = [*SMALL, "--log-level", "WARNING", "--epochs", "4", "--schedule", "plateau", "--plateau-patience", "1",
           "--plateau-factor", "0.5", "--min-delta", "1", "--deterministic", "--batch-size", "48",
           "--micro-batch", "8", "--lr", "0.05"]  # 39 steps an epoch; a drop after every evaluation but the first
                                                 # (no accuracy beats another by more than 1, whatever the recipe)


def test_plateau_drops_then_a_stop_and_resume_on_another_rank_count_is_bit_identical(tmp_path):
    spe = 39
    full, part = tmp_path / "full", tmp_path / "part"
    launch(0, [*PLATEAU, "--checkpoint-dir", full, "--metrics", tmp_path / "full.jsonl"])
    drops = rows(tmp_path / "full.jsonl", "lr")
    assert [(r["step"], r["scale"]) for r in drops][:2] == [(2 * spe, 0.5), (3 * spe, 0.25)]
    epochs = rows(tmp_path / "full.jsonl", "epoch")
    assert epochs[2]["lr"] == 0.05 * 0.5 and epochs[3]["lr"] == 0.05 * 0.25      # the curve shows each drop
    # two ranks, stopped by SIGTERM in the third epoch (after the first drop), resumed in one process
    p = launch(2, [*PLATEAU, "--checkpoint-dir", part, "--metrics", tmp_path / "part.jsonl",
                   "--fault", f"1:{2 * spe + 10}:term"], check=False)
    assert exitcodes.stop_signal(p.returncode) == 15, p.stderr
    _, meta = final_params(part)
    assert 2 * spe < meta["step"] < 3 * spe and meta["steering"]["scale"] == 0.5
    launch(0, [*PLATEAU, "--checkpoint-dir", part, "--metrics", tmp_path / "part.jsonl", "--resume"])
    a, ma = final_params(full)
    b, mb = final_params(part)
    assert ma["step"] == mb["step"] == 4 * spe and mb["ranks"] == 1
    assert np.array_equal(a, b)
    # the decisions' state too (the training loss sums over ranks: its last bits may follow the rank count)
    first = ma["steering"].pop("first_loss"), mb["steering"].pop("first_loss")
    assert ma["steering"] == mb["steering"] and abs(first[0] - first[1]) <= 1e-12 * first[0]
    train_loss = [[r["train_loss"] for r in rows(tmp_path / f"{n}.jsonl", "epoch")] for n in ("full", "part")]
    assert np.allclose(train_loss[0], train_loss[1], rtol=1e-12, atol=0)     # the resumed epoch's too
    assert [r["step"] for r in rows(tmp_path / "part.jsonl", "lr")] == [r["step"] for r in drops]


def test_batch_8_at_the_default_rate_stops_saying_so_or_learns_with_linear_scaling(tmp_path):
    small8 = ["--subset", "--epochs", "2", "--batch-size", "8", "--no-progress", "--log-level", "WARNING"]
    p = launch(0, [*small8, "--metrics", tmp_path / "d.jsonl"], cwd=tmp_path)     # today's recipe learns
    assert rows(tmp_path / "d.jsonl", "epoch")[-1]["test_acc"] > 0.6          # measured 0.825
    assert "not learning" not in p.stdout + p.stderr
    old = ["--augment-shift", "0", "--weight-decay", "5e-4", "--lr", "0.05"]    # the recipe before 0112669 does not
    p = launch(0, [*small8, *old, "--checkpoint-dir", tmp_path / "ck"], check=False)
    assert p.returncode == exitcodes.NOT_LEARNING, p.stderr
    line = "after 2 epochs (chance is 10%): the run is not learning; try --lr 0.00625, or --lr-scaling linear"
    errors = [s for s in p.stderr.splitlines() if "ERROR" in s]
    assert len(errors) == 1 and line in errors[0] and "validation accuracy" in errors[0], p.stderr
    assert resume.newest_usable(tmp_path / "ck", warn=lambda m: None)[1].meta["final"]
    p = launch(0, [*small8, "--lr-scaling", "linear", "--metrics", tmp_path / "m.jsonl"], cwd=tmp_path)
    assert rows(tmp_path / "m.jsonl", "epoch")[-1]["test_acc"] > 0.8          # measured 0.916
    assert "not learning" not in p.stdout + p.stderr


def test_lenet_launch_does_not_restart_a_run_that_does_not_learn(tmp_path):
    from tests.test_launch import Launch
    job = Launch(tmp_path, ["-n", 2], ["--subset", "--epochs", "2", "--batch-size", "8", "--lr", "0.5",
                                       "--no-progress", "--log-level", "WARNING"])    # 9.6% after 2 epochs
    assert job.finish(timeout=240) != 0, job.text
    assert job.rows("restart") == [], job.text
    end = job.rows("end")
    assert end[0]["outcome"].endswith("the run is not learning; try --lr 0.0625, or --lr-scaling linear")
    assert len(end) == 1                                                      # the trainer's own
    assert (f"mpirun exited with code {exitcodes.NOT_LEARNING}: not restarting: not learning will recur: exit "
            f"status {exitcodes.NOT_LEARNING} (the same configuration does not learn again") in job.text, job.text
