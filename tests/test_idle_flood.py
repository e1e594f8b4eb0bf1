"""More idle TCP connections than the trainer may open files (mpirun -n 2 at `ulimit -n 1024`): training
finishes, every checkpoint is written, a real evaluator is still served. bench/idle_connections.py runs the
long form (5,000 connections) and prints figures."""
import pytest

from tests import idleflood
from tests.mpiutil import need_mpirun

N_IDLE = 1500                   # well past the 1,024 descriptors the trainer may hold


def test_idle_connections_stop_neither_training_nor_checkpoints(tmp_path):
    need_mpirun()
    if not idleflood.own_limit(N_IDLE):
        pytest.skip(f"this process may not hold {N_IDLE} connections (hard open-files limit)")
    # Long enough (160 steps) for the evaluator to get in while training goes on: it connects behind the
    # flood, which holds every descriptor until the trainer drops the idle peers (5 s without a handshake);
    # a trainer that has finished waits only 5 s for an evaluator that was never in touch.
    r = idleflood.run(tmp_path, n_idle=N_IDLE, epochs=8, nofile=1024)
    log = r["stderr"] + r["evaluator_stderr"]
    assert r["trainer_rc"] == 0, log
    assert r["all_checkpoints"] and r["checkpoints"] == r["checkpoints_expected"] == 32, log
    assert r["evaluator_rc"] == 0 and r["final_evaluated"], log
