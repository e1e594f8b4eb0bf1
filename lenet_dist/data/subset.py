"""The small real MNIST subset shipped in the package (lenet_dist/subset/): offline tests and first looks.

The first 2,000 training and first 1,000 test examples, cut by scripts/make_subset.py and pinned here by
the sha256 of each decompressed file.
"""
from pathlib import Path

from lenet_dist.data.dataset import DataError, Dataset
from lenet_dist.data.load import _from_dir, _summary, _table, dataset_of

SUBSET_DIR = Path(__file__).resolve().parent.parent / "subset"
SUBSET_HASHES = {
    "train_images": "729d340c0177402770b27c04f817dfb40ed8844459b35a9f11ae21067b05cf19",
    "train_labels": "90795ea2219655a7281c0d6756d0ae8a33bebac7ec84bac89bbdcc5e3baa9f8c",
    "test_images": "de7c252b04f05e1f8309634180ccdf286dc6dbac8c579b74e76e02ae0331ca52",
    "test_labels": "832c0d20f0dc42e575488c75a83a970787d4c8d4d05831b2ef03701b4a478a90",
}


def load_subset() -> Dataset:
    """The subset (2,000 train, 1,000 test), verified."""
    found, missing = _from_dir(SUBSET_DIR, _table(SUBSET_HASHES), True, None, strict=True)
    if missing:
        raise DataError(f"{SUBSET_DIR}: subset files missing from the package: {_summary(missing)}")
    return dataset_of(found, f"subset {SUBSET_DIR}", "mnist-subset")
