"""A complaint said at most once every few seconds per kind, counting what it held back: so that a flood of
bad messages, refused requests or event-loop errors cannot flood the log."""
from __future__ import annotations

import time


class Limited:
    """`say(line)` at most once every `every` seconds per key (no key: every message is of one kind)."""

    def __init__(self, say, every=5.0):
        self.say, self.every = say, every
        self._last, self._held = {}, {}

    def allow(self, key):
        """None: hold this one back (counted); otherwise how many of its kind were held back since the last."""
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self.every:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)

    def __call__(self, message, key=None):
        held = self.allow(key)
        if held is not None:
            self.say(message + (f" ({held} more like it not shown)" if held else ""))
