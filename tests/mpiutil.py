"""Launching real jobs from tests: `mpirun -n N` (or a plain process) with a timeout."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lenet_dist import checkpoint

REPO = Path(__file__).resolve().parent.parent
MPIRUN = shutil.which("mpirun")


def need_mpirun():
    """Skip without mpirun, except in CI, where the README's install brings it and a skip would hide a gap."""
    if MPIRUN:
        return
    if os.environ.get("CI"):
        pytest.fail("mpirun is not installed, but CI must run the MPI tests (pip install -e '.[mpich]')")
    pytest.skip("mpirun is not installed")


def env(**extra):
    e = dict(os.environ, PYTHONUNBUFFERED="1", **{k: str(v) for k, v in extra.items()})
    e.pop("LENET_FAULT", None)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def launch(n, argv, *, timeout=120, module="workers.trainer", cwd=None, extra_env=None, check=True):
    """Run `python -m module argv` under `mpirun -n n` (n=0: no mpirun at all). Returns CompletedProcess."""
    cmd = [sys.executable, "-m", module, *map(str, argv)]
    if n:
        need_mpirun()
        cmd = [MPIRUN, "-n", str(n), *cmd]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO,
                       env=env(**(extra_env or {})))
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def final_params(ckpt_dir):
    """Flat parameter vector of the newest checkpoint in ckpt_dir, and its meta."""
    found = checkpoint.latest_valid(ckpt_dir, warn=lambda m: None)
    assert found, f"no checkpoint in {ckpt_dir}"
    c = found[1]
    return np.concatenate([c.params[n].ravel() for n, _ in checkpoint.PARAM_SPECS]), c.meta
