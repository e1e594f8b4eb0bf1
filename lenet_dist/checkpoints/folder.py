"""The trainer's checkpoint folder: which run owns it, and writing into it so that nothing is lost.

- A run has an id (meta['run_id']); a fresh run refuses a folder holding another run's checkpoints
  (claim()), and a run deletes only checkpoints it wrote itself (CheckpointWriter keeps their list).
- Temp files are removed on every failure path, and leftovers of a crash are swept at start.
- The folder is checked at start-up: the writer opens the temp file of the next checkpoint at once, so
  an unwritable folder is an error before the first step, not at the first checkpoint.
- Descriptors: the next temp file and the folder are held open between checkpoints, so that a write needs
  no new file descriptor. When a flood of connections has taken every descriptor the process may have
  (RLIMIT_NOFILE), the write still goes through; the next temp file is opened again as soon as one is free.
"""
from __future__ import annotations

import errno
import os
import secrets
import time
from pathlib import Path

from lenet_dist.checkpoints.format import CheckpointError, file_name, list_checkpoints, load_file, set_pointer, to_bytes
from lenet_dist.errors import CheckpointFolderError, ResumeError
from lenet_dist.files import is_temp, retry_on_descriptors, temp_name, write_and_rename

OWN_PREFIXES = ("ckpt-", "last.", "best.")  # the folder's own files: checkpoints and the last/best pointers
SUPERSEDED = "superseded-"                  # the subfolder claim(start_over=True) moves another run into
FD_WAIT_S = 30.0                            # how long a write waits for a free descriptor before failing
POINTER_WAIT_S = 2.0                        # how long a last/best pointer waits for one
LASTING = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT}   # a retry meets them again


def _error(e, text):
    """The OSError to raise for `e`: a CheckpointFolderError when the folder itself refuses the write."""
    return (CheckpointFolderError if e.errno in LASTING else OSError)(e.errno, text)


def new_run_id():
    return secrets.token_hex(6)


def is_own_temp(name):
    """Whether `name` is a temp file of this folder's own files (files.temp_name of a checkpoint, of the
    writer's next checkpoint or of a pointer); other temp files in the folder are not ours to remove."""
    return is_temp(name) and name[1:].startswith(OWN_PREFIXES)


