"""Several hosts on one machine: network namespaces play the hosts, tests/netns_agent.sh plays ssh, and
deploy/launch-hostfile.sh runs `lenet-train --check` and then the training across them, exactly as on a
cluster; the evaluator runs on a third "host" and reaches rank 0 over the links.

    namespace  hostname  address (eth0)    runs
    ...-h1     h1        10.77.0.1/24      mpirun, rank 0 (binds the publish port)
    ...-h2     h2        10.77.0.2/24      rank 1, started by Hydra through the agent
    ...-h3     h3        10.77.0.3/24      lenet-evaluator (--results-bind)
    ...-sw     -         -                 bridge br0 joining the three veth links

The addresses exist only inside these namespaces (every namespace has its own port space too, so the
standard ports 5555/5556 cannot collide with anything). Hydra's control connections and the evaluator's
traffic go over the links; MPI's data too, because UCX is told to use TCP on eth0 (left alone, UCX sees one
machine and would use shared memory between the namespaces). Needs root and iproute2; skips otherwise.
"""
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from lenet_dist.transport import generate_keys

from tests.mpiutil import REPO, env, need_mpirun
from tests.netns import AGENT, hosts_or_skip

SUBNET = "10.77.0"                                  # private, and only ever inside our namespaces
HOSTS = {"h1": f"{SUBNET}.1", "h2": f"{SUBNET}.2", "h3": f"{SUBNET}.3"}
PUBLISH_PORT, RESULTS_PORT = 5555, 5556
STEPS = 37                                          # 1,834 subset images (166 held out) / batch 50, one epoch


@pytest.fixture
def hosts():
    need_mpirun()
    with hosts_or_skip(f"lenet{os.getpid()}", HOSTS) as h:
        yield h


def on_host(hosts, host, argv, **popen):
    """Start argv on `host` through the agent, as `ssh host argv` would."""
    return hosts.popen(host, argv, cwd=REPO, **popen)


