"""lenet-keys: CurveZMQ key pairs for the trainer <-> evaluator link.

    lenet-keys generate keys --name trainer                          # keys/trainer.key, keys/trainer.key_secret
    lenet-keys generate keys --name evaluator --authorize keys/authorized   # + a copy of its public key there
    lenet-train --publish tcp://0.0.0.0:5555 --curve-secret-key keys/trainer.key_secret \\
                --curve-authorized keys/authorized
    lenet-evaluator --connect tcp://TRAINER:5555 --curve-secret-key keys/evaluator.key_secret \\
                    --curve-server-key keys/trainer.key

A .key file is public: hand it to the other side. A .key_secret file (mode 0600) holds the pair and
stays on its host. The trainer admits only clients whose .key is in its authorized folder (read at start).
"""
import argparse
import shutil
import sys
from pathlib import Path

from lenet_dist.transport import generate_keys


def main(argv=None):
    p = argparse.ArgumentParser(prog="lenet-keys", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="write NAME.key and NAME.key_secret into DIR")
    g.add_argument("dir", type=Path)
    g.add_argument("--name", required=True, help="file name stem, e.g. trainer or evaluator")
    g.add_argument("--authorize", type=Path, metavar="DIR", help="also copy the public key into this folder")
    g.add_argument("--force", action="store_true", help="overwrite an existing key pair")
    args = p.parse_args(argv)
    if not args.name or "/" in args.name or args.name.startswith("."):
        p.error(f"--name {args.name!r}: a plain file name stem, e.g. evaluator")
    try:
        public, secret = generate_keys(args.dir, args.name, overwrite=args.force)
        print(f"public key: {public}\nsecret key: {secret}")
        if args.authorize:
            args.authorize.mkdir(parents=True, exist_ok=True)
            print(f"authorized: {shutil.copy(public, args.authorize / public.name)}")
    except OSError as e:
        print(f"lenet-keys: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
