"""lenet_dist.transport / wire / watch over real sockets on 127.0.0.1 with ephemeral ports."""
import os
import threading
import time

import pytest
import zmq

from tests.fakes import OVERSIZE, FakeTrainer, bad_replies, good_reply, make_ckpt
from lenet_dist.checkpoints import format as checkpoint
from lenet_dist.checkpoints.format import CheckpointError
from lenet_dist.files import atomic_write
from lenet_dist.transport import wire
from lenet_dist.transport import (CheckpointClient, ResultsPublisher, TrainerLink, TransportError,
                                  generate_keys)
from lenet_dist.transport.watch import DirectoryWatcher

from tests.links import ANY, link  # noqa: F401 (fixture)


@pytest.fixture
def client_of():
    made = []

    def make(endpoint, **kw):
        made.append(CheckpointClient(endpoint, **kw))
        return made[-1]
    yield make
    for c in made:
        c.close()


def test_round_trip_long_poll_and_results(link, client_of):
    c = client_of(link.endpoint)
    assert c.fetch_newer(-1, 200) is None                   # nothing published yet: an empty answer
    assert c.status.startswith("connected")
    data = make_ckpt(5)
    link.publish(5, 0, data)
    h, body = c.fetch_newer(-1, 1000)
    assert (h["step"], h["epoch"], h["final"], h["size"], h["sha256"]) == (5, 0, False, len(data), wire.sha256(data))
    assert body == data and checkpoint.from_bytes(body).step == 5
    assert c.fetch_newer(5, 100) is None                    # nothing newer than what we have

    later = threading.Timer(0.3, lambda: link.publish(9, 1, make_ckpt(9, final=True), final=True))
    later.start()
    t0 = time.monotonic()
    h, _ = c.fetch_newer(5, 5000)                           # parked, answered as soon as 9 appears
    assert h["step"] == 9 and h["final"] and 0.25 < time.monotonic() - t0 < 1.0
    link.progress(12)
    assert c.trainer_step_now() == 12

    c.send_result({"step": 9, "epoch": 1, "accuracy": 0.5, "loss": 1.25, "lag_steps": 3, "sha256": h["sha256"]})
    assert link.wait_final(9, 5)["accuracy"] == 0.5
    assert [r["step"] for r in link.poll_results()] == [9] and link.poll_results() == []
    assert link.latest_result()["lag_steps"] == 3


def test_newest_only_and_final_of_same_step(link, client_of):
    c = client_of(link.endpoint)
    for step in range(1, 11):
        link.publish(step, 0, make_ckpt(step))
    assert c.fetch_newer(-1, 500)[0]["step"] == 10           # the stale ones are never sent
    link.publish(10, 0, make_ckpt(10, final=True), final=True)  # the same state, now flagged final
    h, _ = c.fetch_newer(10, 500)
    assert h["step"] == 10 and h["final"]
    assert c.fetch_newer(10, 100, seen_final=True) is None


def test_publish_never_blocks(link):
    data = make_ckpt(1)
    # a client that keeps asking and never reads its replies
    ctx = zmq.Context()
    greedy = ctx.socket(zmq.DEALER)
    greedy.linger = 0
    greedy.connect(link.endpoint)
    req = {"proto": wire.PROTO, "version": 1, "op": "fetch", "newer_than": -1, "wait_ms": 0, "max_bytes": 1 << 30}
    worst = 0.0
    t0 = time.perf_counter()
    for step in range(1, 1001):
        greedy.send(wire.encode(dict(req, id=step)), zmq.NOBLOCK)
        t = time.perf_counter()
        link.publish(step, 0, data)
        worst = max(worst, time.perf_counter() - t)
    total = time.perf_counter() - t0
    ctx.destroy(0)
    # A publish that waited for the network would wait for ever (the client never reads): bounds far above
    # a busy machine's scheduling noise tell the two apart without timing the call.
    assert worst < 1.0 and total < 20.0, (worst, total)
    with TrainerLink(ANY) as alone:                         # and with nobody at all
        t = time.perf_counter()
        for step in range(1000):
            alone.publish(step, 0, data)
        assert time.perf_counter() - t < 10.0


