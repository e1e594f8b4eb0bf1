"""RowStore: rows kept as compact JSON bytes give back exactly the rows put in, in order, within their bound;
and the dashboard's /api/history, spliced from those bytes, says what history() says."""
import json
import math

import numpy as np

from lenet_dist.dashboard.state import LiveState
from lenet_dist.evaluation.history import History
from lenet_dist.rowstore import RowStore


def row(step, **more):
    return {"event": "step", "step": step, "loss": 1.0 / step, **more}


def test_order_maxlen_and_last_step():
    rows = RowStore(3)
    assert len(rows) == 0 and not rows and rows.last_step is None and list(rows) == []
    rows.extend(row(s) for s in (1, 2, 3, 4, 5))
    assert len(rows) == 3 and rows.maxlen == 3 and rows.last_step == 5
    assert [r["step"] for r in rows] == [3, 4, 5] and rows[0]["step"] == 3 and rows[-1]["step"] == 5
    assert rows.json_array() == b"[" + b",".join(rows.raw()) + b"]"
    assert json.loads(rows.json_array()) == list(rows)
    rows.append({"event": "lr", "lr": 0.1})             # a row without a step
    assert rows.last_step is None and len(rows) == 3
    rows.clear()
    assert len(rows) == 0 and rows.last_step is None and rows.json_array() == b"[]"


def test_round_trip_is_exact_and_reads_are_copies():
    tricky = {"event": "step", "step": 7, "loss": 0.1 + 0.2, "tiny": 5e-324, "big": 1.7976931348623157e308,
              "neg": -0.0, "third": 1 / 3, "f32": float(np.float32(0.1)), "int": 2 ** 63 + 1, "zero": 0,
              "none": None, "flag": True, "text": "é ✓ \"q\"\n", "list": [1, 2.5, None, [3]],
              "nested": {"a": {"b": [0.30000000000000004, {"c": None}]}, "n": -12}}
    rows = RowStore(10, [tricky])
    back = rows[0]
    assert back == tricky and [type(v) for v in back.values()] == [type(v) for v in tricky.values()]
    assert all(repr(back[k]) == repr(tricky[k]) for k in tricky)       # -0.0 stays -0.0, floats bit for bit
    assert math.copysign(1, back["neg"]) == -1 and isinstance(back["int"], int) and back["int"] == 2 ** 63 + 1
    assert next(rows.raw()) == json.dumps(tricky, separators=(",", ":")).encode()      # compact
    back["nested"]["a"]["b"].append(1)                  # a read is the caller's: the store is unchanged
    tricky["loss"] = 9.0                                # and so is the row put in
    assert rows[0]["nested"]["a"]["b"] == [0.30000000000000004, {"c": None}] and rows[0]["loss"] == 0.1 + 0.2


def test_history_keeps_step_rows_once_in_order():
    h = History()
    h.add({"step": 10, "run_id": "r1", "run": "one", "val_accuracy": 0.9, "val_loss": 0.3, "final": False})
    new = h.add_rows("r1", [row(s) for s in (10, 20, 30)] + [row(20), row(40)])
    assert [r["step"] for r in new] == [10, 20, 30, 40]
    run = h.run("r1")
    assert isinstance(run.steps, RowStore) and run.steps.last_step == 40 and list(run.steps) == new


def test_api_history_bytes_say_what_history_says():
    images, labels = np.zeros((4, 28, 28), np.uint8), np.zeros(4, np.int64)
    state = LiveState(images, labels)
    assert json.loads(state.history_json()) == state.history()            # no run yet
    state.add_steps([row(s, rank_images_per_s=[1.5, 2.0], run="a") for s in (1, 2, 3)])
    state.add_steps([{"event": "lr", "step": 2, "lr": 0.01, "run": "a"}, row(9, run="b")])
    for key in (None, "a", "b"):
        h = state.history(key) if key else state.history()
        assert json.loads(state.history_json(key) if key else state.history_json()) == h
    assert [r["step"] for r in state.history("a")["steps"]] == [1, 2, 3]
