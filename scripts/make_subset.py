"""Cut the small real MNIST subset shipped in lenet_dist/subset/ (the offline test data).

    python scripts/make_subset.py [--source DIR] [--out DIR] [--train 2000] [--test 1000]

Takes the FIRST `--train` training and first `--test` test examples (no shuffling: simple to reproduce and,
for MNIST, close to class-balanced; the script prints the class counts). The source files are verified
against the pinned MNIST sha256 first. Output is gzipped IDX with mtime 0 and no file name in the gzip
header, so the same input gives the same bytes. Prints the sha256 table for SUBSET_HASHES and
exits 1 if the table in lenet_dist/data/subset.py differs (paste the printed one in).
"""
import argparse
import gzip
import hashlib
import struct
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lenet_dist.data import MNIST_FILES, SUBSET_HASHES, load_mnist  # noqa: E402


def idx_bytes(a: np.ndarray) -> bytes:
    assert a.dtype == np.uint8
    return bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "mnist"),
                   help="folder with the four full MNIST files (default: ../shared/data/mnist)")
    p.add_argument("--out", default=str(ROOT / "lenet_dist" / "subset"), help="output folder")
    p.add_argument("--train", type=int, default=2000, help="number of training examples")
    p.add_argument("--test", type=int, default=1000, help="number of test examples")
    args = p.parse_args(argv)

    ds = load_mnist(args.source, download=False, log=lambda m: print(m, file=sys.stderr))
    parts = {"train_images": ds.train_images[:args.train], "train_labels": ds.train_labels[:args.train],
             "test_images": ds.test_images[:args.test], "test_labels": ds.test_labels[:args.test]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hashes = {}
    for key, arr in parts.items():
        raw = idx_bytes(np.ascontiguousarray(arr))
        hashes[key] = hashlib.sha256(raw).hexdigest()
        path = out / f"{MNIST_FILES[key][0]}.gz"
        path.write_bytes(gzip.compress(raw, compresslevel=9, mtime=0))
        print(f"{path}  {arr.shape}  {path.stat().st_size} bytes", file=sys.stderr)
    for split in ("train", "test"):
        counts = np.bincount(parts[f"{split}_labels"], minlength=10)
        print(f"{split} class counts: {counts.tolist()}", file=sys.stderr)
    print("SUBSET_HASHES = {")
    for key, h in hashes.items():
        print(f'    "{key}": "{h}",')
    print("}")
    if hashes != SUBSET_HASHES:
        print("lenet_dist/data/subset.py SUBSET_HASHES differs: paste the table above into it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
