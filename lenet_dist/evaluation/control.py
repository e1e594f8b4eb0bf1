"""The evaluator's part of live control (lenet-evaluator --control-key-file): the page's requests, signed
and sent to the shown run's trainer; whether the page may act, and how its last action went, sent back.

    relay = ControlRelay(key, live, curve, stop)     # live: evaluation/live.Live with a dashboard

The page's POST reaches the dashboard process, which hands it up here (process.py, `on_control`). A thread
of the relay's own, with a connection of its own to each trainer (a CheckpointClient is used by one thread
only), signs each request for the shown run (transport/control.Signer: run id, nonce, time, HMAC) and
sends it; every second it asks the shown run's trainer whether it takes control (its status reply), and
the page shows the panel only while the run is going and its trainer says yes.
"""
from __future__ import annotations

import logging
import queue
import threading
import time

from lenet_dist.transport import CheckpointClient, wire
from lenet_dist.transport.control import Signer

log = logging.getLogger("lenet.evaluator")

REFRESH_S = 1.0


class ControlRelay:
    def __init__(self, key, live, curve, stop):
        """`curve`: (secret key, public key, server key) files for the connections, or Nones."""
        self.signer, self.live, self.curve, self.stop = Signer(key), live, curve, stop
        self.clients = {}                           # endpoint -> CheckpointClient of the relay's thread
        self.last, self._sent = None, None          # the last action's status; the status the page has
        self._requests = queue.Queue(100)
        self._done = threading.Event()
        live.dashboard.on_control = self.request
        self._thread = threading.Thread(target=self._run, daemon=True, name="lenet-control")
        self._thread.start()

    def request(self, req):
        """From the dashboard's reader thread: a page's request, handled on the relay's thread."""
        try:
            self._requests.put_nowait(req)
        except queue.Full:
            log.warning("control: a request from the page dropped (%d waiting)", self._requests.qsize())

    def close(self):
        self._done.set()
        self._thread.join(5)
        for c in self.clients.values():
            c.close()

    def _run(self):
        self._refresh()                             # the page learns at once whether it may act
        while not self._done.is_set() and not self.stop:
            try:
                req = self._requests.get(timeout=REFRESH_S)
            except queue.Empty:
                req = None
            if req is not None:
                self._send(req)
            self._refresh()

    def _target(self):
        """(run id, client, None) of the shown run, or (None, None, why the page may not act)."""
        run, source = self.live.shown, self.live.shown_source
        if run is None:
            return None, None, "no run evaluated yet"
        if run.finished:
            return None, None, f"run {run.name} has ended"
        if source not in self.live.followers:       # followed over --connect: its trainer's endpoint
            return None, None, "the shown run is not followed over --connect"
        if source not in self.clients:
            s, p, k = self.curve
            self.clients[source] = CheckpointClient(source, secret_key=s, public_key=p, server_key=k,
                                                    interrupted=self.stop.__bool__)
        return run.run_id, self.clients[source], None

    def _refresh(self):
        run_id, client, why = self._target()
        if client is not None:
            client.trainer_step_now(500)
            if client.control is not True:
                run_id, why = None, ("its trainer does not take control (lenet-train --allow-control)"
                                     if client.control is False else f"its trainer does not answer ({client.status})")
        status = {"available": run_id is not None, "run_id": run_id, "reason": why, "last": self.last}
        if status != self._sent:
            self._sent = status
            self.live.dashboard.control_status(status)

    def _send(self, req):
        run_id, client, why = self._target()
        last = {"id": req.get("id"), "action": req.get("action"), "value": req.get("value"), "time": time.time()}
        if client is None:
            last.update(state="refused", why=why)
        else:
            try:
                signed = self.signer.sign(req.get("action"), req.get("value"), run_id, source="page")
                queued = client.send_control(signed)
                last.update(state="queued" if queued else "no answer",
                            why=None if queued else f"the trainer did not answer ({client.status})")
            except (ValueError, wire.BadMessage) as e:
                last.update(state="refused", why=str(e))
        log.info("control from the page (%s): %s %s -> %s%s", req.get("who"), last["action"],
                 "" if last["value"] is None else last["value"], last["state"],
                 f": {last['why']}" if last["why"] else "")
        self.last = last