@pytest.mark.parametrize("name", list(bad_replies()))
def test_client_rejects_bad_input_and_keeps_working(name, client_of):
    make, reason = bad_replies()[name]
    good = make_ckpt(500)
    fake = FakeTrainer([make, lambda rid: good_reply(rid, 500, good)])
    try:
        c = client_of(fake.endpoint)
        if name == "oversized":                             # ZMQ_MAXMSGSIZE drops it on the floor
            assert c.fetch_newer(-1, 1000) is None and reason in c.status
        elif name.startswith("npz"):                        # the transport is fine, the arrays are not
            h, body = c.fetch_newer(-1, 1000)
            with pytest.raises(CheckpointError, match=reason.replace("(", r"\(").replace(")", r"\)")) as e:
                checkpoint.from_bytes(body, name=f"step {h['step']}")
            assert "\n" not in str(e.value)
        else:
            with pytest.raises(wire.BadMessage, match=reason) as e:
                c.fetch_newer(-1, 1000)
            assert "\n" not in str(e.value)
        h, body = c.fetch_newer(-1, 2000)                   # and the next, good message gets through
        assert h["step"] == 500 and body == good
    finally:
        fake.close()


def test_honest_trainer_respects_client_limit(link, client_of):
    link.publish(3, 0, make_ckpt(3))
    c = client_of(link.endpoint, max_bytes=100_000)
    with pytest.raises(wire.BadMessage, match="more than the 100000") as e:
        c.fetch_newer(-1, 500)
    assert e.value.step == 3


def test_trainer_survives_bad_requests(link, client_of):
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.linger = 0
    raw.connect(link.endpoint)
    req = {"proto": wire.PROTO, "version": 1, "op": "fetch", "id": 1}
    reasons = []
    for frames in ([os.urandom(64)], [b""], [b"a", b"b"], [wire.encode(dict(req, version=wire.VERSION + 1))],
                   [wire.encode(dict(req, op="launch"))], [wire.encode(dict(req, newer_than="x"))]):
        raw.send_multipart(frames)
        assert raw.poll(2000), frames                       # each gets an error reply saying why
        reply = wire.decode_object(raw.recv_multipart()[0], "reply")
        assert reply["kind"] == "error"
        reasons.append(reply["reason"])
    raw.send(wire.encode(dict(req, op="result", result={"step": -1})))
    assert not raw.poll(300)                                # results get no reply; a bad one is dropped
    ctx.destroy(0)
    assert "not JSON" in reasons[0] and "empty" in reasons[1] and "2 frames" in reasons[2]
    assert "newer than" in reasons[3] and "launch" in reasons[4] and "newer_than 'x'" in reasons[5]
    assert any("bad request" in line for line in link.lines)
    link.publish(1, 0, make_ckpt(1))
    assert client_of(link.endpoint).fetch_newer(-1, 500)[0]["step"] == 1
    assert link.poll_results() == []


def test_trainer_restart_and_client_restart(client_of):
    first = TrainerLink(ANY)
    endpoint = first.endpoint
    first.publish(3, 0, make_ckpt(3))
    c = client_of(endpoint, grace_ms=200)
    assert c.fetch_newer(-1, 500)[0]["step"] == 3
    first.close()
    assert c.fetch_newer(3, 300) is None and "trainer" in c.status
    with TrainerLink(endpoint) as second:                   # same port, a new process would do the same
        second.publish(4, 0, make_ckpt(4))
        got = None
        for _ in range(10):
            got = c.fetch_newer(3, 500)
            if got:
                break
        assert got[0]["step"] == 4 and c.status.endswith("(it restarted)")
        c.close()                                           # the evaluator restarts: no trainer restart needed
        assert client_of(endpoint).fetch_newer(3, 500)[0]["step"] == 4


def test_evaluator_first_then_trainer(client_of):
    probe = TrainerLink(ANY)
    endpoint = probe.endpoint
    probe.close()
    c = client_of(endpoint, grace_ms=100)
    assert c.fetch_newer(-1, 200) is None and c.status.startswith("no reply")
    with TrainerLink(endpoint) as ln:
        ln.publish(1, 0, make_ckpt(1))
        assert any(c.fetch_newer(-1, 500) for _ in range(5))


@pytest.fixture
def keys(tmp_path):
    k = {}
    for name in ("trainer", "evaluator", "stranger"):
        k[name] = generate_keys(tmp_path, name)
    auth = tmp_path / "authorized"
    auth.mkdir()
    (auth / "evaluator.key").write_bytes(k["evaluator"][0].read_bytes())
    assert oct(k["evaluator"][1].stat().st_mode & 0o777) == "0o600"
    return k, auth


