"""lenet-launch's decisions, without processes: what kind of failure ended a job (from mpirun's exit status),
whether a restart can help, when and on how many ranks.

    failure = classify(returncode, output_lines)    # Failure(kind, retry, why)
    decision = policy.decide(failure, now)          # restart? after how long? why (not)?
    hosts, n = fit_hosts(hosts, answering, asked, min_ranks)

The trainer's contract is its exit status (exitcodes.py), which mpirun passes on: the kind of
failure and whether it will recur come from the status alone, never from the wording of the trainer's error
line, which is only quoted in `why` for the log. mpirun's own words say when a rank died on a signal.
"""
from __future__ import annotations

import re
import signal
from dataclasses import dataclass, field

from lenet_dist.stopsignal import signal_name

from lenet_dist.run import exitcodes

RANK_ERROR = re.compile(r"lenet-train: rank (\d+)/(\d+): error: (.*)")
USAGE_LINE = re.compile(r"^lenet-train: error: ")
# mpirun's words for a rank that died on a signal: MPICH (Hydra), and Open MPI (5 breaks its line there).
SIGNAL_WORDS = (re.compile(r"EXIT STRING: .*\(signal (\d+)\)"), re.compile(r"KILLED BY SIGNAL: (\d+)"),
                re.compile(r"exited on\s+signal (\d+)"))
# signals that only kill: a status of N (MPICH's for a rank killed by N, also from a remote host) or 128 + N
FATAL_SIGNALS = {int(s) for s in (signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGFPE,
                                  signal.SIGILL)}
# the exception type a rank's line names for each status: which line `why` quotes
_TYPE_OF = {exitcodes.BAD_DATA: "DataError", exitcodes.RESUME_REFUSED: "ResumeError",
            exitcodes.DIVERGED: "TrainingError", exitcodes.REPLICAS: "TrainingError",
            exitcodes.TRAINING: "TrainingError", exitcodes.TRANSPORT: "TransportError"}


@dataclass(frozen=True)
class Failure:
    kind: str           # e.g. "killed", "stall", "diverged loss", "usage error"
    retry: bool         # could a restart get past it?
    why: str            # the evidence, one line, for the log


def _said(lines, status):
    """The rank's error line to quote for `status`: the one naming its exception type if any, else the first."""
    usage = [line.strip() for line in lines if USAGE_LINE.search(line)]
    if status == exitcodes.USAGE and usage:
        return usage[0]
    errors = [(m.group(1), m.group(3).strip()) for line in lines if (m := RANK_ERROR.search(line))]
    typ = _TYPE_OF.get(status)
    for rank, text in errors:
        if typ and text.startswith(typ + ":"):
            return f"rank {rank}: {text.partition(': ')[2]}"
    return f"rank {errors[0][0]}: {errors[0][1]}" if errors else None


def _signal_death(returncode, lines):
    """The signal mpirun says killed a rank, or None."""
    text = "\n".join(line.rstrip("\n") for line in lines)
    found = [m for pattern in SIGNAL_WORDS if (m := pattern.search(text))]
    if found:
        return int(found[0].group(1))
    if returncode is not None and returncode > 0 and (returncode & 127) in FATAL_SIGNALS and \
            returncode in (returncode & 127, 128 + (returncode & 127)):
        return returncode & 127
    return None


def classify(returncode, lines):
    """What ended a job that exited with `returncode` and printed `lines`. The status decides; a status that
    says the failure will recur wins over the deaths it caused (MPI_Abort kills the other ranks)."""
    said = _said(lines, returncode)
    signum = _signal_death(returncode, lines)
    if returncode in exitcodes.WILL_RECUR and not (returncode == exitcodes.USAGE and signum):
        kind, because = exitcodes.WILL_RECUR[returncode]
        return Failure(kind, False, f"{said or f'exit status {returncode}'} ({because})")
    if returncode == exitcodes.STOPPED:
        return Failure("stopped", False, "the run was stopped on request (live control; its checkpoint "
                                         "written); a stop is not a crash")
    stop = exitcodes.stop_signal(returncode) if returncode is not None else None
    if stop and signum is None:             # a rank was sent SIGTERM/SIGUSR1: it stopped with its checkpoint
        return Failure("stopped", False, f"the ranks were stopped by {signal_name(stop)} (checkpoint "
                                         f"written); a stop is not a crash")
    if signum is not None:
        return Failure("killed", True, f"a rank was killed by {signal_name(signum)}")
    if returncode == exitcodes.STALL:
        return Failure("stall", True, said or "a rank's stall guard ended the job (--stall-timeout)")
    if returncode is not None and returncode < 0:
        return Failure("killed", True, f"mpirun was killed by {signal_name(-returncode)}")
    if returncode == exitcodes.FAILED:
        return Failure("rank error", True, said or "a rank failed (exit status 1)")
    return Failure("exit", True, f"a rank exited with code {returncode}" + (f": {said}" if said else
                                                                          " without an error line"))


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
