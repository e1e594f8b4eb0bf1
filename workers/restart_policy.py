"""lenet-launch's decisions, without processes: what kind of failure ended a job (from its stderr lines and
mpirun's exit code), whether a restart can help, when and on how many ranks.

    failure = classify(returncode, stderr_lines)    # Failure(kind, retry, why)
    decision = policy.decide(failure, now)          # restart? after how long? why (not)?
    hosts, n = fit_hosts(hosts, answering, asked, min_ranks)

The trainer's contract (workers/trainer.py): a failing rank prints one line
`lenet-train: rank R/N: error: TYPE: message`, a usage error exits 2 with `lenet-train: error: ...`, the stall
guard prints `... no training step finished in Ns after step S: ...`, a rank asked to stop logs `stopped by
signal N`. A rank that dies on a signal leaves only mpirun's own words.
"""
from __future__ import annotations

import re
import signal
from dataclasses import dataclass, field

RANK_ERROR = re.compile(r"lenet-train: rank (\d+)/(\d+): error: (.*)")
USAGE_ERROR = re.compile(r"^lenet-train: error: |^usage: lenet-train")
STALL = "no training step finished in"
STOPPED = re.compile(r"stopped by signal (\d+) at step (\d+)")
# mpirun's words for a rank that died on a signal: MPICH (Hydra), and Open MPI (5 breaks its line there).
SIGNAL_WORDS = (re.compile(r"EXIT STRING: .*\(signal (\d+)\)"), re.compile(r"KILLED BY SIGNAL: (\d+)"),
                re.compile(r"exited on\s+signal (\d+)"))

# Failures that happen again on every restart: (kind, why it will recur) by the exception's type name.
WILL_RECUR = {
    "DataError": ("bad data", "the data files are missing or corrupt; a restart reads the same files"),
    "ResumeError": ("config refused on resume", "the checkpoint was made with another configuration or "
                                                "other data; a restart resumes from it again"),
    "CheckpointError": ("checkpoint error", "checkpoints cannot be written or read; a restart needs them"),
    "TransportError": ("transport error", "the --publish endpoint or its keys are refused; they do not change"),
}


@dataclass(frozen=True)
class Failure:
    kind: str           # e.g. "killed", "stall", "diverged loss", "usage error"
    retry: bool         # could a restart get past it?
    why: str            # the evidence, one line, for the log


def _signal_name(n):
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"


def classify(returncode, lines):
    """What ended a job that exited with `returncode` and printed `lines` on stderr. An error that will
    recur wins over a death it caused (MPI_Abort kills the other ranks)."""
    errors, stall, stopped, signum = [], None, None, None
    usage = [line.strip() for line in lines if USAGE_ERROR.search(line)]
    if usage:                               # argparse prints its usage, then the line that says what is wrong
        said = next((u for u in usage if u.startswith("lenet-train: error:")), usage[0])
        return Failure("usage error", False, f"{said} (the same flags fail the same way)")
    for line in lines:
        m = RANK_ERROR.search(line)
        if m:
            text = m.group(3).strip()
            if STALL in text:
                stall = stall or f"rank {m.group(1)}: {text}"
            else:
                errors.append((int(m.group(1)), text))
            continue
        m = STOPPED.search(line)
        if m:
            stopped = stopped or (int(m.group(1)), int(m.group(2)))
    text = "\n".join(line.rstrip("\n") for line in lines)
    found = [m for pattern in SIGNAL_WORDS if (m := pattern.search(text))]
    if found:
        signum = int(found[0].group(1))
    for rank, text in errors:
        typ, _, message = text.partition(": ")
        if typ == "TrainingError":
            if "diverged" in message:
                return Failure("diverged loss", False, f"rank {rank}: {message} (the same steps diverge again)")
            if "out of sync" in message:
                return Failure("replica mismatch", False, f"rank {rank}: {message} (a bug or a bad node, "
                                                          "not a crash: a restart would hide it)")
            return Failure("training error", False, f"rank {rank}: {message}")
        if typ in WILL_RECUR:
            kind, because = WILL_RECUR[typ]
            return Failure(kind, False, f"rank {rank}: {text} ({because})")
    if errors:                              # anything else (RuntimeError, MemoryError, OSError): maybe transient
        rank, text = errors[0]
        return Failure("rank error", True, f"rank {rank}: {text}")
    if stall:
        return Failure("stall", True, stall)
    if signum is not None:
        return Failure("killed", True, f"a rank was killed by {_signal_name(signum)}")
    if stopped:                             # someone sent a rank SIGTERM/SIGINT: a deliberate stop
        return Failure("stopped", False, f"a rank was stopped by {_signal_name(stopped[0])} at step "
                                         f"{stopped[1]} (checkpoint written); a stop is not a crash")
    if returncode is not None and returncode < 0:
        return Failure("killed", True, f"mpirun was killed by {_signal_name(-returncode)}")
    return Failure("exit", True, f"a rank exited with code {returncode} without an error line")


