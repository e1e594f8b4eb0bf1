"""Ranks that share a core take turns: on a node with more ranks than cores, the node's ranks are split into
turns of at most `cores` ranks; each step, turn 0 computes its shards while the others sleep, then turn 1,
and so on; the last turn sums every rank's gradient through the node's shared memory, and every rank reads
the sum back.

    local ranks 0 1 | 2 3      (4 ranks, 2 cores: 2 turns of 2)
    step:  turn 0 computes, copies its gradients to its slots, rings turn 1 (which slept in begin())
           turn 1 computes, copies, rings its own turn; each of its ranks sums its chunk of every slot
           into the total and rings every rank of the node
           every rank copies the total back, and updates as without turns

Four ranks competing for two cores deliver less than two ranks alone (context switches, caches, a peer that
waits while the one it waits for is descheduled); two at a time, one pair after the other, deliver about
what two ranks do, provided the hand-overs cost nothing: a waiting rank blocks on its doorbell
(doorbell.py: a Unix datagram socket, no CPU until it rings), never in MPI, whose waits spin or poll.

Exact: every rank computes the same shard from the same parameters with the same code, only at another
moment. The sum adds the ranks' float32 gradients pairwise, in the order MPI's recursive doubling and
halving add them ((g0 + g1) + (g2 + g3)), so that taking turns changes no bit of the result where MPI sums
so (tests/test_turns.py compares); --deterministic sums int64 fixed point, exact in any order. Which turn a
rank takes is its node-local rank's: rank // ceil(ranks / turns).

Where: one node only (the ranks of several nodes would need the node sums summed again across them), the
float32 gradient, and the default or fused sum (buckets overlap a transfer; in turns there is none on one
node). placement.py decides.

Scratch in common: the ranks that follow each other on a core (the same place in their turns: 0 and 2, 1 and
3) do their step's arithmetic in the same memory, one node window per place carved by layers.ScratchArena,
so each finds the core's cache full of the arrays it is about to write instead of the last rank's. The
arena is sized after one step in each rank's own scratch and is held from the end of begin() to the start
of reduce(): only one of those ranks is ever between the two, and evaluation (every rank at once) uses each
rank's own. It changes where the arithmetic happens, never what it computes. LENET_TURNS_SCRATCH=own keeps
every rank's scratch its own (for comparison).

LENET_TURNS: unset or "auto" (the default): turns when a node holds a multiple of its cores (4 ranks on 2
cores: 2 turns; 3 on 2 would leave a core idle in the second turn, so they share the cores); with the
scratch in common, 4 ranks in turns on 2 cores deliver more images/s than competing, for the CPU of -n 2
(docs/scaling.md); "off": no turns; N: N turns whatever the cores (at most one per rank).
"""
from __future__ import annotations

import logging
import os
import shutil

import numpy as np

from lenet_dist.errors import UsageError
from lenet_dist.nn.layers import ScratchArena
from lenet_dist.parallel.doorbell import Doorbells
from lenet_dist.parallel.reducers import EVERYTHING, FusedReducer

log = logging.getLogger(__name__)

VAR = "LENET_TURNS"
SCRATCH_VAR = "LENET_TURNS_SCRATCH"
ARENA_SLACK = 1.5               # the arena: this many times the scratch of the first step (--balance grows
                                # shards; a buffer that no longer fits stays the rank's own)


def parse_setting(text):
    """LENET_TURNS's value -> None (auto, the default) or the number of turns asked for (1: off); ValueError
    naming it."""
    t = (text or "").strip().lower()
    if t in ("", "auto"):
        return None
    if t in ("off", "none"):
        return 1
    if t.isdigit() and int(t) >= 1:
        return int(t)
    raise ValueError(f"{VAR} must be a number of turns (1 or more), 'auto' or 'off', got {text!r}")


