"""What the processes share: logging with the rank in every line, BLAS threads, data loading, fault injection
(outputs of a run are in sinks.py). Process plumbing only; no math."""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
import time

import numpy as np


def one_line(e):
    """An exception as one line: 'Type: first line of the message'."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def number(v, spec=".4f", scale=1):
    """A figure for a log line: `v * scale` formatted, or 'n/a' when it is null, not a number or not finite
    (an evaluator's loss can be null; whatever arrives from outside may be anything)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v * scale):
        return "n/a"
    return format(v * scale, spec)


def raise_open_files_limit(log):
    """Rank 0 with --publish: every peer that connects holds a file descriptor until the server drops it, so
    take the soft RLIMIT_NOFILE up to the hard one (checkpoint writes keep a descriptor in hand anyway: see
    lenet_dist/ckptdir.py). Returns the limit now in force."""
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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows a flag's default once, and only when it says something (not None, not an off switch or an
    empty string, not when the help text already explains it)."""

    def _get_help_string(self, action):
        quiet = action.default is None or action.default is False or action.default in ("", argparse.SUPPRESS)
        if quiet or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def setup_logging(comm, level="INFO"):
    """Every line says which rank wrote it; ranks other than 0 only log warnings and errors."""
    fmt = f"%(asctime)s rank {comm.rank}/{comm.size} %(levelname)s %(message)s"
    logging.basicConfig(format=fmt, datefmt="%H:%M:%S", stream=sys.stderr, force=True,
                        level=level if comm.rank == 0 else max(logging.WARNING, logging.getLevelName(level)))


@contextlib.contextmanager
def blas_threads(threads):
    """Limit BLAS threads to `threads`, default 1. Under MPI the ranks share the cores, so one each. In a
    single process a second thread gains ~1.3x on an idle machine, but OpenBLAS threads spin while they
    wait for each other: on a busy machine a 5-epoch run fell from 6,500 to 257 images/s with 2 threads."""
    from threadpoolctl import threadpool_limits
    n = threads or 1
    with threadpool_limits(limits=n, user_api="blas"):
        yield n


DATA_HINT = ("point --data-dir (or LENET_DATA_DIR) at a folder with the four IDX files, run `lenet-data fetch` "
             "(with the same --dataset) where there is network access, or try `lenet-train --test-mode` for a first look")


def add_data_flags(p):
    """The data flags lenet-train and lenet-evaluator share."""
    from lenet_dist.data.sources import NAMES
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=NAMES, default="mnist",
                   help="a pinned data set (its own mirrors and cache folder), or idx: your own four IDX files "
                        "in --data-dir, checked by structure")
    g.add_argument("--data-dir", help="folder with the four IDX files (default: $LENET_DATA_DIR, then the cache, "
                                      "then download); given here, it must hold them")
    g.add_argument("--subset", action="store_true", help="the small MNIST subset shipped in the package")
    g.add_argument("--no-download", action="store_true", help="fail rather than download")
    return g


def read_dataset(args, log, fetch_first=False):
    """The data the flags name: --subset, --dataset idx --data-dir DIR, or a pinned data set. A DataError
    says what to do about it."""
    from lenet_dist.data import DataError, fetch_mnist, load_mnist, load_subset
    from lenet_dist.data.own import load_idx_dir
    try:
        if args.subset:
            return load_subset()
        if args.dataset == "idx":
            if not args.data_dir:
                raise DataError("--dataset idx needs --data-dir DIR: the folder with your four IDX files")
            return load_idx_dir(args.data_dir)
        kw = dict(download=not args.no_download, dataset=args.dataset, strict_dir=args.data_dir is not None)
        if fetch_first:
            fetch_mnist(args.data_dir, log=log.info, **kw)
            return None
        return load_mnist(args.data_dir, log=log.debug, **kw)
    except DataError as e:
        raise DataError(f"{e} (to fix: {DATA_HINT})") from None


def load_dataset(args, comm, log):
    """The data of read_dataset on every rank. For a pinned data set rank 0 obtains and verifies the files
    first (one download, not one per rank); then every rank reads them (from the shared cache on its node)."""
    if comm.rank == 0 and not args.subset and args.dataset != "idx":
        read_dataset(args, log, fetch_first=True)
    comm.barrier()
    return read_dataset(args, log)


class FaultInjector:
    """Rehearse failures: RANK:STEP:KIND makes rank RANK, just before step STEP, do one of
    raise (an exception), exit (die at once, exit code 17), perturb (nudge one parameter: replicas drift),
    nan (poison its parameters: the loss becomes NaN), slow (from then on compute 3x slower: a straggler),
    hang (stop for good, alive but stuck, as a deadlocked rank would), term (send itself SIGTERM: a stop
    request that reaches one rank only).
    Several specs may be joined with commas."""

    KINDS = ("raise", "exit", "perturb", "nan", "slow", "hang", "term")
    SLOWDOWN = 3.0

    def __init__(self, specs):
        self.specs = specs

    @classmethod
    def parse(cls, text):
        specs = []
        for part in filter(None, (p.strip() for p in (text or "").split(","))):
            try:
                rank, step, kind = part.split(":")
                rank, step = int(rank), int(step)
            except ValueError:
                raise ValueError(f"--fault {part!r}: expected RANK:STEP:KIND, e.g. 1:30:raise") from None
            if kind not in cls.KINDS or rank < 0 or step < 0:
                raise ValueError(f"--fault {part!r}: KIND must be one of {', '.join(cls.KINDS)}, "
                                 f"RANK and STEP >= 0")
            specs.append((rank, step, kind))
        return cls(specs)

    def maybe_fire(self, trainer, rank):
        for r, step, kind in self.specs:
            if r != rank or step != trainer.step:
                continue
            logging.getLogger("lenet.fault").warning("injecting fault '%s' at step %d", kind, step)
            if kind == "raise":
                raise RuntimeError(f"injected fault at step {step}")
            if kind == "exit":
                sys.stderr.flush()
                os._exit(17)
            if kind == "perturb":
                trainer.model.params[0] += np.float32(1e-3)
            if kind == "nan":
                trainer.model.params[:] = np.nan
            if kind == "slow":
                from lenet_dist.parallel.reducers import Straggler
                trainer.reducer = Straggler(trainer.reducer, self.SLOWDOWN)
            if kind == "term":
                os.kill(os.getpid(), signal.SIGTERM)
            if kind == "hang":
                while True:
                    time.sleep(3600)
