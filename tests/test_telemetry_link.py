"""Step telemetry over the trainer link (real ZeroMQ on 127.0.0.1): rows after a seq, bounded replies and a
bounded log, a restarted trainer, and malformed telemetry refused with a reason."""
import pytest

from lenet_dist.transport import CheckpointClient, TrainerLink, wire


def row(step, **kw):
    return dict({"event": "step", "step": step, "loss": 0.5, "acc": 0.9, "lr": 0.1, "images_per_s": 1000.0,
                 "rank_compute_s": [0.1, 0.2]}, **kw)


@pytest.fixture()
def link():
    with TrainerLink("tcp://127.0.0.1:*") as link:
        yield link


def test_rows_after_a_seq_in_order(link):
    client = CheckpointClient(link.endpoint)
    try:
        assert client.fetch_telemetry(-1, 2000) == ([], -1)        # nothing yet
        for s in (10, 20, 30):
            link.telemetry(row(s))
        rows, seq = client.fetch_telemetry(-1, 2000)
        assert [r["step"] for r in rows] == [10, 20, 30] and seq == 2 and rows[0] == row(10)
        assert client.fetch_telemetry(seq, 2000) == ([], 2)
        link.telemetry(row(40))
        rows, seq = client.fetch_telemetry(seq, 2000)
        assert [r["step"] for r in rows] == [40] and seq == 3
    finally:
        client.close()


def test_replies_are_bounded_and_the_log_too(link):
    client = CheckpointClient(link.endpoint)
    try:
        for s in range(2500):
            link.telemetry(row(s))
        rows, seq = client.fetch_telemetry(-1, 2000)
        assert len(rows) == wire.MAX_TELEMETRY_ROWS and rows[0]["step"] == 500     # the log kept the last 2000
        got = list(rows)
        while rows:
            rows, seq = client.fetch_telemetry(seq, 2000)
            got += rows
        assert [r["step"] for r in got] == list(range(500, 2500))
    finally:
        client.close()


def test_a_restarted_trainer_answers_with_a_lower_seq():
    with TrainerLink("tcp://127.0.0.1:*") as probe:
        endpoint = probe.endpoint                           # a free port, for the two trainers in turn
    client = CheckpointClient(endpoint)
    try:
        with TrainerLink(endpoint) as first:
            for s in range(5):
                first.telemetry(row(s))
            assert client.fetch_telemetry(-1, 2000)[1] == 4
            old = client.server
        with TrainerLink(endpoint) as second:
            second.telemetry(row(0))
            got = None
            while got is None:                              # the client reconnects (lazy pirate)
                got = client.fetch_telemetry(4, 1000)
            assert got == ([], 0) and client.server != old  # seq 0 < 4: the follower starts again from -1
            assert client.fetch_telemetry(-1, 2000)[0] == [row(0)]
    finally:
        client.close()


def test_the_trainer_refuses_rows_json_cannot_carry(link):
    with pytest.raises(ValueError):
        link.telemetry(row(1, loss=float("nan")))


@pytest.mark.parametrize("header, reason", [
    ({"rows": [{"step": "x"}], "seq": 0}, "integer step"),
    ({"rows": [{"step": 1, "loss": 1e400}], "seq": 0}, "finite"),
    ({"rows": [{"step": 1, "rank_compute_s": [1.0, float("inf")]}], "seq": 0}, "finite"),
    ({"rows": "many", "seq": 0}, "list"),
    ({"rows": [{"step": 1}] * (wire.MAX_TELEMETRY_ROWS + 1), "seq": 0}, "at most"),
    ({"rows": [], "seq": "3"}, "seq"),
])
def test_malformed_telemetry_replies_are_refused(header, reason):
    import json
    h = dict({"proto": wire.PROTO, "version": 1, "kind": "telemetry", "id": 1, "server": "x", "trainer_step": 1},
             **header)
    frame = json.dumps(h).replace("Infinity", "1e400").encode()
    with pytest.raises(wire.BadMessage, match=reason):
        wire.parse_reply([frame], 1 << 20)


def test_a_bad_telemetry_request_gets_an_error_reply(link):
    client = CheckpointClient(link.endpoint)
    try:
        with pytest.raises(wire.BadMessage, match="since"):
            client._ask({"op": "telemetry", "since": "soon"}, 2000)
    finally:
        client.close()
