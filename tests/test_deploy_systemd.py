"""deploy/systemd/lenet-evaluator.service started by a real systemd: systemd as PID 1 in a privileged podman
container (Debian 12 by debootstrap, built once and kept in podman's store, as tests/test_deploy_container.py
keeps its stand-in base), the package installed as the unit's header says (a virtualenv at /opt/lenet-dist,
the pinned wheels of deploy/requirements.lock, offline), the unit and its environment file installed
unchanged but for the env file's values. The unit watches a checkpoint folder of a stopped run (trained
here, mounted read-only): it must evaluate the newest checkpoint and stay active, with no restart, under
every line of its hardening; then the run's final checkpoint appears, and the unit evaluates it and stays
active after the run's end, waiting for the next run. Needs root, podman, runc and debootstrap (scripts/setup-tests.sh); skips,
saying which is missing, otherwise. The container is removed even when the test fails.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from lenet_dist.checkpoints import folder as ckptdir, resume

from tests.mpiutil import REPO
from tests.test_deploy_container import build_context, podman, standin_base, ulimits

# bump when the recipe below changes
SYSTEMD_IMAGE = "localhost/lenet-dist-test-systemd:bookworm-1"
SYSTEMD_PACKAGES = "systemd,systemd-sysv,python3,python3-venv"
SYSTEMD_CHANGES = ('CMD ["/lib/systemd/systemd"]', "STOPSIGNAL SIGRTMIN+3")
UNIT = REPO / "deploy" / "systemd" / "lenet-evaluator.service"
ENV_FILE = REPO / "deploy" / "systemd" / "lenet-evaluator.env"
VENV = "/opt/lenet-dist/venv"
WATCHED = "/srv/run/checkpoints"
REPORT = "/var/lib/lenet-evaluator/report.jsonl"
SETTLE = 6                          # seconds the unit must stay up after its first evaluation


def unavailable():
    if os.geteuid() != 0:
        return "not root: podman runs systemd in a privileged container"
    missing = [c for c in ("podman", "runc", "debootstrap") if not shutil.which(c)]
    if missing:
        return f"no {', '.join(missing)} (Debian packages; scripts/setup-tests.sh installs them as root)"
    return None


def stopped_run(folder):
    """Checkpoints of a run stopped by SIGTERM mid-way (not final: the evaluator waits for more)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for var in ("LENET_DATA_DIR", "LENET_FAULT"):
        env.pop(var, None)
    p = subprocess.Popen([sys.executable, "-m", "workers.trainer", "--subset", "--epochs", "50", "--batch-size",
                          "50", "--checkpoint-every", "10", "--no-progress", "--checkpoint-dir", str(folder)],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (folder.exists() and len(list(folder.glob("*.npz"))) >= 2):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()[0]
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    found = resume.newest_usable(folder, warn=lambda m: None)
    assert found and not found[1].meta.get("final"), out
    for f in folder.rglob("*"):                       # read by the unit's user, seen as nobody's files
        f.chmod(0o755 if f.is_dir() else 0o644)
    folder.chmod(0o755)
    return found[1].step


def env_file():
    """The shipped environment file with this test's values: watch the mounted folder, the shipped subset."""
    values = {"LENET_SOURCE": f"--watch {WATCHED}", "LENET_EVALUATOR_EXTRA": "--subset"}
    lines = []
    for line in ENV_FILE.read_text().splitlines():
        key = line.partition("=")[0]
        lines.append(f"{key}={values.pop(key)}" if key in values else line)
    assert not values, f"not in {ENV_FILE.name}: {values}"
    return "\n".join(lines) + "\n"


@pytest.fixture
def booted(tmp_path):
    """A container with systemd as PID 1, the run's folder and the build context mounted; yields exec()."""
    why = unavailable()
    if why:
        pytest.skip(why)
    image = standin_base(tmp_path, SYSTEMD_IMAGE, SYSTEMD_PACKAGES, SYSTEMD_CHANGES)
    ctx = build_context(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o755)
    tmp_path.chmod(0o755)
    step = stopped_run(run / "checkpoints")
    (ctx / "lenet-evaluator.env").write_text(env_file())
    shutil.copy(UNIT, ctx / UNIT.name)
    name = f"lenet-test-systemd-{os.getpid()}"
    podman("run", "-d", "--runtime", "runc", "--privileged", "--systemd=always", "--network=none", *ulimits(),
           f"--name={name}", f"--volume={ctx}:/ctx:ro", f"--volume={run}:/srv/run:ro", image, "/lib/systemd/systemd")

    def sh(script, timeout=300, check=True):
        return podman("exec", name, "bash", "-c", script, timeout=timeout, check=check)
    try:
        deadline = time.monotonic() + 120
        while (state := sh("systemctl is-system-running", check=False).stdout.strip()) not in ("running", "degraded"):
            # systemctl answers nothing until PID 1 listens, then "initializing" or "starting"
            assert time.monotonic() < deadline, f"systemd is {state or 'not answering'} after 120 s"
            time.sleep(0.5)
        yield sh, step, run / "checkpoints"
    finally:
        if os.environ.get("LENET_KEEP_CONTAINER") != "1":
            podman("rm", "-f", "--time=0", name, check=False)


def test_the_unit_runs_under_systemd_and_evaluates_a_checkpoint_folder(booted):
    sh, step, folder = booted
    # The install steps of the unit's header, from the build context (offline: the pinned wheels).
    sh(f"""set -e
        useradd --system --home-dir /var/lib/lenet-evaluator --shell /usr/sbin/nologin lenet
        cp -r /ctx /tmp/src
        python3 -m venv {VENV}
        {VENV}/bin/pip install -q --no-index --find-links /tmp/src/deploy/wheels --require-hashes \
            -r /tmp/src/deploy/requirements.lock
        {VENV}/bin/pip install -q --no-index --no-deps --no-build-isolation /tmp/src
        install -D -m 0644 /ctx/lenet-evaluator.env /etc/lenet-dist/evaluator.env
        install -m 0644 /ctx/lenet-evaluator.service /etc/systemd/system/
        systemctl daemon-reload
        systemctl start lenet-evaluator""", timeout=600)

    deadline = time.monotonic() + 90
    evaluated = []
    while not evaluated:
        report = sh(f"cat {REPORT} 2>/dev/null", check=False).stdout
        evaluated = [r for r in map(json.loads, report.splitlines()) if r.get("step") == step]
        if not evaluated:
            props = show(sh)
            assert time.monotonic() < deadline and props["NRestarts"] == "0", (props, journal(sh))
            time.sleep(0.5)
    time.sleep(SETTLE)
    props = show(sh)
    assert (props["ActiveState"], props["SubState"], props["NRestarts"]) == ("active", "running", "0"), \
        (props, journal(sh))
    log = journal(sh)
    assert "Operation not permitted" not in log, log
    # The run ends (its final checkpoint): the unit evaluates it and outlives the run.
    final = finish_run(folder)
    wait_for_step(sh, final)
    time.sleep(SETTLE)
    props = show(sh)
    assert (props["ActiveState"], props["SubState"], props["NRestarts"]) == ("active", "running", "0"), \
        (props, journal(sh))
    assert f"finished at step {final}; waiting for the next run" in journal(sh), journal(sh)
    # systemctl stop: SIGTERM, a clean exit within TimeoutStopSec.
    sh("systemctl stop lenet-evaluator", timeout=60)
    out = sh("systemctl show -p Result,ExecMainStatus lenet-evaluator").stdout.split()
    assert out == ["Result=success", "ExecMainStatus=0"], (out, journal(sh))


def finish_run(folder):
    """The run's final checkpoint, as the trainer writes it at the end: the newest one's arrays, final."""
    path, ckpt = resume.newest_usable(folder, warn=lambda m: None)
    meta = dict(ckpt.meta, step=ckpt.step + 10, final=True)
    path, _ = ckptdir.save(folder, ckpt.params, ckpt.velocity, meta)
    path.chmod(0o644)
    return ckpt.step + 10


def wait_for_step(sh, step):
    deadline = time.monotonic() + 90
    while not any(r.get("step") == step for r in map(json.loads, sh(f"cat {REPORT} 2>/dev/null",
                                                                     check=False).stdout.splitlines())):
        props = show(sh)
        assert time.monotonic() < deadline and props["NRestarts"] == "0", (props, journal(sh))
        time.sleep(0.5)


def show(sh):
    out = sh("systemctl show -p ActiveState,SubState,NRestarts,ExecMainStatus lenet-evaluator").stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal(sh):
    return sh("journalctl -u lenet-evaluator --no-pager -n 60", check=False).stdout
