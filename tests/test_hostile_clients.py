"""The checkpoint server against hostile clients, over real sockets on 127.0.0.1: odd values cannot end
its loop, a forged result does not count, a death of its thread is said at once; and the fuzz test of the
server and of the evaluator's reply parser."""
import json
import os
import subprocess
import sys
import time

import pytest
import zmq

from lenet_dist.transport import CheckpointClient, wire

from tests import fuzzgen
from tests.fakes import make_ckpt
from tests.mpiutil import MPIRUN, env, need_mpirun

from tests.links import link  # noqa: F401 (fixture)
FUZZ_MESSAGES = 10_000


@pytest.fixture
def raw(link):
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.connect(link.endpoint)
    yield s
    ctx.destroy(0)


def served(link, step=1):
    """Publish a checkpoint and fetch it as a real client does; its header (the sha256 a result names)."""
    link.publish(step, 0, make_ckpt(step))
    c = CheckpointClient(link.endpoint)
    try:
        return c.fetch_newer(step - 1, 2000)[0]
    finally:
        c.close()


def answered(sock, frames, timeout=2000):
    sock.send_multipart(frames)
    assert sock.poll(timeout), f"no reply to {frames[0][:80]!r}"
    return wire.decode_object(sock.recv_multipart()[0], "reply")


def test_non_finite_and_odd_values_are_refused_and_the_server_goes_on(link, raw):
    start = b'{"proto":"lenet-ckpt","version":1,'
    for text in (b'"op":"status","id":NaN}', b'"op":"status","id":Infinity}', b'"op":"status","id":1e999}',
                 b'"op":"status","id":' + b"9" * 5000 + b"}", b'"op":"status","id":[1,{"a":2}]}',
                 b'"op":"fetch","id":1,"newer_than":-1,"wait_ms":NaN,"max_bytes":1}',
                 b'"op":"status","id":' + b"[" * 20000 + b"]" * 20000 + b"}"):
        reply = answered(raw, [start + text])              # an id that is no id is not echoed
        assert reply["id"] is None and reply["kind"] == ("none" if b"[1," in text else "error"), text[:60]
    nan_result = start + b'"op":"result","result":{"step":1,"accuracy":0.5,"loss":1,"x":NaN}}'
    assert answered(raw, [nan_result])["kind"] == "error"  # undecodable, so refused like any request
    reply = answered(raw, [start + b'"op":"status","id":"still-here"}'])
    assert reply["kind"] == "none" and reply["id"] == "still-here"
    assert link.failed is None and link.refused == 7
    assert served(link, 3)["step"] == 3                     # a real client is served as before


def test_a_dead_server_thread_says_so_at_once_and_stops_serving(link):
    def broken(*a):
        raise RuntimeError("simulated fault in the server loop")
    link._answer = broken                                   # the loop calls it on every turn
    link.publish(1, 0, make_ckpt(1))
    deadline = time.monotonic() + 5
    while link.failed is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert link.failed and "simulated fault" in link.failed
    said = [line for line in link.lines if "stopped" in line]
    assert len(said) == 1 and "no longer served" in said[0] and link.endpoint in said[0]
    t0 = time.monotonic()
    assert link.wait_final(1, 10) is None and time.monotonic() - t0 < 1   # no pretending to wait for results


def test_a_result_counts_only_for_a_checkpoint_that_was_served(link):
    h = served(link, 5)
    c = CheckpointClient(link.endpoint)
    try:
        c.send_result({"step": 1_000_000_000, "accuracy": 1.0, "loss": None, "sha256": h["sha256"]})
        c.send_result({"step": 5, "accuracy": 1.0, "loss": None, "sha256": "a" * 64})   # not what we sent
        c.send_result({"step": 5, "accuracy": 0.25, "loss": None, "sha256": h["sha256"]})
        got = link.wait_final(5, 5)
    finally:
        c.close()
    assert got["accuracy"] == 0.25 and got["loss"] is None
    assert link.latest_result()["step"] == 5 and link.refused == 2
    assert sum("about no checkpoint this trainer served" in line for line in link.lines) == 1   # rate-limited


