"""The contract between lenet-train and lenet-launch: what a trainer's exit status means.

The launcher decides from the status alone (restart or not, and what to call the failure); the one error
line a rank prints is for people, and its wording can change freely. Statuses a trainer chooses are below
128 and outside 3..31, because MPICH's mpirun reports a rank killed by signal N as status N, and Open MPI's
as 128 + N. A rank that stops for a signal (SIGTERM, SIGINT, SIGUSR1) exits 128 + N, which MPICH's mpirun
passes on as N: stopped() reads both.

    status   name               restart?  meaning
    0        OK                 -         the run finished (or had finished already)
    1        FAILED             yes       anything else: a rank crashed, ran out of memory, ...
    2        USAGE              no        a bad flag or value (argparse's status); the same command fails again
    65       BAD_DATA           no        the data files are missing, corrupt or unusable
    66       RESUME_REFUSED     no        --resume cannot continue this folder (other data, config, none usable)
    67       CHECKPOINT_FOLDER  no        the checkpoint folder cannot be written (read-only, full, no permission)
    68       DIVERGED           no        the loss became NaN or Inf: the same steps diverge again
    69       REPLICAS           no        replicas out of sync: a bug or a bad node, not a crash
    70       TRAINING           no        another training error
    71       TRANSPORT          no        the --publish endpoint or its keys are refused
    72       NOT_LEARNING       no        accuracy at chance level, or a loss that does not fall: the same run
                                          does not learn again (its checkpoint is written)
    73       STOPPED            no        stopped on request (live control: the page, the evaluator) with its
                                          stop checkpoint written; --resume continues the run
    75       STALL              yes       the stall guard: no step finished in --stall-timeout (a peer died)
    128+N    stopped(N)         no        stopped by signal N with its stop checkpoint written
"""
from __future__ import annotations

import signal

from lenet_dist.stopsignal import SIGNALS

OK = 0
FAILED = 1
USAGE = 2
BAD_DATA = 65
RESUME_REFUSED = 66
CHECKPOINT_FOLDER = 67
DIVERGED = 68
REPLICAS = 69
TRAINING = 70
TRANSPORT = 71
NOT_LEARNING = 72
STOPPED = 73
STALL = 75

STOP_SIGNALS = SIGNALS                    # the signals a rank stops for with its checkpoint (stopsignal.py)

# status -> (kind, why a restart cannot help), for the statuses that will recur
WILL_RECUR = {
    USAGE: ("usage error", "the same flags fail the same way"),
    BAD_DATA: ("bad data", "the data files are missing or corrupt; a restart reads the same files"),
    RESUME_REFUSED: ("config refused on resume", "the checkpoint folder cannot be continued as asked; a "
                                                 "restart resumes from it again"),
    CHECKPOINT_FOLDER: ("checkpoint folder unusable", "the checkpoint folder cannot be written (read-only, "
                                                      "full or no permission); a restart writes there again"),
    DIVERGED: ("diverged loss", "the same steps diverge again"),
    REPLICAS: ("replica mismatch", "a bug or a bad node, not a crash: a restart would hide it"),
    TRAINING: ("training error", "training cannot go on from here"),
    TRANSPORT: ("transport error", "the --publish endpoint or its keys are refused; they do not change"),
    NOT_LEARNING: ("not learning", "the same configuration does not learn again; change --lr or --lr-scaling"),
}
RETRY = {FAILED: "rank error", STALL: "stall"}


def stopped(signum: int) -> int:
    """The status of a rank that stopped for `signum` with its checkpoint written."""
    return 128 + int(signum)


def stop_signal(status: int) -> int | None:
    """The stop signal a job's status says it stopped for (128 + N from a rank, N from MPICH's mpirun), or
    None. MPICH's 2 for a rank's 130 is read as USAGE: a lone SIGINT reaches a rank only from its terminal."""
    for s in STOP_SIGNALS:
        if status == 128 + s or (status == s and s != signal.SIGINT):
            return int(s)
    return None


_BY_TYPE = {"UsageError": USAGE, "DataError": BAD_DATA, "ResumeError": RESUME_REFUSED,
            "CheckpointFolderError": CHECKPOINT_FOLDER, "CheckpointError": CHECKPOINT_FOLDER,
            "TransportError": TRANSPORT}


def status_for(exc: BaseException) -> int:
    """The exit status of a trainer ending on `exc`, by its type (a subclass counts as its base)."""
    names = [c.__name__ for c in type(exc).__mro__]
    for name in names:
        if name in _BY_TYPE:
            return _BY_TYPE[name]
    if "TrainingError" in names:
        kind = getattr(exc, "kind", None)
        return DIVERGED if kind == "diverged" else REPLICAS if kind == "replicas" else TRAINING
    return FAILED
