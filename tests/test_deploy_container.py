"""deploy/Dockerfile built and run for real with podman: the documented offline build (wheels from
deploy/requirements.lock in the build context, built with no network at all), then `lenet-train --test-mode` in the
image, then a 2-rank trainer and an evaluator in two containers, each in a network namespace of its own
(tests/netns.py) joined by a bridge, so that the evaluator reaches rank 0 over a link as between hosts:

    container  namespace  address      runs
    trainer    …-h1       10.79.0.1    mpirun -n 2 lenet-train (publish port 5555)
    evaluator  …-h2       10.79.0.2    lenet-evaluator (results port 5556)

The public base image (python:3.11-slim-bookworm, pinned by digest) cannot be pulled on the test machines,
so the test builds a stand-in base from Debian 12's own packages with debootstrap (Python 3.11, pip, ssh:
what the Dockerfile expects of its base) and passes it as BASE_IMAGE. The stand-in is kept in podman's
store under STANDIN and the wheels in WHEEL_CACHE, so only the first run on a machine pays for them.
Runtime flags for this kind of machine: `--runtime runc`, build `--isolation=chroot`, `--ulimit` no
higher than the current limits. Needs root, podman, runc, debootstrap (scripts/setup-tests.sh) and
network namespaces; skips, saying which is missing, otherwise. Containers, the test image and the
namespaces are removed even when the test fails.
"""
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.mpiutil import REPO
from tests.netns import Hosts, unavailable as netns_unavailable

STANDIN = "localhost/lenet-dist-test-base:bookworm-2"      # bump when the recipe below changes
WHEEL_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lenet-dist-tests" / "wheels"
DEBIAN_MIRROR = os.environ.get("LENET_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# What the Dockerfile expects of python:3.11-slim: python3.11 and pip; ssh so that no apt step runs.
STANDIN_PACKAGES = "python3,python3-pip,openssh-client,openssh-server"
# Debian's pip installs under /usr/local (the python images' prefix), MPICH's libmpi in /usr/local/lib,
# where mpi4py looks only with that prefix: the stand-in names the directory to the dynamic loader.
STANDIN_CHANGES = ('CMD ["/bin/bash"]', "ENV LD_LIBRARY_PATH=/usr/local/lib")
SUBNET = "10.79.0"
HOSTS = {"h1": f"{SUBNET}.1", "h2": f"{SUBNET}.2"}
STEPS = 40                                  # 2,000 subset images / batch 50, one epoch


def unavailable():
    why = netns_unavailable()
    if why:
        return why
    missing = [c for c in ("podman", "runc", "debootstrap") if not shutil.which(c)]
    if missing:
        return f"no {', '.join(missing)} (Debian packages; scripts/setup-tests.sh installs them as root)"
    return None


# conmon, which podman starts each container from, runs with at most this many processes (seen on Debian
# 12's podman 4.3); a container may not ask for more.
CONMON_NPROC = 32768


def ulimits():
    """--ulimit flags no higher than the current limits: podman's defaults (about a million processes and
    open files) are refused where the builder may not raise its own limits."""
    flags = []
    for name, res, cap in (("nofile", resource.RLIMIT_NOFILE, None), ("nproc", resource.RLIMIT_NPROC, CONMON_NPROC)):
        finite = [v for v in (*resource.getrlimit(res), cap) if v not in (None, resource.RLIM_INFINITY)]
        if finite:
            flags.append(f"--ulimit={name}={min(finite)}:{min(finite)}")
    return flags


def build_ulimits():
    """The build's RUN steps take only nofile: buildah's chroot keeps the builder's own process limit."""
    return [f for f in ulimits() if f.startswith("--ulimit=nofile")]


def podman(*args, timeout=600, check=True, **kw):
    p = subprocess.run(["podman", *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"podman {' '.join(map(str, args))} exited {p.returncode}\n"
                             f"stdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}")
    return p


def standin_base(tmp_path, tag=STANDIN, packages=STANDIN_PACKAGES, changes=STANDIN_CHANGES):
    """A Debian 12 image made by debootstrap with `packages`, imported into podman once as `tag` (by default
    the stand-in for python:3.11-slim-bookworm); later runs reuse it."""
    if podman("image", "exists", tag, check=False).returncode == 0:
        return tag
    root = tmp_path / "rootfs"
    p = subprocess.run(["debootstrap", "--variant=minbase", f"--include={packages}", "bookworm",
                        str(root), DEBIAN_MIRROR], capture_output=True, text=True, timeout=1200)
    if p.returncode != 0:
        pytest.fail(f"debootstrap from {DEBIAN_MIRROR} failed (LENET_DEBIAN_MIRROR picks another):\n"
                    f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    # As in the python images, pip installs into the system Python (Debian marks it externally managed).
    for marker in root.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
        marker.unlink()
    for deb in root.glob("var/cache/apt/archives/*.deb"):
        deb.unlink()
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run(["podman", "import", *(f"--change={c}" for c in changes), "-", tag],
                              stdin=tar.stdout, capture_output=True, text=True, timeout=600)
    tar.stdout.close()
    assert tar.wait() == 0 and imported.returncode == 0, imported.stderr
    shutil.rmtree(root, ignore_errors=True)
    return tag


def build_context(tmp_path):
    """What the documented build has in its context: the repository's files the Dockerfile copies, the
    pinned wheels fetched by the documented `pip download` line into deploy/wheels, deploy/mnist empty."""
    ctx = tmp_path / "context"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for rel in ("pyproject.toml", "README.md", "deploy/Dockerfile", "deploy/Dockerfile.dockerignore",
                "deploy/requirements.lock", "deploy/mnist"):
        src, dst = REPO / rel, ctx / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree(src, dst, ignore=skip) if src.is_dir() else shutil.copy(src, dst))
    for rel in ("lenet_dist", "workers"):
        shutil.copytree(REPO / rel, ctx / rel, ignore=skip)
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    download = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--python-version", "3.11",
         "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64",
         "--no-deps",
         "-r", str(REPO / "deploy" / "requirements.lock"), "-d", str(WHEEL_CACHE)],
        capture_output=True, text=True, timeout=600)
    assert download.returncode == 0, download.stderr[-4000:]
    shutil.copytree(WHEEL_CACHE, ctx / "deploy" / "wheels")
    return ctx