@dataclass
class RestartPolicy:
    """At most `max_restarts` restarts within any `window` seconds (0: within the whole run). A restart waits
    `backoff` seconds, doubled for each failure in a row that came less than `settle` seconds after its
    start (a crash loop), at most `backoff_max`."""
    max_restarts: int = 3
    window: float = 3600.0
    backoff: float = 1.0
    backoff_max: float = 30.0
    settle: float = 60.0
    restarts: list = field(default_factory=list)    # times of the restarts granted so far
    quick: int = 0                                  # failures in a row that came soon after their start

    def __post_init__(self):
        if self.max_restarts < 0 or self.window < 0 or self.backoff < 0 or self.backoff_max < self.backoff:
            raise ValueError(f"restart policy: max_restarts {self.max_restarts}, window {self.window}, "
                             f"backoff {self.backoff}, backoff_max {self.backoff_max}: need all >= 0 and "
                             f"backoff_max >= backoff")

    def decide(self, failure, now, ran=float("inf")):
        """(restart, delay seconds, why) for a job that failed at `now` after running `ran` seconds. A
        granted restart is counted at `now`."""
        if not failure.retry:
            return False, 0.0, f"not restarting: {failure.kind} will recur: {failure.why}"
        recent = [t for t in self.restarts if not self.window or now - t < self.window]
        span = f"within {self.window:g} s" if self.window else "in this run"
        if len(recent) >= self.max_restarts:
            return False, 0.0, (f"not restarting: {failure.kind}: {failure.why}; already {len(recent)} "
                                f"restart(s) {span} (--max-restarts {self.max_restarts})")
        self.quick = self.quick + 1 if ran < self.settle else 0
        delay = min(self.backoff * 2 ** max(self.quick - 1, 0), self.backoff_max)
        self.restarts.append(now)
        return True, delay, (f"restarting ({len(recent) + 1}/{self.max_restarts} {span}) in {delay:g} s: "
                             f"{failure.kind}: {failure.why}")


def parse_hostfile(text):
    """[(host, slots)] from an MPICH (`host:slots`) or Open MPI (`host slots=N`) hostfile; slots default 1."""
    hosts = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+?)(?::(\d+))?(?:\s+(?:slots|max_slots|max-slots)\s*=\s*(\d+))*\s*", line)
        if not m:
            raise ValueError(f"hostfile line {n}: {raw.strip()!r}: expected 'host', 'host:slots' or "
                             f"'host slots=N'")
        slots = int(m.group(2) or 0) or int(m.group(3) or 0) or 1
        hosts.append((m.group(1), slots))
    if not hosts:
        raise ValueError("the hostfile lists no hosts")
    return hosts


def format_hostfile(hosts, flavor):
    return "".join(f"{h}:{s}\n" if flavor == "mpich" else f"{h} slots={s}\n" for h, s in hosts)


def fit_hosts(hosts, answering, asked, min_ranks):
    """The hosts that answer and the ranks they can hold, up to `asked`. Raises ValueError below min_ranks."""
    up = [(h, s) for h, s in hosts if h in answering]
    n = min(asked, sum(s for _, s in up))
    if n < min_ranks:
        lost = ", ".join(h for h, _ in hosts if h not in answering) or "none"
        raise ValueError(f"only {n} rank(s) can be started (hosts not answering: {lost}); --min-ranks is "
                         f"{min_ranks}")
    return up, n
