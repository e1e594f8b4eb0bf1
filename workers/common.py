"""What the processes share around their flags: the help format, the data flags and loading the data they
name. Logging, BLAS threads and text helpers live in lenet_dist/run/ (process.py, text.py)."""
from __future__ import annotations

import argparse



class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows a flag's default once, and only when it says something (not None, not an off switch or an
    empty string, not when the help text already explains it)."""

    def _get_help_string(self, action):
        quiet = action.default is None or action.default is False or action.default in ("", argparse.SUPPRESS)
        if quiet or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def host_port(p, flag, text):
    """[HOST:]PORT -> (host, port), host 127.0.0.1 unless given; p.error on a bad one."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        p.error(f"{flag} {text!r}: expected [HOST:]PORT with a port in [0, 65535]")
    return host, int(port)


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