@pytest.fixture
def image(tmp_path):
    why = unavailable()
    if why:
        pytest.skip(why)
    base = standin_base(tmp_path)
    ctx = build_context(tmp_path)
    tag = f"localhost/lenet-dist-test:{os.getpid()}"
    t0 = time.monotonic()
    # Offline for real: podman builds inside a network namespace of its own with no link but loopback (a
    # chroot-isolated build uses the builder's network; --network=none is refused with --isolation=chroot).
    build = subprocess.run(
        ["unshare", "--net", "podman", "build", "--runtime", "runc", "--isolation=chroot", *build_ulimits(),
         "--layers=false",                  # one commit at the end, no intermediate images to store and remove
         "--build-arg", f"BASE_IMAGE={base}", "--ignorefile", ctx / "deploy" / "Dockerfile.dockerignore",
         "-f", ctx / "deploy" / "Dockerfile", "-t", tag, ctx], capture_output=True, text=True, timeout=1200)
    assert build.returncode == 0, f"podman build exited {build.returncode}\n{build.stdout[-4000:]}\n{build.stderr[-4000:]}"
    print(f"podman build: {time.monotonic() - t0:.1f} s")
    try:
        yield tag
    finally:
        podman("rmi", "-f", tag, check=False)


def run_in(image, *argv, network="none", name=None, volumes=(), timeout=300):
    args = ["run", "--rm", "--runtime", "runc", f"--network={network}", *ulimits()]
    args += [f"--volume={v}" for v in volumes] + ([f"--name={name}"] if name else [])
    return podman(*args, image, *argv, timeout=timeout, check=False)


def test_image_builds_offline_and_trains_with_an_evaluator_in_another_container(image, tmp_path):
    # The image as built: non-root, the pinned packages, the test mode's trainer and evaluator.
    p = run_in(image, "sh", "-c", "id -un; pip freeze --all")
    assert p.returncode == 0, p.stderr
    user, *frozen = p.stdout.split()
    assert user == "mpiuser"
    for line in (REPO / "deploy" / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            assert line.split()[0] in frozen, f"{line.split()[0]} not installed: {frozen}"
    # deploy/mnist holds no data here: nothing of it reaches the image (its README and .gitignore neither).
    p = run_in(image, "ls", "-A", "/opt/mnist")
    assert p.returncode == 0 and p.stdout == "", p.stdout + p.stderr
    p = run_in(image, "lenet-train", "--test-mode", "--no-progress", timeout=600)
    assert p.returncode == 0, f"--test-mode exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"

    # Two containers, two network namespaces: the trainer's rank 0 on h1, the evaluator on h2.
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)                                    # written by mpiuser (uid 1000) in the containers
    hosts = Hosts(f"lct{os.getpid()}", HOSTS)
    names = [f"lenet-test-eval-{os.getpid()}", f"lenet-test-train-{os.getpid()}"]
    try:
        hosts.create()
        net = {h: f"ns:/run/netns/{ns}" for h, ns in hosts.ns.items()}
        evaluator = subprocess.Popen(
            ["podman", "run", "--rm", "--runtime", "runc", f"--network={net['h2']}", *ulimits(),
             f"--volume={out}:/out", f"--name={names[0]}", image,
             "lenet-evaluator", "--subset", "--connect", f"tcp://{HOSTS['h1']}:5555",
             "--results-bind", f"tcp://{HOSTS['h2']}:5556", "--report", "/out/evaluator.jsonl", "--timeout", "300", "--exit-after-run"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        train = run_in(image, "mpirun", "-n", "2", "lenet-train", "--subset", "--epochs", "1", "--batch-size", "50",
                       "--val-size", "0", "--checkpoint-every", "10", "--no-progress", "--checkpoint-dir", "/out/ckpt",
                       "--metrics", "/out/metrics.jsonl", "--publish", f"tcp://{HOSTS['h1']}:5555",
                       "--results", f"tcp://{HOSTS['h2']}:5556",
                       network=net["h1"], name=names[1], volumes=[f"{out}:/out"], timeout=600)
        assert train.returncode == 0, f"trainer exited {train.returncode}\n{train.stdout}\n{train.stderr}"
        ev_out, _ = evaluator.communicate(timeout=180)
        assert evaluator.returncode == 0, ev_out
    finally:
        for name in names:
            podman("rm", "-f", "--time=0", name, check=False)
        hosts.destroy()

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if r["event"] == "epoch"][-1]
    assert final["ranks"] == 2 and final["step"] == STEPS, final
    last = [json.loads(line) for line in (out / "evaluator.jsonl").read_text().splitlines()][-1]
    assert last["final"] and last["step"] == STEPS, last
    assert last["accuracy"] == pytest.approx(final["test_acc"], abs=1e-9), (last, final)
    # Rank 0 heard the verdict over the link (it lingers for the final one).
    assert f"evaluator: step {STEPS} accuracy {100 * last['accuracy']:.2f}%" in train.stderr + train.stdout
