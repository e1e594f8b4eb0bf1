"""The --watch alternative to the socket, for users who share a filesystem with the trainer: the same
fetch_newer() as transport.CheckpointClient, over the checkpoint directory the trainer writes.

The newest checkpoint is the newest one that loads (resume.newest_usable, the one rule): a file named like a
checkpoint that is not one (junk, truncated, a FIFO, named for another step) is skipped and said once, and
never hides an older valid checkpoint. The folder is looked at again only when its listing changes (names,
inodes, times, sizes), so polling costs a few stats. Files are written atomically (temp file, fsync,
rename), so one that loads is complete; it may still vanish under us when the trainer rotates old ones
out, which only means "look again".
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from lenet_dist.checkpoints.format import CheckpointError, list_checkpoints, MAX_BYTES, read_bounded
from lenet_dist.checkpoints.resume import newest_usable
from lenet_dist.transport import wire

log = logging.getLogger("lenet.watch")


class DirectoryWatcher:
    def __init__(self, directory, *, max_bytes=MAX_BYTES, scan_ms=100, interrupted=None, warn=None):
        self.directory = Path(directory)
        self.interrupted = interrupted              # a callable: true ends a wait early
        self.endpoint = str(self.directory)
        self.run_name = self.directory.resolve().name     # what the evaluator calls the run it finds here
        self.max_bytes = max_bytes
        self.scan_s = scan_ms / 1000
        self.trainer_step = None    # newest usable step on disk, as last seen
        self.status = f"watching {self.directory}"
        self._served = {}           # step -> (inode, mtime, size) of the file handed out for it
        self._listing = None        # the folder as last looked at
        self._found = None          # (step, path) of its newest usable checkpoint
        self._warn = warn or log.warning
        self._said = set()          # what was said about unusable files: each once

    def fetch_newer(self, than_step, timeout_ms, *, seen_final=False):
        """(header, bytes) of the newest usable checkpoint whose step is > than_step (or == than_step but
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
        self._look()
        return self.trainer_step

    def send_result(self, result):
        """Results have no way back to the trainer through a directory; see --results-bind."""

    def close(self):
        pass

    def _say_once(self, message):
        if message not in self._said:
            self._said.add(message)
            self._warn(message)

    def _look(self):
        """Find the newest usable checkpoint again if the folder changed; the listing."""
        listing = []
        for step, path in list_checkpoints(self.directory):
            try:
                st = path.stat()
            except OSError:
                continue                                # rotated away between listing and stat
            listing.append((step, path.name, st.st_ino, st.st_mtime_ns, st.st_size))
        if listing != self._listing:
            self._listing = listing
            found = newest_usable(self.directory, warn=self._say_once, for_resume=False) if listing else None
            self._found = None if found is None else (found[1].step, found[0])
            self.trainer_step = None if found is None else found[1].step
        return listing

    def _newest(self, than_step):
        if not self.directory.is_dir():
            self.status = f"{self.directory} does not exist (yet)"
            return None
        if not self._look():
            self.status = f"watching {self.directory}: no checkpoints yet"
            return None
        if self._found is None:
            self.status = f"watching {self.directory}: no usable checkpoint yet"
            return None
        self.status = f"watching {self.directory}"
        step, path = self._found
        ident = next(e[2:] for e in self._listing if e[1] == path.name)
        rewritten = step in self._served and self._served[step] != ident
        if step < than_step or (step == than_step and not rewritten):
            return None
        try:
            data = read_bounded(path, self.max_bytes)   # a regular file of bounded size; never blocks on a FIFO
        except CheckpointError:
            self._listing = None                        # replaced or rotated away meanwhile: look again
            return None
        self._served = {s: v for s, v in self._served.items() if s >= step - 1} | {step: ident}
        header = {"proto": wire.PROTO, "version": wire.VERSION, "kind": "checkpoint", "server": self.endpoint,
                  "trainer_step": step, "step": step, "size": len(data), "sha256": wire.sha256(data),
                  "final": False, "path": str(path)}
        return header, data


class RunFolders:
    """--watch on a folder of run folders: one DirectoryWatcher per subfolder holding checkpoints (and one for
    the folder itself if it holds some), looked for again every `rescan_s`; sources() is the current list."""

    def __init__(self, directory, *, rescan_s=2.0, **watcher_kw):
        self.directory = Path(directory)
        self.rescan_s, self.kw = rescan_s, watcher_kw
        self._watchers = {}                         # folder -> DirectoryWatcher
        self._scanned = -float("inf")
        self._current = []

    def sources(self):
        now = time.monotonic()
        if now - self._scanned >= self.rescan_s:
            self._scanned = now
            folders = self._folders()
            for folder in folders:
                if folder not in self._watchers:
                    self._watchers[folder] = DirectoryWatcher(folder, **self.kw)
            self._current = [self._watchers[f] for f in folders]    # the same objects: the loop tracks them
        return self._current

    def _folders(self):
        try:
            subs = sorted(p for p in self.directory.iterdir() if p.is_dir())
        except OSError:
            return [self.directory]                 # not there yet: the watcher of the folder itself says so
        found = [p for p in subs if list_checkpoints(p)]
        return [self.directory] + found if list_checkpoints(self.directory) or not found else found

    def close(self):
        for w in self._watchers.values():
            w.close()
