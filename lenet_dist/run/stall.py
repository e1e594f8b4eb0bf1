"""A rank's stall guard: ends the process when its training loop stops making progress.

A rank that waits in a collective for a peer that has died waits forever: MPI has no timeout, and the
launcher does not always notice the death (once in our CI, Hydra let a rank wait on in the allreduce
after its peer had died by os._exit; a few hundred such crashes here did not repeat it).
The guard is a daemon thread. The loop calls `beat()` after each step; when no beat has come for
`timeout` seconds, the thread calls `on_stall(seconds)`, which prints one line and exits the process,
and a process that exits is something every launcher notices.
mpi4py releases the GIL inside blocking MPI calls, so the thread runs while the main thread waits there.

A process that was frozen as a whole (SIGSTOP, a suspended Slurm job, a paused VM) is not stalled: the
guard sees a gap in its own ticks and starts counting again from when it woke.
"""
from __future__ import annotations

import threading
import time


class StallGuard:
    def __init__(self, timeout, on_stall, *, tick=None, clock=time.monotonic):
        if not timeout >= 0:
            raise ValueError(f"stall timeout must be >= 0 seconds (0: off), got {timeout}")
        self.timeout = float(timeout)               # 0: off, no thread
        self.on_stall = on_stall                    # called once, from the guard's thread, with the seconds
        self.tick = tick if tick is not None else min(1.0, max(0.01, self.timeout / 10))
        self.clock = clock
        self._last = clock()
        self._halt = threading.Event()
        self._thread = None

    def start(self):
        self._last = self.clock()
        if not self.timeout:
            return self
        self._thread = threading.Thread(target=self._watch, name="lenet-stall-guard", daemon=True)
        self._thread.start()
        return self

    def beat(self):
        """The loop made progress (a step finished)."""
        self._last = self.clock()

    def stop(self):
        self._halt.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _watch(self):
        woke = self.clock()
        while not self._halt.wait(self.tick):
            now = self.clock()
            if now - woke > 3 * self.tick + 2.0:    # we were frozen too: the whole process was
                self._last = now
            woke = now
            quiet = now - self._last
            if quiet >= self.timeout:
                self.on_stall(quiet)
                return