def sweep_temps(directory, warn=print):
    """Remove temp files a crashed writer left in `directory`; the names removed."""
    gone = []
    for p in Path(directory).iterdir():
        if is_own_temp(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            gone.append(p.name)
    if gone:
        warn(f"removed {len(gone)} temp file(s) left by an interrupted write in {directory}: {', '.join(gone[:5])}")
    return gone


def claim(directory, *, start_over=False, log=print):
    """A fresh run is about to use `directory`. If it holds checkpoints (another run's: this one has not
    written any yet), refuse with ResumeError saying how to go on, or with start_over move them into a
    superseded-* subfolder (nothing is deleted), with the old run's last/best pointers, so that no `last` or
    `best` names a checkpoint of the run before. Returns that subfolder or None."""
    found = list_checkpoints(directory)
    pointers = [Path(directory) / f"{e}.{x}" for e in ("last", "best") for x in ("npz", "json")]
    pointers = [p for p in pointers if p.exists()]
    if not found and not (start_over and pointers):
        return None
    if not start_over:
        raise ResumeError(f"{directory} holds {len(found)} checkpoint(s) of another run (newest {found[0][1].name}); "
                          f"continue it with --resume, use another --checkpoint-dir, or add --start-over to begin "
                          f"a new run here (the old checkpoints are moved into a superseded-* subfolder)")
    aside = Path(directory) / time.strftime(f"{SUPERSEDED}%Y%m%d-%H%M%S", time.gmtime())
    aside.mkdir()
    for path in [path for _, path in found] + pointers:
        os.replace(path, aside / path.name)
    log(f"--start-over: moved {len(found)} checkpoint(s) of the previous run"
        f"{' and its last/best pointers' if pointers else ''} into {aside}")
    return aside


class CheckpointWriter:
    """Writes this run's checkpoints into `directory` and keeps its newest `keep` (never touching files it
    did not write; `own` lists those of this run found on resume, oldest first)."""

    def __init__(self, directory, *, keep=3, own=(), warn=print):
        self.dir = Path(directory)
        self.keep, self.warn = keep, warn
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            sweep_temps(self.dir, warn)
            self._dir_fd = os.open(self.dir, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise _error(e, f"checkpoint folder {self.dir}: {e.strerror or e}") from None
        self._written = [Path(p) for p in own]
        self._next = None                       # (fd, path) of the temp file the next checkpoint goes into
        self._open_next()                       # an unwritable folder fails here, at start-up

    def write(self, step, data):
        """Write one checkpoint atomically; its path. OSError naming the path on failure, no temp file left."""
        final = self.dir / file_name(int(step))
        if self._next is None:
            self._open_next(wait=FD_WAIT_S)
        fd, tmp = self._next
        self._next = None
        try:
            write_and_rename(fd, tmp, final, data, dir_fd=self._dir_fd)
        except OSError as e:
            raise _error(e, f"cannot write checkpoint {final}: {e.strerror or e}") from None
        self._written = [p for p in self._written if p != final] + [final]
        self._prune()
        try:
            self._open_next()
        except OSError as e:                    # no descriptor now: retried at the next checkpoint
            self.warn(f"{e}; will retry before the next checkpoint")
        return final

    def close(self):
        if self._next is not None:
            os.close(self._next[0])
            self._next[1].unlink(missing_ok=True)
            self._next = None
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1

    def _open_next(self, wait=0.0):
        tmp = temp_name(self.dir / "ckpt-next")
        try:
            fd = retry_on_descriptors(lambda: os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                                                      0o644), wait)
        except OSError as e:
            raise _error(e, f"cannot write into checkpoint folder {self.dir}: {e.strerror or e}") from None
        self._next = (fd, tmp)

    def _prune(self):
        self._written = rotate(self._written, self.keep, self.warn)


def rotate(own, keep, warn=print):
    """The one rotation rule: of `own` (this run's checkpoint files, oldest first) keep the newest `keep` and
    remove the rest; never a file of another run. Returns the kept ones."""
    own = list(own)
    while len(own) > keep:
        old = own.pop(0)
        try:
            old.unlink(missing_ok=True)
        except OSError as e:
            warn(f"could not remove old checkpoint {old}: {e.strerror or e}")
    return own


def own_checkpoints(directory, run_id, before_step):
    """The checkpoints of run `run_id` in `directory` older than `before_step`, oldest first: a resumed run
    rotates them out like its own. Unreadable ones are not provably ours and are left alone."""
    own = []
    for step, path in list_checkpoints(directory):
        if step >= before_step:
            continue
        try:
            if load_file(path).meta.get("run_id") == run_id:
                own.append(path)
        except CheckpointError:
            pass
    return own[::-1]


def save(directory, params, velocity, meta, residual=None, *, keep=3):
    """One checkpoint for meta['step'] written as the trainer writes it (CheckpointWriter), keeping the newest
    `keep` of its run (meta['run_id']); returns (path, bytes). For tools and tests that write one at a time."""
    data = to_bytes(params, velocity, dict(meta, created=time.time()), residual)
    step = int(meta["step"])
    writer = CheckpointWriter(directory, keep=keep, own=own_checkpoints(directory, meta.get("run_id"), step)
                              if Path(directory).is_dir() else ())
    try:
        return writer.write(step, data), data
    finally:
        writer.close()


def point(directory, entry, target, info, warn=print):
    """Make `entry` (last / best) name the checkpoint `target` (checkpoint.set_pointer); True when done. A
    pointer is a convenience: one that cannot be written is a warning, never the end of the run whose
    checkpoint is already on disk."""
    try:
        retry_on_descriptors(lambda: set_pointer(directory, entry, target, info), POINTER_WAIT_S)
        return True
    except OSError as e:
        warn(f"could not point {os.path.join(directory, f'{entry}.npz')} at {os.path.basename(target)} "
             f"({e.strerror or e}); the checkpoint itself is written")
        return False
