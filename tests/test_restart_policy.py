"""lenet-launch's decisions without processes: failure kinds from the trainer's exit status (the lines the
trainer and mpirun print are quoted), the restart window, back-off and limit, and which hosts a restart can
use."""
import pytest

from lenet_dist.run import exitcodes as X
from lenet_dist.run.restart_policy import classify, Failure, fit_hosts, format_hostfile, parse_hostfile, RestartPolicy

# Lines as the trainer (workers/trainer.py) and mpirun print them.
USAGE = ["usage: lenet-train [-h] [--epochs EPOCHS]", "lenet-train: error: unrecognized arguments: --bogus"]
DIVERGED = ["lenet-train: rank 1/2: error: TrainingError: loss is nan at step 12: training diverged (lower --lr)",
            "lenet-train: rank 0/2: error: TrainingError: loss is nan at step 12: training diverged (lower --lr)",
            "Abort(1) on node 1 (rank 1 in comm 0): application called MPI_Abort(MPI_COMM_WORLD, 1) - process 1"]
OUT_OF_SYNC = ["lenet-train: rank 0/2: error: TrainingError: replicas out of sync at step 100: rank 1 "
               "(parameter checksums differ)"]
BAD_DATA = ["lenet-train: rank 0/4: error: DataError: train-images-idx3-ubyte: truncated: 1000 of 47040016 bytes"]
REFUSED = ["lenet-train: rank 0/2: error: ResumeError: the checkpoint was made with --lr 0.1, not 0.05"]
STALL = ["lenet-train: rank 0/2: error: no training step finished in 5s after step 20: a rank died or hangs "
         "(--stall-timeout); exiting"]
MPICH_KILLED = ["BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES",
                "YOUR APPLICATION TERMINATED WITH THE EXIT STRING: Killed (signal 9)"]
OPENMPI_KILLED = ["mpirun noticed that process rank 1 with PID 4242 on node n1 exited on signal 9 (Killed)."]
OPENMPI5_KILLED = ["-" * 74, "prterun noticed that process rank 1 with PID 28691 on node vm exited on",
                   "signal 9 (Killed).", "-" * 74]
CRASH = ["lenet-train: rank 1/2: error: RuntimeError: injected fault at step 7"]
STOPPED = ["12:00:00 rank 0/2 WARNING stopped by signal 15 at step 241; checkpoint written"]


@pytest.mark.parametrize("code, lines, kind", [
    (2, USAGE, "usage error"), (X.DIVERGED, DIVERGED, "diverged loss"), (X.REPLICAS, OUT_OF_SYNC, "replica mismatch"),
    (X.BAD_DATA, BAD_DATA, "bad data"), (X.RESUME_REFUSED, REFUSED, "config refused on resume"),
    (143, STOPPED, "stopped"), (X.STOPPED, ["12:00:00 rank 0/2 WARNING stopped from the page at step 9"], "stopped")])
def test_failures_that_recur_are_not_retried(code, lines, kind):
    f = classify(code, lines)
    assert (f.kind, f.retry) == (kind, False)
    restart, _, why = RestartPolicy(max_restarts=5).decide(f, now=0.0)
    assert not restart and why.startswith(f"not restarting: {kind}")


@pytest.mark.parametrize("code, lines, kind, says", [
    (9, MPICH_KILLED, "killed", "SIGKILL"), (137, OPENMPI_KILLED, "killed", "SIGKILL"),
    (137, OPENMPI5_KILLED, "killed", "SIGKILL"),
    (X.STALL, STALL, "stall", "no training step finished in 5s after step 20"),
    (1, CRASH, "rank error", "RuntimeError: injected fault"), (17, [], "exit", "code 17"),
    (-9, [], "killed", "mpirun was killed by SIGKILL")])
def test_deaths_are_retried_and_named(code, lines, kind, says):
    f = classify(code, lines)
    assert (f.kind, f.retry) == (kind, True) and says in f.why


