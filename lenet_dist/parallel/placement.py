"""Which reducer a run gets: the one place that decides from where the ranks are and what was asked.

    one rank                      the fused "sum" (nothing is sent)
    --bucket-kb unset (default)   by placement: ranks on several nodes, naps between tests (more ranks than
                                  cores), or half precision: buckets of BUCKET_KB_DEFAULT; ranks that share
                                  one node, a core each: one non-blocking allreduce after backward
    --bucket-kb 0 | N | -1        the fused allreduce | buckets of N KiB | measure both, keep the faster
    pipelined                     buckets across nodes with a core per rank, not --deterministic
    --deterministic               the chosen reducer sums micro-batches in fixed point (fixedpoint.py)
    more ranks than cores         one node, float32, default or fused sum: the node's ranks take turns
                                  computing and sum through shared memory (turns.py)

Why: on shared memory the sum takes ~0.1 ms, so overlap hides nothing and the buckets' MPI calls cost a few
percent, while MPICH's non-blocking sum keeps its pace beside a busy process where the blocking one does
not. Pipelining needs a transfer to hide and a core of its own per rank: on a node with more ranks than
cores a rank's waits give its core to a peer, and each chunk waits for that peer's turn. Measurements:
docs/scaling.md.
"""
from __future__ import annotations

from lenet_dist.parallel.autotune import AutoReducer
from lenet_dist.parallel.buckets import BUCKET_KB_DEFAULT
from lenet_dist.parallel.fixedpoint import FixedPointReducer
from lenet_dist.parallel.reducers import BucketedReducer, FusedReducer, HalfPrecisionReducer
from lenet_dist.parallel.turns import TurnsReducer, takes_turns


def reducer_for(cfg, comm):
    """The reducer for a run of `cfg` (TrainConfig) on `comm`, unbound."""
    reducer = TurnsReducer(comm) if takes_turns(cfg, comm) else _float_reducer(cfg, comm)
    return FixedPointReducer(reducer, cfg.micro_batch) if cfg.deterministic else reducer


def _float_reducer(cfg, comm):
    if comm.size == 1:
        return FusedReducer(comm)
    if cfg.bucket_kb is None:                                     # by placement
        nothing_to_hide = comm.ranks_per_node == comm.size and comm.nap is None and cfg.allreduce_dtype == "float32"
        if nothing_to_hide:
            return FusedReducer(comm, nonblocking=True)
    if cfg.bucket_kb == 0:
        return FusedReducer(comm)
    kb = cfg.bucket_kb if cfg.bucket_kb and cfg.bucket_kb > 0 else BUCKET_KB_DEFAULT
    pipelined = not cfg.deterministic and comm.nap is None and comm.ranks_per_node < comm.size
    if cfg.allreduce_dtype != "float32":
        return HalfPrecisionReducer(comm, kb, cfg.allreduce_dtype, pipelined=pipelined)
    buckets = BucketedReducer(comm, kb, pipelined=pipelined)
    if cfg.bucket_kb == -1:
        return AutoReducer(FusedReducer(comm), buckets)
    return buckets
