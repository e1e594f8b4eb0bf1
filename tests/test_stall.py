"""The stall guard on its own: real threads and real waits, a fake clock only to freeze the process."""
import threading
import time

import pytest

from lenet_dist.run.stall import StallGuard


class Fired:
    def __init__(self):
        self.seconds = []
        self.event = threading.Event()

    def __call__(self, seconds):
        self.seconds.append(seconds)
        self.event.set()


def test_steady_beats_keep_it_quiet():
    fired = Fired()
    with StallGuard(0.3, fired, tick=0.02) as guard:
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            guard.beat()
            time.sleep(0.03)
    assert fired.seconds == []


def test_no_beat_for_the_timeout_fires_once():
    fired = Fired()
    t0 = time.monotonic()
    with StallGuard(0.3, fired, tick=0.02) as guard:
        guard.beat()
        assert fired.event.wait(5.0)
        took = time.monotonic() - t0
        time.sleep(0.2)                             # it does not fire again
    assert len(fired.seconds) == 1
    assert fired.seconds[0] >= 0.3 and 0.3 <= took < 3.0


def test_the_quiet_time_counts_from_the_last_beat():
    fired = Fired()
    with StallGuard(0.4, fired, tick=0.02) as guard:
        for _ in range(10):                         # 0.6 s of steps 0.06 s apart
            time.sleep(0.06)
            guard.beat()
        last = time.monotonic()
        assert fired.event.wait(5.0)
    assert time.monotonic() - last >= 0.4


def test_a_frozen_process_is_not_a_stall():
    """SIGSTOP / a suspended job freezes the guard's thread too: its clock jumps between two ticks."""
    offset = [0.0]
    clock = lambda: time.monotonic() + offset[0]    # noqa: E731
    fired = Fired()
    with StallGuard(1.0, fired, tick=0.02, clock=clock) as guard:
        guard.beat()
        offset[0] += 600.0                          # ten minutes pass while nothing runs
        time.sleep(0.3)                             # the guard wakes: a gap in its own ticks, not a stall
        assert fired.seconds == []
        assert fired.event.wait(5.0)                # but a real stall after the thaw still counts
    assert 1.0 <= fired.seconds[0] < 5.0


def test_stop_is_prompt_and_idempotent():
    guard = StallGuard(60.0, Fired()).start()
    t0 = time.monotonic()
    guard.stop()
    guard.stop()
    assert time.monotonic() - t0 < 2.0


def test_timeout_zero_is_off_and_negative_is_refused():
    fired = Fired()
    with StallGuard(0, fired) as guard:
        assert guard._thread is None
        time.sleep(0.1)
    assert fired.seconds == []
    with pytest.raises(ValueError, match=">= 0"):
        StallGuard(-1, fired)
