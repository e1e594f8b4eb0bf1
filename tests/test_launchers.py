"""Real launchers: the oversubscription log names what was set for which MPI; a foreign mpirun is refused."""
import os
import re
import subprocess

import pytest

from tests import mpiutil
from tests.mpiutil import REPO, env, launch

ARGS = ["--subset", "--epochs", "1", "--train-subset", "60", "--batch-size", "20", "--no-progress"]
SETTINGS = {"mpich": "MPIR_CVAR_CH4_PROGRESS_THROTTLE=1", "openmpi": "OMPI_MCA_mpi_yield_when_idle=1"}


@pytest.mark.usefixtures("mpi_flavour")
def test_oversubscription_counts_ranks_and_node_cores(tmp_path):
    cores = os.cpu_count()
    fits = launch(cores, ARGS, timeout=120, cwd=tmp_path)    # a core per rank, whatever the binding
    assert "more ranks than cores" not in fits.stderr
    over = launch(cores + 1, ARGS, timeout=120, cwd=tmp_path)
    [line] = [l for l in over.stderr.splitlines() if "more ranks than cores" in l]
    library = "MPICH" if mpiutil.current.name == "mpich" else "Open MPI"
    assert f"set for {library}: {SETTINGS[mpiutil.current.name]}" in line


@pytest.mark.parametrize("launcher, library", [("mpich", "Open MPI"), ("openmpi", "MPICH")])
def test_an_mpirun_of_another_mpi_is_a_one_line_error(launcher, library, tmp_path):
    # MPICH's mpirun starting Open MPI's mpi4py would run 2 one-rank jobs writing the same files
    runner, target = mpiutil.use_flavour(launcher), mpiutil.Flavour("openmpi" if launcher == "mpich" else "mpich")
    try:
        mpiutil.need_mpirun()
        if target.mpirun is None:
            mpiutil.use_flavour(target.name)
            mpiutil.need_mpirun()
        ckpt = tmp_path / "ckpt"
        cmd = [*mpiutil.mpirun_cmd(2), target.python, "-m", "workers.trainer", *ARGS, "--checkpoint-dir", ckpt]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO, env=env())
    finally:
        mpiutil.use_flavour("mpich")
    assert p.returncode != 0
    errors = re.findall(r"^lenet-train: error: .*$", p.stderr, re.M)
    # each rank says it, unless the launcher ends the job at the first one's exit (Open MPI's does)
    assert 1 <= len(errors) <= 2 and len(set(errors)) == 1, p.stderr
    assert re.search(rf"the launcher started 2 ranks \(\w+=2\) but the MPI library \({library}", errors[0])
    assert not ckpt.exists()                                 # stopped before training: nothing written


def test_test_mode_under_a_launcher_of_several_ranks_is_refused():
    p = launch(0, ["--test-mode", "--no-progress"], check=False, timeout=60, extra_env={"PMI_SIZE": 2, "PMI_RANK": 0})
    assert p.returncode == 2
    assert p.stderr.strip() == ("lenet-train: error: --test-mode runs in one process, but the launcher started 2 "
                                "(PMI_SIZE=2): run it without mpirun")