def test_an_error_that_recurs_wins_over_the_deaths_it_causes():
    f = classify(X.DIVERGED, MPICH_KILLED + STALL + CRASH + DIVERGED)
    assert f.kind == "diverged loss" and f.why.startswith("rank 1:")
    assert classify(2, CRASH + USAGE).kind == "usage error"
    assert classify(1, STALL + CRASH).kind == "rank error"      # the crash that caused the stall, not the stall


def test_the_usage_line_names_what_is_wrong():
    assert "unrecognized arguments: --bogus" in classify(2, USAGE).why


KILLED = Failure("killed", True, "a rank was killed by SIGKILL")


def test_the_limit_counts_within_the_window():
    p = RestartPolicy(max_restarts=2, window=100)
    assert p.decide(KILLED, now=0)[0] and p.decide(KILLED, now=10)[0]
    restart, _, why = p.decide(KILLED, now=20)
    assert not restart and "already 2 restart(s) within 100 s (--max-restarts 2)" in why
    assert p.decide(KILLED, now=105)[0]                          # the one at 0 has left the window
    assert not p.decide(KILLED, now=106)[0]                      # 10 and 105 are within it
    assert p.decide(KILLED, now=111)[0]                          # 10 has left too


def test_the_backoff_doubles_in_a_crash_loop_only():
    p = RestartPolicy(max_restarts=9, window=0, backoff=1, backoff_max=3, settle=60)
    assert [p.decide(KILLED, now=t, ran=5)[1] for t in range(4)] == [1, 2, 3, 3]
    assert p.decide(KILLED, now=10, ran=600)[1] == 1             # a job that ran a while: the streak is over
    assert p.decide(KILLED, now=11, ran=5)[1] == 1               # the first quick failure after it
    assert p.decide(KILLED, now=12, ran=5)[1] == 2


def test_window_zero_counts_the_whole_run_and_zero_restarts_means_none():
    p = RestartPolicy(max_restarts=1, window=0)
    assert p.decide(KILLED, now=0)[0]
    assert not p.decide(KILLED, now=1e9)[0]
    assert not RestartPolicy(max_restarts=0).decide(KILLED, now=0)[0]


def test_bad_policy_values_are_refused():
    with pytest.raises(ValueError, match="max_restarts -1"):
        RestartPolicy(max_restarts=-1)
    with pytest.raises(ValueError, match="backoff_max"):
        RestartPolicy(backoff=10, backoff_max=1)


def test_hostfiles_of_both_flavours():
    assert parse_hostfile("# cluster\nn1:2\nn2\n\n") == [("n1", 2), ("n2", 1)]
    assert parse_hostfile("n1 slots=4\nn2 slots=2 # spare\n") == [("n1", 4), ("n2", 2)]
    assert format_hostfile([("n1", 2)], "mpich") == "n1:2\n"
    assert format_hostfile([("n1", 2)], "openmpi") == "n1 slots=2\n"
    with pytest.raises(ValueError, match="line 2"):
        parse_hostfile("n1\nn2 slots=x\n")
    with pytest.raises(ValueError, match="no hosts"):
        parse_hostfile("# nothing\n")


def test_lost_hosts_are_left_out_down_to_min_ranks():
    hosts = [("n1", 2), ("n2", 2), ("n3", 2)]
    assert fit_hosts(hosts, {"n1", "n2", "n3"}, 6, 2) == (hosts, 6)
    assert fit_hosts(hosts, {"n1", "n3"}, 6, 2) == ([("n1", 2), ("n3", 2)], 4)
    assert fit_hosts(hosts, {"n1", "n2", "n3"}, 5, 5)[1] == 5      # never more than asked
    with pytest.raises(ValueError, match="only 2 rank.*not answering: n2, n3.*--min-ranks is 3"):
        fit_hosts(hosts, {"n1"}, 6, 3)
