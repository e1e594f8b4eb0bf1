"""The one stop request of every long-running process (trainer rank, evaluator, launcher).

SIGTERM, SIGINT and SIGUSR1 ask for a graceful stop; the process finishes what it is doing (a step, an
evaluation), writes what it owes (the stop checkpoint, the report) and exits. Repeated SIGTERMs do not
escalate: at a time limit Slurm sends SIGTERM, SIGCONT, then SIGTERM again, and the stop checkpoint must
still be written (kill -9 remains for "now"). Only a second Ctrl-C (SIGINT after SIGINT) stops at once,
by KeyboardInterrupt. SIGUSR1 is there because Open MPI's mpirun forwards it to the ranks and waits,
where a SIGTERM makes it kill the job (docs/openmpi.md), and because Slurm's `--signal=B:USR1@90` warns
with it before a time limit.

The handler only sets plain attributes: taking a lock (threading.Event) inside a signal handler can
deadlock with the interrupted thread. Processes install it; the library only reads it.
"""
from __future__ import annotations

import signal
import threading
import time

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def settle(signals=SIGNALS) -> None:
    """The process has decided how it ends (its exit status is known): from now on stop signals are ignored,
    so that one arriving while the interpreter shuts down (which restores the default, deadly handlers)
    cannot turn a clean exit status into a death by signal. Main thread only (elsewhere: nothing)."""
    if threading.current_thread() is threading.main_thread():
        for s in signals:
            signal.signal(s, signal.SIG_IGN)


class StopSignal:
    """`signum`: the first stop signal received (0: none); `count`: how many arrived. Truthy once asked.
    install=False leaves the handlers alone (in-process use, or off the main thread): set .signum to stop."""

    def __init__(self, install: bool = True, signals=SIGNALS):
        self.signum = 0
        self.count = 0
        self._signals = tuple(signals)
        self._installed = install and threading.current_thread() is threading.main_thread()
        if self._installed:
            for s in signals:
                signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.count += 1
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt             # Ctrl-C twice: the person at the terminal means now
        self.signum = self.signum or signum

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a stop from inside the process (a test, a control message): as if `signum` arrived."""
        self.count += 1
        self.signum = self.signum or signum

    def __bool__(self):
        return bool(self.signum)

    @property
    def name(self) -> str:
        return signal_name(self.signum) if self.signum else ""

    def settled(self) -> None:
        """The process has decided how it ends: settle() (when this one installed handlers)."""
        if self._installed:
            settle(self._signals)

    def sleep(self, seconds: float) -> bool:
        """Sleep up to `seconds`, returning early (True) once a stop was asked."""
        end = time.monotonic() + seconds
        while not self.signum and (left := end - time.monotonic()) > 0:
            time.sleep(min(0.05, left))
        return bool(self.signum)
