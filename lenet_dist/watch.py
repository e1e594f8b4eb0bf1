"""The --watch alternative to the socket, for users who share a filesystem with the trainer: the same
fetch_newer() as transport.CheckpointClient, over the checkpoint directory the trainer writes.

checkpoint.save writes each file atomically (temp file, fsync, rename), so a file we see is complete;
it may still vanish under us when the trainer rotates old ones out, which only means "look again".
"""
from __future__ import annotations

import time
from pathlib import Path

from . import wire
from .checkpoint import MAX_BYTES, CheckpointError, list_checkpoints, read_bounded


class DirectoryWatcher:
    def __init__(self, directory, *, max_bytes=MAX_BYTES, scan_ms=100, interrupted=None):
        self.directory = Path(directory)
        self.interrupted = interrupted              # a callable: true ends a wait early
        self.endpoint = str(self.directory)
        self.max_bytes = max_bytes
        self.scan_s = scan_ms / 1000
        self.trainer_step = None    # newest step on disk, as last seen
        self.status = f"watching {self.directory}"
        self._served = {}           # step -> (inode, mtime, size) of the file handed out for it

    def fetch_newer(self, than_step, timeout_ms, *, seen_final=False):
        """(header, bytes) of the newest checkpoint file whose step is > than_step (or == than_step but
        rewritten since we served it), polling up to timeout_ms; None if there is none yet. Header fields
        as in wire.py, minus epoch: the evaluator reads epoch and final from the checkpoint's own meta."""
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            got = self._newest(than_step)
            if got is not None:
                return got
            left = deadline - time.monotonic()
            if left <= 0 or (self.interrupted is not None and self.interrupted()):
                return None
            time.sleep(min(self.scan_s, left))

    def trainer_step_now(self, timeout_ms=0):
        found = list_checkpoints(self.directory)
        if found:
            self.trainer_step = found[0][0]
        return self.trainer_step

    def send_result(self, result):
        """Results have no way back to the trainer through a directory; see --results-bind."""

    def close(self):
        pass

    def _newest(self, than_step):
        if not self.directory.is_dir():
            self.status = f"{self.directory} does not exist (yet)"
            return None
        found = list_checkpoints(self.directory)
        if not found:
            self.status = f"watching {self.directory}: no checkpoints yet"
            return None
        step, path = found[0]
        self.trainer_step = step
        self.status = f"watching {self.directory}"
        try:
            st = path.stat()
        except FileNotFoundError:
            return None                                 # rotated away between listing and stat
        ident = (st.st_ino, st.st_mtime_ns, st.st_size)
        rewritten = step in self._served and self._served[step] != ident
        if step < than_step or (step == than_step and not rewritten):
            return None
        self._served = {s: v for s, v in self._served.items() if s >= step - 1} | {step: ident}
        try:
            data = read_bounded(path, self.max_bytes)   # a regular file of bounded size; never blocks on a FIFO
        except CheckpointError as e:
            if not path.exists():
                return None                             # rotated away meanwhile
            raise wire.BadMessage(str(e), step) from None
        header = {"proto": wire.PROTO, "version": wire.VERSION, "kind": "checkpoint", "server": self.endpoint,
                  "trainer_step": step, "step": step, "size": len(data), "sha256": wire.sha256(data),
                  "final": False, "path": str(path)}
        return header, data
