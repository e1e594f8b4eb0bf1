"""The evaluator Deployment's readiness and liveness probes (deploy/k8s/evaluator.yaml) reach what the
evaluator serves: the probes name the container port that --health binds, on all interfaces (the kubelet
probes the pod's address), and the evaluator started with the manifest's own arguments answers each probe's
path as the kubelet counts success (a status from 200 to 399). Stand-ins for the cluster: the shipped subset
for /opt/mnist, loopback ports, a temporary folder for the state volume, generated keys for the Secret.
"""
import http.client
import os
import signal
import subprocess
import sys
import time

import pytest

from lenet_dist.transport import generate_keys

from tests.mpiutil import REPO
from tests.test_e2e import free_port

yaml = pytest.importorskip("yaml")

from tests.test_deploy_recipes import flag, one, yaml_docs  # noqa: E402


def evaluator_container():
    deployment = one(yaml_docs("k8s/evaluator.yaml"), "Deployment")
    return deployment["spec"]["template"]["spec"]["containers"][0]


def probes(container):
    return {kind: container[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe")}


def test_the_probes_name_the_port_the_evaluator_serves_them_on():
    c = evaluator_container()
    host, _, port = flag(c["args"], "--health").rpartition(":")
    assert host == "0.0.0.0", "the kubelet probes the pod's address, not its loopback"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    found = probes(c)
    assert {g["path"] for g in found.values()} == {"/readyz", "/healthz"}
    assert found["readinessProbe"]["path"] == "/readyz" and found["livenessProbe"]["path"] == "/healthz"
    for g in found.values():
        assert ports.get(g["port"], g["port"]) == int(port), (g, ports)


def get(port, path):
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return None


def local_args(container, tmp_path):
    args = list(container["args"])
    state = str(tmp_path / "state")
    keys = tmp_path / "keys"
    generate_keys(keys, "evaluator")
    generate_keys(keys, "trainer")
    secret = flag(args, "--curve-server-key").rsplit("/", 1)[0]
    volume = flag(args, "--report").rsplit("/", 1)[0]
    args = [a.replace(secret, str(keys)).replace(volume, state) for a in args]
    data = args.index("--data-dir")
    args[data:data + 2] = ["--subset"]
    port = free_port()
    for name, value in (("--connect", f"tcp://127.0.0.1:{free_port()}"),
                        ("--results-bind", f"tcp://127.0.0.1:{free_port()}"), ("--health", f"127.0.0.1:{port}")):
        args[args.index(name) + 1] = value
    os.makedirs(state)
    return args, port


def test_the_evaluator_started_as_the_manifest_says_answers_its_probes(tmp_path):
    c = evaluator_container()
    args, port = local_args(c, tmp_path)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    env.pop("LENET_DATA_DIR", None)
    ev = subprocess.Popen([sys.executable, "-m", "workers.evaluator", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while (status := {k: get(port, g["path"]) for k, g in probes(c).items()}) != \
                {"readinessProbe": 200, "livenessProbe": 200}:
            assert ev.poll() is None and time.monotonic() < deadline, (status, ev.communicate()[1][-3000:])
            time.sleep(0.2)
    finally:
        ev.send_signal(signal.SIGTERM)
        _, err = ev.communicate(timeout=30)
    assert ev.returncode == 0, err
