"""Node-local wake-ups (lenet_dist/parallel/doorbell.py): real Unix datagram sockets between two doorbells."""
import threading
import time

from lenet_dist.parallel.doorbell import Doorbells


def test_rings_are_counted_by_kind_and_kept_until_waited_for():
    token = f"test-{time.monotonic_ns()}"
    a, b = Doorbells(token, 0), Doorbells(token, 1)
    try:
        a.ring([1], 2)              # a READY before the DONE that b waits for first
        a.ring([1], 0)
        a.ring([1], 0)
        b.wait(0, 2)                # both DONE rings, the READY kept
        assert b.rung[2] == 1 and b.rung[0] == 0
        b.wait(2, 1)
        assert b.rung[2] == 0
        b.ring([0, 0], 1)
        a.wait(1, 2)
    finally:
        a.close()
        b.close()


def test_a_waiting_rank_uses_no_cpu():
    """The waiter sleeps in recv() until the ring: its thread's CPU time over a 0.5 s wait stays near zero
    (a napping poll would wake thousands of times)."""
    token = f"test-{time.monotonic_ns()}"
    a, b = Doorbells(token, 0), Doorbells(token, 1)
    try:
        ringer = threading.Timer(0.5, a.ring, args=([1], 0))
        ringer.start()
        wall, cpu = time.monotonic(), time.thread_time()
        b.wait(0, 1)
        wall, cpu = time.monotonic() - wall, time.thread_time() - cpu
        ringer.join()
        assert wall >= 0.45
        assert cpu < 0.02, cpu
    finally:
        a.close()
        b.close()


def test_two_nodes_tokens_do_not_meet():
    """Doorbells of another token (another job on the node) are other sockets: both bind rank 0."""
    a, b = Doorbells(f"job-a-{time.monotonic_ns()}", 0), Doorbells(f"job-b-{time.monotonic_ns()}", 0)
    a.close()
    b.close()