def plan(local_rank, local_size, cores, setting=None):
    """(turns on this node, this rank's turn, ranks per turn) for `local_size` ranks on `cores` cores;
    `setting`: parse_setting's answer."""
    if setting is None:
        turns = local_size // cores if local_size > cores and local_size % cores == 0 else 1
    else:
        turns = min(setting, local_size)
    per = -(-local_size // max(turns, 1))
    return -(-local_size // per), local_rank // per, per


def shm_room(path="/dev/shm"):
    """Bytes free to this user in the shared-memory filesystem, or None when there is none to ask."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def shares_scratch(text):
    """LENET_TURNS_SCRATCH's value -> whether ranks in turns share their scratch; ValueError naming it."""
    t = (text or "").strip().lower()
    if t in ("", "shared"):
        return True
    if t == "own":
        return False
    raise ValueError(f"{SCRATCH_VAR} must be 'shared' (the default) or 'own', got {text!r}")


DONE, LAST, READY, HELLO = 0, 1, 2, 3   # doorbell kinds: a turn is done; a rank of the last turn is done;
                                        # a sum is there; a rank's doorbell is up


class TurnsReducer(FusedReducer):
    """The node's ranks compute in turns and sum through shared memory (see the module's docstring).

    bind() allocates the slots (one per node rank, the buffer's size and dtype, then the total) and the
    doorbells: collective, at the trainer's start, when every rank is there. begin() sleeps until the turn
    before this rank's is done; reduce() is the rest of the step's hand-overs and the sum. The ranks of
    later turns owe their update until their next turn begins (or anything settles), so that only one
    turn's ranks run at any time, the update included: the same update from the same sum, later."""

    def __init__(self, comm):
        super().__init__(comm)
        self.name = "in turns, through shared memory"
        c = comm
        self.me, self.size = c.node_rank, c.node_size
        self.members = [list(range(t * c.turn_size, min((t + 1) * c.turn_size, self.size)))
                        for t in range(c.turns)]
        self.turn = c.turn
        self.last = self.members[-1]
        self.others = [r for r in range(self.size) if r != self.me]     # every other rank of the node
        self._owed = None                       # later turns: this step's update, applied when the next begins
        self.place = self.me - self.members[self.turn][0]     # the ranks of one place follow each other on a core
        self._workspaces, self._steps, self.arena = [], 0, None

    @property
    def description(self):
        c = self.comm
        return f"{self.name}; {c.turns} turns of {c.turn_size} rank(s) per node"

    def bind(self, buf, tail):
        super().bind(buf, tail)
        mem = self.comm.node_shared((self.size + 1) * buf.nbytes)
        slots = mem.view(buf.dtype).reshape(self.size + 1, len(buf))
        self.slots, self.total = slots[:-1], slots[-1]
        self.bells = Doorbells(self.comm.node_token(), self.me)
        self.comm.barrier()                     # every doorbell is bound before the first ring
        try:
            self.bells.ring(self.others, HELLO)
        except OSError as e:
            raise UsageError(f"the ranks MPI places on one node cannot ring each other ({e.strerror}: another "
                             f"network namespace?); set LENET_TURNS=off") from None
        self.bells.wait(HELLO, self.size - 1)
        if self.me in self.last:                # this rank's chunk of the sum
            bounds = np.linspace(0, len(buf), len(self.last) + 1).astype(int)
            i = self.last.index(self.me)
            self.chunk = slice(bounds[i], bounds[i + 1])

    def share(self, workspaces):
        if shares_scratch(os.environ.get(SCRATCH_VAR)):
            self._workspaces = list(workspaces)

    def _make_arena(self):
        """Collective over the node, at the second step's begin() (every rank of the node is there, whatever
        it shares): each rank of the first turn gives a window segment of ARENA_SLACK times its first step's
        scratch, which the ranks of its place use from then on. The segments take at most half the room
        left in /dev/shm, where MPI keeps shared windows: a container's is often 64 MB, and a page touched
        past it is a SIGBUS."""
        size = 0
        if self.turn == 0 and self._workspaces:
            size = int(sum(ws.nbytes for ws in self._workspaces) * ARENA_SLACK)
            room = shm_room()
            if room is not None:
                size = min(size, room // (2 * len(self.members[0])))
        segments = self.comm.node_segments(size)
        mem = segments[self.members[0][self.place]]
        if len(mem) and self._workspaces:
            self.arena = ScratchArena(mem)
            for ws in self._workspaces:
                ws.arena = self.arena
            log.info("in turns: node ranks %s compute in one %.1f MiB of scratch",
                     " and ".join(str(m[self.place]) for m in self.members if self.place < len(m)),
                     len(mem) / 2 ** 20)

    def begin(self):
        super().begin()
        self._steps += 1
        if self._steps == 2:
            self._make_arena()
        self.wait_turn()
        self.settle()
        if self.arena is not None:
            self.arena.active = True            # until reduce(): no other rank of this place is computing

    def update(self, apply):
        if self.turn == 0:
            apply(EVERYTHING)
        else:
            self._owed = apply

    def settle(self):
        if self.arena is not None:
            self.arena.active = False
        if self._owed is not None:
            apply, self._owed = self._owed, None
            apply(EVERYTHING)

    def wait_turn(self):
        """Sleep until every rank of the turn before this rank's has computed (turn 0: at once)."""
        if self.turn > 0:
            self.bells.wait(DONE, len(self.members[self.turn - 1]))

    def reduce(self):
        if self.arena is not None:
            self.arena.active = False           # before the next rank of this place can begin
        self.slots[self.me] = self.buf
        if self.me in self.last:
            peers = [r for r in self.last if r != self.me]
            self.bells.ring(peers, LAST)
            self.bells.wait(LAST, len(peers))
            pairwise_sum(self.slots[:, self.chunk], out=self.total[self.chunk])
            self.bells.ring(self.others, READY)
            self.bells.wait(READY, len(peers))
        else:
            self.bells.ring(self.members[self.turn + 1], DONE)
            self.bells.wait(READY, len(self.last))
        self.buf[:] = self.total


def pairwise_sum(rows, out):
    """Sum the rows of `rows` (ranks x n) into `out` (n), pairwise as MPI's recursive doubling adds ranks:
    with p = 2^k + r ranks, the first 2r are summed in pairs (0+1, 2+3, ...), then the 2^k partial sums in a
    balanced tree ((a + b) + (c + d)). Each addition is one float operation per element, so the result is
    the same bits as an MPI sum that adds in this order."""
    p = len(rows)
    r = p - (1 << (p.bit_length() - 1))
    level = [rows[i] + rows[i + 1] for i in range(0, 2 * r, 2)] + [rows[i] for i in range(2 * r, p)]
    while len(level) > 1:
        level = [level[i] + level[i + 1] for i in range(0, len(level), 2)]
    out[...] = level[0]


def takes_turns(cfg, comm):
    """Whether a run of `cfg` on `comm` computes in turns: this node's plan says so, the job is on one node,
    and the gradient is summed whole in float32 (the default sum, or --bucket-kb 0)."""
    return (getattr(comm, "turns", 1) > 1 and comm.ranks_per_node == comm.size
            and cfg.allreduce_dtype == "float32" and cfg.bucket_kb in (None, 0))
