"""A live run a person can steer (issue 25 item 3): real lenet-train processes (one, or `mpirun -n 2`), real
ZeroMQ on 127.0.0.1, and for the page a real lenet-evaluator serving the dashboard to a real Chromium.
Forged, replayed or unsigned control messages are refused and logged; pause and continue under mpirun
sleep every rank after the same step; an lr_scale survives a kill and --resume bit for bit."""
import json
import shutil
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lenet_dist.checkpoints import format as checkpoint
from lenet_dist.run import exitcodes
from lenet_dist.run.procs import local_ranks
from lenet_dist.transport import CheckpointClient, wire
from lenet_dist.transport.control import mac, Signer

from tests.mpiutil import env, final_params, launch, mpirun_cmd, python, rank_pid
from tests.test_browser import browser, js, severe, until  # noqa: F401 - the fixture
from tests.test_e2e import finish, free_port, start_evaluator, wait_serving

# 2,000 subset examples, 166 held out: 1,834 / batch 50 = 37 steps an epoch
SMALL = ["--subset", "--batch-size", "50", "--no-progress", "--log-level", "INFO", "--checkpoint-every", "5",
         "--lr", "0.05"]                          # the rate the assertions below scale
KEY = b"a control secret of the test, 40 bytes long"


def rows(path, event=None):
    out = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in out if event is None or r.get("event") == event]


def key_file(tmp_path, key=KEY):
    p = tmp_path / "control.key"
    p.write_bytes(key)
    return p


