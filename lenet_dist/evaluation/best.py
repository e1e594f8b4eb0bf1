"""--best-dir: the best checkpoint an evaluator has seen (lenet_dist.selection's rule) as best.npz, and its
figures as best.json, both written atomically. A restarted evaluator carries on from best.json if it
describes the same run (same training config, same validation split); anything else starts afresh, and so
does a new run (another meta.run_id) on a daemon that outlives its runs."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from lenet_dist import selection
from lenet_dist.checkpoints.format import MAX_BYTES
from lenet_dist.files import atomic_write, read_regular

log = logging.getLogger("lenet.evaluator")


class BestKeeper:
    def __init__(self, directory):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.best = None                    # the best result so far
        self.loaded = False
        self.warned = False

    def kept(self):
        """(result, config, checkpoint bytes) of the best kept here (by an earlier process too), or None."""
        try:
            best = json.loads(read_regular(self.dir / "best.json", 1 << 20))
            data = read_regular(self.dir / "best.npz", MAX_BYTES)
        except (OSError, ValueError):
            return None
        if not isinstance(best, dict):
            return None
        return best, best.pop("config", None), data

    def offer(self, result, data, config):
        """Keep `data` (a checkpoint's bytes) if its `result` is the best so far; True if it was kept."""
        if "val_accuracy" not in result:    # choosing on the test set would make its figure optimistic
            if not self.warned:
                log.warning("--best-dir keeps nothing: the checkpoints have no validation split (--val-size 0)")
                self.warned = True
            return False
        if not self.loaded:
            self.loaded = True
            try:
                prev = json.loads(read_regular(self.dir / "best.json", 1 << 20))
                if prev.get("config") == config and prev.get("n_val") == result["n_val"]:
                    self.best = prev
            except (OSError, ValueError, TypeError, AttributeError):
                pass
        runs = (self.best or {}).get("run_id"), result.get("run_id")
        if None not in runs and runs[0] != runs[1]:
            self.best = None                # a new run on the same source: its own best, never the last run's
        if not selection.is_better(result, self.best):
            return False
        atomic_write(self.dir / "best.npz", data)
        atomic_write(self.dir / "best.json", json.dumps(dict(result, config=config)).encode())
        self.best = result
        return True
