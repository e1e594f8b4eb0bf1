"""The steering decisions alone (lenet_dist/run/steering.py): no MPI, no files, figures fed by hand."""
import json

import pytest

from lenet_dist.config import TrainConfig
from lenet_dist.run import exitcodes
from lenet_dist.run.restart_policy import classify
from lenet_dist.run.steering import lr_factor, MIN_STEPS, Steering


def ev(acc, loss=1.0, train_loss=1.0, train_acc=0.5):
    return {"val_acc": acc, "val_loss": loss, "train_loss": train_loss, "train_acc": train_acc}


def feed(s, accs, step0=MIN_STEPS, every=100, **kw):
    out = []
    for i, a in enumerate(accs):
        out.append(s.after_validation(ev(a, **kw), step0 + i * every, i + 1, 0.05))
    return out


def test_early_stop_after_n_evaluations_without_improvement():
    s = Steering(TrainConfig(early_stop=2, learning_check=False))
    d = feed(s, [0.5, 0.7, 0.69, 0.7])
    assert [x.end for x in d] == [None, None, None, "early_stop"]
    assert d[-1].why == "early stop: no improvement in val_accuracy for 2 evaluations since step 200"
    assert s.ended == d[-1].why


def test_min_delta_and_the_loss_metric():
    s = Steering(TrainConfig(early_stop=1, early_stop_metric="val_loss", min_delta=0.1, learning_check=False))
    d = [s.after_validation(ev(0.9, loss=v), 100 * (i + 1), i + 1, 0.05) for i, v in enumerate([1.0, 0.8, 0.75])]
    assert [x.end for x in d] == [None, None, "early_stop"]          # 0.75 beats 0.8 by less than 0.1
    assert "val_loss for 1 evaluation since step 200" in d[-1].why


def test_no_early_stop_at_the_last_evaluation_or_without_validation():
    s = Steering(TrainConfig(early_stop=1, learning_check=False))
    s.after_validation(ev(0.9), 100, 1, 0.05)
    assert s.after_validation(ev(0.5), 200, 2, 0.05, last=True).end is None
    s = Steering(TrainConfig(early_stop=1, learning_check=False))
    assert [s.after_validation({"train_loss": 1.0}, 100 * i, i, 0.05).end for i in (1, 2, 3)] == [None] * 3


def test_plateau_drops_by_the_factor_down_to_the_floor():
    cfg = TrainConfig(schedule="plateau", plateau_patience=1, plateau_factor=0.5, min_lr=0.01, lr=0.05,
                      learning_check=False)
    s = Steering(cfg)
    d = feed(s, [0.5, 0.5, 0.5, 0.6, 0.6, 0.6, 0.6])
    scales = [x.lr_row and x.lr_row["scale"] for x in d]
    assert scales == [None, 0.5, 0.25, None, pytest.approx(0.2), None, None]     # the floor: 0.01 / 0.05
    assert d[1].lr_row == {"event": "lr", "step": 200, "lr": 0.025, "scale": 0.5,
                           "reason": "plateau: no improvement in val_accuracy for 1 evaluation since step 100"}
    assert s.lr_scale == pytest.approx(0.2)


def test_no_plateau_drops_with_another_schedule():
    s = Steering(TrainConfig(schedule="cosine", plateau_patience=1, learning_check=False))
    assert all(x.lr_row is None for x in feed(s, [0.5, 0.5, 0.5]))


def test_state_round_trips_through_json_and_decides_alike():
    cfg = TrainConfig(schedule="plateau", plateau_patience=2, early_stop=3, plateau_factor=0.3)
    a = Steering(cfg)
    feed(a, [0.5, 0.6, 0.6])
    b = Steering(cfg)
    b.load(json.loads(json.dumps(a.state())))
    assert b.state() == a.state()
    rest = [0.55, 0.6, 0.58, 0.59]
    da, db = feed(a, rest, step0=400), feed(b, rest, step0=400)
    assert [(x.end, x.why, x.lr_row) for x in da] == [(x.end, x.why, x.lr_row) for x in db]
    assert a.lr_scale == b.lr_scale == pytest.approx(0.09) and a.ended and a.ended == b.ended
    Steering(cfg).load(None)                # an older checkpoint: nothing decided yet


def test_evaluator_verdicts_in_step_order():
    s = Steering(TrainConfig(early_stop=2, learning_check=False), from_evaluator=True)
    assert [x.end for x in feed(s, [0.9, 0.8, 0.8, 0.8])] == [None] * 4      # its own validation does not
    assert s.after_verdict({"step": 10, "val_accuracy": 0.8}) is None
    assert s.after_verdict({"step": 20, "val_accuracy": 0.7}) is None
    assert s.after_verdict({"step": 20, "val_accuracy": 0.7}) is None        # the same verdict again
    assert s.after_verdict({"step": 15, "val_accuracy": 0.1}) is None        # an older checkpoint's
    why = s.after_verdict({"step": 30, "val_accuracy": 0.8})
    assert why == "early stop: no improvement in val_accuracy for 2 evaluations since step 10"


def test_chance_level_twice_is_not_learning_with_a_suggestion():
    s = Steering(TrainConfig(batch_size=8, lr=0.05))
    d = feed(s, [0.116, 0.113])
    assert d[0].end is None and d[1].end == "not_learning"
    assert d[1].why == ("validation accuracy 11.3% after 2 epochs (chance is 10%): the run is not learning; "
                        "try --lr 0.00625, or --lr-scaling linear")


def test_the_learning_check_waits_for_enough_steps_and_can_be_off():
    s = Steering(TrainConfig(batch_size=8))
    assert [x.end for x in feed(s, [0.1, 0.1], step0=10, every=20)] == [None, None]
    s = Steering(TrainConfig(batch_size=8, learning_check=False))
    assert [x.end for x in feed(s, [0.1, 0.1, 0.1])] == [None] * 3


def test_a_training_loss_that_does_not_fall_is_not_learning():
    s = Steering(TrainConfig(batch_size=256, val_size=0, lr=0.05))
    out = [s.after_validation({"train_loss": v, "train_acc": 0.5}, 100 * (i + 1), i + 1, 0.05)
           for i, v in enumerate([2.0, 2.1, 1.9, 2.0, 2.05, 2.2])]
    assert [x.end for x in out] == [None, None, None, None, None, "not_learning"]
    assert out[-1].why.startswith("training loss 2.2 after 6 epochs, not below its 2 of the first evaluation")
    assert out[-1].why.endswith("try --lr 0.005, or --lr-scaling linear")


def test_linear_scaling_factor():
    assert lr_factor(TrainConfig(batch_size=256, lr_scaling="linear")) == 4.0
    assert lr_factor(TrainConfig(batch_size=8, lr_scaling="linear")) == 0.125
    assert lr_factor(TrainConfig(batch_size=256)) == 1.0
    assert Steering(TrainConfig(batch_size=8, lr_scaling="linear")).lr_scale == 0.125


@pytest.mark.parametrize("field,value", [("early_stop", -1), ("early_stop_metric", "test_acc"), ("min_delta", -0.1),
                                         ("plateau_factor", 1.0), ("plateau_patience", 0), ("min_lr", -1.0),
                                         ("lr_scaling", "sqrt")])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_the_launcher_does_not_restart_a_run_that_does_not_learn():
    failure = classify(exitcodes.NOT_LEARNING, ["lenet-train: rank 0/1: error: the run is not learning\n"])
    assert not failure.retry and failure.kind == "not learning"
