"""The --metrics file: JSON lines, one writer at a time, one way of writing them.

lenet-train appends its rows (epoch, step, end) while it runs; lenet-launch appends its own (start, restart,
and an end row only for a job that could not write its own) between the trainer's runs, never during one.
Both go through MetricsFile: opened with files.open_regular (a FIFO or a device is refused in one line), one
write and a flush per row, so a reader never sees half a row.
"""
from __future__ import annotations

import json
from pathlib import Path

from lenet_dist.files import open_regular

LAUNCH_RESTARTS_VAR = "LENET_LAUNCH_RESTARTS"   # lenet-launch tells its trainer how many restarts came before


class MetricsFile:
    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open_regular(self.path, "a")

    def write(self, row: dict):
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()

    def close(self):
        self.f.close()


def append(path, row: dict):
    """One row appended to `path` (for a process that writes one now and then)."""
    m = MetricsFile(path)
    try:
        m.write(row)
    finally:
        m.close()


def size(path) -> int:
    try:
        return Path(path).stat().st_size
    except OSError:
        return 0


def events_since(path, offset: int) -> list:
    """The "event" of every whole row written after byte `offset` (a half-written last line is left out)."""
    try:
        with open_regular(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line).get("event"))
        except (ValueError, AttributeError):
            continue
    return out
