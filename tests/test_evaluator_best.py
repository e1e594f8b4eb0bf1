"""One rule for "best" across the evaluator's --best-dir, the results the trainer hears, the dashboard's
summary, /metrics and predict?model=best: two real trained checkpoints that rank one way on their validation
split and the other way on the test set; every one of them must name the validation winner."""
import json
import signal

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")

from lenet_dist.checkpoints import format as checkpoint  # noqa: E402
from lenet_dist.comm import LocalComm  # noqa: E402
from lenet_dist.config import TrainConfig  # noqa: E402
from lenet_dist.data import load_subset  # noqa: E402
from lenet_dist.data.identity import data_record  # noqa: E402
from lenet_dist.data.split import rebuild_validation  # noqa: E402
from lenet_dist.parallel.step import DataParallelTrainer  # noqa: E402
from lenet_dist.run.outcome import RunFacts, summary, Tally  # noqa: E402
from lenet_dist.transport import TrainerLink  # noqa: E402

from tests.fakes import make_ckpt  # noqa: E402
from tests.test_browser import until  # noqa: E402
from tests.test_e2e import finish, free_port  # noqa: E402
from tests.test_evaluator_live import evaluator  # noqa: E402

VAL = 200


def disagreeing_pair():
    """(split record, params of A, params of B): A is better on validation, B on the test set."""
    data = load_subset()
    split = data_record(data.identity(), len(data.train_images), VAL, seed=0)
    idx = rebuild_validation(split, len(data.train_images))
    val = data.train_images[idx], data.train_labels[idx]
    models = []
    with threadpool_limits(1, user_api="blas"):
        # snapshots of one short real run near its end: accuracies close, their order on 200 and on 1,000
        # images noisy
        t = DataParallelTrainer(TrainConfig(epochs=6, batch_size=64, lr=0.05), LocalComm(), data)
        while not t.done:
            t.train_step()
            if t.step > 120 and t.step % 2 == 0:
                v, te = t.model.evaluate(*val)[1], t.model.evaluate(data.test_images, data.test_labels)[1]
                models.append((v, te, {k: a.copy() for k, a in t.model.named_params().items()}))
    for a in models:
        for b in models:
            if a[0] > b[0] and a[1] < b[1]:
                return split, a[2], b[2]
    pytest.fail(f"no pair ranks differently on validation and test: {[(m[0], m[1]) for m in models]}")


def test_every_best_is_the_validation_winner(tmp_path):
    split, params_a, params_b = disagreeing_pair()
    port = free_port()
    with TrainerLink("tcp://127.0.0.1:*") as link:
        ev = evaluator("--connect", link.endpoint, "--http", f"127.0.0.1:{port}", "--best-dir", tmp_path / "best",
                       "--report", tmp_path / "r.jsonl")
        try:
            # A (better on validation) first, B (better on test) at the higher step: neither "highest step"
            # nor "best test accuracy" picks A
            link.publish(10, 0, make_ckpt(10, params=params_a, data=split))
            until("A evaluated", lambda: (tmp_path / "r.jsonl").exists() and (tmp_path / "r.jsonl").read_text())
            link.publish(20, 1, make_ckpt(20, epoch=1, params=params_b, data=split))
            until("B evaluated", lambda: len((tmp_path / "r.jsonl").read_text().splitlines()) == 2, timeout=60)
            rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
            assert rows[0]["val_accuracy"] > rows[1]["val_accuracy"] and rows[0]["accuracy"] < rows[1]["accuracy"]
            until("the trainer heard both", lambda: link.latest_result() and link.latest_result()["step"] == 20)
            assert link.best_result()["step"] == 10                                     # served.Results
            tally = Tally()                    # the trainer's summary: it saw only the newest at an epoch end
            tally.add_evaluator(link.latest_result())
            end = summary(RunFacts(), reason="finished", step=20, total_steps=20, epoch=2, epochs=2, ranks=1,
                          wall_seconds=1.0, tally=tally, link=link)
            assert end["evaluator"]["step"] == 20 and end["evaluator"]["best_step"] == 10   # the summary
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
                s = c.get("/api/state").json()
                assert s["evaluations"] == 2 and s["best"]["step"] == 10              # the dashboard
                assert s["best_accuracy"] == rows[0]["accuracy"]
                metrics = c.get("/metrics").text
                assert "lenet_eval_best_step 10.0" in metrics
                assert f"lenet_eval_best_val_accuracy {float(rows[0]['val_accuracy'])!r}" in metrics
                pixels = np.zeros((28, 28))
                pixels[5:23, 12:16] = 1.0
                got = c.post("/api/predict?model=best", json={"pixels": pixels.ravel().tolist()}).json()
                assert got["step"] == 10                                              # predict?model=best
                assert c.post("/api/predict?model=newest", json={"pixels": pixels.ravel().tolist()}).json()["step"] == 20
        finally:
            ev.send_signal(signal.SIGTERM)
            rc, _, err = finish(ev, 30)
    assert rc == 0, err
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert best["step"] == 10                                                         # --best-dir
    assert checkpoint.from_bytes((tmp_path / "best" / "best.npz").read_bytes()).step == 10
