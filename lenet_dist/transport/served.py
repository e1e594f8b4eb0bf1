"""What the trainer's end keeps between requests, without sockets: the checkpoint it serves (Published), its
bounded log of step rows (Telemetry) and its inbox of evaluator results (Results). The link's server thread
answers from them; the training loop only swaps or adds. The messages themselves are wire.py's."""
from __future__ import annotations

import collections
import threading
import time

from lenet_dist import selection
from lenet_dist.transport.wire import (_is_hex64, BadMessage, check_result, checkpoint_header, encode, MAX_HEADER,
                                       MAX_TELEMETRY_ROWS, none_header, sha256)


class Published:
    """One checkpoint as the trainer serves it: its bytes by reference, their hash computed when first
    needed (by the server thread, not by the training loop)."""

    def __init__(self, step, epoch, data, final):
        self.step, self.epoch, self.data, self.final, self._sha256 = step, epoch, data, final, None

    def answers(self, req):
        """Is this what a fetch waiting for something newer than (newer_than, seen_final) wants?"""
        return self.step > req["newer_than"] or (
            self.final and self.step == req["newer_than"] and not req["seen_final"])

    def reply(self, req, server, trainer_step):
        """(header, bytes or None): the checkpoint, or an error if it is over the client's size limit."""
        if len(self.data) > req["max_bytes"]:
            h = none_header(req_id=req["id"], server=server, trainer_step=trainer_step,
                            reason=f"checkpoint of {len(self.data)} bytes, more than the {req['max_bytes']} "
                                   f"the client accepts")
            return dict(h, step=self.step), None
        if self._sha256 is None:
            self._sha256 = sha256(self.data)
        return checkpoint_header(req_id=req["id"], server=server, trainer_step=trainer_step, step=self.step,
                                 epoch=self.epoch, data_sha256=self._sha256, size=len(self.data),
                                 final=self.final), self.data


class Results:
    """The trainer's inbox of evaluator results (thread-safe). The same result may arrive twice, over
    the checkpoint channel and over a results subscription; it is kept once."""

    SERVED_KEPT = 256                                # checkpoints remembered as served, for results

    def __init__(self):
        self._served = collections.OrderedDict()    # (step, sha256) of checkpoints actually sent out
        self._cond = threading.Condition()
        self._new = collections.deque(maxlen=256)   # not yet taken by take()
        self._seen = collections.deque(maxlen=64)   # hashes of recent results
        self._newest = None                         # the result for the highest step
        self._best = None                           # the best model by selection's rule (validation)
        self._closed = False                        # no more results can come (the server stopped)

    def served(self, step, data_sha256):
        """A checkpoint went out: results about it are welcome from now on."""
        with self._cond:
            self._served[(step, data_sha256)] = True
            self._served.move_to_end((step, data_sha256))
            while len(self._served) > self.SERVED_KEPT:
                self._served.popitem(last=False)

    def add(self, envelope):
        """A decoded result message -> True if kept; BadMessage if it is not a result or not about a
        checkpoint that was served (so a forged result cannot pose as the evaluation of a step)."""
        result = check_result(envelope.get("result"))
        key = sha256(encode(result))
        if not _is_hex64(result.get("sha256")):
            raise BadMessage(f"result sha256 {str(result.get('sha256'))[:70]!r}, expected 64 lowercase hex digits")
        with self._cond:
            if (result["step"], result["sha256"]) not in self._served:
                raise BadMessage(f"result for step {result['step']} (sha256 {str(result.get('sha256'))[:12]}...) "
                                 f"is about no checkpoint this trainer served; ignored")
            if key in self._seen:
                return False
            self._seen.append(key)
            self._new.append(result)
            if self._newest is None or result["step"] >= self._newest["step"]:
                self._newest = result
            if selection.is_better(result, self._best):
                self._best = result
            self._cond.notify_all()
        return True

    def close(self):
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def take(self):
        with self._cond:
            out = list(self._new)
            self._new.clear()
        return out

    def latest(self):
        """The result for the highest step so far (None before any)."""
        with self._cond:
            return dict(self._newest) if self._newest else None

    def best(self):
        """The result of the best model so far by lenet_dist.selection (None before any)."""
        with self._cond:
            return dict(self._best) if self._best else None

    def wait_for(self, step, timeout, stop=None):
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                r = self._newest
                if r is not None and r["step"] >= step:
                    return dict(r)
                left = deadline - time.monotonic()
                if left <= 0 or self._closed or (stop is not None and stop()):
                    return None
                self._cond.wait(min(left, 0.2))


class Telemetry:
    """The trainer's bounded log of step rows (thread-safe): the loop adds, the server thread answers
    "rows after seq" from it. An evaluator that falls further behind than the log reaches skips ahead."""

    def __init__(self, keep=2000):
        self._lock = threading.Lock()
        self._rows = collections.deque(maxlen=keep)     # (seq, row, its encoded size)
        self._seq = -1

    def add(self, row):
        size = len(encode(row))                          # refuses NaN here, in the trainer, not at the client
        with self._lock:
            self._seq += 1
            self._rows.append((self._seq, row, size))

    def after(self, since, budget=MAX_HEADER // 2):
        """(rows after `since`, the seq of the last one): at most MAX_TELEMETRY_ROWS rows and `budget` bytes."""
        with self._lock:
            out, seq, used = [], self._seq if since >= self._seq else since, 0
            for s, row, size in self._rows:
                if s <= since:
                    continue
                if len(out) == MAX_TELEMETRY_ROWS or used + size > budget:
                    break
                out.append(row)
                seq, used = s, used + size
            return out, seq
