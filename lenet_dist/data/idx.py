"""Reading IDX files (gzipped or raw): the header first, then exactly the data it announces, streamed.

    arr = read_idx("t10k-images-idx3-ubyte.gz")          # read-only uint8 array, shape from the header
    arr, sha = read_idx_hashed(path)                      # and the sha256 of the decompressed bytes
    path = locate(folder, "t10k-images-idx3-ubyte")       # the raw or .gz copy; differing copies refused

A file is never read whole before its header is checked: a raw file whose size disagrees with its header is
refused before any data is read, and a gzip stream is read up to the size its header implies plus one byte,
so a sparse file or a gzip bomb costs no more memory than the data it claims to hold.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from lenet_dist.data.dataset import DataError
from lenet_dist.files import NotRegularFile, open_regular

GZIP_MAGIC = b"\x1f\x8b"
CHUNK = 1 << 20                 # bytes per read: the peak beyond the array itself
MAX_DEFLATE_RATIO = 1032        # deflate never expands more than this: a bound on what a .gz can hold


class _Corrupt(Exception):
    """The gzip layer failed; args[0] is the reason."""


def _read_exact(stream, n: int) -> bytes:
    """Up to n bytes, fewer only at the end of the stream."""
    parts, left = [], n
    while left:
        try:
            part = stream.read(left)
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise _Corrupt(str(e)) from None
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def _readinto(stream, view) -> int:
    try:
        return stream.readinto(view)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise _Corrupt(str(e)) from None


def _header(stream, name: str, size: int | None) -> tuple[tuple[int, ...], int, bytes]:
    """(dims, element count, header bytes) after checking the magic, the dimensions and, for a raw file of
    known `size`, that the data the header announces is exactly what the file holds."""
    magic = _read_exact(stream, 4)
    if len(magic) < 4:
        raise DataError(f"{name}: not an IDX file: {len(magic)} bytes, shorter than the 4-byte magic")
    if magic[0] != 0 or magic[1] != 0:
        raise DataError(f"{name}: not an IDX file: magic bytes 0x{magic.hex()}, expected 0x000008nn")
    if magic[2] != 0x08:
        raise DataError(f"{name}: unsupported IDX element type 0x{magic[2]:02x} (only 0x08, unsigned byte)")
    ndim = magic[3]
    if ndim == 0:
        raise DataError(f"{name}: IDX header declares 0 dimensions")
    start = 4 + 4 * ndim
    rest = _read_exact(stream, 4 * ndim)
    if len(rest) < 4 * ndim:
        raise DataError(f"{name}: truncated header: {ndim} dimensions need {start} bytes, file has {4 + len(rest)}")
    dims = struct.unpack(f">{ndim}I", rest)
    count = 1
    for d in dims:
        count *= d
    if size is not None and size - start != count:
        _size_error(name, dims, count, size - start)
    return dims, count, magic + rest


def _size_error(name, dims, count, have, more=False):
    what = "truncated" if have < count else "trailing garbage"
    shape = "x".join(map(str, dims))
    has = f"more than {count}" if more else str(have)
    raise DataError(f"{name}: {what}: header says {shape} = {count} bytes of data, file has {has}")


def _read(stream, name: str, size: int | None, bound: int | None, keep: bool):
    """(array or None, sha256 hexdigest of the decompressed bytes) of an IDX stream. `size`: the stream's
    exact length when known (a raw file); `bound`: the most data it can hold (a .gz file's limit)."""
    h = hashlib.sha256()
    dims, count, head = _header(stream, name, size)
    if bound is not None and count > bound:
        shape = "x".join(map(str, dims))
        raise DataError(f"{name}: header says {shape} = {count} bytes of data, more than the "
                        f"{bound} a gzip file of this size can hold")
    h.update(head)
    arr = np.empty(count, np.uint8) if keep else np.empty(min(count, CHUNK), np.uint8)
    view, done = memoryview(arr), 0
    while done < count:
        lo = done if keep else 0
        n = _readinto(stream, view[lo:lo + min(CHUNK, count - done)])
        if not n:
            _size_error(name, dims, count, done)
        h.update(view[lo:lo + n])
        done += n
    if _read_exact(stream, 1):
        _size_error(name, dims, count, count + 1, more=size is None)
    if not keep:
        return None, h.hexdigest()
    arr = arr.reshape(dims)
    arr.flags.writeable = False
    return arr, h.hexdigest()


def _from_source(source, name, keep):
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = name or "<bytes>"
        if data[:2] == GZIP_MAGIC:
            stream, size, bound = gzip.GzipFile(fileobj=io.BytesIO(data)), None, len(data) * MAX_DEFLATE_RATIO
        else:
            stream, size, bound = io.BytesIO(data), len(data), None
        return _guarded(stream, name, size, bound, keep)
    name = name or str(source)
    try:
        f = open_regular(source, "rb")
    except NotRegularFile as e:
        raise DataError(f"{name}: {_reason(e, source)}") from None
    with f:
        try:
            total = os.fstat(f.fileno()).st_size
            gz = f.read(2) == GZIP_MAGIC
            f.seek(0)
        except OSError as e:
            raise DataError(f"{name}: cannot read: {e.strerror or e}") from None
        if gz:
            return _guarded(gzip.GzipFile(fileobj=f), name, None, total * MAX_DEFLATE_RATIO, keep)
        return _guarded(f, name, total, None, keep)


def _reason(e: OSError, path) -> str:
    """files.open_regular's reason without the path it starts with."""
    return (e.strerror or str(e)).removeprefix(f"{path}: ")


def _guarded(stream, name, size, bound, keep):
    try:
        return _read(stream, name, size, bound, keep)
    except _Corrupt as e:
        raise DataError(f"{name}: corrupt gzip stream: {e.args[0]}") from None
    except OSError as e:
        raise DataError(f"{name}: cannot read: {e.strerror or e}") from None


def read_idx_hashed(source, name: str | None = None) -> tuple[np.ndarray, str]:
    """(read-only uint8 array, sha256 of the decompressed bytes) of an IDX file: a path or bytes, gzipped
    or raw. Raises DataError naming the file and the problem."""
    return _from_source(source, name, keep=True)


def read_idx(source, name: str | None = None) -> np.ndarray:
    """Parse an IDX file (gzipped or raw; a path or bytes) into a read-only uint8 array."""
    return read_idx_hashed(source, name)[0]


def content_sha256(path) -> str:
    """The sha256 of an IDX file's decompressed bytes, checked like read_idx but keeping nothing."""
    return _from_source(path, None, keep=False)[1]


def locate(directory, name: str) -> Path | None:
    """`directory/name` or `directory/name.gz`, None when neither exists (a FIFO or a folder of that name is
    found, and refused when read). When both exist, they must hold the same data: a DataError naming both
    otherwise (neither silently wins)."""
    d = Path(directory)
    raw, gz = d / name, d / f"{name}.gz"
    found = [p for p in (raw, gz) if p.exists()]
    if len(found) < 2:
        return found[0] if found else None
    shas = [content_sha256(p) for p in found]
    if shas[0] != shas[1]:
        raise DataError(f"{raw} and {gz} differ (decompressed sha256 {shas[0][:12]}... and {shas[1][:12]}...): "
                        f"keep only the one you mean")
    return raw
