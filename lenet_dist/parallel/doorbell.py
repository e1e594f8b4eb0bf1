"""Node-local wake-ups that do not poll: one Unix datagram socket per rank of a node.

A rank that waits for its peers blocks in recv() and uses no CPU until a peer rings; the kernel wakes it at
once. MPI cannot wait like that (its waits spin, or nap and test), and on a node with more ranks than cores
every poll is taken from the rank that computes (parallel/turns.py).

The sockets live in Linux's abstract namespace ("\\0" names: no file to clean up, gone with the process),
named by a token the node's ranks share (comm.node_token) and the node-local rank. A ring is one byte, its
kind; a wait counts rings by kind, so a ring that arrives before its wait is kept for it.
"""
from __future__ import annotations

import socket
from collections import Counter

RECV_BYTES = 256                # rings read per recv() call, at most


class Doorbells:
    def __init__(self, token, me):
        self.token, self.me = token, me
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self._address(me))
        self.rung = Counter()   # rings received and not yet waited for, by kind

    def _address(self, rank):
        return f"\0lenet-dist-{self.token}-{rank}"

    def ring(self, ranks, kind):
        """Wake each of `ranks` (node-local) with a ring of `kind` (0-255)."""
        msg = bytes([kind])
        for r in ranks:
            self.sock.sendto(msg, self._address(r))

    def wait(self, kind, count):
        """Sleep until `count` rings of `kind` have arrived (counting those that came early), and use them."""
        while self.rung[kind] < count:
            self.rung.update(self.sock.recv(RECV_BYTES))    # one datagram: one ring
        self.rung[kind] -= count

    def close(self):
        self.sock.close()