def test_curve_right_key_receives_wrong_key_gets_nothing(keys, client_of):
    k, auth = keys
    with TrainerLink(ANY, secret_key=k["trainer"][1], authorized=auth) as ln:
        ln.publish(7, 0, make_ckpt(7))
        good = client_of(ln.endpoint, secret_key=k["evaluator"][1], public_key=k["evaluator"][0],
                         server_key=k["trainer"][0])
        assert good.fetch_newer(-1, 1000)[0]["step"] == 7
        stranger = client_of(ln.endpoint, secret_key=k["stranger"][1], server_key=k["trainer"][0], grace_ms=200)
        assert stranger.fetch_newer(-1, 500) is None and "refused our CurveZMQ key" in stranger.status
        wrong_server = client_of(ln.endpoint, secret_key=k["evaluator"][1], server_key=k["stranger"][0],
                                 grace_ms=200)
        assert wrong_server.fetch_newer(-1, 500) is None
        plain = client_of(ln.endpoint, grace_ms=200)
        assert plain.fetch_newer(-1, 500) is None
    with pytest.raises(TransportError, match="not the public half"):
        CheckpointClient("tcp://127.0.0.1:1", secret_key=k["evaluator"][1], public_key=k["stranger"][0],
                         server_key=k["trainer"][0])
    with pytest.raises(TransportError, match="no public keys"):
        TrainerLink(ANY, secret_key=k["trainer"][1], authorized=auth / "missing")
    with pytest.raises(FileExistsError):
        generate_keys(k["trainer"][0].parent, "trainer")


def test_results_pub_sub_and_no_duplicates(client_of):
    pub = ResultsPublisher(ANY)
    try:
        with TrainerLink(ANY, results=pub.endpoint) as ln:
            ln.publish(4, 0, make_ckpt(4))
            h, _ = client_of(ln.endpoint).fetch_newer(-1, 2000)   # a result counts for a served checkpoint
            result = {"step": 4, "accuracy": 0.75, "loss": 0.5, "sha256": h["sha256"]}
            got = []
            for _ in range(50):                             # PUB/SUB drops what is sent before it joins
                pub.publish(result)
                got += ln.poll_results()
                if got:
                    break
                time.sleep(0.05)
            assert got == [result]
            client_of(ln.endpoint).send_result(result)     # the same result by the other channel
            pub.publish(dict(result, accuracy=2.0))         # not a fraction: dropped
            time.sleep(0.3)
            assert ln.poll_results() == [] and ln.latest_result() == result
    finally:
        pub.close()


def test_bind_errors_are_one_line(link):
    with pytest.raises(TransportError, match="cannot bind"):
        TrainerLink(link.endpoint)
    with pytest.raises(TransportError, match="cannot connect"):
        CheckpointClient("nonsense://x")


def test_directory_watcher(tmp_path):
    w = DirectoryWatcher(tmp_path / "ckpt")
    assert w.fetch_newer(-1, 50) is None and "does not exist" in w.status
    d = tmp_path / "ckpt"
    d.mkdir()
    for step in (10, 20):
        atomic_write(d / checkpoint.file_name(step), make_ckpt(step))
    (d / "best.npz").write_bytes(b"not ours")               # ignored: not a trainer checkpoint name
    h, data = w.fetch_newer(-1, 50)
    assert h["step"] == 20 and h["sha256"] == wire.sha256(data) and w.trainer_step_now() == 20
    assert w.fetch_newer(20, 50) is None
    time.sleep(0.01)
    atomic_write(d / checkpoint.file_name(20), make_ckpt(20, final=True))   # rewritten: served again
    h, data = w.fetch_newer(20, 50)
    assert checkpoint.from_bytes(data).meta["final"]
    big = d / checkpoint.file_name(30)
    with open(big, "wb") as f:
        f.truncate(OVERSIZE)
    said = []
    w = DirectoryWatcher(d, warn=said.append)
    assert w.fetch_newer(20, 50) is None and w.fetch_newer(20, 50) is None     # skipped: 20 stays the newest
    assert w.trainer_step_now() == 20 and len(said) == 1 and "more than" in said[0] and big.name in said[0]
