"""Files the processes read and write: the one atomic write, and opens that refuse what is not a regular file.

Atomic writes: every file this project writes whole goes through write_and_rename (a temp file beside the
target, written, fsynced, renamed over it, then the folder fsynced) or, for a temp file already in place,
rename_durably. atomic_write uses the first for best.json, the pointers' .json, the data cache and an exported
model; ckptdir.CheckpointWriter uses it on a temp file opened in advance (so a checkpoint needs no new
descriptor at write time); checkpoint.set_pointer uses rename_durably for the hard link of last/best.npz.
Temp files are named by temp_name and recognised by is_temp, nowhere else.

Reads: every path a user names for reading or appending (a report, a token, a metrics file, a checkpoint)
is opened by open_regular or read_regular, which never block on a FIFO or a device and say in one line what
the path is instead.
"""
from __future__ import annotations

import errno
import os
import re
import stat
import time
from pathlib import Path

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class NotRegularFile(OSError):
    """A path that must be a regular file is something else (a FIFO, a device, a folder) or cannot be opened."""


def temp_name(path: Path) -> Path:
    """The temp file beside `path` for an atomic write: hidden, and never ending in .npz or .json, so
    nothing that lists checkpoints or pointers mistakes it for one (ckptdir.sweep_temps removes leftovers)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def is_temp(name: str) -> bool:
    """Whether the file name `name` is one temp_name gives: .<name>.<pid>.tmp."""
    return _TEMP.match(name) is not None


_TEMP = re.compile(r"^\..+\.\d+\.tmp$")


def fsync_folder(folder, dir_fd: int | None = None) -> None:
    """fsync the folder `folder` (through `dir_fd` if it is held open already): makes a rename in it durable."""
    fd = dir_fd if dir_fd is not None else os.open(folder, os.O_RDONLY | _CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        if dir_fd is None:
            os.close(fd)


def rename_durably(tmp: Path, path: Path, *, dir_fd: int | None = None) -> None:
    """Rename the complete temp file `tmp` over `path` and fsync their folder. OSError as raised."""
    os.replace(tmp, path)
    fsync_folder(path.parent, dir_fd)


def write_and_rename(fd: int, tmp: Path, path: Path, data: bytes, *, dir_fd: int | None = None) -> None:
    """The atomic write on an open temp file: write `data` to `fd` (the temp file `tmp`), fsync, close it,
    rename_durably over `path`. `fd` is always closed; on failure `tmp` is removed and the OSError raised
    as is (callers name the path in their own words)."""
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        rename_durably(tmp, path, dir_fd=dir_fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path, data: bytes, *, mode: int = 0o644) -> Path:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part
    (write_and_rename on a new temp file). On any failure the temp file is removed and the OSError names
    `path`. Returns `path`."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)                 # whatever the umask: the data is meant to be read
        except BaseException:
            os.close(fd)
            raise
        write_and_rename(fd, tmp, path, data)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from None
        raise
    return path


def _check_regular(fd, path):
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotRegularFile(f"{path}: not a regular file ({_kind(st.st_mode)})")
    return st


def _kind(mode):
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a file"


def open_regular(path, mode: str = "r", *, encoding: str | None = "utf-8"):
    """open(path, mode) for "r", "rb", "a", "ab", "w", "wb", but only if `path` is (or, for writing, becomes)
    a regular file: the open itself is non-blocking, so a FIFO or a device is refused at once in one line
    (NotRegularFile) instead of hanging the process past its stop signal."""
    flags = {"r": os.O_RDONLY, "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
             "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC}[mode[0]]
    try:
        # O_TRUNC is applied only after the type check: never truncate what we then refuse
        fd = os.open(path, (flags & ~os.O_TRUNC) | os.O_NONBLOCK | _CLOEXEC, 0o644)
    except OSError as e:
        try:                                    # a FIFO without a reader fails the open (ENXIO): say what it is
            kind = os.stat(path).st_mode
        except OSError:
            kind = None
        if kind is not None and not stat.S_ISREG(kind):
            raise NotRegularFile(f"{path}: not a regular file ({_kind(kind)})") from None
        raise NotRegularFile(e.errno, f"{path}: cannot open: {e.strerror or e}") from None
    _check_regular(fd, path)
    os.set_blocking(fd, True)
    if flags & os.O_TRUNC:
        os.ftruncate(fd, 0)
    binary = "b" in mode
    return os.fdopen(fd, mode.replace("+", ""), encoding=None if binary else encoding)


def read_regular(path, max_bytes: int) -> bytes:
    """The bytes of `path` if it is a regular file of at most `max_bytes`; NotRegularFile (an OSError)
    naming it otherwise. Never blocks on a FIFO; never reads past max_bytes even if the file grows."""
    with open_regular(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise NotRegularFile(f"{path}: {size} bytes, more than the {max_bytes} allowed")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise NotRegularFile(f"{path}: grew past {max_bytes} bytes while being read")
    return data


def check_writable_path(path) -> None:
    """Refuse, in one line, a path that exists and is not a regular file (ValueError): for flags checked
    before a run starts (--metrics, --report, --timeline), so the run does not fail at its first write."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: not a regular file ({_kind(st.st_mode)})")


def retry_on_descriptors(fn, seconds: float):
    """fn(), retried every 50 ms for up to `seconds` while it fails for want of a file descriptor (EMFILE,
    ENFILE): under a flood of connections descriptors come free as the link drops idle peers. Any other
    failure, or the last one, is raised."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return fn()
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE) or time.monotonic() >= deadline:
                raise
            time.sleep(0.05)
