"""Live control of a run (lenet-train --allow-control): the signed control message and the trainer's gate.

    evaluator: Signer(key).sign("lr_scale", 0.5, run_id, source="page") -> {"control": {...}, "mac": hex}
    trainer:   gate = ControlGate(key, run_id, allowed=True, log=log); gate.admit(req) -> None or why refused;
               the training loop: gate.take() -> the admitted actions, oldest first

The MAC is HMAC-SHA256 under a secret both ends read from a file (--control-key-file), over the canonical
JSON (sorted keys, no spaces) of the control object, which names the run, a fresh random nonce and the
sender's clock: a message for another run, one older or newer than WINDOW_S, or a nonce seen within the
window is refused, so a captured message cannot be replayed. Without a key, or without --allow-control,
everything is refused. Each refusal is one log line (rate-limited).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time

from lenet_dist.files import read_regular
from lenet_dist.ratelimit import Limited

ACTIONS = ("stop", "pause", "resume", "checkpoint", "lr_scale")
LR_SCALE_MIN, LR_SCALE_MAX = 0.01, 100.0    # one lr_scale action's factor
WINDOW_S = 60.0                             # a message's clock may differ from ours by this much
MIN_KEY_BYTES = 16


def load_key(path):
    """A control secret file -> its bytes (stripped); ValueError naming the fault."""
    try:
        key = read_regular(path, 4096).strip()
    except OSError as e:
        raise ValueError(str(e.strerror or e)) from None        # read_regular's line names the file
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"{path}: the control secret must be {MIN_KEY_BYTES} bytes or more, got {len(key)}")
    return key


def canonical(control):
    return json.dumps(control, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def mac(key, control):
    return hmac.new(key, canonical(control), hashlib.sha256).hexdigest()


def check_action(action, value):
    """(action, value) as the trainer applies it, or ValueError naming the fault (the page says it too)."""
    if action not in ACTIONS:
        raise ValueError(f"control action {str(action)[:40]!r}, expected one of {', '.join(ACTIONS)}")
    if action != "lr_scale":
        return action, None
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)
            and LR_SCALE_MIN <= value <= LR_SCALE_MAX):
        raise ValueError(f"lr_scale {str(value)[:40]}: expected a factor in [{LR_SCALE_MIN:g}, {LR_SCALE_MAX:g}]")
    return action, float(value)


class Signer:
    """The evaluator's end: signs control actions for one run."""

    def __init__(self, key):
        self.key = key

    def sign(self, action, value, run_id, source):
        action, value = check_action(action, value)
        control = {"action": action, "value": value, "run_id": run_id, "nonce": secrets.token_hex(16),
                   "time": round(time.time(), 3), "source": str(source)[:200]}
        return {"control": control, "mac": mac(self.key, control)}


class ControlGate:
    """The trainer's end (rank 0): admits signed, fresh actions for its own run into a queue the training
    loop takes from between steps. Thread-safe: the link's server thread admits, the loop takes."""

    def __init__(self, key, run_id, allowed, log, clock=time.time):
        self.key, self.run_id, self.allowed, self.clock = key, run_id, allowed, clock
        self._log = log
        self._complain = Limited(self._log)  # one rate-limited log line per kind of refusal
        self._lock = threading.Lock()
        self._queue, self._seen = [], {}     # admitted actions; nonce -> its time, for the window
        self.refused = 0

    def admit(self, req):
        """A control request (wire.check_control passed) -> None when queued, else the one-line reason."""
        why = self._why_not(req)
        if why:
            self.refused += 1
            kind = why.split(" ", 1)[0]
            self._complain(f"refused a control message: {why}", key=kind)
            return why
        return None

    def _why_not(self, req):
        if not self.allowed:
            return "control is off on this trainer (start it with --allow-control)"
        if not self.key:
            return "this trainer has no --control-key-file"
        control, given = req["control"], req.get("mac")
        if not isinstance(given, str) or not hmac.compare_digest(given, mac(self.key, control)):
            return "missing or wrong MAC (not signed with this trainer's control key)"
        if control["run_id"] != self.run_id:
            return f"for run {str(control['run_id'])[:40]!r}, this trainer runs {self.run_id!r}"
        now = self.clock()
        if abs(now - control["time"]) > WINDOW_S:
            return f"stale: its clock is {now - control['time']:.0f}s from ours (window {WINDOW_S:.0f}s)"
        try:
            action = check_action(control["action"], control["value"])
        except ValueError as e:
            return str(e)
        with self._lock:
            self._seen = {n: t for n, t in self._seen.items() if now - t <= 2 * WINDOW_S}
            if control["nonce"] in self._seen:
                return "replayed (its nonce was used already)"
            self._seen[control["nonce"]] = now
            self._queue.append({"action": action[0], "value": action[1], "source": control["source"]})
        return None

    def take(self, only=None):
        """The admitted actions, oldest first, removed from the queue (`only`: just those actions)."""
        with self._lock:
            taken = [a for a in self._queue if only is None or a["action"] in only]
            self._queue = [a for a in self._queue if a not in taken]
        return taken

    def pending(self):
        with self._lock:
            return bool(self._queue)