def trainer(tmp_path, endpoint, *extra, ranks=0, name="m"):
    cmd = [sys.executable, "-m", "workers.trainer", *SMALL, "--publish", endpoint, "--linger", "2",
           "--checkpoint-dir", str(tmp_path / f"ck-{name}"), "--metrics", str(tmp_path / f"{name}.jsonl"),
           *map(str, extra)]
    if ranks:
        cmd = [*mpirun_cmd(ranks), python(), *cmd[1:]]
    return subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_id(client, p):
    """The trainer's run id, from the first checkpoint it serves."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        got = client.fetch_newer(-1, 1000)
        if got:
            return checkpoint.from_bytes(got[1]).meta["run_id"]
    raise AssertionError(f"no checkpoint served: {finish(p)}")


def refused(client, message):
    with pytest.raises(wire.BadMessage) as e:
        client.send_control(message)
    return str(e.value)


def test_forged_unsigned_and_replayed_control_messages_are_refused_and_the_run_goes_on(tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    p = trainer(tmp_path, endpoint, "--epochs", "2", "--allow-control", "--control-key-file", key_file(tmp_path))
    client = CheckpointClient(endpoint)
    try:
        rid = run_id(client, p)
        good = Signer(KEY).sign("lr_scale", 100, rid, "test")
        unsigned = {"control": good["control"]}
        forged = Signer(b"not the trainer's key, but long enough").sign("stop", None, rid, "test")
        other_run = Signer(KEY).sign("stop", None, "another-run", "test")
        assert "missing or wrong MAC" in refused(client, unsigned)
        assert "missing or wrong MAC" in refused(client, forged)
        assert "missing or wrong MAC" in refused(client, dict(good, control=dict(good["control"], value=50)))
        assert "for run 'another-run'" in refused(client, other_run)
        old = dict(good["control"], action="stop", value=None, time=good["control"]["time"] - 3600)
        assert "stale" in refused(client, {"control": old, "mac": mac(KEY, old)})
        too_much = dict(good["control"], value=1000, nonce="f" * 32)      # signed, but out of bounds
        assert "lr_scale 1000" in refused(client, {"control": too_much, "mac": mac(KEY, too_much)})
        checkpoint_now = Signer(KEY).sign("checkpoint", None, rid, "test")
        assert client.send_control(checkpoint_now) is True          # a valid one is taken ...
        assert "replayed" in refused(client, checkpoint_now)         # ... once
    finally:
        client.close()
        code, out, err = finish(p)
    assert code == 0, err
    assert "refused a control message: missing or wrong MAC" in err and "refused a control message: replayed" in err
    assert "refused a control message: for run 'another-run'" in err and "stale" in err
    control = rows(tmp_path / "m.jsonl", "control")
    assert [r["action"] for r in control] == ["checkpoint"]         # nothing forged was applied
    end = rows(tmp_path / "m.jsonl", "end")[0]
    assert end["outcome"] == "finished" and end["step"] == 2 * 37
    lrs = [r["lr"] for r in rows(tmp_path / "m.jsonl", "step")]
    assert max(lrs) <= 0.05 + 1e-9                                  # no lr_scale slipped through


def test_without_allow_control_every_control_message_is_refused(tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    p = trainer(tmp_path, endpoint, "--epochs", "1", "--control-key-file", key_file(tmp_path))
    client = CheckpointClient(endpoint)
    try:
        rid = run_id(client, p)
        why = refused(client, Signer(KEY).sign("stop", None, rid, "test"))
        assert client.trainer_step_now() is not None and client.control is False
    finally:
        client.close()
        code, out, err = finish(p)
    assert "control is off on this trainer" in why and code == 0, err
    assert "refused a control message: control is off on this trainer (start it with --allow-control)" in err
    assert rows(tmp_path / "m.jsonl", "control") == [] and rows(tmp_path / "m.jsonl", "end")[0]["outcome"] == "finished"


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100        # utime + stime, clock ticks of 1/100 s


def test_pause_then_continue_under_mpirun_sleeps_every_rank_after_the_same_step(tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    p = trainer(tmp_path, endpoint, "--epochs", "2", "--allow-control", "--control-key-file", key_file(tmp_path),
                "--stall-timeout", "4", ranks=2)
    client = CheckpointClient(endpoint)
    try:
        rid = run_id(client, p)
        assert client.send_control(Signer(KEY).sign("pause", None, rid, "test")) is True
        deadline = time.monotonic() + 60
        while not rows(tmp_path / "m.jsonl", "control") and time.monotonic() < deadline:
            time.sleep(0.2)
        ranks = local_ranks(p.pid)
        assert len(ranks) == 2
        before = [cpu_seconds(pid) for pid in ranks]
        time.sleep(6)                                   # longer than --stall-timeout 4: not a stall
        used = [cpu_seconds(pid) - b for pid, b in zip(ranks, before)]
        assert p.poll() is None
        assert max(used) < 1.5, f"paused ranks used {used} s of CPU in 6 s"
        assert client.send_control(Signer(KEY).sign("resume", None, rid, "test")) is True
    except BaseException:
        p.kill()                                        # a paused run waits for ever
        raise
    finally:
        client.close()
        code, out, err = finish(p, timeout=180)
    assert code == 0, err
    control = rows(tmp_path / "m.jsonl", "control")
    assert [r["action"] for r in control] == ["pause", "resume"] and control[0]["step"] == control[1]["step"]
    s = control[0]["step"]
    paused = [line for line in err.splitlines() if f"control: paused after step {s} " in line]
    assert sorted(line.split(" rank ", 1)[1][:3] for line in paused) == ["0/2", "1/2"]   # every rank, that step
    steps = [r["step"] for r in rows(tmp_path / "m.jsonl", "step")]
    assert steps == sorted(steps) and rows(tmp_path / "m.jsonl", "end")[0]["step"] == 2 * 37
    assert "no training step finished" not in err


# 39 steps an epoch, every checkpoint kept
DET = ["--deterministic", "--batch-size", "48", "--micro-batch", "8", "--epochs", "2", "--keep", "100"]


def test_lr_scale_then_a_kill_and_resume_is_bit_identical(tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    p = trainer(tmp_path, endpoint, *DET, "--allow-control", "--control-key-file", key_file(tmp_path), name="full")
    client = CheckpointClient(endpoint)
    try:
        rid = run_id(client, p)
        assert client.send_control(Signer(KEY).sign("lr_scale", 0.5, rid, "test")) is True
    finally:
        client.close()
        code, out, err = finish(p, timeout=180)
    assert code == 0, err
    (applied,) = rows(tmp_path / "full.jsonl", "control")
    s = applied["step"]
    assert applied["action"] == "lr_scale" and applied["value"] == 0.5 and s < 2 * 39 - 10
    step_lr = {r["step"]: r["lr"] for r in rows(tmp_path / "full.jsonl", "step")}
    later = [st for st in step_lr if st > s + 1]
    assert later and all(step_lr[st] < 0.05 * 0.5 + 1e-9 for st in later)      # the scaled rate from S + 1
    full = tmp_path / "ck-full"
    params, meta = final_params(full)
    assert meta["steering"]["control_scale"] == 0.5
    assert [(c["step"], c["control"]) for c in meta["config_changes"]] == [
        (s, {"action": "lr_scale", "value": 0.5, "source": "test"})]
    # what a kill after a checkpoint past S leaves: that checkpoint and the ones before it
    cut = next(st for st in range(s + 1, 2 * 39) if st % 5 == 0 and st > s)
    part = tmp_path / "ck-part"
    part.mkdir()
    for f in full.glob("ckpt-*.npz"):
        if int(f.stem.split("-")[1]) <= cut:
            shutil.copy2(f, part / f.name)
    launch(0, [*SMALL, *DET, "--checkpoint-dir", part, "--resume"], timeout=180)
    resumed, rmeta = final_params(part)
    assert rmeta["step"] == meta["step"] == 2 * 39
    assert np.array_equal(resumed, params), "the resumed run differs from the uninterrupted one"
    assert rmeta["steering"]["control_scale"] == 0.5


def test_the_page_scales_the_learning_rate_then_stops_the_run(tmp_path, browser):
    endpoint, port = f"tcp://127.0.0.1:{free_port()}", free_port()
    url = f"http://127.0.0.1:{port}"
    key = key_file(tmp_path)
    ev = start_evaluator(endpoint, tmp_path / "eval.jsonl", "--http", f"127.0.0.1:{port}", "--control-key-file", key)
    wait_serving(ev)
    tr = trainer(tmp_path, endpoint, "--epochs", "30", "--log-every", "2", "--allow-control", "--control-key-file", key)
    try:
        browser.get(url)
        until("the control panel", lambda: js(browser, "return !document.getElementById('control').hidden"),
              timeout=120)
        browser.find_element("id", "control-lr-half").click()
        until("the lr_scale taken by the trainer", lambda: "taken by the trainer" in js(
            browser, "return document.getElementById('control-status').textContent"), timeout=60)
        until("the lr_scale row", lambda: rows(tmp_path / "m.jsonl", "control"), timeout=60)
        scaled = rows(tmp_path / "m.jsonl", "control")[0]["step"]
        until("steps after the scale",
              lambda: any(r["step"] > scaled + 4 for r in rows(tmp_path / "m.jsonl", "step")))
        browser.find_element("id", "control-stop").click()
        code, out, err = finish(tr, timeout=120)
        assert [e for e in severe(browser) if "control" in e["message"]] == []     # the panel's (app.js: its test)
    finally:
        for p in (tr, ev):
            if p.poll() is None:
                p.terminate()
        finish(ev, timeout=60)
    assert code == exitcodes.STOPPED, err             # not finished: not 0
    control = rows(tmp_path / "m.jsonl", "control")
    assert [(r["action"], r["value"], r["source"]) for r in control] == [("lr_scale", 0.5, "page"),
                                                                          ("stop", None, "page")]
    stopped = control[1]["step"]
    end = rows(tmp_path / "m.jsonl", "end")[0]
    assert end["outcome"] == f"stopped from the page at step {stopped} (live control)" and end["step"] == stopped
    assert end["checkpoint"].endswith(f"ckpt-{stopped:09d}.npz") and "resume_command" in end
    assert f"stopped from the page at step {stopped}" in out
    params, meta = final_params(tmp_path / "ck-m")
    assert meta["step"] == stopped and not meta["final"] and meta["steering"]["control_scale"] == 0.5
    assert [c["control"]["action"] for c in meta["config_changes"] if "control" in c] == ["lr_scale", "stop"]
    step_lr = {r["step"]: r["lr"] for r in rows(tmp_path / "m.jsonl", "step")}
    before = [step_lr[s] for s in step_lr if s <= scaled]
    after = [step_lr[s] for s in step_lr if s > scaled + 1]
    assert before and after and max(after) <= 0.5 * max(before) + 1e-9       # the curve shows the scaled rate
    epochs = [r for r in rows(tmp_path / "m.jsonl", "epoch") if r["step"] > scaled + 1]
    assert all(r["lr"] <= 0.05 * 0.5 + 1e-9 for r in epochs)



def test_the_dashboards_control_route_wants_the_token_the_page_and_a_run_to_steer(tmp_path):
    import httpx
    port, token = free_port(), "a-token-of-the-test-0123456789"
    (tmp_path / "token").write_text(token)
    ev = start_evaluator(f"tcp://127.0.0.1:{free_port()}", tmp_path / "eval.jsonl", "--http", f"127.0.0.1:{port}",
                         "--http-token-file", tmp_path / "token", "--control-key-file", key_file(tmp_path))
    try:
        wait_serving(ev)
        url = f"http://127.0.0.1:{port}"
        auth = {"Authorization": f"Bearer {token}"}
        c = httpx.Client(base_url=url, timeout=10)
        stop = {"action": "stop", "value": None}
        until("the evaluator's word on control", lambda: c.get("/api/control", headers=auth).json()["reason"]
              == "no run evaluated yet", timeout=30)
        assert c.post("/api/control", json=stop).status_code == 401                          # no token
        assert c.post("/api/control", json=stop, headers={**auth, "Origin": "http://evil.example"}).status_code == 403
        assert c.post("/api/control", json=stop, headers={**auth, "Sec-Fetch-Site": "cross-site"}).status_code == 403
        assert c.post("/api/control", content=json.dumps(stop), headers={**auth, "Content-Type": "text/plain"}
                      ).status_code == 415                                                   # a simple request
        bad = c.post("/api/control", json={"action": "lr_scale", "value": 1000}, headers=auth)
        assert bad.status_code == 400 and "lr_scale 1000" in bad.json()["error"]
        assert c.post("/api/control", json={"action": "format-disk"}, headers=auth).status_code == 400
        same = c.post("/api/control", json=stop, headers={**auth, "Origin": url})
        assert same.status_code == 409 and "no run evaluated yet" in same.json()["error"]     # nothing to steer
        got = c.get("/api/control", headers=auth).json()
        assert got["available"] is False and got["reason"] == "no run evaluated yet"
    finally:
        ev.terminate()
        finish(ev, timeout=60)


@pytest.mark.parametrize("argv, says", [
    (["--allow-control"], "--allow-control needs --publish and --control-key-file"),
    (["--publish", "tcp://127.0.0.1:5999", "--allow-control", "--control-key-file", "short.key"],
     "--control-key-file short.key: the control secret must be 16 bytes or more, got 5"),
    (["--publish", "tcp://127.0.0.1:5999", "--allow-control", "--control-key-file", "missing.key"],
     "--control-key-file missing.key: cannot open: No such file or directory"),
])
def test_control_flags_say_what_is_wrong_in_one_line(tmp_path, argv, says):
    (tmp_path / "short.key").write_text("short")
    p = subprocess.run([sys.executable, "-m", "workers.trainer", *argv], cwd=tmp_path, env=env(),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and says in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_a_stop_from_live_control_ends_lenet_launch_as_stopped_not_finished(tmp_path):
    """The trainer's status for a control stop is STOPPED (73), never 0 (a finished run): lenet-launch says
    the job stopped, does not restart it, and exits 73 too, so that a service manager can tell."""
    from tests.test_launch import Launch
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    job = Launch(tmp_path, ["-n", 2, "--max-restarts", 3],
                 [*SMALL, "--epochs", "20", "--publish", endpoint, "--linger", "1", "--allow-control",
                  "--control-key-file", key_file(tmp_path)])
    client = CheckpointClient(endpoint)
    try:
        rid = run_id(client, job.proc)
        assert client.send_control(Signer(KEY).sign("stop", None, rid, "test")) is True
        assert job.finish() == exitcodes.STOPPED, job.text
    finally:
        client.close()
    assert "restart" not in [r["event"] for r in job.rows()]
    (stop,), (end,) = job.rows("control"), job.rows("end")          # the trainer's: the launcher adds none
    assert stop["action"] == "stop" and end["outcome"] == f"stopped from the test at step {stop['step']} (live control)"
    assert f"the job stopped with code 73: the run was stopped on request (live control; its checkpoint " \
           f"written); a stop is not a crash; newest checkpoint: ckpt-{stop['step']:09d}.npz" in job.text, job.text


def test_checkpoint_now_then_a_signal_while_paused_stops_with_the_checkpoint(tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    p = trainer(tmp_path, endpoint, "--epochs", "20", "--keep", "1000", "--allow-control", "--control-key-file",
                key_file(tmp_path))
    client = CheckpointClient(endpoint)
    try:
        rid = run_id(client, p)
        assert client.send_control(Signer(KEY).sign("checkpoint", None, rid, "test")) is True
        until("the checkpoint action", lambda: rows(tmp_path / "m.jsonl", "control"), timeout=60)
        assert client.send_control(Signer(KEY).sign("pause", None, rid, "test")) is True
        until("the pause", lambda: len(rows(tmp_path / "m.jsonl", "control")) == 2, timeout=60)
        time.sleep(1)
        p.send_signal(signal.SIGTERM)                   # a time limit reached while paused
    finally:
        client.close()
        code, out, err = finish(p)
    now, pause = rows(tmp_path / "m.jsonl", "control")
    assert (now["action"], pause["action"]) == ("checkpoint", "pause")
    assert (tmp_path / "ck-m" / f"ckpt-{now['step']:09d}.npz").exists()      # written at that step
    assert code == 128 + 15, err
    end = rows(tmp_path / "m.jsonl", "end")[0]
    assert end["outcome"] == "stopped" and end["signal"] == 15 and end["step"] == pause["step"]
    _, meta = final_params(tmp_path / "ck-m")
    assert meta["step"] == pause["step"]
    assert [c["control"]["action"] for c in meta["config_changes"]] == ["checkpoint", "pause"]


def test_control_over_curvezmq_reaches_the_gate_only_from_an_authorized_key(tmp_path):
    from lenet_dist.transport import generate_keys, TrainerLink
    from lenet_dist.transport.control import ControlGate
    k = {name: generate_keys(tmp_path, name) for name in ("trainer", "evaluator", "stranger")}
    auth = tmp_path / "authorized"
    auth.mkdir()
    (auth / "evaluator.key").write_bytes(k["evaluator"][0].read_bytes())
    said = []
    gate = ControlGate(KEY, "run-1", True, said.append)
    with TrainerLink("tcp://127.0.0.1:*", secret_key=k["trainer"][1], authorized=auth, control=gate) as ln:
        ok = CheckpointClient(ln.endpoint, secret_key=k["evaluator"][1], server_key=k["trainer"][0])
        stranger = CheckpointClient(ln.endpoint, secret_key=k["stranger"][1], server_key=k["trainer"][0],
                                    grace_ms=200)
        try:
            assert ok.send_control(Signer(KEY).sign("lr_scale", 2, "run-1", "test")) is True
            assert stranger.send_control(Signer(KEY).sign("stop", None, "run-1", "test"), 500) is None
        finally:
            ok.close()
            stranger.close()
    assert gate.take() == [{"action": "lr_scale", "value": 2.0, "source": "test"}] and said == []


def test_a_signal_to_one_rank_alone_ends_a_pause(tmp_path):
    """Paused under mpirun -n 2, SIGTERM to rank 1 only (an OOM killer's warning, a kill of one pid): the
    ranks' votes in the pause carry it, and the run stops after the paused step with its checkpoint."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    p = trainer(tmp_path, endpoint, "--epochs", "20", "--allow-control", "--control-key-file", key_file(tmp_path),
                ranks=2)
    client = CheckpointClient(endpoint)
    try:
        rid = run_id(client, p)
        assert client.send_control(Signer(KEY).sign("pause", None, rid, "test")) is True
        until("the pause", lambda: rows(tmp_path / "m.jsonl", "control"), timeout=60)
        time.sleep(1)
        os.kill(rank_pid(p.pid, 1), signal.SIGTERM)
        code, out, err = finish(p, timeout=60)
    except BaseException:
        p.kill()                                        # a paused run waits for ever
        raise
    finally:
        client.close()
    pause, = rows(tmp_path / "m.jsonl", "control")
    end = rows(tmp_path / "m.jsonl", "end")[0]
    assert end["outcome"] == "stopped" and end["signal"] == 15 and end["step"] == pause["step"], err
    _, meta = final_params(tmp_path / "ck-m")
    assert meta["step"] == pause["step"]