def wait_for_text(path, text, proc, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        assert proc.poll() is None, f"exited {proc.returncode} before '{text}':\n{path.read_text()}"
        time.sleep(0.1)
    raise AssertionError(f"no '{text}' within {timeout} s:\n{path.read_text()}")


def make_keys(tmp_path):
    """deploy/README.md's layout: rank 0's host holds the trainer's pair and authorized/evaluator.key; the
    evaluator's host its own pair and trainer.key."""
    rank0, ev = tmp_path / "keys-rank0", tmp_path / "keys-evaluator"
    trainer_public, _ = generate_keys(rank0, "trainer")
    evaluator_public, _ = generate_keys(ev, "evaluator")
    (rank0 / "authorized").mkdir()
    shutil.copy(evaluator_public, rank0 / "authorized")
    shutil.copy(trainer_public, ev)
    return rank0, ev


def test_training_spans_hosts_and_the_evaluator_on_a_third_reports_the_final_step(hosts, tmp_path):
    rank0_keys, eval_keys = make_keys(tmp_path)
    rank0, evaluator_host = HOSTS["h1"], HOSTS["h3"]
    e = env(LENET_NETNS_HOSTS=hosts.agent_map(),
            HYDRA_IFACE="eth0",                      # = mpirun -iface eth0: Hydra's control port on the link
            UCX_TLS="tcp,self", UCX_NET_DEVICES="eth0")   # MPI data over TCP on the link, not shared memory
    for var in ("LENET_DATA_DIR", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        e.pop(var, None)

    # The evaluator on h3: it connects to rank 0's publish port and publishes its results on its own.
    report, ev_log = tmp_path / "evaluator.jsonl", tmp_path / "evaluator.log"
    with open(ev_log, "w") as log:
        ev = on_host(hosts, evaluator_host,
                     [sys.executable, "-m", "workers.evaluator", "--subset", "--report", report, "--exit-after-run",
                      "--connect", f"tcp://{rank0}:{PUBLISH_PORT}",
                      "--results-bind", f"tcp://{evaluator_host}:{RESULTS_PORT}", "--timeout", "50",
                      "--curve-secret-key", eval_keys / "evaluator.key_secret",
                      "--curve-public-key", eval_keys / "evaluator.key",
                      "--curve-server-key", eval_keys / "trainer.key"],
                     env=e, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_text(ev_log, "evaluating checkpoints from", ev, timeout=30)

        # The deploy recipe, run from h1 as a user runs it from the first host of the hostfile.
        (tmp_path / "hosts").write_text(f"{HOSTS['h1']}:1\n{HOSTS['h2']}:1\n")
        lenet_train = tmp_path / "lenet-train"       # this checkout's trainer, whatever is installed
        lenet_train.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m workers.trainer \"$@\"\n")
        lenet_train.chmod(0o755)
        launch_env = dict(e, HOSTFILE=tmp_path / "hosts", RANKS_PER_NODE="1", THREADS="1",
                          LAUNCH_AGENT=AGENT, LENET_TRAIN=lenet_train, PUBLISH_BIND=rank0,
                          PUBLISH_PORT=str(PUBLISH_PORT), RESULTS_PORT=str(RESULTS_PORT),
                          EVALUATOR=evaluator_host, KEYS_DIR=rank0_keys, CHECKPOINT_DIR=tmp_path / "ckpt")
        launch_env = {k: str(v) for k, v in launch_env.items()}
        metrics = tmp_path / "metrics.jsonl"
        before = hosts.eth0_bytes("h2")
        t0 = time.monotonic()
        launch = on_host(hosts, rank0, ["bash", REPO / "deploy" / "launch-hostfile.sh", "--subset", "--epochs",
                                        "1", "--batch-size", "50", "--checkpoint-every", "10",
                                        "--metrics", metrics, "--no-progress"],
                         env=launch_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = launch.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            launch.kill()
            out, err = launch.communicate()
            raise AssertionError(f"launch-hostfile.sh did not finish in 90 s\nstdout:\n{out}\nstderr:\n{err}")
        seconds = time.monotonic() - t0
        assert launch.returncode == 0, f"exit {launch.returncode}\nstdout:\n{out}\nstderr:\n{err}"
        rx, tx = (now - then for now, then in zip(hosts.eth0_bytes("h2"), before))
        ev.wait(timeout=30)
    finally:
        if ev.poll() is None:
            ev.kill()
            ev.wait()
    mpirun_lines = [line for line in err.splitlines() if line.startswith("+ ") and "mpirun" in line]
    print("\n".join(mpirun_lines), f"\nlaunch: {seconds:.1f} s; h2 eth0: {rx} bytes in, {tx} out", sep="")

    # The pre-flight ran on both hosts, each rank naming its own, and passed everything.
    assert len(mpirun_lines) == 2 and "--check" in mpirun_lines[0], err
    assert "2 rank(s) on 2 host(s): h1 (rank 0), h2 (rank 1)" in out, out
    assert "lenet-train --check: ok: all 8 checks passed" in out, out
    assert f"ok    rank 0 on h1  results: tcp://{evaluator_host}:{RESULTS_PORT} accepts connections" in out
    # Training spanned both: two ranks, and rank 1's allreduces crossed h2's link (each step moves
    # ~240 KiB each way; Hydra's control traffic alone is a few KiB).
    final = [r for r in map(json.loads, metrics.read_text().splitlines()) if r["event"] == "epoch"][-1]
    assert final["ranks"] == 2 and final["step"] == STEPS, final
    assert min(rx, tx) > STEPS * 100_000, (rx, tx)
    # The evaluator, on h3, saw the final checkpoint and agrees with the trainer's own evaluation.
    assert ev.returncode == 0, ev_log.read_text()
    results = [json.loads(line) for line in report.read_text().splitlines()]
    last = results[-1]
    assert last["final"] and last["step"] == STEPS, results
    assert last["evaluator"].startswith("h3:")
    assert last["accuracy"] == pytest.approx(final["test_acc"], abs=1e-9), (last, final)
    # Results came back to rank 0 over the link. Wait for the event, not for luck: whether any result has
    # arrived by the time the (only) epoch line is written is a race, but rank 0 lingers until the
    # evaluator has judged the final checkpoint and then logs that verdict.
    assert f"evaluator: step {STEPS} accuracy {100 * last['accuracy']:.2f}%" in err, err
