"""Rows (JSON-ready dicts) kept as their compact JSON bytes in a bounded deque: a row the trainer sends is
~260 bytes of JSON but over a kilobyte as a Python dict, and a daemon keeps thousands per run.

    rows = RowStore(maxlen=20_000)
    rows.append({"event": "step", "step": 10, "loss": 0.1})
    rows.last_step                      # 10, without decoding
    rows[-1], list(rows)                # dicts, decoded afresh on each read
    b"[" + b",".join(rows.raw()) + b"]"  # a JSON array of them, without decoding
"""
from __future__ import annotations

import collections
import json


def _pack(row):
    return json.dumps(row, separators=(",", ":")).encode()


class RowStore:
    """The newest `maxlen` rows, oldest first. Reads give new dicts: changing one does not change the store."""

    def __init__(self, maxlen, rows=()):
        self._rows = collections.deque(maxlen=maxlen)
        self.last_step = None               # the newest row's "step" (None: no row, or it had none)
        self.extend(rows)

    @property
    def maxlen(self):
        return self._rows.maxlen

    def append(self, row):
        self._rows.append(_pack(row))
        self.last_step = row.get("step")

    def extend(self, rows):
        for row in rows:
            self.append(row)

    def clear(self):
        self._rows.clear()
        self.last_step = None

    def raw(self):
        """Each row's JSON bytes, oldest first."""
        return iter(self._rows)

    def json_array(self):
        """The rows as one JSON array (bytes)."""
        return b"[" + b",".join(self._rows) + b"]"

    def __len__(self):
        return len(self._rows)

    def __iter__(self):
        return map(json.loads, list(self._rows))     # a snapshot: appends while iterating do not break it

    def __getitem__(self, i):
        return json.loads(self._rows[i])

    def __repr__(self):
        return f"RowStore({len(self)} rows, maxlen={self.maxlen})"
