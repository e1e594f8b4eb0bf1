"""What a process of a run sets up around the library: logging with the rank in every line, BLAS threads, the
open-files limit. Called by the entry points in workers/; nothing here parses flags or installs handlers."""
from __future__ import annotations

import contextlib
import logging

from lenet_dist import logformat


def setup_logging(comm, level="INFO", fmt="text"):
    """Every line says which rank wrote it; ranks other than 0 only log warnings and errors. fmt: "text" or
    "json" (lenet_dist/logformat.py, the one log format of every process)."""
    logformat.setup(f"rank {comm.rank}/{comm.size}", level if comm.rank == 0 else
                    max(logging.WARNING, logging.getLevelName(level)), fmt)


@contextlib.contextmanager
def blas_threads(threads):
    """Limit BLAS threads to `threads`, default 1: under MPI the ranks share the cores, and OpenBLAS threads
    spin while they wait for each other, which costs far more than they gain on a busy machine
    (docs/performance.md)."""
    from threadpoolctl import threadpool_limits
    n = threads or 1
    with threadpool_limits(limits=n, user_api="blas"):
        yield n


def raise_open_files_limit(log):
    """Rank 0 with --publish: every peer that connects holds a file descriptor until the server drops it, so
    take the soft RLIMIT_NOFILE up to the hard one (checkpoint writes keep a descriptor in hand anyway: see
    lenet_dist/checkpoints/folder.py). Returns the limit now in force."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as e:
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, want, e)
    log.info("open-files limit %s (hard %s): about that many evaluator connections at once", soft, hard)
    return soft