def test_forged_and_null_results_against_a_real_trainer(tmp_path):
    """mpirun -n 2 lenet-train --publish; a client fetches the final checkpoint, sends a forged result for
    step 1e9 and then a genuine one with a null loss: the trainer ignores the first and prints the second."""
    need_mpirun()
    from tests.test_e2e import free_port
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cmd = [MPIRUN, "-n", "2", sys.executable, "-m", "workers.trainer", "--subset", "--batch-size", "100",
           "--epochs", "2", "--train-subset", "600", "--no-progress", "--publish", endpoint, "--linger", "60",
           "--stall-timeout", "30"]
    tr = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    c = CheckpointClient(endpoint)
    try:
        step, header = -1, None
        deadline = time.monotonic() + 120
        while not (header and header["final"]) and time.monotonic() < deadline:
            got = c.fetch_newer(step, 1000)
            if got:
                header, step = got[0], got[0]["step"]
        assert header and header["final"], "the final checkpoint never came"
        c.send_result({"step": 10**9, "accuracy": 1.0, "loss": None, "sha256": header["sha256"]})
        c.send_result({"step": step, "accuracy": 0.5, "loss": None, "sha256": header["sha256"]})
        out, err = tr.communicate(timeout=60)
    finally:
        c.close()
        if tr.poll() is None:
            tr.kill()
            tr.communicate()
    assert tr.returncode == 0, err
    assert "Logging error" not in err and "Traceback" not in err
    assert f"evaluator: step {step} accuracy 50.00% loss n/a" in err
    assert "1000000000" not in out and "refused a result" in err


# ------------------------------------------------------------------------------------------------- fuzz

def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_fuzz_the_checkpoint_server(link):
    """10,000 generated requests from a few connections, huge frames from another; the loop survives,
    memory stays bounded and a real client is served at the end."""
    ctx = zmq.Context()
    socks = []
    for _ in range(4):
        s = ctx.socket(zmq.DEALER)
        s.linger, s.sndhwm = 0, 0
        s.connect(link.endpoint)
        socks.append(s)
    try:
        served(link, 1)
        rss0 = _rss_mb()
        for i, frames in enumerate(fuzzgen.messages(1, FUZZ_MESSAGES, fuzzgen.request)):
            s = socks[i % len(socks)]
            s.send_multipart(frames)
            if i % 200 == 199:                              # read the replies now and then
                for t in socks:
                    while t.poll(0):
                        t.recv_multipart()
        huge = ctx.socket(zmq.DEALER)                       # frames past ZMQ_MAXMSGSIZE end that connection
        huge.linger = 0
        huge.connect(link.endpoint)
        for n in (wire.MAX_HEADER + 1, 8 << 20):
            huge.send(b"{" + b" " * n + b"}")
        # a fresh connection (a frame over the server's ZMQ_MAXMSGSIZE ends the one it came on, and what
        # was queued on it) asks for the status: answered
        fresh = ctx.socket(zmq.DEALER)
        fresh.linger = 0
        fresh.connect(link.endpoint)
        reply = answered(fresh, [wire.encode({"proto": wire.PROTO, "version": 1, "op": "status", "id": 7})],
                         timeout=30_000)
        assert reply["kind"] == "none" and reply["id"] == 7
        deadline = time.monotonic() + 30                    # the other connections' queues drain too
        while link.requests_seen < FUZZ_MESSAGES and time.monotonic() < deadline:
            time.sleep(0.05)
        assert link.failed is None and link.dropped == 0
        assert link.requests_seen >= FUZZ_MESSAGES and link.refused > FUZZ_MESSAGES // 5
        assert _rss_mb() - rss0 < 100                       # nothing accumulates per message
        assert served(link, 2)["step"] == 2
        assert link.latest_result() is None                 # none of the generated results was about step 1
    finally:
        ctx.destroy(0)


def test_fuzz_the_evaluators_reply_parser():
    """10,000 generated replies: parse_reply returns a valid header or raises BadMessage, nothing else."""
    body = make_ckpt(9)
    good = wire.checkpoint_header(req_id=1, server="s", trainer_step=9, step=9, epoch=0,
                                  data_sha256=wire.sha256(body), size=len(body), final=False)
    accepted = 0
    for frames in fuzzgen.messages(2, FUZZ_MESSAGES, lambda rng: fuzzgen.reply(rng, good, body)):
        try:
            h, data = wire.parse_reply(frames, 1 << 20)
        except wire.BadMessage as e:
            assert "\n" not in str(e)
            continue
        accepted += 1
        json.dumps(h, allow_nan=False)                      # whatever passes is finite, plain JSON
        if h["kind"] == "checkpoint":
            assert wire.sha256(data) == h["sha256"] and isinstance(h["step"], int)
    assert 0 < accepted < FUZZ_MESSAGES // 2
